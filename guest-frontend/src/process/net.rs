//! `NetFrontend`: a process domain's virtio-net device (one RX/TX queue pair), reached over
//! vhost-user, with rings and frame buffers in the process's I/O window (as [`super::block`]).

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::window::{IoWindow, WindowError, DEFAULT_WINDOW_GPA};
use crate::virtio::net::{
    negotiate_features, NetConfig, NetError, NetQueuePair, NET_CONFIG_BYTES, VIRTIO_NET_F_MRG_RXBUF,
};
use crate::virtio::{BumpAllocator, DmaRegion, Notify, QueueAddrs, SplitQueue};

const RX: usize = 0;
const TX: usize = 1;

/// Errors of [`NetFrontend`].
#[derive(Debug, Error)]
pub enum NetFrontendError {
    /// The configuration is unusable.
    #[error("invalid net frontend configuration: {0}")]
    Config(String),
    /// The backend lacks something the frontend needs.
    #[error("backend does not support {0}")]
    Unsupported(String),
    /// The I/O window could not be set up.
    #[error("I/O window: {0}")]
    Window(#[from] WindowError),
    /// A vhost-user message failed.
    #[error("vhost-user {op}: {source}")]
    VhostUser {
        /// The request that failed.
        op: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// Eventfd or socket I/O failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The virtio-net driver failed.
    #[error("virtio-net: {0}")]
    Net(#[from] NetError),
}

impl From<crate::virtio::QueueError> for NetFrontendError {
    fn from(e: crate::virtio::QueueError) -> Self {
        Self::Net(NetError::Queue(e))
    }
}

impl From<crate::virtio::MemoryError> for NetFrontendError {
    fn from(e: crate::virtio::MemoryError) -> Self {
        Self::Net(NetError::Memory(e))
    }
}

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

fn vu(op: &'static str) -> impl FnOnce(vhost::Error) -> NetFrontendError {
    move |source| NetFrontendError::VhostUser { op, source }
}

fn eventfd(op: &'static str) -> Result<EventFd, NetFrontendError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| NetFrontendError::Io { op, source })
}

/// A virtio-net frontend in a host process, connected to a vhost-user-net backend.
pub struct NetFrontend {
    vhost: Frontend,
    pair: NetQueuePair<DmaRegion>,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    config: NetConfig,
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
    pub fn connect_path(path: &Path, cfg: NetFrontendConfig) -> Result<Self, NetFrontendError> {
        let deadline = Instant::now() + cfg.timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(NetFrontendError::Io {
                        op: "connect to vhost-user socket",
                        source,
                    })
                }
            }
        };
        Self::connect(stream, cfg)
    }

