//! The driver domain: device ownership and virtio backends.
//!
//! - [`blk`]: the transport-independent virtio-blk device core.
//! - [`vhost_user`]: vhost-user adapters that expose the device cores to any VMM.
//! - [`managed`]: the driver domain as `splitvmm up` runs it, walking xenbus states through
//!   the store.

pub mod blk;
pub mod hw;
pub mod managed;
pub mod vhost_user;
