//! The in-flight log: which fetched requests have not completed yet.
//!
//! A memfd-backed region in the vhost-user "Inflight I/O tracking" layout for split queues,
//! handed to a vhost-user frontend through GET_INFLIGHT_FD, so that a restarted backend can
//! find and resubmit the requests that were in flight when it died. A log handed back
//! (SET_INFLIGHT_FD) is taken over with [`InflightLog::adopt`] and [`InflightQueue::recover`]
//! says what to resubmit (the request handler is [`crate::vhost_user::handler`]; the
//! resubmission [`crate::blk::queue::BlkBackendQueue::resume`]). Per queue:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! Each queue region is rounded up to 64 bytes. A head is marked in flight, with a counter that
//! keeps fetch order, right after it is popped from the avail ring, and cleared after its used
//! element is published (then `used_idx` is updated), following the order the vhost-user
//! specification gives for split rings.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::virtio_core::memory::{check_region_file, PeerMemoryError};
use crate::virtio_core::SealPolicy;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use thiserror::Error;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Layout version written into each queue header.
pub const INFLIGHT_VERSION: u16 = 1;
const QUEUE_HEADER_LEN: u64 = 16;
const DESC_STATE_LEN: u64 = 16;

/// Errors of the in-flight log.
#[derive(Debug, Error)]
pub enum InflightError {
    /// memfd_create / ftruncate failed.
    #[error("cannot create the in-flight memfd: {0}")]
    Create(#[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("cannot map the in-flight memfd: {0}")]
    Map(String),
    /// A region handed back by a frontend does not have the layout asked for.
    #[error("the in-flight region handed back does not fit: {0}")]
    Layout(String),
    /// A region handed back by a frontend could shrink under the backend.
    #[error("the in-flight region handed back")]
    Unsealed(#[source] PeerMemoryError),
    /// A head index does not fit the queue.
    #[error("descriptor index {0} is past the queue size {1}")]
    BadIndex(u16, u16),
    /// The log's memory could not be accessed.
    #[error("in-flight log access failed: {0}")]
    Access(#[from] vm_memory::GuestMemoryError),
}

/// Bytes one queue takes in the log.
pub fn queue_region_len(queue_size: u16) -> u64 {
    let raw = QUEUE_HEADER_LEN + DESC_STATE_LEN * u64::from(queue_size);
    raw.div_ceil(64) * 64
}

/// The whole log: one region per queue in one memfd.
pub struct InflightLog {
    file: File,
    mem: Arc<GuestMemoryMmap>,
    queue_size: u16,
    num_queues: u16,
}

impl std::fmt::Debug for InflightLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightLog")
            .field("queue_size", &self.queue_size)
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

impl InflightLog {
    /// Create a zeroed log for `num_queues` queues of `queue_size` entries.
    pub fn new(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let len = queue_region_len(queue_size) * u64::from(num_queues.max(1));
        // Sealable: a frontend hands the log back after a restart, and the backend that takes
        // it over seals it against shrinking first (see `adopt`).
        let fd = memfd_create(
            c"splitvmm-blk-inflight",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(|e| InflightError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(len).map_err(InflightError::Create)?;
        let log = Self::map(file, 0, len, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = GuestAddress(queue_region_len(queue_size) * u64::from(q));
            log.mem.write_obj(INFLIGHT_VERSION, base.unchecked_add(8))?;
            log.mem.write_obj(queue_size, base.unchecked_add(10))?;
        }
        Ok(log)
    }

    /// Takes over a log handed back by a frontend (SET_INFLIGHT_FD, after a backend restart)
    /// for `num_queues` queues of `queue_size` entries. The frontend is not trusted: the file
    /// must be at least that large and, under `policy`, sealed against shrinking (as guest
    /// memory is: a log it could truncate would fault the backend), and each queue header
    /// must say version 1 and `queue_size` entries, or the log is refused (and with it the
    /// session, not the backend). A queue whose header is all zero is a fresh log (the one a
    /// driver VM's dom0 makes, docs/protocol.md): it is cleared and given its header, as
    /// libvhost-user's `vu_check_queue_inflights` does. The log starts `offset` bytes into
    /// `file` (a page multiple; BAR2 of the cross-VM device holds it at any such offset).
    pub fn adopt(
        file: File,
        offset: u64,
        (num_queues, queue_size): (u16, u16),
        policy: SealPolicy,
    ) -> Result<Self, InflightError> {
        let len = queue_region_len(queue_size) * u64::from(num_queues.max(1));
        let actual = file.metadata().map_err(InflightError::Create)?.len();
        if offset.checked_add(len).is_none_or(|end| actual < end) {
            return Err(InflightError::Layout(format!(
                "{actual} bytes, {len} needed at {offset} for {num_queues} queue(s) of \
                 {queue_size}"
            )));
        }
        check_region_file(&file, offset, len, policy).map_err(InflightError::Unsealed)?;
        let log = Self::map(file, offset, len, num_queues, queue_size)?;
        for q in 0..num_queues {
            let base = GuestAddress(queue_region_len(queue_size) * u64::from(q));
            let mut version: u16 = log.mem.read_obj(base.unchecked_add(8))?;
            let mut desc_num: u16 = log.mem.read_obj(base.unchecked_add(10))?;
            let header: [u8; 16] = log.mem.read_obj(base)?;
            if header == [0; 16] {
                let zero = vec![0u8; queue_region_len(queue_size) as usize];
                log.mem.write_slice(&zero, base)?;
                log.mem.write_obj(INFLIGHT_VERSION, base.unchecked_add(8))?;
                log.mem.write_obj(queue_size, base.unchecked_add(10))?;
                (version, desc_num) = (INFLIGHT_VERSION, queue_size);
            }
            if version != INFLIGHT_VERSION || desc_num != queue_size {
                return Err(InflightError::Layout(format!(
                    "queue {q}: version {version}, {desc_num} entries (want {INFLIGHT_VERSION}, \
                     {queue_size})"
                )));
            }
        }
        Ok(log)
    }

    fn map(
        file: File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let map_file = file.try_clone().map_err(InflightError::Create)?;
        let size = usize::try_from(len).map_err(|e| InflightError::Map(e.to_string()))?;
        let region = MmapRegion::from_file(FileOffset::new(map_file, offset), size)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| InflightError::Map("region does not fit".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(InflightLog {
            file,
            mem: Arc::new(mem),
            queue_size,
            num_queues,
        })
    }

    /// The memfd holding the log (what GET_INFLIGHT_FD hands to a frontend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The view of one queue's region, or `None` if `index` is out of range.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            mem: self.mem.clone(),
            base: queue_region_len(self.queue_size) * u64::from(index),
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

/// One queue's part of the log.
#[derive(Debug)]
pub struct InflightQueue {
    mem: Arc<GuestMemoryMmap>,
    base: u64,
    desc_num: u16,
    counter: u64,
}

impl InflightQueue {
    fn desc(&self, head: u16) -> Result<GuestAddress, InflightError> {
        if head >= self.desc_num {
            return Err(InflightError::BadIndex(head, self.desc_num));
        }
        Ok(GuestAddress(
            self.base + QUEUE_HEADER_LEN + DESC_STATE_LEN * u64::from(head),
        ))
    }

    /// Record that `head` was fetched from the avail ring.
    pub fn set(&mut self, head: u16) -> Result<(), InflightError> {
        let d = self.desc(head)?;
        self.counter += 1;
        self.mem.write_obj(self.counter, d.unchecked_add(8))?;
        self.mem.store(1u8, d, Ordering::Release)?;
        Ok(())
    }

    /// Before publishing `head` in the used ring: remember it as the last batch head.
    pub fn pre_complete(&mut self, head: u16) -> Result<(), InflightError> {
        self.desc(head)?;
        self.mem
            .store(head, GuestAddress(self.base + 12), Ordering::Release)?;
        Ok(())
    }

    /// After publishing `head` in the used ring: clear it and record the new used index.
    pub fn post_complete(&mut self, head: u16, used_idx: u16) -> Result<(), InflightError> {
        let d = self.desc(head)?;
        self.mem.store(0u8, d, Ordering::Release)?;
        self.mem
            .store(used_idx, GuestAddress(self.base + 14), Ordering::Release)?;
        Ok(())
    }

    /// Heads currently marked in flight, in fetch order.
    pub fn pending(&self) -> Result<Vec<u16>, InflightError> {
        let mut v = Vec::new();
        for h in 0..self.desc_num {
            let d = self.desc(h)?;
            let flag: u8 = self.mem.load(d, Ordering::Acquire)?;
            if flag != 0 {
                let c: u64 = self.mem.read_obj(d.unchecked_add(8))?;
                v.push((c, h));
            }
        }
        v.sort_unstable();
        Ok(v.into_iter().map(|(_, h)| h).collect())
    }

    /// What a restarted backend resubmits, as libvhost-user's `vu_check_queue_inflights`
    /// decides it: if the log's `used_idx` lags the ring's (`ring_used_idx`, read from the
    /// used ring), the backend died between publishing `last_batch_head` and clearing it, so
    /// that head is done and is cleared now; the log then agrees with the ring. Returns the
    /// heads still in flight in the order they were fetched (by counter); the restarted
    /// backend resubmits them first and continues its counter after theirs.
    pub fn recover(&mut self, ring_used_idx: u16) -> Result<Vec<u16>, InflightError> {
        let logged = self.used_idx()?;
        if logged != ring_used_idx {
            let last: u16 = self
                .mem
                .load(GuestAddress(self.base + 12), Ordering::Acquire)?;
            // A head out of range (a hostile or torn log) is refused by `desc`.
            let d = self.desc(last)?;
            self.mem.store(0u8, d, Ordering::Release)?;
            self.mem.store(
                ring_used_idx,
                GuestAddress(self.base + 14),
                Ordering::Release,
            )?;
        }
        let mut max_counter = 0;
        for h in 0..self.desc_num {
            let d = self.desc(h)?;
            let flag: u8 = self.mem.load(d, Ordering::Acquire)?;
            if flag != 0 {
                let c: u64 = self.mem.read_obj(d.unchecked_add(8))?;
                max_counter = max_counter.max(c);
            }
        }
        self.counter = max_counter;
        self.pending()
    }

    /// The `used_idx` recorded in the log.
    pub fn used_idx(&self) -> Result<u16, InflightError> {
        Ok(self
            .mem
            .load(GuestAddress(self.base + 14), Ordering::Acquire)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_order() {
        let log = InflightLog::new(2, 8).unwrap();
        assert_eq!(queue_region_len(8), 192);
        assert_eq!(log.file().metadata().unwrap().len(), 384);
        let mut q1 = log.queue(1).unwrap();
        assert!(log.queue(2).is_none());
        q1.set(5).unwrap();
        q1.set(2).unwrap();
        assert_eq!(q1.pending().unwrap(), vec![5, 2]);
        q1.pre_complete(5).unwrap();
        q1.post_complete(5, 1).unwrap();
        assert_eq!(q1.pending().unwrap(), vec![2]);
        assert_eq!(q1.used_idx().unwrap(), 1);
        assert!(q1.set(8).is_err());
        // The raw bytes follow the vhost-user layout: desc_num at offset 10 of queue 1.
        let mut raw = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(log.file(), &mut raw, 192 + 10).unwrap();
        assert_eq!(u16::from_le_bytes(raw), 8);
        let mut flag = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(log.file(), &mut flag, 192 + 16 + 2 * 16)
            .unwrap();
        assert_eq!(flag[0], 1);
        // Queue 0 untouched.
        assert!(log.queue(0).unwrap().pending().unwrap().is_empty());
    }

    /// A log a dead backend left: 3, 6 and 1 fetched in that order; 6 completed; 1 published
    /// in the used ring (used index 2) but the backend died before clearing it.
    fn log_of_a_dead_backend() -> InflightLog {
        let log = InflightLog::new(1, 8).unwrap();
        let mut q = log.queue(0).unwrap();
        for head in [3, 6, 1] {
            q.set(head).unwrap();
        }
        q.pre_complete(6).unwrap();
        q.post_complete(6, 1).unwrap();
        q.pre_complete(1).unwrap();
        log
    }

    #[test]
    fn a_restarted_backend_resubmits_what_was_in_flight_in_fetch_order() {
        let dead = log_of_a_dead_backend();
        let handed_back = dead.file().try_clone().unwrap();
        let log = InflightLog::adopt(handed_back, 0, (1, 8), SealPolicy::RequireSealed).unwrap();
        // Sealed now: the frontend can no longer shrink it under the backend.
        assert!(dead.file().set_len(0).is_err());
        let mut q = log.queue(0).unwrap();
        // The ring says 2 were used: head 1 was published, so only 3 is left.
        assert_eq!(q.recover(2).unwrap(), vec![3]);
        assert_eq!(q.used_idx().unwrap(), 2);
        // New fetches count on after the recovered ones, so the order holds across restarts.
        q.set(5).unwrap();
        assert_eq!(q.pending().unwrap(), vec![3, 5]);
    }

    #[test]
    fn when_the_ring_agrees_with_the_log_nothing_is_cleared() {
        let log = log_of_a_dead_backend();
        let mut q = log.queue(0).unwrap();
        // Head 1 never reached the used ring (used index still 1): it is resubmitted too.
        assert_eq!(q.recover(1).unwrap(), vec![3, 1]);
    }

    #[test]
    fn a_handed_back_log_of_the_wrong_shape_is_refused() {
        let log = InflightLog::new(1, 8).unwrap();
        // Too small for two queues.
        let adopt = |shape| {
            InflightLog::adopt(
                log.file().try_clone().unwrap(),
                0,
                shape,
                SealPolicy::RequireSealed,
            )
        };
        assert!(matches!(adopt((2, 8)), Err(InflightError::Layout(_))));
        // A different queue size in its header.
        assert!(matches!(adopt((1, 4)), Err(InflightError::Layout(_))));
        // A file that cannot be sealed (no MFD_ALLOW_SEALING) could shrink under the backend.
        let unsealable = tempfile::tempfile().unwrap();
        std::io::copy(&mut log.file().try_clone().unwrap(), &mut { &unsealable }).unwrap();
        let refused = InflightLog::adopt(unsealable, 0, (1, 8), SealPolicy::RequireSealed);
        assert!(matches!(refused, Err(InflightError::Unsealed(_))));
        // A torn last_batch_head is refused, not followed.
        let mut q = log.queue(0).unwrap();
        q.set(2).unwrap();
        std::os::unix::fs::FileExt::write_all_at(log.file(), &99u16.to_le_bytes(), 12).unwrap();
        assert!(matches!(q.recover(7), Err(InflightError::BadIndex(99, 8))));
    }

    #[test]
    fn a_zeroed_log_at_an_offset_is_adopted_as_fresh() {
        // What a driver VM's dom0 hands over: a zeroed region at a page offset of a larger
        // file (BAR2), with stale bytes around it that must stay untouched.
        let fd = memfd_create(c"bar2", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap();
        let file = File::from(fd);
        file.set_len(3 * 4096).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xaa; 4096], 0).unwrap();
        let log = InflightLog::adopt(
            file.try_clone().unwrap(),
            4096,
            (2, 8),
            SealPolicy::RequireSealed,
        )
        .unwrap();
        let mut header = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 4096 + 8).unwrap();
        assert_eq!(
            header,
            [1, 0, 8, 0],
            "version 1, 8 entries written at the offset"
        );
        let mut before = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut before, 4095).unwrap();
        assert_eq!(before, [0xaa]);
        let mut q = log.queue(1).unwrap();
        assert_eq!(q.recover(0).unwrap(), Vec::<u16>::new());
        q.set(4).unwrap();
        // Adopted again (the next backend), it is no longer fresh: head 4 is in flight.
        let again = InflightLog::adopt(file, 4096, (2, 8), SealPolicy::RequireSealed).unwrap();
        assert_eq!(again.queue(1).unwrap().recover(0).unwrap(), vec![4]);
        // Past the file's end: refused.
        let short = InflightLog::adopt(
            log.file().try_clone().unwrap(),
            3 * 4096,
            (2, 8),
            SealPolicy::RequireSealed,
        );
        assert!(matches!(short, Err(InflightError::Layout(_))));
    }
}
