//! The in-VM server's main loop (`driver-domain vm-serve`): reads frames from the tunnel,
//! says HELLO first, opens a channel per OPEN with a fresh device from the caller, delivers
//! VHOST frames to their channel and ends a channel on CLOSE. A bad frame (the decoder's
//! errors) is logged and skipped; a message that cannot be delivered fails its channel alone
//! (closed here, CLOSE to dom0); the server and the other channels go on.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;

use ipc::tunnel::{Frame, FrameDecoder, FrameKind};
use log::{info, warn};
use thiserror::Error;

use super::channel::Channel;
use super::doorbell::{DoorbellError, DoorbellRelay};
use super::poller::{PollerError, RingPoller};
use super::refs::SignalPaths;
use super::writer::{TunnelWriter, WriterError};
use super::xvm_device::CrossVmDevice;
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
        let relay = DoorbellRelay::start(device.clone())?;
        let poller = RingPoller::start()?;
        Ok(VmServer {
            device,
            tunnel,
            relay,
            poller,
            channels: HashMap::new(),
            new_device,
        })
    }

    /// The ring poller (its counts).
    pub fn poller(&self) -> &RingPoller {
        &self.poller
    }

    /// Says HELLO, then serves the frames read from `input` until it ends (Ok) or fails.
    pub fn run(&mut self, mut input: impl Read) -> Result<(), ServerError> {
        self.tunnel
            .send(&Frame::hello())
            .map_err(ServerError::Hello)?;
        info!(
            "vm-serve: ready (HELLO sent; cross-VM device {})",
            self.device.bdf()
        );
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
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
        }
        info!("vm-serve: the tunnel closed");
        self.close_all();
        Ok(())
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
            FrameKind::Store | FrameKind::Control => {
                warn!(
                    "tunnel: {:?} frame, but this server runs no driver domain; dropped",
                    frame.kind
                )
            }
            FrameKind::Open => {
                if let Some(old) = self.channels.remove(&id) {
                    warn!("channel {id}: opened again; ending the old session");
                    old.close(false, self.paths());
                }
                let opened = (self.new_device)(id).and_then(|d| {
                    Channel::open(id, d, self.tunnel.clone()).map_err(|e| e.to_string())
                });
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

    fn close_all(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.channels.remove(&id) {
                c.close(false, self.paths());
            }
        }
    }
}
