//! virtio-blk device core, independent of the transport.
//!
//! The core works on "guest memory + a split virtqueue + a kick eventfd + a call eventfd + an
//! in-flight log". No vhost type crosses this interface, so the same core serves a vhost-user
//! peer ([`crate::vhost_user::blk`]), a process domain, or later a peer VM.
//!
//! - [`disk`]: the backing store (raw image file or null device).
//! - [`request`]: reading a request out of a descriptor chain (header copied once, then parsed).
//! - [`executor`]: executing a parsed request against the disk and guest memory.
//! - [`inflight`]: the memfd-backed in-flight log (vhost-user INFLIGHT_SHMFD layout).
//! - [`queue`]: processing one virtqueue with a per-wakeup budget; a standalone worker thread.
//! - [`memory`]: checks on peer-supplied memory regions (re-exported from
//!   [`crate::virtio_core`]).

pub mod config;
pub mod disk;
pub mod executor;
pub mod inflight;
pub mod queue;
pub mod request;

// Not blk-specific; kept reachable under their old paths.
pub use crate::virtio_core::{memory, ring_driver};

pub use config::{BlkConfig, BlkConfigSpace};
pub use disk::{BlkDisk, DiskError};
pub use inflight::{InflightError, InflightLog, InflightQueue};
pub use memory::{MemoryError, SealPolicy};
pub use queue::{BlkQueue, Progress, QueueError, QueueWorker};
pub use request::{Request, RequestError, RequestType};

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
