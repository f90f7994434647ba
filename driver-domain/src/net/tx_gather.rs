//! Gathering a batch of transmit chains before any frame is copied.
//!
//! The TX queue first walks every chain of a batch: each descriptor is checked (device-readable,
//! inside guest memory, in one mapped region) and translated to a host address once, and the
//! first bytes of each frame are prefetched. Only then are the frames copied out, one after
//! another. The frames were written by the driver on another CPU, so their first read misses
//! the cache; gathering first lets those misses overlap instead of serialising one frame's
//! descriptor read, translation and copy behind the previous frame's.
//!
//! The host addresses stay valid while the memory snapshot the batch was gathered from is
//! borrowed: a [`TxGather`] is filled and drained within one pass over the ring, and cleared
//! before the next one.

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions,
};

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};

use super::header::HeaderError;
use super::queue::FrameError;
use super::ring::host_range;

/// Non-empty descriptors one transmit chain may have (as QEMU's `VIRTQUEUE_MAX_SIZE`; Linux
/// sends at most `MAX_SKB_FRAGS` + 2). A chain with more is refused.
pub const MAX_CHAIN_SEGMENTS: usize = 1024;
/// Segments one batch gathers before it stops taking chains (the last chain may add up to
/// [`MAX_CHAIN_SEGMENTS`] more).
const MAX_BATCH_SEGMENTS: usize = 4096;

/// One gathered chain.
#[derive(Debug)]
pub struct GatheredChain {
    /// The chain's head index (for the used ring).
    pub head: u16,
    /// `[start, end)` of its segments in the batch, or why it cannot be sent.
    segments: Result<(usize, usize), FrameError>,
    /// Bytes in the chain (header included), or so far when it was found too long.
    total: usize,
}

/// A batch of gathered transmit chains.
#[derive(Debug, Default)]
pub struct TxGather {
    /// Host address and length of every non-empty descriptor of the batch.
    segments: Vec<(usize, usize)>,
    chains: Vec<GatheredChain>,
    /// The region the last descriptor was found in: guest start, length, host address.
    region: Option<(u64, u64, usize)>,
    /// The batch's descriptor table: guest address, entries, host address if in one region.
    table: (u64, u16, Option<usize>),
    /// The batch's available ring: guest address, host address if in one region.
    avail: (u64, Option<usize>),
}

/// `VIRTQ_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
const DESC_F_INDIRECT: u16 = 4;

/// One split-ring descriptor.
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Descriptor `index` of the table at `table` (host address `host` when it lies in one
/// region); `None` if it is outside guest memory.
fn read_descriptor<M: GuestMemory>(
    mem: &M,
    table: u64,
    host: Option<usize>,
    index: u16,
) -> Option<Descriptor> {
    let off = 16 * usize::from(index);
    let raw: [u8; 16] = match host {
        // SAFETY: the table's `16 * entries` bytes lie in one region of `mem` (`host_range`),
        // borrowed for the batch, and `index` < entries (checked by the caller). The driver
        // may write the entry meanwhile: every field read is validated before use.
        Some(h) => unsafe { std::ptr::read_volatile((h + off) as *const [u8; 16]) },
        None => mem
            .read_obj(GuestAddress(table.checked_add(off as u64)?))
            .ok()?,
    };
    let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
    Some(Descriptor {
        addr: u64::from_le_bytes(raw[0..8].try_into().ok()?),
        len: u32::from_le_bytes(raw[8..12].try_into().ok()?),
        flags: u16_at(12),
        next: u16_at(14),
    })
}

/// Hint the CPU to fetch the cache line at `addr`.
#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever the
    // address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Push the host addresses of `len` bytes of guest memory at `addr` to `out`, one per region
/// they span, through the memory's own translation; false if any byte is not in memory.
fn push_translated<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<(usize, usize)>,
) -> bool {
    let Ok(slices) = mem.get_slices(addr, len, Permissions::Read) else {
        return false;
    };
    let mut got = 0;
    for slice in slices {
        let Ok(slice) = slice else { return false };
        out.push((slice.ptr_guard().as_ptr() as usize, slice.len()));
        got += slice.len();
    }
    got == len
}

/// Guest start, length and host address of the region holding `addr` (plain memory only).
fn region_of<M: GuestMemory>(mem: &M, addr: GuestAddress) -> Option<(u64, u64, usize)> {
    let r = mem.physical_memory()?.find_region(addr)?;
    let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
    Some((r.start_addr().raw_value(), r.len(), host as usize))
}

impl TxGather {
    /// Chains gathered.
    pub fn count(&self) -> usize {
        self.chains.len()
    }

    /// Whether the batch holds as many segments as it should before it is drained.
    pub fn full(&self) -> bool {
        self.segments.len() >= MAX_BATCH_SEGMENTS
    }

    /// Forget the batch (its host addresses must not outlive the memory snapshot).
    pub fn clear(&mut self) {
        self.segments.clear();
        self.chains.clear();
        self.region = None;
    }

