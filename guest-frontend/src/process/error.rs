//! Errors of the process-domain frontend.

use std::io;

use frontend_core::vhost_user::FrontendSessionError;
use thiserror::Error;

use super::window::WindowError;
use crate::virtio::net::NetError;
use crate::virtio::{BlkError, FrontMemoryError, FrontQueueError, FrontRequestError};

/// Errors of the process guest's frontends: [`super::BlockFrontend`] (and its
/// [`super::BlockFrontendQueue`]s) and [`super::NetFrontend`].
#[derive(Debug, Error)]
pub enum ProcessFrontendError {
    /// The configuration is unusable.
    #[error("invalid frontend configuration: {0}")]
    Config(String),
    /// The backend lacks something the frontend needs.
    #[error("backend does not support {0}")]
    Unsupported(String),
    /// The I/O window could not be set up.
    #[error("I/O window: {0}")]
    Window(#[from] WindowError),
    /// The vhost-user session failed (connect, negotiation, set-up, stop).
    #[error("vhost-user session")]
    Session(#[from] FrontendSessionError),
    /// Eventfd or socket I/O failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The virtio-net driver failed.
    #[error("virtio-net")]
    Net(#[from] NetError),
    /// The virtio-blk driver failed (queue full, or the device broke the queue).
    #[error("virtio-blk: {0}")]
    Blk(#[from] BlkError),
    /// The device failed a request.
    #[error("request failed: {0}")]
    Request(#[from] FrontRequestError),
    /// No completion arrived in time (a lost kick or interrupt, or a stuck backend).
    #[error("queue {queue}: no completion within {timeout_ms} ms ({in_flight} in flight)")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// Requests in flight.
        in_flight: usize,
        /// The timeout.
        timeout_ms: u128,
    },
    /// The backend's connection ended with requests in flight (the driver domain died). The
    /// requests stay queued: a reconnect re-posts them
    /// ([`super::BlockFrontend::reconnect`]).
    #[error("queue {queue}: the backend is gone ({in_flight} in flight)")]
    BackendGone {
        /// Queue index.
        queue: u16,
        /// Requests in flight.
        in_flight: usize,
    },
    /// A request does not fit the device or the bounce buffers.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No bounce buffer or descriptor is free (complete some requests first).
    #[error("queue {0} is full")]
    QueueFull(u16),
    /// The queue index does not exist.
    #[error("no queue {0}")]
    NoQueue(u16),
    /// A thread panicked while holding a queue.
    #[error("queue {0} lock poisoned")]
    Poisoned(u16),
}

impl From<FrontQueueError> for ProcessFrontendError {
    fn from(e: FrontQueueError) -> Self {
        Self::Blk(BlkError::Queue(e))
    }
}

impl From<FrontMemoryError> for ProcessFrontendError {
    fn from(e: FrontMemoryError) -> Self {
        Self::Blk(BlkError::Memory(e))
    }
}
