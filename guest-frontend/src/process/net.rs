//! `NetFrontend`: a process domain's virtio-net device (one RX/TX queue pair), reached over
//! vhost-user, with rings and frame buffers in the process's I/O window (as [`super::block`]).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use frontend_core::vhost_user::{
    connect_with_retry, ConfigSpace, DeviceSpec, FrontendSession, SharedRegion, VringSetup,
    DEFAULT_REPLY_TIMEOUT,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::error::ProcessFrontendError;
use super::peer::BackendPeer;
use super::window::{IoWindow, DEFAULT_WINDOW_GPA};
use crate::virtio::net::{
    negotiate_features, FrontNetConfig, NetError, NetQueuePair, NET_CONFIG_BYTES,
    VIRTIO_NET_F_MRG_RXBUF,
};
use crate::virtio::{BumpAllocator, DmaRegion, Notify, QueueAddrs, SplitQueue};

const RX: usize = 0;
const TX: usize = 1;

/// Settings of a [`NetFrontend`].
#[derive(Debug, Clone)]
pub struct NetFrontendConfig {
    /// Entries per virtqueue (power of two, at most 1024).
    pub queue_size: u16,
    /// Size of the I/O window in bytes.
    pub window_size: usize,
    /// Guest-physical base of the window as announced to the backend.
    pub window_gpa: u64,
    /// Negotiate VIRTIO_NET_F_MRG_RXBUF if offered.
    pub mrg_rxbuf: bool,
    /// How long connecting may wait for the backend socket.
    pub timeout: Duration,
}