    /// Runs the vhost-user set-up over a connected socket and starts both queues.
    pub fn connect(stream: UnixStream, cfg: NetFrontendConfig) -> Result<Self, NetFrontendError> {
        let size = cfg.queue_size;
        if size == 0 || !size.is_power_of_two() || size > 1024 {
            return Err(NetFrontendError::Config(format!("queue size {size}")));
        }
        let mut vhost = Frontend::from_stream(stream, 2);
        vhost.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = vhost.get_features().map_err(vu("GET_FEATURES"))?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & proto_bit == 0 {
            return Err(NetFrontendError::Unsupported(
                "VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        let proto = vhost
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let want = proto & VhostUserProtocolFeatures::CONFIG;
        vhost
            .set_protocol_features(want)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        let features = negotiate_features(offered, cfg.mrg_rxbuf, false)? | proto_bit;
        vhost.set_features(features).map_err(vu("SET_FEATURES"))?;
        let config = if want.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, raw) = vhost
                .get_config(
                    0,
                    NET_CONFIG_BYTES as u32,
                    VhostUserConfigFlags::empty(),
                    &[0u8; NET_CONFIG_BYTES],
                )
                .map_err(vu("GET_CONFIG"))?;
            NetConfig::parse(&raw, features)?
        } else {
            NetConfig::parse(&[0; NET_CONFIG_BYTES], 0)?
        };

        let window = Arc::new(IoWindow::new(cfg.window_size, cfg.window_gpa)?);
        let region = window.region();
        let mut alloc = BumpAllocator::new(&region);
        let mut rings = Vec::new();
        for _ in 0..2 {
            let addrs = QueueAddrs {
                desc: alloc.alloc(QueueAddrs::desc_bytes(size), 64)?,
                avail: alloc.alloc(QueueAddrs::avail_bytes(size), 64)?,
                used: alloc.alloc(QueueAddrs::used_bytes(size), 64)?,
            };
            // SAFETY: the rings are inside the window, which `NetFrontend` keeps alive (its
            // `window` field outlives `pair`); nothing else in this process uses those bytes.
            rings.push(unsafe { SplitQueue::new(&region, addrs, size, false)? });
        }
        let tx = rings
            .pop()
            .ok_or(NetFrontendError::Config("no TX ring".into()))?;
        let rx = rings
            .pop()
            .ok_or(NetFrontendError::Config("no RX ring".into()))?;
        let mrg = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mut pair = NetQueuePair::new(rx, tx, region, &mut alloc, mrg)?;
        vhost
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: window.gpa(),
                memory_size: window.len() as u64,
                userspace_addr: window.gpa(),
                mmap_offset: 0,
                mmap_handle: window.as_raw_fd(),
            }])
            .map_err(vu("SET_MEM_TABLE"))?;
        let kicks = [eventfd("kick eventfd")?, eventfd("kick eventfd")?];
        let calls = [eventfd("call eventfd")?, eventfd("call eventfd")?];
        pair.fill_rx()?;
        for (i, q) in [RX, TX].into_iter().enumerate() {
            let addrs = if q == RX {
                pair.rx_queue().addrs()
            } else {
                pair.tx_queue().addrs()
            };
            vhost.set_vring_num(q, size).map_err(vu("SET_VRING_NUM"))?;
            vhost.set_vring_base(q, 0).map_err(vu("SET_VRING_BASE"))?;
            let ring = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: addrs.desc,
                used_ring_addr: addrs.used,
                avail_ring_addr: addrs.avail,
                log_addr: None,
            };
            vhost
                .set_vring_addr(q, &ring)
                .map_err(vu("SET_VRING_ADDR"))?;
            vhost
                .set_vring_call(q, &calls[i])
                .map_err(vu("SET_VRING_CALL"))?;
            vhost
                .set_vring_kick(q, &kicks[i])
                .map_err(vu("SET_VRING_KICK"))?;
            vhost
                .set_vring_enable(q, true)
                .map_err(vu("SET_VRING_ENABLE"))?;
        }
        let me = Self {
            vhost,
            pair,
            kicks,
            calls,
            config,
            features,
            window,
        };
        me.kick(RX)?;
        Ok(me)
    }

    fn kick(&self, q: usize) -> Result<(), NetFrontendError> {
        self.kicks[q]
            .write(1)
            .map_err(|source| NetFrontendError::Io { op: "kick", source })
    }

    /// The MAC address the device published, if any.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.config.mac
    }

    /// The parsed device configuration.
    pub fn config(&self) -> NetConfig {
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
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetFrontendError> {
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
    ) -> Result<Option<usize>, NetFrontendError> {
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
            // SAFETY: the EventFd owns the descriptor and outlives this borrow.
            let fd = unsafe { BorrowedFd::borrow_raw(self.calls[RX].as_raw_fd()) };
            let ms = u16::try_from(left.as_millis().min(100)).unwrap_or(100);
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(NetFrontendError::Io {
                        op: "wait for a receive interrupt",
                        source: e.into(),
                    })
                }
            }
            let _ = self.calls[RX].read();
            self.pair.rx_queue().note_interrupt();
        }
    }

    /// Stops both vrings (GET_VRING_BASE) and closes the session.
    pub fn shutdown(self) -> Result<(), NetFrontendError> {
        for q in [RX, TX] {
            self.vhost.get_vring_base(q).map_err(vu("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}
