//! virtio-blk device core, independent of the transport.
//!
//! The core works on "guest memory + a split virtqueue + an in-flight log"; [`BlkBackendDevice`]
//! implements [`crate::virtio_core::BackendDevice`], so the same core serves a vhost-user
//! peer ([`crate::vhost_user`]), a process domain, or later a peer VM.
//!
//! - [`config`]: device options and the configuration space.
//! - [`device`]: the device (configuration space, features, in-flight log, workers).
//! - [`queue`]: the processing of one virtqueue with a per-wakeup budget.
//! - [`request`]: reading a request out of a descriptor chain (header copied once, then
//!   parsed) and executing it against the disk and guest memory.
//! - [`disk`]: the backing store (raw image file or null device).
//! - [`bounce`]: `cache = none` transfers through an aligned bounce buffer.
//! - [`inflight`]: the memfd-backed in-flight log (vhost-user INFLIGHT_SHMFD layout).
//! - [`resubmit`]: descriptor chains for the requests a restarted backend resubmits.
//! - [`uring`]: a queue's reads and writes batched through a restricted io_uring.

pub mod bounce;
pub mod config;
pub mod device;
pub mod disk;
pub mod inflight;
pub mod queue;
pub mod request;
pub mod resubmit;
pub mod uring;

pub use config::{BlkBackendConfig, BlkConfigSpace, CacheMode};
pub use device::BlkBackendDevice;
pub use disk::{BlkDisk, DiskError};
pub use inflight::{InflightError, InflightLog, InflightQueue};
pub use queue::{BlkBackendError, BlkBackendQueue};
pub use request::{execute, BlkRequestError, BlkRequestOutcome, Request, RequestType};

/// Sector size of the virtio-blk protocol (fixed at 512 bytes by the specification).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Request status written into the last byte of each chain.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed (or is malformed / out of range).
    pub const IOERR: u8 = 1;
    /// The request type is not supported by this device.
    pub const UNSUPP: u8 = 2;
}
