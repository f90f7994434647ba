//! One channel of the tunnel in the driver VM: a vhost-user session of the unchanged backend
//! on one end of a socketpair (or, in a managed driver VM, on a connection the in-VM driver
//! domain accepted: [`Channel::relay`]), and the tunnel's end of it. Frontend messages from dom0 are
//! written to the socket with their references turned into descriptors ([`super::refs`]); a
//! thread reads the backend's messages and sends them to dom0 as VHOST frames. When the
//! backend ends the session (an error, a refused memory table) the thread tells dom0 with
//! CLOSE; when dom0 sends CLOSE, the socket is shut down and the session ends.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ipc::tunnel::vhost_msg::MsgHeader;
use ipc::tunnel::{Frame, FrameKind, Ref};
use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::FrontendReq;

use super::refs::{ChannelSignals, RefError, SignalPaths};
use super::rings::{RingTable, RingsError};
use super::vhost_stream::{self, VhostStreamError};
use super::writer::TunnelWriter;
use crate::vhost_user::serve_stream;
use crate::virtio_core::BackendDevice;

/// Why a frame failed its channel.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The channel's threads could not be started.
    #[error("cannot start the channel: {0}")]
    Start(#[source] io::Error),
    /// Only VHOST frames carry messages for the backend.
    #[error("a {0:?} frame is not a message")]
    NotAMessage(FrameKind),
    /// The message is malformed.
    #[error(transparent)]
    Rings(#[from] RingsError),
    /// Its references could not be turned into descriptors.
    #[error(transparent)]
    Refs(#[from] RefError),
    /// The backend's socket failed.
    #[error(transparent)]
    Stream(#[from] VhostStreamError),
}

/// One open channel.
pub struct Channel {
    id: u16,
    to_backend: UnixStream,
    rings: RingTable,
    signals: ChannelSignals,
    /// Closed without telling dom0 (dom0 closed it, or was told already): the reader does
    /// not send CLOSE.
    quiet: Arc<AtomicBool>,
    /// The backend's side is gone (the reader told dom0).
    ended: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Channel {
    /// Opens channel `id`: `device` served by the backend session on a socketpair.
    pub fn open<D: BackendDevice + Send + 'static>(
        id: u16,
        device: D,
        tunnel: Arc<TunnelWriter>,
    ) -> Result<Self, ChannelError> {
        let (mine, theirs) = UnixStream::pair().map_err(ChannelError::Start)?;
        let backend = std::thread::Builder::new()
            .name(format!("channel{id}"))
            .spawn(move || {
                if let Err(e) = serve_stream(theirs, device, |_| {}) {
                    warn!("channel {id}: backend session: {e}");
                }
            })
            .map_err(ChannelError::Start)?;
        // Should the rest fail, `mine` closes and the session ends: the thread is not waited.
        Self::start(id, mine, vec![backend], tunnel)
    }

    /// Opens channel `id` on `connection`, a vhost-user connection whose backend runs
    /// elsewhere: in a managed driver VM, the in-VM driver domain's session accepts its other
    /// end (the listener a CONTROL request prepared it on).
    pub fn relay(
        id: u16,
        connection: UnixStream,
        tunnel: Arc<TunnelWriter>,
    ) -> Result<Self, ChannelError> {
        Self::start(id, connection, Vec::new(), tunnel)
    }

    /// The channel on `to_backend` (the tunnel's end of the backend's connection), with the
    /// thread relaying the backend's messages out.
    fn start(
        id: u16,
        to_backend: UnixStream,
        mut threads: Vec<JoinHandle<()>>,
        tunnel: Arc<TunnelWriter>,
    ) -> Result<Self, ChannelError> {
        let reader_end = to_backend.try_clone().map_err(ChannelError::Start)?;
        let quiet = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let (q, gone) = (quiet.clone(), ended.clone());
        let reader = std::thread::Builder::new()
            .name(format!("channel{id}-out"))
            .spawn(move || relay_backend(id, &reader_end, &tunnel, &q, &gone))
            .map_err(ChannelError::Start)?;
        threads.push(reader);
        info!("channel {id}: opened");
        Ok(Channel {
            id,
            to_backend,
            rings: RingTable::default(),
            signals: ChannelSignals::new(id),
            quiet,
            ended,
            threads,
        })
    }

    /// The channel's number.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Whether the backend's side ended (dom0 was told with CLOSE).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Hands a VHOST frame's message to the backend, its references turned into descriptors.
    pub fn deliver(&mut self, frame: &Frame, paths: SignalPaths<'_>) -> Result<(), ChannelError> {
        if frame.kind != FrameKind::Vhost {
            return Err(ChannelError::NotAMessage(frame.kind));
        }
        let event = self.rings.observe(&frame.payload)?;
        let fds = self
            .signals
            .resolve(&frame.payload, &frame.refs, &self.rings, paths)?;
        self.signals.follow(event, &self.rings, paths);
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        vhost_stream::send(&self.to_backend, &frame.payload, &raw)?;
        // Our copies close here; the backend holds its own.
        Ok(())
    }

    /// Ends the channel: its session stops, its threads are joined, its signals released.
    /// With `tell_dom0`, dom0 gets CLOSE (once: not again if the backend's end told it).
    pub fn close(mut self, tell_dom0: bool, paths: SignalPaths<'_>) {
        self.quiet.store(!tell_dom0, Ordering::Release);
        let _ = self.to_backend.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.signals.release(paths);
        info!("channel {}: closed", self.id);
    }
}

/// The reader thread: the backend's messages to dom0, then CLOSE when it leaves.
fn relay_backend(
    id: u16,
    from_backend: &UnixStream,
    tunnel: &TunnelWriter,
    quiet: &AtomicBool,
    ended: &AtomicBool,
) {
    loop {
        match vhost_stream::recv(from_backend) {
            Ok(Some(msg)) if !msg.fds.is_empty() && !is_inflight_reply(&msg) => {
                // Nothing else the backend may send (the relayable protocol features) carries
                // descriptors; the tunnel could not carry them anyway.
                warn!(
                    "channel {id}: the backend sent {} descriptor(s), which the tunnel cannot carry: closing",
                    msg.fds.len()
                );
                let _ = from_backend.shutdown(Shutdown::Both);
                break;
            }
            Ok(Some(msg)) if !msg.fds.is_empty() => {
                // GET_INFLIGHT_FD: the backend's own log stays here (NONE); dom0 answers with
                // a log of its own in BAR2, which the backend adopts (SET_INFLIGHT_FD).
                if let Err(e) = tunnel.send(&Frame::vhost(id, vec![Ref::none()], msg.bytes)) {
                    warn!("channel {id}: {e}");
                }
            }
            Ok(Some(msg)) => {
                if let Err(e) = tunnel.send(&Frame::vhost(id, Vec::new(), msg.bytes)) {
                    warn!("channel {id}: {e}");
                }
            }
            Ok(None) => break,
            Err(e) => {
                warn!("channel {id}: {e}");
                let _ = from_backend.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    ended.store(true, Ordering::Release);
    if !quiet.load(Ordering::Acquire) {
        info!("channel {id}: the session ended on this side; telling dom0");
        if let Err(e) = tunnel.send(&Frame::close(id)) {
            warn!("channel {id}: {e}");
        }
    }
}

/// The backend's reply to GET_INFLIGHT_FD, with its log's one descriptor.
fn is_inflight_reply(msg: &vhost_stream::VhostMessage) -> bool {
    msg.fds.len() == 1
        && MsgHeader::parse(&msg.bytes)
            .is_ok_and(|h| h.is_reply() && h.request == u32::from(FrontendReq::GET_INFLIGHT_FD))
}
