//! The relay between the guests' vhost-user connections and the driver VM: a thread per
//! listening socket (channel 0, 1, ... in `--driver-vm-socket` order) accepts one frontend at
//! a time once the driver VM said HELLO, and turns its messages into frames
//! ([`ChannelSession`]); frames from the driver VM go back to the right connection, GET_PROTOCOL_FEATURES
//! replies masked; the reply to GET_INFLIGHT_FD carries a log this side made
//! ([`ChannelSession::inflight_reply`]). A channel that misbehaves, on either side, is closed alone: CLOSE to the
//! driver VM, the frontend's connection shut, its BAR2 space and doorbells freed.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ipc::tunnel::vhost_msg::{mask_protocol_features_reply, MsgHeader};
use ipc::tunnel::{Frame, FrameKind, VERSION};
use vhost::vhost_user::message::FrontendReq;

use crate::vmm::bus::Limiter;
use crate::vmm::devices::cross_vm::CrossVmState;

use super::bar2_space::Bar2Space;
use super::managed::Managed;
use super::session::ChannelSession;
use super::wire::{read_message, write_message, Stop};

/// How long a reply may wait for a frontend that does not read before its channel fails.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A channel's connection, as the frames from the driver VM reach it.
#[derive(Debug, Default)]
struct Link {
    conn: Option<UnixStream>,
    /// The driver VM closed the channel (no CLOSE goes back to it).
    vm_closed: bool,
    /// The request code of the last message relayed to the driver VM, until a reply to it
    /// came back. A frontend waits for the reply to a request before it sends another, so a
    /// reply to anything else (one the driver VM sent before it saw this connection's
    /// predecessor close, or a message nothing asked for) is dropped, never handed to this
    /// frontend.
    awaiting: Option<u32>,
    /// What the connection set up in dom0 (taken and closed when the connection ends).
    session: Option<ChannelSession>,
}

