//! Split virtqueue, driver side (virtio 1.2, section 2.7).
//!
//! The driver owns three areas in DMA memory: the descriptor table, the available ring (driver ->
//! device) and the used ring (device -> driver). The device may write *any* of them at any time
//! (they are shared memory), so the driver keeps everything it relies on -- the free list, chain
//! lengths, which heads are in flight -- in private state and never reads descriptors back.
//! Everything read from the used ring is validated; a bad value breaks this queue (all further
//! calls fail) and never corrupts driver state.
//!
//! # Notification suppression and the fences
//!
//! Kicks (driver -> device) with `VIRTIO_F_EVENT_IDX`: the device publishes `avail_event`, the avail
//! index it wants to be kicked for, and the driver kicks iff that index lies in the range it just
//! published: `vring_need_event(avail_event, new, old)`. Device and driver race:
//!
//! ```text
//!   driver (publish)                       device (going idle)
//!   D1 store avail.idx = new               V1 store avail_event = last_avail
//!   D2 fence(SeqCst)                       V2 fence(SeqCst)
//!   D3 load avail_event                    V3 load avail.idx; sleep only if == last_avail
//! ```
//!
//! Without D2, D3 may be satisfied before D1 is visible (store->load reordering, allowed even on
//! x86). Then the driver can read a stale `avail_event` (no kick) while the device reads a stale
//! `avail.idx` (nothing to do) and sleeps: the request is published, nobody is woken, and it
//! never completes -- a lost kick. With both full fences, the two stores and the two loads are
//! totally ordered, so at least one side sees the other's store: either the driver sees the new
//! `avail_event` and kicks, or the device sees the new `avail.idx` and processes it. A release
//! store alone is not enough: it orders earlier accesses before D1 but not D1 before D3.
//!
//! The same argument, mirrored, covers interrupts: [`SplitQueue::enable_interrupts`] stores
//! `used_event`, fences, and re-reads `used.idx`; the device stores `used.idx`, fences and reads
//! `used_event`. Without `EVENT_IDX` the flags fields (`VRING_USED_F_NO_NOTIFY`,
//! `VRING_AVAIL_F_NO_INTERRUPT`) play the same role with the same fences.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicU16, Ordering};

use super::memory::{DmaBuf, DmaMemory, FrontMemoryError};

