//! Device options and the virtio-blk configuration space the device publishes.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use std::sync::Arc;

use crate::virtio_core::counters::DeviceCounters;
use crate::virtio_core::memory::SealPolicy;
use crate::virtio_core::MemoryGrant;

/// Largest number of ranges accepted in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Largest number of sectors one DISCARD or WRITE_ZEROES range may cover (4 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

/// How the image is cached on the host (`--cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the host's page cache (buffered I/O; FLUSH is `fdatasync`).
    #[default]
    Writeback,
    /// `O_DIRECT`: around the page cache, through an aligned bounce buffer per queue (see
    /// [`super::bounce`]); FLUSH is still `fdatasync` (the device's volatile cache). Reads
    /// and writes use `preadv`/`pwritev` on the bounce buffer, never io_uring.
    None,
}

impl CacheMode {
    /// The flags to open the image with (`OpenOptionsExt::custom_flags`).
    pub fn open_flags(self) -> i32 {
        match self {
            CacheMode::Writeback => 0,
            CacheMode::None => libc::O_DIRECT,
        }
    }
}

/// Options of one block device, chosen by whoever creates it (CLI, toolstack).
#[derive(Clone, Debug)]
pub struct BlkBackendConfig {
    /// Number of virtqueues (>= 1).
    pub num_queues: u16,
    /// Largest queue size the device accepts (a power of two, <= 32768).
    pub queue_size: u16,
    /// Requests processed from one queue per wakeup before the other queues of the same
    /// worker get a turn.
    pub budget: usize,
    /// Busy-poll an empty queue this long (with guest notifications disabled) before going to
    /// sleep on the kick eventfd; 0: the adaptive window below.
    pub poll_us: u64,
    /// With `poll_us` 0, poll adaptively up to this long (QEMU's iothread default, 32 µs; see
    /// [`crate::virtio_core::poll_window`]); 0 disables polling.
    pub poll_max_us: u64,
    /// The 20-byte serial returned by GET_ID (shorter strings are zero padded).
    pub serial: String,
    /// What to accept from peer-supplied shared memory that is not sealed against shrinking.
    pub seal_policy: SealPolicy,
    /// The guest memory the peer may share: any table (a standalone backend serving QEMU,
    /// say), or the I/O window the toolstack granted (managed mode).
    pub grant: MemoryGrant,
    /// Where the device counts what it serves (shared with whoever reports it).
    pub counters: Arc<DeviceCounters>,
    /// Batch each pass's reads and writes through an io_uring per queue (see
    /// [`super::uring`]; the default); without it, or where the kernel refuses a ring, every
    /// request is a `preadv`/`pwritev` of its own.
    pub io_uring: bool,
    /// How the image was opened: with [`CacheMode::None`] the device refuses an image not
    /// opened `O_DIRECT` (open it with [`CacheMode::open_flags`]).
    pub cache: CacheMode,
}

impl Default for BlkBackendConfig {
    fn default() -> Self {
        BlkBackendConfig {
            num_queues: 1,
            queue_size: 256,
            budget: 64,
            poll_us: 0,
            poll_max_us: 32,
            serial: "splitvmm-blk".to_string(),
            seal_policy: SealPolicy::AllowUnsealedChecked,
            grant: MemoryGrant::AllRam,
            counters: Arc::default(),
            io_uring: true,
            cache: CacheMode::Writeback,
        }
    }
}

impl BlkBackendConfig {
    /// The largest number of data segments a request may carry: queue size minus the header
    /// and status descriptors (Linux honours this and the kernel's own limit).
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The virtio feature bits offered for a disk that is (or is not) read-only.
    pub fn features(&self, read_only: bool) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        if self.num_queues > 1 {
            f |= 1u64 << VIRTIO_BLK_F_MQ;
        }
        if read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }
}

/// The virtio-blk configuration space (virtio 1.2, 5.2.4), serialised little endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfigSpace {
    bytes: [u8; Self::LEN],
}

impl BlkConfigSpace {
    /// Bytes published: up to and including `write_zeroes_may_unmap` and its padding.
    pub const LEN: usize = 60;

    /// Build the configuration space for a disk of `capacity_sectors` sectors whose logical
    /// block is `block_size` bytes (512; an `O_DIRECT` device's own, so that the guest sends
    /// only whole blocks).
    pub fn new(cfg: &BlkBackendConfig, capacity_sectors: u64, block_size: u32) -> Self {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&capacity_sectors.to_le_bytes()); // capacity
                                                                  // 8..12 size_max: not offered.
        b[12..16].copy_from_slice(&cfg.seg_max().to_le_bytes()); // seg_max
                                                                 // 16..20 geometry: not offered.
        b[20..24].copy_from_slice(&block_size.to_le_bytes()); // blk_size
                                                              // 24..32 topology: not offered.
                                                              // 32 writeback, 33 unused.
        b[34..36].copy_from_slice(&cfg.num_queues.to_le_bytes()); // num_queues
        b[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        b[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
        b[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        b[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        b[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        b[56] = 1; // write_zeroes_may_unmap
        BlkConfigSpace { bytes: b }
    }

    /// The bytes `[offset, offset + size)` of the space; out-of-range parts read as nothing
    /// (the reply is shortened), never as a panic.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(Self::LEN);
        let end = start
            .saturating_add(usize::try_from(size).unwrap_or(usize::MAX))
            .min(Self::LEN);
        self.bytes[start..end].to_vec()
    }

    /// All bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn config_space_fields() {
        let cfg = BlkBackendConfig {
            num_queues: 4,
            ..BlkBackendConfig::default()
        };
        let cs = BlkConfigSpace::new(&cfg, 2048, 4096);
        assert_eq!(cs.read(20, 4), 4096u32.to_le_bytes());
        assert_eq!(cs.read(0, 8), 2048u64.to_le_bytes());
        assert_eq!(cs.read(34, 2), 4u16.to_le_bytes());
        assert_eq!(cs.read(12, 4), 254u32.to_le_bytes());
        assert_eq!(cs.read(58, 100).len(), 2);
        assert!(cs.read(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn read_only_hides_discard() {
        let cfg = BlkBackendConfig::default();
        let f = cfg.features(true);
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    }
}
