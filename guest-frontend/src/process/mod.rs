//! Process domains: a guest that is a host process.
//!
//! The process is a vhost-user *frontend* (the role QEMU plays for a VM): it owns an
//! [`IoWindow`], puts every virtqueue ring and every data (bounce) buffer inside it, shares only
//! that memfd with the backend, and drives the rings with the `no_std` [`crate::virtio`] core.
//! Kicks go out on a per-queue kick eventfd; completions arrive on a per-queue call eventfd
//! (interrupt mode) or are busy-polled from the used ring (polling mode).

mod block;
mod error;
mod net;
mod peer;
mod queue;
mod window;

pub use block::{BlockFrontend, BlockFrontendConfig};
pub use error::ProcessFrontendError;
pub use net::{NetFrontend, NetFrontendConfig};
pub use queue::{BlockFrontendCompletion, BlockFrontendQueue, BlockOp, FrontendStats, RequestId};
pub use window::{IoWindow, WindowError, DEFAULT_WINDOW_GPA, WINDOW_SEALS};
