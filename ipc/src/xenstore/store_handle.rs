//! The store daemon's settings, statistics and the handle other threads use
//! to reach it (`server` runs the daemon itself).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::perms::DomId;
use super::server::ServerError;
use super::Quotas;

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The privileged (dom0) socket. Domain sockets live in `<socket>.d/`.
    pub socket: PathBuf,
    /// Limits for unprivileged domains.
    pub quotas: Quotas,
    /// Most bytes of watch events queued towards one client (1 MiB): beyond
    /// it, events for a guest are dropped, and a dom0 client flooded by dom0's
    /// own changes is disconnected. Events a guest caused always reach dom0;
    /// the guest is throttled instead (see `Quotas::outstanding_requests`).
    pub max_output_bytes: usize,
    /// Most simultaneous connections; further ones are refused (1024).
    pub max_connections: usize,
    /// Connection slots only dom0 may take (64).
    pub reserved_for_dom0: usize,
    /// A message must arrive completely within this time of its first byte,
    /// or its connection is closed (5 s).
    pub partial_message_timeout: Duration,
    /// Watch events unread for this long are dropped, discharging the domain
    /// that caused them (20 s, C xenstored's default).
    pub watch_event_timeout: Duration,
}

impl StoreConfig {
    /// Defaults with the given privileged socket path.
    pub fn new(socket: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            socket: socket.into(),
            ..StoreConfig::default()
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            socket: PathBuf::from("/run/xenstored/socket"),
            quotas: Quotas::default(),
            max_output_bytes: 1 << 20,
            max_connections: 1024,
            reserved_for_dom0: 64,
            partial_message_timeout: Duration::from_secs(5),
            watch_event_timeout: Duration::from_secs(20),
        }
    }
}

/// The directory holding per-domain sockets for a store socket.
pub fn domain_socket_dir(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".d");
    PathBuf::from(s)
}

/// The socket a domain connects to once introduced.
pub fn domain_socket_path(socket: &Path, domid: DomId) -> PathBuf {
    domain_socket_dir(socket).join(domid.to_string())
}

pub(super) enum Command {
    Attach(DomId, UnixStream),
    Stats(Sender<StoreStats>),
    Shutdown,
}

/// A snapshot of the store's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Open client connections.
    pub connections: usize,
    /// Bytes queued towards clients, over all connections.
    pub queued_output_bytes: usize,
    /// Bytes received but not yet handled, over all connections.
    pub buffered_input_bytes: usize,
    /// Nodes in the tree, the root included.
    pub nodes: usize,
    /// Connections refused by a connection limit, since the store started.
    pub refused_connections: u64,
    /// Connections closed because a message stayed half-sent, since start.
    pub timed_out_messages: u64,
    /// Watch events dropped (receiver over its bound, or unread too long).
    pub dropped_events: u64,
}

/// A cloneable, sendable handle to a running (or about to run) store.
#[derive(Clone)]
pub struct StoreHandle {
    pub(super) tx: Sender<Command>,
    pub(super) wake: Arc<EventFd>,
    pub(super) socket: PathBuf,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("socket", &self.socket)
            .finish()
    }
}

impl StoreHandle {
    /// A connection already registered as `domid` (privileged if 0), for the
    /// toolstack to hand to a domain's process.
    pub fn connect_domain(&self, domid: DomId) -> Result<UnixStream, ServerError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|source| ServerError::SocketPair { domid, source })?;
        self.tx
            .send(Command::Attach(domid, ours))
            .map_err(|_| ServerError::ShutDown)?;
        self.wake.write(1).map_err(|_| ServerError::ShutDown)?;
        Ok(theirs)
    }

    /// Current resource use, as seen by the store's thread (waits at most `timeout`).
    pub fn stats(&self, timeout: std::time::Duration) -> Result<StoreStats, ServerError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::Stats(tx))
            .map_err(|_| ServerError::ShutDown)?;
        self.wake.write(1).map_err(|_| ServerError::ShutDown)?;
        rx.recv_timeout(timeout).map_err(|_| ServerError::ShutDown)
    }

    /// Asks the store to stop; `run` returns soon after.
    pub fn shutdown(&self) {
        if self.tx.send(Command::Shutdown).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// The privileged socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}