/// Largest queue size this driver supports (private state is sized statically: no allocator).
pub const MAX_QUEUE_SIZE: u16 = 1024;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Device -> driver: "don't kick me" (used ring flags; without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Driver -> device: "don't interrupt me" (avail ring flags; without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The virtio event-index test: should a notification be sent for the entries `old..new`, given
/// that the other side asked to be notified when index `event` is crossed?
#[inline]
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Errors of the split virtqueue driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontQueueError {
    /// Queue size is not a power of two in 1..=MAX_QUEUE_SIZE.
    BadSize(u16),
    /// A ring address is misaligned or outside DMA memory.
    BadLayout,
    /// A chain needs more descriptors than are free.
    Full,
    /// A chain with no buffers, or with more than the queue size.
    BadChain,
    /// The device returned a used id that is not a descriptor index.
    UsedIdOutOfRange {
        /// The id the device wrote.
        id: u32,
    },
    /// The device returned a used id that is not the head of an in-flight chain.
    UsedIdNotInFlight {
        /// The id the device wrote.
        id: u32,
    },
    /// The device's used index claims more completions than there are requests in flight.
    UsedIndexRunaway {
        /// The used index the device wrote.
        used_idx: u16,
        /// The driver's last seen used index.
        last_used: u16,
    },
    /// The queue was broken by an earlier device error.
    Broken,
    /// DMA memory error.
    Memory(FrontMemoryError),
}

impl fmt::Display for FrontQueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadSize(n) => write!(
                f,
                "queue size {n} is not a power of two <= {MAX_QUEUE_SIZE}"
            ),
            Self::BadLayout => write!(f, "ring address misaligned or outside DMA memory"),
            Self::Full => write!(f, "not enough free descriptors"),
            Self::BadChain => write!(f, "descriptor chain is empty or longer than the queue"),
            Self::UsedIdOutOfRange { id } => write!(f, "device used id {id} is out of range"),
            Self::UsedIdNotInFlight { id } => write!(f, "device used id {id} is not in flight"),
            Self::UsedIndexRunaway {
                used_idx,
                last_used,
            } => write!(
                f,
                "device used index {used_idx} runs ahead of requests in flight (last {last_used})"
            ),
            Self::Broken => write!(f, "queue is broken by an earlier device error"),
            Self::Memory(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for FrontQueueError {}

impl From<FrontMemoryError> for FrontQueueError {
    fn from(e: FrontMemoryError) -> Self {
        Self::Memory(e)
    }
}

/// Device addresses of the three ring areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueAddrs {
    /// Descriptor table (16-byte aligned).
    pub desc: u64,
    /// Available ring (2-byte aligned).
    pub avail: u64,
    /// Used ring (4-byte aligned).
    pub used: u64,
}

impl QueueAddrs {
    /// Bytes of the descriptor table for `size` entries.
    pub const fn desc_bytes(size: u16) -> usize {
        16 * size as usize
    }
    /// Bytes of the available ring including `used_event`.
    pub const fn avail_bytes(size: u16) -> usize {
        6 + 2 * size as usize
    }
    /// Bytes of the used ring including `avail_event`.
    pub const fn used_bytes(size: u16) -> usize {
        6 + 8 * size as usize
    }
}

/// A completed chain as returned by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the chain (the value `add` returned).
    pub head: u16,
    /// Bytes the device says it wrote into the writable buffers (untrusted).
    pub len: u32,
}

/// Outcome of publishing new available entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// The device must be kicked.
    Kick,
    /// The device asked not to be kicked for these entries.
    Suppressed,
    /// Nothing new was published.
    Nothing,
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Publishes that required a kick.
    pub kicks_sent: u64,
    /// Publishes for which the device suppressed the kick.
    pub kicks_suppressed: u64,
    /// Interrupts (notifications) the transport reported consumed.
    pub interrupts: u64,
    /// Chains the device completed.
    pub completed: u64,
}

/// Split virtqueue driver.
pub struct SplitQueue {
    size: u16,
    event_idx: bool,
    addrs: QueueAddrs,
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    /// Private free-list links and chain links (never read back from shared memory).
    next: [u16; MAX_QUEUE_SIZE as usize],
    /// Number of descriptors in the chain headed here; 0 if this is not an in-flight head.
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
    /// The avail index each in-flight head was added at: their order, for a restart.
    added_at: [u16; MAX_QUEUE_SIZE as usize],
    free_head: u16,
    num_free: u16,
    in_flight: u16,
    avail_idx: u16,
    published_idx: u16,
    last_used: u16,
    used_event_shadow: u16,
    interrupts_enabled: bool,
    broken: bool,
    stats: QueueStats,
}

impl fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitQueue")
            .field("size", &self.size)
            .field("addrs", &self.addrs)
            .field("event_idx", &self.event_idx)
            .field("in_flight", &self.in_flight)
            .field("broken", &self.broken)
            .finish()
    }
}

