//! `BlockFrontend`: a process domain's virtio-blk device, reached over vhost-user.
//!
//! Set-up is frontend-core's vhost-user session ([`FrontendSession`]): negotiation and
//! GET_CONFIG (capacity) at connect, then the memory table with the one I/O window region and
//! every queue's vring. Ring addresses are GPAs in the window; no host pointer of this process
//! reaches the backend.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use frontend_core::vhost_user::{
    connect_with_retry, ConfigSpace, DeviceSpec, FrontendSession, SharedRegion, VringSetup,
    DEFAULT_REPLY_TIMEOUT,
};

use super::error::ProcessFrontendError;
use super::peer::BackendPeer;
use super::queue::{BlockFrontendQueue, FrontendStats};
use super::window::{IoWindow, DEFAULT_WINDOW_GPA};
use crate::virtio::blk::{negotiate_features, FrontBlkConfig, BLK_CONFIG_BYTES, VIRTIO_BLK_F_MQ};
use crate::virtio::{
    BumpAllocator, DmaBuf, DmaRegion, FrontBlkQueue, QueueAddrs, SplitQueue,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Settings of a [`BlockFrontend`].
#[derive(Debug, Clone)]
pub struct BlockFrontendConfig {
    /// Entries per virtqueue (power of two, at most 1024).
    pub queue_size: u16,
    /// Number of request queues.
    pub queues: u16,
    /// Size of the I/O window in bytes (rings, headers and bounce buffers of all queues).
    pub window_size: usize,
    /// Guest-physical base of the window as announced to the backend.
    pub window_gpa: u64,
    /// Bounce buffer size: the largest transfer of one request.
    pub max_request_bytes: u32,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if the backend offers it.
    pub event_idx: bool,
    /// Busy-poll the used ring instead of sleeping on the call eventfd.
    pub poll: bool,
    /// How long a wait for a completion may take before it fails.
    pub timeout: Duration,
}

impl Default for BlockFrontendConfig {
    fn default() -> Self {
        Self {
            queue_size: 128,
            queues: 1,
            window_size: 4 << 20,
            window_gpa: DEFAULT_WINDOW_GPA,
            max_request_bytes: 64 << 10,
            event_idx: true,
            poll: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A virtio-blk frontend in a host process, connected to a vhost-user-blk backend.
pub struct BlockFrontend {
    queues: Vec<Mutex<BlockFrontendQueue>>,
    session: FrontendSession,
    window: Arc<IoWindow>,
    config: FrontBlkConfig,
    features: u64,
}

impl std::fmt::Debug for BlockFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockFrontend")
            .field("queues", &self.queues.len())
            .field("window", &self.window)
            .field("config", &self.config)
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl BlockFrontend {
    /// Connects to the vhost-user-blk backend listening at `path`. A backend that is still
    /// starting is retried for up to `cfg.timeout`.
    pub fn connect_path(
        path: &Path,
        cfg: BlockFrontendConfig,
    ) -> Result<Self, ProcessFrontendError> {
        Self::connect(connect_with_retry(path, cfg.timeout)?, cfg)
    }

    /// Runs the vhost-user set-up over a connected socket and starts every queue.
    pub fn connect(
        stream: UnixStream,
        cfg: BlockFrontendConfig,
    ) -> Result<Self, ProcessFrontendError> {
        if cfg.max_request_bytes == 0 || !cfg.max_request_bytes.is_multiple_of(512) {
            return Err(ProcessFrontendError::Config(format!(
                "max_request_bytes {} is not a positive multiple of 512",
                cfg.max_request_bytes
            )));
        }
        let spec = DeviceSpec {
            max_queues: 0,
            queues: cfg.queues,
            config: ConfigSpace::Required {
                bytes: BLK_CONFIG_BYTES,
            },
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            // It re-posts its own chains after a backend restart.
            inflight: false,
        };
        let mut session = FrontendSession::connect(stream, spec)?;
        let features = negotiate_features(session.device_features(), cfg.event_idx)?;
        if cfg.queues > 1 && features & VIRTIO_BLK_F_MQ == 0 {
            return Err(ProcessFrontendError::Unsupported("VIRTIO_BLK_F_MQ".into()));
        }
        session.set_features(features)?;
        let config = FrontBlkConfig::parse(session.config().unwrap_or_default(), features)?;
        if let Some(n) = config.num_queues {
            if n < cfg.queues {
                return Err(ProcessFrontendError::Unsupported(format!(
                    "{} queues (device config says {n})",
                    cfg.queues
                )));
            }
        }

        let window = Arc::new(IoWindow::new(cfg.window_size, cfg.window_gpa)?);
        let queues = Self::build_queues(&window, &cfg, features)?;
        session.set_mem_table(&[SharedRegion {
            gpa: window.gpa(),
            len: window.len() as u64,
            fd: window.as_raw_fd(),
        }])?;
        let mut started = Vec::with_capacity(queues.len());
        for (i, (blk, bounce)) in queues.into_iter().enumerate() {
            let mut q = Self::start_queue(&mut session, i, blk, bounce, &window, &cfg)?;
            q.set_peer(BackendPeer::new(session.peer()?));
            started.push(Mutex::new(q));
        }
        Ok(Self {
            queues: started,
            session,
            window,
            config,
            features,
        })
    }

    /// Carves rings, headers and bounce buffers of every queue out of the window.
    #[allow(clippy::type_complexity)]
    fn build_queues(
        window: &IoWindow,
        cfg: &BlockFrontendConfig,
        features: u64,
    ) -> Result<Vec<(FrontBlkQueue<DmaRegion>, Vec<DmaBuf>)>, ProcessFrontendError> {
        let region = window.region();
        let mut alloc = BumpAllocator::new(&region);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut blks = Vec::new();
        for _ in 0..cfg.queues {
            let size = cfg.queue_size;
            let addrs = QueueAddrs {
                desc: alloc.alloc(QueueAddrs::desc_bytes(size), 64)?,
                avail: alloc.alloc(QueueAddrs::avail_bytes(size), 64)?,
                used: alloc.alloc(QueueAddrs::used_bytes(size), 64)?,
            };
            // SAFETY: the rings are inside the window, which every BlockFrontendQueue keeps alive via
            // its Arc<IoWindow>; nothing else in this process uses those bytes.
            let vq = unsafe { SplitQueue::new(&region, addrs, size, event_idx)? };
            blks.push(FrontBlkQueue::new(vq, region, &mut alloc)?);
        }
        let page = 4096u64;
        let per_request = u64::from(cfg.max_request_bytes).div_ceil(page) * page;
        let free = (window.len() as u64).saturating_sub(alloc.used() + page);
        let fit = free / (per_request * u64::from(cfg.queues));
        // 3 descriptors per data request: more bounce buffers than that could never be in use.
        let depth = fit.min(u64::from(cfg.queue_size / 3).max(1));
        if depth == 0 {
            return Err(ProcessFrontendError::Config(format!(
                "window of {} bytes has no room for a {}-byte bounce buffer per queue",
                window.len(),
                cfg.max_request_bytes
            )));
        }
        let mut out = Vec::new();
        for blk in blks {
            let mut bounce = Vec::new();
            for _ in 0..depth {
                let addr = alloc.alloc(per_request as usize, page as usize)?;
                bounce.push(DmaBuf {
                    addr,
                    len: cfg.max_request_bytes,
                });
            }
            out.push((blk, bounce));
        }
        Ok(out)
    }

    fn start_queue(
        session: &mut FrontendSession,
        i: usize,
        blk: FrontBlkQueue<DmaRegion>,
        bounce: Vec<DmaBuf>,
        window: &Arc<IoWindow>,
        cfg: &BlockFrontendConfig,
    ) -> Result<BlockFrontendQueue, ProcessFrontendError> {
        let addrs = blk.virtqueue_ref().addrs();
        session.start_vring(
            i,
            VringSetup {
                size: cfg.queue_size,
                desc: addrs.desc,
                avail: addrs.avail,
                used: addrs.used,
            },
        )?;
        let dup = |fd: &vmm_sys_util::eventfd::EventFd| {
            fd.try_clone().map_err(|source| ProcessFrontendError::Io {
                op: "dup eventfd",
                source,
            })
        };
        Ok(BlockFrontendQueue::new(
            i as u16,
            blk,
            Arc::clone(window),
            dup(session.kick(i)?)?,
            dup(session.call(i)?)?,
            bounce,
            cfg.poll,
            cfg.timeout,
        ))
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }
    /// The parsed device configuration.
    pub fn config(&self) -> FrontBlkConfig {
        self.config
    }
    /// The acknowledged virtio feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }
    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & VIRTIO_RING_F_EVENT_IDX != 0
    }
    /// The I/O window shared with the backend.
    pub fn window(&self) -> &IoWindow {
        &self.window
    }
    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Exclusive access to queue `index` (each thread of a multi-queue user takes its own).
    pub fn queue(
        &self,
        index: u16,
    ) -> Result<MutexGuard<'_, BlockFrontendQueue>, ProcessFrontendError> {
        self.queues
            .get(index as usize)
            .ok_or(ProcessFrontendError::NoQueue(index))?
            .lock()
            .map_err(|_| ProcessFrontendError::Poisoned(index))
    }

    /// Reads from `sector` into `buf` (a multiple of 512 bytes) on queue 0.
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ProcessFrontendError> {
        self.queue(0)?.read(sector, buf)
    }
    /// Writes `data` (a multiple of 512 bytes) at `sector` on queue 0.
    pub fn write(&self, sector: u64, data: &[u8]) -> Result<(), ProcessFrontendError> {
        self.queue(0)?.write(sector, data)
    }
    /// Flushes the device write cache (queue 0).
    pub fn flush(&self) -> Result<(), ProcessFrontendError> {
        self.queue(0)?.flush()
    }
    /// Reads the device id (queue 0).
    pub fn get_id(&self) -> Result<[u8; 20], ProcessFrontendError> {
        self.queue(0)?.get_id()
    }

    /// Reconnects to a restarted backend on `stream`, keeping everything else: the same I/O
    /// window, rings, bounce buffers and eventfds, and the requests in flight when the old
    /// backend went away, which are re-posted oldest first and waited for (their results are
    /// those of the new backend). A caller that saw [`ProcessFrontendError::BackendGone`]
    /// then goes on as if the request had only been slow.
    ///
    /// The rings start over (cleared, in-flight requests re-posted from avail index 0 and
    /// published) before the new backend is told them: it may read a ring as soon as it has
    /// it, and does at once when the dead backend left a kick unread on the kick eventfd. A
    /// ring cleared under it would lose what it completed meanwhile (the request would never
    /// complete and the reconnect would time out).
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<u32, ProcessFrontendError> {
        let spec = DeviceSpec {
            queues: self.num_queues(),
            max_queues: 0,
            config: ConfigSpace::Required {
                bytes: BLK_CONFIG_BYTES,
            },
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            // It re-posts its own chains after a backend restart.
            inflight: false,
        };
        let mut resubmitted = 0u32;
        for i in 0..self.num_queues() {
            resubmitted += u32::from(self.queue(i)?.restart()?);
        }
        self.session.reconnect(stream, spec)?;
        for i in 0..self.num_queues() {
            let peer = BackendPeer::new(self.session.peer()?);
            self.queue(i)?.set_peer(peer);
        }
        for i in 0..self.num_queues() {
            let mut q = self.queue(i)?;
            while q.in_flight() > 0 {
                // Completed for callers that gave up waiting: the data is on the disk (or
                // read and dropped); only a failure is worth saying.
                q.complete(|c| {
                    if let Err(e) = c.result {
                        log::warn!("a request resubmitted after the restart failed: {e}");
                    }
                })?;
            }
        }
        Ok(resubmitted)
    }

    /// Counters summed over all queues.
    pub fn stats(&self) -> Result<FrontendStats, ProcessFrontendError> {
        let mut total = FrontendStats::default();
        for i in 0..self.num_queues() {
            total.add(&self.queue(i)?.stats());
        }
        Ok(total)
    }

    /// Stops every vring (GET_VRING_BASE) after draining in-flight requests, and closes the
    /// session. Returns, per queue, the avail index the backend reports it stopped at, which
    /// equals the number of requests this frontend published (mod 2^16).
    pub fn shutdown(mut self) -> Result<Vec<u16>, ProcessFrontendError> {
        let mut bases = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            q.lock()
                .map_err(|_| ProcessFrontendError::Poisoned(i as u16))?
                .drain()?;
            let base = self.session.stop_vring(i)?.unwrap_or_default();
            bases.push(base as u16);
        }
        Ok(bases)
    }
}
