//! The `no_std` virtio core: DMA memory, the split virtqueue driver, the virtio-blk and
//! virtio-net drivers.
//! Transport-agnostic: callers deliver kicks (MMIO doorbell, eventfd) and interrupts.

pub mod blk;
pub mod memory;
pub mod net;
pub mod virtqueue;

/// Device feature: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device feature: indirect descriptors (not used by this driver).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Device feature: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub use blk::{
    BlkCompletion, BlkError, BlkOp, BlkRequest, FrontBlkConfig, FrontBlkQueue, FrontRequestError,
};
pub use memory::{BumpAllocator, DmaBuf, DmaMemory, DmaRegion, FrontMemoryError};
pub use virtqueue::{
    vring_need_event, FrontQueueError, Notify, QueueAddrs, QueueStats, SplitQueue, UsedElem,
};
