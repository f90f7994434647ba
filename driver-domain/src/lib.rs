//! The driver domain: device ownership and virtio backends.
//!
//! - [`blk`]: the transport-independent virtio-blk device core.
//! - [`net`]: the virtio-net device core and the L2 switch between guests' ports.
//! - [`virtio_core`]: the backend core shared by the devices: the transport-independent
//!   [`virtio_core::BackendDevice`] contract and its queue scheduler, peer memory checks, a
//!   test driver ring.
//! - [`vhost_user`]: the vhost-user transport: one generic adapter and session layer that
//!   expose any device core to any VMM.
//! - [`managed`]: the driver domain as `splitvmm up` runs it, walking xenbus states through
//!   the store.
//! - [`vm_tunnel`]: the driver domain inside a VM (`vm-serve`): vhost-user sessions over the
//!   tunnel from dom0, shared memory and doorbells of the cross-VM device.

pub mod blk;
pub mod hw;
pub mod managed;
pub mod net;
pub mod vhost_user;
pub mod virtio_core;
pub mod vm_tunnel;
