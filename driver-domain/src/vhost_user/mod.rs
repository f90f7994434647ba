//! The vhost-user transport: this project's request handler on the `vhost` crate's protocol
//! types, serving any [`crate::virtio_core::BackendDevice`], and the functions that serve its
//! sessions.
//!
//! - [`handler`]: [`VhostUserReqHandler`], the backend side of one session (features, memory
//!   table, vring set-up, INFLIGHT_SHMFD: GET/SET_INFLIGHT_FD and the resubmission on start).
//!   vhost-user-backend's handler is private and refuses the in-flight messages, hence this.
//! - [`device`]: [`VhostUserDevice`], a device as the handler and workers see it (features,
//!   config, memory table check, worker layout, serving a worker's queues).
//! - [`vring`]: [`vring::Vring`], one virtqueue with its eventfds and the queue size checked.
//! - [`worker`]: the queue worker threads (epoll on kicks, the wake event, an exit event).
//! - [`session`]: binding, accepting, serving one or many frontends, shutdown, session logs.

pub mod device;
pub mod handler;
pub mod session;
pub mod vring;
pub mod worker;

pub use device::VhostUserDevice;
pub use handler::{HandlerError, VhostUserReqHandler};
pub use session::{
    bind_atomically, serve_forever, serve_forever_on, serve_listener, serve_one, serve_stream,
    SessionShutdown, VhostUserSessionError,
};