// SAFETY: the raw pointers point into DMA memory that the constructor's contract keeps alive for
// the queue's lifetime; the queue is the only driver-side user of these rings, and all accesses
// to them are volatile/atomic, so moving the queue to another thread is sound.
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Creates a driver for a queue of `size` entries whose rings are at `addrs` in `mem`, and
    /// initialises the rings (zeroed descriptor table, empty avail ring, empty used ring).
    ///
    /// # Safety
    ///
    /// The memory behind `addrs` must stay mapped for as long as the queue lives and must not be
    /// used by anyone else except the device this queue drives.
    pub unsafe fn new(
        mem: &impl DmaMemory,
        addrs: QueueAddrs,
        size: u16,
        event_idx: bool,
    ) -> Result<Self, FrontQueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(FrontQueueError::BadSize(size));
        }
        if !addrs.desc.is_multiple_of(16)
            || !addrs.avail.is_multiple_of(2)
            || !addrs.used.is_multiple_of(4)
        {
            return Err(FrontQueueError::BadLayout);
        }
        let desc = mem
            .translate(addrs.desc, QueueAddrs::desc_bytes(size))
            .ok_or(FrontQueueError::BadLayout)?;
        let avail = mem
            .translate(addrs.avail, QueueAddrs::avail_bytes(size))
            .ok_or(FrontQueueError::BadLayout)?;
        let used = mem
            .translate(addrs.used, QueueAddrs::used_bytes(size))
            .ok_or(FrontQueueError::BadLayout)?;
        // SAFETY: the three ranges were just checked to be inside `mem`, which the caller keeps
        // alive; the device is not running on this queue yet, so plain zeroing is race-free.
        unsafe {
            core::ptr::write_bytes(desc.as_ptr(), 0, QueueAddrs::desc_bytes(size));
            core::ptr::write_bytes(avail.as_ptr(), 0, QueueAddrs::avail_bytes(size));
            core::ptr::write_bytes(used.as_ptr(), 0, QueueAddrs::used_bytes(size));
        }
        let mut next = [0u16; MAX_QUEUE_SIZE as usize];
        for (i, n) in next.iter_mut().enumerate().take(size as usize) {
            *n = (i as u16).wrapping_add(1);
        }
        Ok(Self {
            size,
            event_idx,
            addrs,
            desc,
            avail,
            used,
            next,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
            added_at: [0; MAX_QUEUE_SIZE as usize],
            free_head: 0,
            num_free: size,
            in_flight: 0,
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
            used_event_shadow: 0,
            interrupts_enabled: true,
            broken: false,
            stats: QueueStats::default(),
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Ring addresses (device-visible).
    pub fn addrs(&self) -> QueueAddrs {
        self.addrs
    }
    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }
    /// Chains added and not yet returned by the device.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }
    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    /// The driver's next avail index (what the device will see after the next publish).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
    /// The head index the next [`SplitQueue::add`] will return (meaningful while
    /// `num_free() > 0`): lets a driver place per-request metadata indexed by head.
    pub fn next_head(&self) -> u16 {
        self.free_head
    }
    /// Records that the transport consumed one interrupt (notification) for this queue.
    pub fn note_interrupt(&mut self) {
        self.stats.interrupts += 1;
    }

    fn atomic_u16(&self, base: NonNull<u8>, offset: usize) -> &AtomicU16 {
        // SAFETY: every caller passes a ring base from `new` and an offset inside that ring
        // area (validated in `new`), 2-byte aligned (ring bases are aligned, offsets are even).
        // `AtomicU16` has the size and alignment of u16; the memory outlives `self`
        // (constructor contract) and is only ever accessed atomically or volatilely.
        unsafe { &*(base.as_ptr().add(offset) as *const AtomicU16) }
    }

    fn avail_idx_ref(&self) -> &AtomicU16 {
        self.atomic_u16(self.avail, 2)
    }
    fn avail_flags_ref(&self) -> &AtomicU16 {
        self.atomic_u16(self.avail, 0)
    }
    fn used_event_ref(&self) -> &AtomicU16 {
        self.atomic_u16(self.avail, 4 + 2 * self.size as usize)
    }
    fn used_flags_ref(&self) -> &AtomicU16 {
        self.atomic_u16(self.used, 0)
    }
    fn used_idx_ref(&self) -> &AtomicU16 {
        self.atomic_u16(self.used, 2)
    }
    fn avail_event_ref(&self) -> &AtomicU16 {
        self.atomic_u16(self.used, 4 + 8 * self.size as usize)
    }

    fn write_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        // SAFETY: idx < size (it comes from the private free list), so the 16 bytes are inside
        // the descriptor table validated in `new`; 16-byte alignment is checked there.
        unsafe {
            core::ptr::write_volatile(
                self.desc.as_ptr().add(16 * idx as usize) as *mut [u8; 16],
                raw,
            )
        };
    }

    /// Adds a chain: `readable` buffers (device reads) followed by `writable` buffers (device
    /// writes). Returns the head index, which identifies the chain in [`UsedElem::head`]. The
    /// entry is not visible to the device until [`SplitQueue::publish`].
    pub fn add(
        &mut self,
        readable: &[DmaBuf],
        writable: &[DmaBuf],
    ) -> Result<u16, FrontQueueError> {
        if self.broken {
            return Err(FrontQueueError::Broken);
        }
        let n = readable.len() + writable.len();
        if n == 0 || n > self.size as usize {
            return Err(FrontQueueError::BadChain);
        }
        if n > self.num_free as usize {
            return Err(FrontQueueError::Full);
        }
        let head = self.free_head;
        let mut cur = head;
        let bufs = readable
            .iter()
            .map(|b| (b, 0))
            .chain(writable.iter().map(|b| (b, VIRTQ_DESC_F_WRITE)));
        for (i, (buf, write_flag)) in bufs.enumerate() {
            let last = i + 1 == n;
            let link = self.next[cur as usize];
            let (flags, next) = if last {
                (write_flag, 0)
            } else {
                (write_flag | VIRTQ_DESC_F_NEXT, link)
            };
            self.write_desc(cur, buf.addr, buf.len, flags, next);
            if !last {
                cur = link;
            }
        }
        // `cur` is the tail; the free list continues after it.
        self.free_head = self.next[cur as usize];
        self.num_free -= n as u16;
        self.chain_len[head as usize] = n as u16;
        self.added_at[head as usize] = self.avail_idx;
        self.in_flight += 1;
        let slot = (self.avail_idx & (self.size - 1)) as usize;
        // SAFETY: slot < size, so the entry is inside the avail ring validated in `new`.
        unsafe {
            core::ptr::write_volatile(
                self.avail.as_ptr().add(4 + 2 * slot) as *mut u16,
                head.to_le(),
            )
        };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head)
    }

    /// Makes every chain added since the last publish visible to the device and decides whether
    /// the device must be kicked (the caller sends the kick; see the module docs for the fence).
    pub fn publish(&mut self) -> Notify {
        let new = self.avail_idx;
        let old = self.published_idx;
        if new == old {
            return Notify::Nothing;
        }
        // Release: descriptor and avail-ring writes above become visible no later than the index.
        self.avail_idx_ref().store(new, Ordering::Release);
        self.published_idx = new;
        // Full fence between the avail.idx store and the avail_event / flags load (D2 above).
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = self.avail_event_ref().load(Ordering::Relaxed);
            vring_need_event(event, new, old)
        } else {
            self.used_flags_ref().load(Ordering::Relaxed) & VRING_USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.stats.kicks_sent += 1;
            Notify::Kick
        } else {
            self.stats.kicks_suppressed += 1;
            Notify::Suppressed
        }
    }

    /// True if the device has returned chains not yet reaped.
    pub fn has_used(&self) -> bool {
        self.used_idx_ref().load(Ordering::Acquire) != self.last_used
    }

    /// Reaps one completed chain, if any. A used element that does not name an in-flight head,
    /// or a used index that runs ahead of the requests in flight, breaks the queue.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, FrontQueueError> {
        if self.broken {
            return Err(FrontQueueError::Broken);
        }
        // Acquire: the element contents are read only after the index that published them.
        let used_idx = self.used_idx_ref().load(Ordering::Acquire);
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.in_flight {
            self.broken = true;
            return Err(FrontQueueError::UsedIndexRunaway {
                used_idx,
                last_used: self.last_used,
            });
        }
        let slot = (self.last_used & (self.size - 1)) as usize;
        // SAFETY: slot < size, so the 8-byte element is inside the used ring (4-byte aligned).
        let raw = unsafe {
            core::ptr::read_volatile(self.used.as_ptr().add(4 + 8 * slot) as *const [u8; 8])
        };
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        if id >= u32::from(self.size) {
            self.broken = true;
            return Err(FrontQueueError::UsedIdOutOfRange { id });
        }
        let head = id as u16;
        let n = self.chain_len[head as usize];
        if n == 0 {
            self.broken = true;
            return Err(FrontQueueError::UsedIdNotInFlight { id });
        }
        // Return the chain to the free list using the private links.
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[tail as usize];
        }
        self.next[tail as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.chain_len[head as usize] = 0;
        self.in_flight -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        self.stats.completed += 1;
        if !self.interrupts_enabled && self.event_idx {
            self.park_used_event();
        }
        Ok(Some(UsedElem { head, len }))
    }

    /// Starts the rings over for a new device session (a restarted backend told to begin at
    /// avail index 0), keeping every chain in flight: the avail and used rings are cleared and
    /// the in-flight heads re-posted from index 0 in the order they were first added (so a
    /// write is never overtaken by an older one to the same place). Their descriptors are
    /// untouched. Returns how many were re-posted; [`SplitQueue::publish`] then makes them
    /// visible. A broken queue (the old device misbehaved) starts over too.
    pub fn restart(&mut self) -> u16 {
        let mut heads: [u16; MAX_QUEUE_SIZE as usize] = [0; MAX_QUEUE_SIZE as usize];
        let mut n = 0usize;
        for head in 0..self.size {
            if self.chain_len[head as usize] != 0 {
                heads[n] = head;
                n += 1;
            }
        }
        // Oldest first: the furthest behind the current avail index.
        let avail_idx = self.avail_idx;
        let added_at = self.added_at;
        heads[..n].sort_unstable_by_key(|h| {
            core::cmp::Reverse(avail_idx.wrapping_sub(added_at[*h as usize]))
        });
        // SAFETY: both ranges were validated in `new`; a new session has not started on them
        // yet (the caller restarts before the device is told the ring), so plain writes are
        // race-free.
        unsafe {
            core::ptr::write_bytes(self.avail.as_ptr(), 0, QueueAddrs::avail_bytes(self.size));
            core::ptr::write_bytes(self.used.as_ptr(), 0, QueueAddrs::used_bytes(self.size));
        }
        self.avail_idx = 0;
        self.published_idx = 0;
        self.last_used = 0;
        self.used_event_shadow = 0;
        self.broken = false;
        for (i, head) in heads[..n].iter().enumerate() {
            // SAFETY: i < n <= size, so the entry is inside the avail ring.
            unsafe {
                core::ptr::write_volatile(
                    self.avail.as_ptr().add(4 + 2 * i) as *mut u16,
                    head.to_le(),
                )
            };
            self.added_at[*head as usize] = self.avail_idx;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        if self.interrupts_enabled {
            self.enable_interrupts();
        } else {
            self.disable_interrupts();
        }
        n as u16
    }

    /// Busy-polls for up to `spins` iterations for a completion.
    pub fn poll_used(&mut self, spins: u32) -> Result<Option<UsedElem>, FrontQueueError> {
        for _ in 0..spins {
            if let Some(e) = self.pop_used()? {
                return Ok(Some(e));
            }
            core::hint::spin_loop();
        }
        self.pop_used()
    }

    fn store_used_event(&mut self, value: u16) {
        self.used_event_ref().store(value, Ordering::Relaxed);
        self.used_event_shadow = value;
    }

    /// Keeps `used_event` just behind the driver so that a device honouring EVENT_IDX never
    /// finds it inside a range it publishes (rewritten only when it gets stale, to keep the
    /// cache line quiet while polling).
    fn park_used_event(&mut self) {
        let behind = self.last_used.wrapping_sub(1);
        if behind.wrapping_sub(self.used_event_shadow) > 0x4000 {
            self.store_used_event(behind);
        }
    }

    /// Asks the device not to send used-buffer notifications (for busy-polling drivers).
    pub fn disable_interrupts(&mut self) {
        self.interrupts_enabled = false;
        self.avail_flags_ref()
            .store(VRING_AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        if self.event_idx {
            self.store_used_event(self.last_used.wrapping_sub(1));
        }
    }

    /// Asks the device to notify on the next completion. Returns true if completions are
    /// already pending: the caller must reap them instead of sleeping (the re-check after the
    /// fence closes the race with a device that completed just before the request took effect).
    pub fn enable_interrupts(&mut self) -> bool {
        self.interrupts_enabled = true;
        self.avail_flags_ref().store(0, Ordering::Relaxed);
        if self.event_idx {
            self.store_used_event(self.last_used);
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Completes `head` as a device would: used element at the device's used index.
    fn device_completes(q: &SplitQueue, used_idx: &mut u16, head: u16) {
        let slot = (*used_idx & (q.size - 1)) as usize;
        // SAFETY: the slot is inside the used ring of the test's buffer.
        unsafe {
            core::ptr::write_volatile(
                q.used.as_ptr().add(4 + 8 * slot) as *mut [u8; 8],
                [head as u8, (head >> 8) as u8, 0, 0, 0, 0, 0, 0],
            )
        };
        *used_idx = used_idx.wrapping_add(1);
        q.used_idx_ref().store(*used_idx, Ordering::Release);
    }

    fn avail_entry(q: &SplitQueue, i: usize) -> u16 {
        // SAFETY: the entry is inside the avail ring of the test's buffer.
        unsafe { core::ptr::read_volatile(q.avail.as_ptr().add(4 + 2 * i) as *const u16) }
    }

    #[test]
    fn a_restart_reposts_exactly_the_chains_in_flight_oldest_first() {
        use crate::virtio::DmaRegion;
        let mut buf = vec![0u8; 0x4000];
        // SAFETY: `buf` outlives the region and the queue; nobody else touches it.
        let mem = unsafe { DmaRegion::new(buf.as_mut_ptr(), 0x10_0000, buf.len()) }.unwrap();
        let addrs = QueueAddrs {
            desc: 0x10_0000,
            avail: 0x10_1000,
            used: 0x10_2000,
        };
        // SAFETY: the rings are inside `buf`, used by this queue only.
        let mut q = unsafe { SplitQueue::new(&mem, addrs, 8, true) }.unwrap();
        let buf_at = |i: u64| DmaBuf {
            addr: 0x10_3000 + 16 * i,
            len: 16,
        };
        let heads: Vec<u16> = (0..5).map(|i| q.add(&[buf_at(i)], &[]).unwrap()).collect();
        q.publish();
        // The old device completes the second and the fourth, out of order, then dies.
        let mut used_idx = 0;
        device_completes(&q, &mut used_idx, heads[3]);
        device_completes(&q, &mut used_idx, heads[1]);
        assert_eq!(q.pop_used().unwrap().unwrap().head, heads[3]);
        assert_eq!(q.pop_used().unwrap().unwrap().head, heads[1]);
        assert_eq!(q.in_flight(), 3);

        assert_eq!(q.restart(), 3);
        assert_eq!(q.avail_idx(), 3);
        assert_eq!(q.used_idx_ref().load(Ordering::Acquire), 0);
        // In the order they were first added.
        let reposted: Vec<u16> = (0..3).map(|i| avail_entry(&q, i)).collect();
        assert_eq!(reposted, vec![heads[0], heads[2], heads[4]]);
        assert!(matches!(q.publish(), Notify::Kick | Notify::Suppressed));
        assert_eq!(q.avail_idx_ref().load(Ordering::Acquire), 3);
        // The new device starts at index 0 and completes them; nothing else is in flight.
        let mut used_idx = 0;
        for h in &reposted {
            device_completes(&q, &mut used_idx, *h);
        }
        for h in &reposted {
            assert_eq!(q.pop_used().unwrap().unwrap().head, *h);
        }
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.num_free(), 8);
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Published old..new = 10..13: notify iff the event index is 10, 11 or 12.
        assert!(!vring_need_event(9, 13, 10));
        assert!(vring_need_event(10, 13, 10));
        assert!(vring_need_event(12, 13, 10));
        assert!(!vring_need_event(13, 13, 10));
        // Across the 16-bit wrap.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(1, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
        // Nothing published: never.
        assert!(!vring_need_event(5, 5, 5));
    }
}