/// What the channel threads and the tunnel's reader share.
#[derive(Debug)]
pub struct Relay {
    device: Arc<CrossVmState>,
    space: Mutex<Bar2Space>,
    to_vm: Mutex<mpsc::Sender<Vec<u8>>>,
    /// The driver VM said HELLO.
    ready: Mutex<bool>,
    ready_changed: Condvar,
    links: Vec<Mutex<Link>>,
    stop: Stop,
    noise: Limiter,
    /// A managed driver VM's store connection and control channel.
    managed: Option<Arc<Managed>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Relay {
    /// A relay of `channels` channels over the cross-VM device `device`; encoded frames for
    /// the driver VM go to `to_vm` (COM2's feeder).
    pub fn new(
        device: Arc<CrossVmState>,
        channels: usize,
        to_vm: mpsc::Sender<Vec<u8>>,
        stop: Arc<AtomicBool>,
        managed: Option<Arc<Managed>>,
    ) -> std::io::Result<Self> {
        let size = device.bar2_size();
        Ok(Self {
            device,
            space: Mutex::new(Bar2Space::new(size)),
            to_vm: Mutex::new(to_vm),
            ready: Mutex::new(false),
            ready_changed: Condvar::new(),
            links: (0..channels).map(|_| Mutex::default()).collect(),
            stop: Stop::new(stop)?,
            noise: Limiter::default(),
            managed,
        })
    }

    /// Stops the channel threads (they wait without waking up until this) and the feeder.
    pub fn stop(&self) {
        self.stop.stop();
        // Under the lock, so that no waiter misses it between its check and its wait.
        let _ready = lock(&self.ready);
        self.ready_changed.notify_all();
        // An empty frame wakes the feeder, which then sees the stop.
        let _ = lock(&self.to_vm).send(Vec::new());
    }

    /// The stop every relay thread waits on.
    pub(super) fn stop_handle(&self) -> &Stop {
        &self.stop
    }

    /// Bytes of BAR2 in use.
    pub fn bar2_used(&self) -> u64 {
        lock(&self.space).used()
    }

    pub(super) fn send(&self, frame: &Frame) {
        match frame.encode() {
            // The feeder ends only with the machine.
            Ok(bytes) => {
                let _ = lock(&self.to_vm).send(bytes);
            }
            Err(e) => log::error!("driver-VM tunnel: channel {}: {e}", frame.channel),
        }
    }

    /// Waits for the driver VM's HELLO; false once stopping.
    pub(super) fn wait_ready(&self) -> bool {
        let mut ready = lock(&self.ready);
        loop {
            if self.stop.stopped() {
                return false;
            }
            if *ready {
                return true;
            }
            ready = self
                .ready_changed
                .wait(ready)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Shuts channel `channel`'s connection (its thread then closes the channel).
    fn shut(&self, channel: u16, by_vm: bool) {
        let Some(link) = self.links.get(usize::from(channel)) else {
            return;
        };
        let mut link = lock(link);
        if let Some(conn) = &link.conn {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            link.vm_closed |= by_vm;
        }
    }

    /// A frame from the driver VM.
    pub fn from_vm(&self, frame: Frame) {
        match frame.kind {
            FrameKind::Hello => {
                let version = frame.hello_version();
                if version != Some(VERSION) {
                    log::error!("driver-VM tunnel: HELLO of version {version:?}; ignored");
                    return;
                }
                let mut ready = lock(&self.ready);
                if *ready {
                    // The server in the driver VM started again: what was open is gone there.
                    log::warn!("driver-VM tunnel: HELLO again; closing every channel");
                    for ch in 0..self.links.len() {
                        self.shut(ch as u16, true);
                    }
                } else {
                    log::info!("driver-VM tunnel: HELLO (version {VERSION}): accepting frontends");
                }
                *ready = true;
                self.ready_changed.notify_all();
            }
            FrameKind::Close => self.shut(frame.channel, true),
            FrameKind::Open => {
                if self.noise.allow() {
                    log::warn!("driver-VM tunnel: OPEN from the driver VM; ignored");
                }
            }
            FrameKind::Vhost => self.reply(frame),
            FrameKind::Store | FrameKind::Control => match (&self.managed, frame.kind) {
                (Some(m), FrameKind::Store) => m.store_from_vm(&frame.payload),
                (Some(m), _) => m.control_from_vm(&frame.payload),
                (None, kind) => {
                    if self.noise.allow() {
                        log::warn!(
                            "driver-VM tunnel: {kind:?} frame of an unmanaged driver VM; dropped"
                        );
                    }
                }
            },
        }
    }

    /// A VHOST frame from the driver VM: to its channel's frontend, masked.
    fn reply(&self, frame: Frame) {
        let channel = frame.channel;
        let Some(link) = self.links.get(usize::from(channel)) else {
            if self.noise.allow() {
                log::warn!("driver-VM tunnel: VHOST for channel {channel}, which does not exist");
            }
            return;
        };
        if lock(link).conn.is_none() {
            // The channel closed meanwhile (its CLOSE is on its way to the driver VM).
            return;
        }
        let mut msg = frame.payload;
        let inflight_reply = MsgHeader::parse(&msg)
            .is_ok_and(|h| h.is_reply() && h.request == u32::from(FrontendReq::GET_INFLIGHT_FD));
        let checked = if frame.refs.is_empty() || inflight_reply {
            MsgHeader::parse(&msg)
                .and_then(|h| mask_protocol_features_reply(&mut msg).map(|_| h))
                .map_err(|e| e.to_string())
        } else {
            Err("references in a message from the driver VM".to_owned())
        };
        let header = match checked {
            Ok(h) if !h.is_reply() => Err(format!("request {} from the driver VM", h.request)),
            other => other,
        };
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                log::warn!("driver-VM tunnel: channel {channel}: {e}; closing the channel");
                self.send(&Frame::close(channel));
                self.shut(channel, true);
                return;
            }
        };
        let mut inflight_failed = None;
        let written = {
            let mut link = lock(link);
            if link.conn.is_none() || link.awaiting != Some(header.request) {
                if self.noise.allow() {
                    log::warn!(
                        "driver-VM channel {channel}: a reply to request {} that its frontend \
                         is not waiting for; dropped",
                        header.request
                    );
                }
                return;
            }
            link.awaiting = None;
            let mut log = None;
            if inflight_reply {
                let made = match link.session.as_mut() {
                    Some(session) => session
                        .inflight_reply(&self.device, &self.space, &mut msg, &frame.refs)
                        .map_err(|e| e.to_string()),
                    None => Err("no session".to_owned()),
                };
                match made {
                    Ok((file, adopt)) => {
                        // Before the frontend hears the reply (and sends its next request).
                        self.send(&adopt);
                        log = Some(file);
                    }
                    Err(e) => inflight_failed = Some(e),
                }
            }
            match (&link.conn, &inflight_failed) {
                (Some(conn), None) => write_message(conn, &msg, log.as_ref().map(|f| f.as_fd()))
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            }
        };
        if let Some(e) = inflight_failed {
            log::warn!("driver-VM channel {channel}: in-flight log: {e}; closing the channel");
            self.send(&Frame::close(channel));
            self.shut(channel, true);
            return;
        }
        if let Err(e) = written {
            log::warn!("driver-VM channel {channel}: writing to the frontend: {e}; closing");
            self.shut(channel, false);
        }
    }

    /// Serves channel `channel` on `listener` until stopped.
    pub fn serve_channel(&self, channel: u16, listener: &UnixListener) {
        while self.wait_ready() {
            let Some(conn) = self.accept(listener) else {
                continue;
            };
            self.serve_connection(channel, conn);
        }
    }

    /// The next frontend, or None when stopping (or accept failed).
    pub(super) fn accept(&self, listener: &UnixListener) -> Option<UnixStream> {
        if !matches!(self.stop.wait_readable(listener.as_fd()), Ok(true)) {
            return None;
        }
        match listener.accept() {
            Ok((conn, _)) => Some(conn),
            Err(e) => {
                if self.noise.allow() {
                    log::warn!("driver-VM relay: accept: {e}");
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
                None
            }
        }
    }

    /// Relays one frontend's connection on `channel` until either side ends it.
    pub fn serve_connection(&self, channel: u16, conn: UnixStream) {
        let Some(link) = self.links.get(usize::from(channel)) else {
            return;
        };
        let writer = match conn
            .try_clone()
            .and_then(|w| w.set_write_timeout(Some(WRITE_TIMEOUT)).map(|()| w))
        {
            Ok(w) => w,
            Err(e) => {
                log::error!("driver-VM channel {channel}: {e}");
                return;
            }
        };
        *lock(link) = Link {
            conn: Some(writer),
            vm_closed: false,
            awaiting: None,
            session: Some(ChannelSession::new(channel)),
        };
        log::info!("driver-VM channel {channel}: frontend connected");
        self.send(&Frame::open(channel));
        let why = loop {
            let incoming = match read_message(&conn, &self.stop) {
                Ok(m) => m,
                Err(e) => break e.to_string(),
            };
            let mut guard = lock(link);
            let translated = match guard.session.as_mut() {
                Some(s) => s.translate(&self.device, &self.space, incoming.bytes, incoming.fds),
                None => break "no session".to_owned(),
            };
            match translated {
                Ok(frame) => {
                    // Before it goes: the reply may come back at once.
                    let code = MsgHeader::parse(&frame.payload).map(|h| h.request);
                    guard.awaiting = code.ok();
                    drop(guard);
                    self.send(&frame);
                }
                Err(e) => {
                    log::warn!("driver-VM channel {channel}: {e}; closing the channel");
                    break e.to_string();
                }
            }
        };
        let vm_closed = {
            let mut link = lock(link);
            if let Some(mut session) = link.session.take() {
                session.close(&self.device, &self.space);
            }
            let vm_closed = link.vm_closed;
            *link = Link::default();
            vm_closed
        };
        let _ = conn.shutdown(std::net::Shutdown::Both);
        if !vm_closed {
            self.send(&Frame::close(channel));
        }
        log::info!("driver-VM channel {channel}: closed ({why})");
    }
}
