//! The in-VM server's main loop (`driver-domain vm-serve`): reads frames from the tunnel,
//! says HELLO first, opens a channel per OPEN with a fresh device from the caller, delivers
//! VHOST frames to their channel and ends a channel on CLOSE. A bad frame (the decoder's
//! errors) is logged and skipped; a message that cannot be delivered fails its channel alone
//! (closed here, CLOSE to dom0); the server and the other channels go on.
//!
//! Managed ([`VmServer::managed`]): the in-VM `driver-domain managed` serves every device;
//! STORE and CONTROL frames go to it ([`super::managed`]), and OPEN relays a channel to the
//! connection its CONTROL request prepared. The server ends when the tunnel does, or when the
//! driver domain is gone.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::sync::Arc;

use ipc::tunnel::{Frame, FrameDecoder, FrameKind};
use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;

use super::channel::Channel;
use super::doorbell::{DoorbellError, DoorbellRelay};
use super::managed::{ManagedBackend, ManagedError, ManagedLink};
use super::poller::{PollerError, RingPoller};
use super::refs::SignalPaths;
use super::writer::{TunnelWriter, WriterError};
use super::xvm_device::CrossVmDevice;
use crate::blk::BlkBackendDevice;
use crate::virtio_core::BackendDevice;

/// Why the server stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Reading the tunnel failed.
    #[error("reading the tunnel: {0}")]
    Read(#[source] io::Error),
    /// HELLO could not be sent.
    #[error("saying HELLO: {0}")]
    Hello(#[source] WriterError),
    /// The doorbell relay could not start.
    #[error(transparent)]
    Doorbell(#[from] DoorbellError),
    /// The ring poller could not start.
    #[error(transparent)]
    Poller(#[from] PollerError),
    /// The server's wake-up could not be made, or waiting on it failed.
    #[error("the server's wake-up: {0}")]
    Wake(#[source] nix::Error),
    /// The managed driver domain's side could not start.
    #[error(transparent)]
    Managed(#[from] ManagedError),
}

/// Why the server stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The tunnel closed.
    Tunnel,
    /// The managed driver domain behind it is gone (its store or control channel closed).
    DriverDomain,
}

/// The device maker of a managed server: none; every device is the driver domain's.
pub type NoDevices = fn(u16) -> Result<BlkBackendDevice, String>;

fn no_devices(channel: u16) -> Result<BlkBackendDevice, String> {
    Err(format!("channel {channel}: no device is made here"))
}

/// The in-VM server: the cross-VM device, the tunnel's writer, the threads behind the
/// signals, and the open channels.
pub struct VmServer<F> {
    device: Arc<CrossVmDevice>,
    tunnel: Arc<TunnelWriter>,
    relay: DoorbellRelay,
    poller: RingPoller,
    channels: HashMap<u16, Channel>,
    new_device: F,
    /// The managed driver domain, if the server runs one.
    managed: Option<ManagedBackend>,
    /// Signalled when the managed driver domain is gone.
    wake: Arc<EventFd>,
}

impl VmServer<NoDevices> {
    /// A server for a managed driver domain on `link`: its STORE and CONTROL frames go
    /// there, and each channel relays to the connection its request prepared.
    pub fn managed(
        device: Arc<CrossVmDevice>,
        tunnel: Arc<TunnelWriter>,
        link: ManagedLink,
    ) -> Result<Self, ServerError> {
        let mut server = VmServer::new(device, tunnel.clone(), no_devices as NoDevices)?;
        server.managed = Some(ManagedBackend::start(link, tunnel, server.wake.clone())?);
        Ok(server)
    }
}

impl<D, F> VmServer<F>
where
    D: BackendDevice + Send + 'static,
    F: FnMut(u16) -> Result<D, String>,
{
    /// A server on `device` that sends on `tunnel`; `new_device(channel)` makes the device
    /// a channel serves (an error refuses the channel).
    pub fn new(
        device: Arc<CrossVmDevice>,
        tunnel: Arc<TunnelWriter>,
        new_device: F,
    ) -> Result<Self, ServerError> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(ServerError::Wake)?;
        let relay = DoorbellRelay::start(device.clone())?;
        let poller = RingPoller::start()?;
        Ok(VmServer {
            device,
            tunnel,
            relay,
            poller,
            channels: HashMap::new(),
            new_device,
            managed: None,
            wake: Arc::new(wake),
        })
    }

    /// The ring poller (its counts).
    pub fn poller(&self) -> &RingPoller {
        &self.poller
    }

    /// Says HELLO, then serves the frames read from `input` until it ends or the managed
    /// driver domain is gone (Ok: which), or reading fails.
    pub fn run(&mut self, mut input: impl Read + AsFd) -> Result<Ended, ServerError> {
        self.tunnel
            .send(&Frame::hello())
            .map_err(ServerError::Hello)?;
        info!(
            "vm-serve: ready (HELLO sent; cross-VM device {})",
            self.device.bdf()
        );
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let ended = loop {
            let mut fds = [
                PollFd::new(input.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    self.close_all();
                    return Err(ServerError::Wake(e));
                }
            }
            // Data, or the end (POLLHUP, POLLERR), which the read then reports.
            let input_ready = fds[0].revents().is_none_or(|r| !r.is_empty());
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                info!("vm-serve: the driver domain is gone");
                break Ended::DriverDomain;
            }
            if !input_ready {
                continue;
            }
            let n = match input.read(&mut buf) {
                Ok(0) => {
                    info!("vm-serve: the tunnel closed");
                    break Ended::Tunnel;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close_all();
                    return Err(ServerError::Read(e));
                }
            };
            decoder.push(&buf[..n]);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => self.handle(frame),
                    Ok(None) => break,
                    Err(e) => warn!("tunnel: {e}"),
                }
            }
            self.reap();
        };
        self.close_all();
        Ok(ended)
    }

    fn paths(&self) -> SignalPaths<'_> {
        SignalPaths {
            shm: self.device.shm(),
            relay: &self.relay,
            poller: &self.poller,
        }
    }

    /// One frame from dom0.
    fn handle(&mut self, frame: Frame) {
        let id = frame.channel;
        match frame.kind {
            FrameKind::Hello => warn!("tunnel: HELLO from dom0 ignored"),
            FrameKind::Store | FrameKind::Control if self.managed.is_none() => {
                warn!(
                    "tunnel: {:?} frame, but this server runs no driver domain; dropped",
                    frame.kind
                )
            }
            FrameKind::Store => {
                if let Some(m) = &mut self.managed {
                    m.store(&frame.payload);
                }
            }
            FrameKind::Control => {
                if let Some(m) = &mut self.managed {
                    m.control(&frame.payload);
                }
            }
            FrameKind::Open => {
                if let Some(old) = self.channels.remove(&id) {
                    warn!("channel {id}: opened again; ending the old session");
                    old.close(false, self.paths());
                }
                let opened = match &mut self.managed {
                    Some(m) => m.take_prepared(id).map_err(str::to_owned).and_then(|conn| {
                        Channel::relay(id, conn, self.tunnel.clone()).map_err(|e| e.to_string())
                    }),
                    None => (self.new_device)(id).and_then(|d| {
                        Channel::open(id, d, self.tunnel.clone()).map_err(|e| e.to_string())
                    }),
                };
                match opened {
                    Ok(c) => {
                        self.channels.insert(id, c);
                    }
                    Err(e) => {
                        warn!("channel {id}: refused: {e}");
                        self.tell_closed(id);
                    }
                }
            }
            FrameKind::Close => match self.channels.remove(&id) {
                Some(c) => c.close(false, self.paths()),
                None => info!("channel {id}: CLOSE of a channel not open"),
            },
            FrameKind::Vhost => {
                let Some(mut channel) = self.channels.remove(&id) else {
                    warn!("channel {id}: message for a channel not open, dropped");
                    return;
                };
                if channel.ended() {
                    // dom0 was told; its CLOSE is on the way.
                    channel.close(false, self.paths());
                    return;
                }
                match channel.deliver(&frame, self.paths()) {
                    Ok(()) => {
                        self.channels.insert(id, channel);
                    }
                    Err(e) => {
                        warn!("channel {id}: {e}: closing it");
                        channel.close(true, self.paths());
                    }
                }
            }
        }
    }

    /// Tells dom0 channel `id` is closed on this side.
    fn tell_closed(&self, id: u16) {
        if let Err(e) = self.tunnel.send(&Frame::close(id)) {
            warn!("channel {id}: {e}");
        }
    }

    /// Drops the channels whose backend ended (dom0 was told).
    fn reap(&mut self) {
        let ended: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| c.ended())
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(c) = self.channels.remove(&id) {
                c.close(false, self.paths());
            }
        }
    }

    /// Ends every channel, then the link to the managed driver domain.
    fn close_all(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.channels.remove(&id) {
                c.close(false, self.paths());
            }
        }
        self.managed = None;
    }
}
