//! The driver domain: device ownership and virtio backends.
//!
//! - [`blk`]: the transport-independent virtio-blk device core.
//! - [`vhost_user`]: vhost-user adapters that expose the device cores to any VMM.

pub mod blk;
pub mod vhost_user;
