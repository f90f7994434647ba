//! The vhost-user transport: one generic adapter from `vhost-user-backend` to any
//! [`crate::virtio_core::BackendDevice`], and the functions that serve its sessions.
//!
//! - [`device`]: [`VhostUserDevice`], the adapter (features, config, memory table check,
//!   worker layout, kicks and wake-ups into [`crate::virtio_core::serve_queues`]).
//! - [`session`]: binding, accepting, serving one or many frontends, shutdown, session logs.
//! - [`vring`]: [`vring::CheckedVring`], vhost-user-backend's vring with the queue size checked.

pub mod device;
pub mod session;
pub mod vring;

pub use device::VhostUserDevice;
pub use session::{
    bind_atomically, serve_forever, serve_forever_on, serve_listener, serve_one,
    VhostUserSessionError,
};