impl Default for NetFrontendConfig {
    fn default() -> Self {
        Self {
            queue_size: 256,
            window_size: 2 << 20,
            window_gpa: DEFAULT_WINDOW_GPA,
            mrg_rxbuf: true,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A virtio-net frontend in a host process, connected to a vhost-user-net backend.
pub struct NetFrontend {
    session: FrontendSession,
    /// The backend's connection, watched while receiving.
    peer: BackendPeer,
    pair: NetQueuePair<DmaRegion>,
    config: FrontNetConfig,
    features: u64,
    // Declared last: the rings above live in it.
    window: Arc<IoWindow>,
}

impl std::fmt::Debug for NetFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetFrontend")
            .field("config", &self.config)
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl NetFrontend {
    /// Connects to the vhost-user-net backend listening at `path` (retried for `cfg.timeout`
    /// while the backend starts).
    pub fn connect_path(path: &Path, cfg: NetFrontendConfig) -> Result<Self, ProcessFrontendError> {
        Self::connect(connect_with_retry(path, cfg.timeout)?, cfg)
    }

    /// Runs the vhost-user set-up over a connected socket and starts both queues.
    pub fn connect(
        stream: UnixStream,
        cfg: NetFrontendConfig,
    ) -> Result<Self, ProcessFrontendError> {
        let size = cfg.queue_size;
        if size == 0 || !size.is_power_of_two() || size > 1024 {
            return Err(ProcessFrontendError::Config(format!("queue size {size}")));
        }
        let spec = DeviceSpec {
            max_queues: 0,
            queues: 2,
            config: ConfigSpace::IfOffered {
                bytes: NET_CONFIG_BYTES,
            },
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            // It re-posts its own chains after a backend restart.
            inflight: false,
        };
        let mut session = FrontendSession::connect(stream, spec)?;
        let features = negotiate_features(session.device_features(), cfg.mrg_rxbuf, false)?;
        session.set_features(features)?;
        let config = match session.config() {
            Some(raw) => FrontNetConfig::parse(raw, features)?,
            None => FrontNetConfig::parse(&[0; NET_CONFIG_BYTES], 0)?,
        };

        let window = Arc::new(IoWindow::new(cfg.window_size, cfg.window_gpa)?);
        let region = window.region();
        let mut alloc = BumpAllocator::new(&region);
        let mut rings = Vec::new();
        for _ in 0..2 {
            let addrs = QueueAddrs {
                desc: alloc
                    .alloc(QueueAddrs::desc_bytes(size), 64)
                    .map_err(NetError::from)?,
                avail: alloc
                    .alloc(QueueAddrs::avail_bytes(size), 64)
                    .map_err(NetError::from)?,
                used: alloc
                    .alloc(QueueAddrs::used_bytes(size), 64)
                    .map_err(NetError::from)?,
            };
            // SAFETY: the rings are inside the window, which `NetFrontend` keeps alive (its
            // `window` field outlives `pair`); nothing else in this process uses those bytes.
            let ring = unsafe { SplitQueue::new(&region, addrs, size, false) };
            rings.push(ring.map_err(NetError::from)?);
        }
        let tx = rings
            .pop()
            .ok_or(ProcessFrontendError::Config("no TX ring".into()))?;
        let rx = rings
            .pop()
            .ok_or(ProcessFrontendError::Config("no RX ring".into()))?;
        let mrg = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mut pair = NetQueuePair::new(rx, tx, region, &mut alloc, mrg)?;
        session.set_mem_table(&[SharedRegion {
            gpa: window.gpa(),
            len: window.len() as u64,
            fd: window.as_raw_fd(),
        }])?;
        pair.fill_rx()?;
        for q in [RX, TX] {
            let addrs = if q == RX {
                pair.rx_queue().addrs()
            } else {
                pair.tx_queue().addrs()
            };
            session.start_vring(
                q,
                VringSetup {
                    size,
                    desc: addrs.desc,
                    avail: addrs.avail,
                    used: addrs.used,
                },
            )?;
        }
        let peer = BackendPeer::new(session.peer()?);
        let me = Self {
            session,
            peer,
            pair,
            config,
            features,
            window,
        };
        me.kick(RX)?;
        Ok(me)
    }

    fn kick(&self, q: usize) -> Result<(), ProcessFrontendError> {
        self.session
            .kick(q)?
            .write(1)
            .map_err(|source| ProcessFrontendError::Io { op: "kick", source })
    }

    /// The MAC address the device published, if any.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.config.mac
    }

    /// The parsed device configuration.
    pub fn config(&self) -> FrontNetConfig {
        self.config
    }

    /// The acknowledged feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The I/O window shared with the backend.
    pub fn window(&self) -> &IoWindow {
        &self.window
    }

    /// Sends one Ethernet frame (without FCS).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), ProcessFrontendError> {
        self.pair.reclaim_tx()?;
        self.pair.send(frame)?;
        if self.pair.publish_tx() == Notify::Kick {
            self.kick(TX)?;
        }
        Ok(())
    }

    /// Receives one frame into `out`, waiting up to `timeout`; `None` if none arrived.
    pub fn recv(
        &mut self,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<Option<usize>, ProcessFrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.pair.recv(out);
            if self.pair.fill_rx()? == Notify::Kick {
                self.kick(RX)?;
            }
            if let Some(n) = got? {
                return Ok(Some(n));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let call = self.session.call(RX)?;
            // SAFETY: the session owns the eventfd and outlives this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(call.as_raw_fd()) };
            // SAFETY: `self.peer` owns the descriptor and outlives this borrow.
            let peer = unsafe { BorrowedFd::borrow_raw(self.peer.raw()) };
            let ms = u16::try_from(left.as_millis().min(100)).unwrap_or(100);
            let mut fds = [
                PollFd::new(fd, PollFlags::POLLIN),
                PollFd::new(peer, PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(ProcessFrontendError::Io {
                        op: "wait for a receive interrupt",
                        source: e.into(),
                    })
                }
            }
            let call_ready = fds[0].any().unwrap_or(false);
            let peer_events = fds[1].revents().map_or(0, |r| r.bits());
            if !call_ready && self.peer.ended(peer_events) {
                return Err(ProcessFrontendError::BackendGone {
                    queue: RX as u16,
                    in_flight: 0,
                });
            }
            let _ = call.read();
            self.pair.rx_queue().note_interrupt();
        }
    }

    /// Stops both vrings (GET_VRING_BASE) and closes the session.
    pub fn shutdown(mut self) -> Result<(), ProcessFrontendError> {
        for q in [RX, TX] {
            self.session.stop_vring(q)?;
        }
        Ok(())
    }
}
