//! The driver domain: device ownership and virtio backends.
//!
//! - [`blk`]: the transport-independent virtio-blk device core.
//! - [`net`]: the virtio-net device core and the L2 switch between guests' ports.
//! - [`virtio_core`]: pieces shared by the device cores (peer memory checks, a test driver ring).
//! - [`vhost_user`]: vhost-user adapters that expose the device cores to any VMM.
//! - [`managed`]: the driver domain as `splitvmm up` runs it, walking xenbus states through
//!   the store.

pub mod blk;
pub mod hw;
pub mod managed;
pub mod net;
pub mod vhost_user;
pub mod virtio_core;