    /// The host address of `len` (> 0) bytes at `addr` if they lie in one region of plain
    /// memory; the last region found is tried first (a driver's buffers usually share one).
    fn host_address<M: GuestMemory>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
    ) -> Option<usize> {
        let a = addr.raw_value();
        let within = |(start, size, host): (u64, u64, usize)| {
            let off = a.checked_sub(start)?;
            let end = off.checked_add(len as u64)?;
            (end <= size).then(|| host + off as usize)
        };
        if let Some(h) = self.region.and_then(within) {
            return Some(h);
        }
        let r = region_of(mem, addr)?;
        self.region = Some(r);
        within(r)
    }

    /// The gathered chain `i`.
    pub fn chain(&self, i: usize) -> &GatheredChain {
        &self.chains[i]
    }

    /// Start a batch on `queue`'s rings: the descriptor table is translated once.
    pub fn begin<M: GuestMemory>(&mut self, queue: &Queue, mem: &M) {
        self.clear();
        let size = queue.size();
        self.table = (
            queue.desc_table(),
            size,
            host_range(mem, queue.desc_table(), 16 * usize::from(size)),
        );
        let avail = queue.avail_ring();
        self.avail = (avail, host_range(mem, avail, 4 + 2 * usize::from(size)));
    }

    /// The head index in slot `slot` (taken modulo the size) of the batch's available ring.
    pub fn avail_entry<M: GuestMemory>(
        &self,
        mem: &M,
        slot: u16,
    ) -> Result<u16, virtio_queue::Error> {
        let size = self.table.1.max(1);
        let off = 4 + 2 * usize::from(slot % size);
        let raw: u16 = match self.avail.1 {
            // SAFETY: the ring's `4 + 2 * size` bytes lie in one region of `mem`
            // (`host_range`), borrowed for the batch; `off + 2` is within them. The entry is
            // read after the index (acquire) that published it.
            Some(h) => {
                u16::from_le_bytes(unsafe { std::ptr::read_volatile((h + off) as *const [u8; 2]) })
            }
            None => {
                let at = GuestAddress(self.avail.0)
                    .checked_add(off as u64)
                    .ok_or(virtio_queue::Error::AddressOverflow)?;
                u16::from_le(
                    mem.load(at, Ordering::Acquire)
                        .map_err(virtio_queue::Error::GuestMemory)?,
                )
            }
        };
        Ok(raw)
    }

    /// Walk the chain at `head` of the batch's descriptor table (as virtio-queue's
    /// `DescriptorChain` does: at most the table's size of descriptors, one level of indirect
    /// table, a malformed link ends the chain), translating each descriptor once and
    /// prefetching the frame's start. A chain of more than `limit` bytes is recorded as
    /// oversized without its segments.
    pub fn push<M: GuestMemory>(&mut self, head: u16, mem: &M, limit: usize) {
        let start = self.segments.len();
        let mut total = 0usize;
        let mut result = Ok(());
        let (mut table, mut table_size, mut table_host) = self.table;
        let (mut next, mut ttl, mut indirect, mut yielded) = (head, table_size, false, 0u32);
        while ttl > 0 && next < table_size {
            let Some(desc) = read_descriptor(mem, table, table_host, next) else {
                break;
            };
            if desc.flags & DESC_F_INDIRECT != 0 {
                if indirect || desc.len % 16 != 0 || desc.len / 16 > u32::from(u16::MAX) {
                    break;
                }
                table = desc.addr;
                table_size = (desc.len / 16) as u16;
                table_host = host_range(mem, desc.addr, desc.len as usize);
                (next, ttl, indirect) = (0, table_size, true);
                continue;
            }
            let Some(y) = yielded.checked_add(desc.len) else {
                break;
            };
            yielded = y;
            if desc.flags & DESC_F_NEXT != 0 {
                next = desc.next;
                ttl -= 1;
            } else {
                ttl = 0;
            }
            if desc.flags & DESC_F_WRITE != 0 {
                result = Err(FrameError::WriteOnly);
                break;
            }
            let len = desc.len as usize;
            if len == 0 {
                continue;
            }
            total = total.saturating_add(len);
            if total > limit {
                result = Err(FrameError::Header(HeaderError::Oversized(total)));
                break;
            }
            if self.segments.len() - start == MAX_CHAIN_SEGMENTS {
                result = Err(FrameError::Descriptors(MAX_CHAIN_SEGMENTS));
                break;
            }
            let first = start == self.segments.len();
            let addr = GuestAddress(desc.addr);
            match self.host_address(mem, addr, len) {
                Some(host) => self.segments.push((host, len)),
                // Spanning regions, or memory behind an IOMMU.
                None if push_translated(mem, addr, len, &mut self.segments) => {}
                None => {
                    result = Err(FrameError::Memory(desc.addr, desc.len));
                    break;
                }
            }
            if first {
                let host = self.segments[start].0;
                prefetch(host);
                if len > 64 {
                    prefetch(host + 64);
                }
            }
        }
        let segments = match result {
            Ok(()) => Ok((start, self.segments.len())),
            Err(e) => {
                self.segments.truncate(start);
                Err(e)
            }
        };
        self.chains.push(GatheredChain {
            head,
            segments,
            total,
        });
    }

    /// Copy gathered chain `i` into `area`; returns its length. A chain longer than `area`
    /// is [`HeaderError::Oversized`] with its length (the caller may retry with a larger
    /// area).
    pub fn copy_chain(&self, i: usize, area: &mut [u8]) -> Result<usize, FrameError> {
        let c = &self.chains[i];
        let (start, end) = c.segments?;
        if c.total > area.len() {
            return Err(FrameError::Header(HeaderError::Oversized(c.total)));
        }
        let mut off = 0usize;
        for &(host, len) in &self.segments[start..end] {
            let dst = &mut area[off..off + len];
            // SAFETY: `host` is the start of `len` bytes of one mapped region of the memory
            // snapshot this batch was gathered from (`host_address`), which the caller still
            // borrows (the batch is cleared before the pass over the ring ends); `dst` is a
            // distinct host buffer of `len` bytes. The driver may write the bytes meanwhile:
            // the copy is then torn, as any read of shared memory, and validated afterwards.
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, dst.as_mut_ptr(), len) };
            off += len;
        }
        Ok(off)
    }
}
