//! `BlockFrontend`: a process domain's virtio-blk device, reached over vhost-user.
//!
//! Set-up (one vhost-user session, in the order QEMU uses): SET_OWNER, feature and protocol
//! feature negotiation, GET_CONFIG (capacity), SET_MEM_TABLE with the one I/O window region,
//! then per queue SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE. In the memory table the window's
//! "user address" is set to its GPA, not to our mapping's address, so the ring addresses in
//! SET_VRING_ADDR are GPAs too and no host pointer of this process reaches the backend.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::error::FrontendError;
use super::queue::{BlockQueue, FrontendStats};
use super::window::{IoWindow, DEFAULT_WINDOW_GPA};
use crate::virtio::blk::{negotiate_features, BlkConfig, BLK_CONFIG_BYTES, VIRTIO_BLK_F_MQ};
use crate::virtio::{
    BlkQueue, BumpAllocator, DmaBuf, QueueAddrs, SplitQueue, VIRTIO_RING_F_EVENT_IDX,
};

/// Settings of a [`BlockFrontend`].
#[derive(Debug, Clone)]
pub struct FrontendConfig {
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

impl Default for FrontendConfig {
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
    queues: Vec<Mutex<BlockQueue>>,
    vhost: Frontend,
    window: Arc<IoWindow>,
    config: BlkConfig,
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

fn vu(op: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::VhostUser { op, source }
}

fn eventfd(op: &'static str) -> Result<EventFd, FrontendError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| FrontendError::Io { op, source })
}

impl BlockFrontend {
    /// Connects to the vhost-user-blk backend listening at `path`. A backend that is still
    /// starting (socket not yet created, or bound but not yet listening) is retried for up to
    /// `cfg.timeout`.
    pub fn connect_path(path: &Path, cfg: FrontendConfig) -> Result<Self, FrontendError> {
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
                    return Err(FrontendError::Io {
                        op: "connect to vhost-user socket",
                        source,
                    })
                }
            }
        };
        Self::connect(stream, cfg)
    }

    /// Runs the vhost-user set-up over a connected socket and starts every queue.
    pub fn connect(stream: UnixStream, cfg: FrontendConfig) -> Result<Self, FrontendError> {
        if cfg.queues == 0 || cfg.queues > 64 {
            return Err(FrontendError::Config(format!("{} queues", cfg.queues)));
        }
        if cfg.max_request_bytes == 0 || !cfg.max_request_bytes.is_multiple_of(512) {
            return Err(FrontendError::Config(format!(
                "max_request_bytes {} is not a positive multiple of 512",
                cfg.max_request_bytes
            )));
        }
        let mut vhost = Frontend::from_stream(stream, u64::from(cfg.queues));
        vhost.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = vhost.get_features().map_err(vu("GET_FEATURES"))?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & proto_bit == 0 {
            return Err(FrontendError::Unsupported(
                "VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        let proto = vhost
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::Unsupported(
                "the CONFIG protocol feature".into(),
            ));
        }
        let mut want = VhostUserProtocolFeatures::CONFIG;
        if cfg.queues > 1 {
            if !proto.contains(VhostUserProtocolFeatures::MQ) {
                return Err(FrontendError::Unsupported("the MQ protocol feature".into()));
            }
            want |= VhostUserProtocolFeatures::MQ;
        }
        vhost
            .set_protocol_features(want)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        if cfg.queues > 1 {
            let max = vhost.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?;
            if max < u64::from(cfg.queues) {
                return Err(FrontendError::Unsupported(format!(
                    "{} queues (backend has {max})",
                    cfg.queues
                )));
            }
        }
        let features = negotiate_features(offered, cfg.event_idx)? | proto_bit;
        if cfg.queues > 1 && features & VIRTIO_BLK_F_MQ == 0 {
            return Err(FrontendError::Unsupported("VIRTIO_BLK_F_MQ".into()));
        }
        vhost.set_features(features).map_err(vu("SET_FEATURES"))?;
        let (_, raw) = vhost
            .get_config(
                0,
                BLK_CONFIG_BYTES as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; BLK_CONFIG_BYTES],
            )
            .map_err(vu("GET_CONFIG"))?;
        let config = BlkConfig::parse(&raw, features)?;
        if let Some(n) = config.num_queues {
            if n < cfg.queues {
                return Err(FrontendError::Unsupported(format!(
                    "{} queues (device config says {n})",
                    cfg.queues
                )));
            }
        }

        let window = Arc::new(IoWindow::new(cfg.window_size, cfg.window_gpa)?);
        let queues = Self::build_queues(&window, &cfg, features)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: window.gpa(),
            memory_size: window.len() as u64,
            // Deliberately the GPA, not our mapping: the backend needs only a consistent
            // translation key, and our address space layout is none of its business.
            userspace_addr: window.gpa(),
            mmap_offset: 0,
            mmap_handle: window.as_raw_fd(),
        };
        vhost
            .set_mem_table(&[region])
            .map_err(vu("SET_MEM_TABLE"))?;
        let mut started = Vec::with_capacity(queues.len());
        for (i, (blk, bounce)) in queues.into_iter().enumerate() {
            let q = Self::start_queue(&mut vhost, i, blk, bounce, &window, &cfg)?;
            started.push(Mutex::new(q));
        }
        Ok(Self {
            queues: started,
            vhost,
            window,
            config,
            features,
        })
    }

    /// Carves rings, headers and bounce buffers of every queue out of the window.
    #[allow(clippy::type_complexity)]
    fn build_queues(
        window: &IoWindow,
        cfg: &FrontendConfig,
        features: u64,
    ) -> Result<Vec<(BlkQueue<crate::virtio::DmaRegion>, Vec<DmaBuf>)>, FrontendError> {
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
            // SAFETY: the rings are inside the window, which every BlockQueue keeps alive via
            // its Arc<IoWindow>; nothing else in this process uses those bytes.
            let vq = unsafe { SplitQueue::new(&region, addrs, size, event_idx)? };
            blks.push(BlkQueue::new(vq, region, &mut alloc)?);
        }
        let page = 4096u64;
        let per_request = u64::from(cfg.max_request_bytes).div_ceil(page) * page;
        let free = (window.len() as u64).saturating_sub(alloc.used() + page);
        let fit = free / (per_request * u64::from(cfg.queues));
        // 3 descriptors per data request: more bounce buffers than that could never be in use.
        let depth = fit.min(u64::from(cfg.queue_size / 3).max(1));
        if depth == 0 {
            return Err(FrontendError::Config(format!(
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
        vhost: &mut Frontend,
        i: usize,
        blk: BlkQueue<crate::virtio::DmaRegion>,
        bounce: Vec<DmaBuf>,
        window: &Arc<IoWindow>,
        cfg: &FrontendConfig,
    ) -> Result<BlockQueue, FrontendError> {
        let addrs = blk.virtqueue_ref().addrs();
        let kick = eventfd("kick eventfd")?;
        let call = eventfd("call eventfd")?;
        vhost
            .set_vring_num(i, cfg.queue_size)
            .map_err(vu("SET_VRING_NUM"))?;
        vhost.set_vring_base(i, 0).map_err(vu("SET_VRING_BASE"))?;
        let ring = VringConfigData {
            queue_max_size: cfg.queue_size,
            queue_size: cfg.queue_size,
            flags: 0,
            desc_table_addr: addrs.desc,
            used_ring_addr: addrs.used,
            avail_ring_addr: addrs.avail,
            log_addr: None,
        };
        vhost
            .set_vring_addr(i, &ring)
            .map_err(vu("SET_VRING_ADDR"))?;
        vhost
            .set_vring_call(i, &call)
            .map_err(vu("SET_VRING_CALL"))?;
        vhost
            .set_vring_kick(i, &kick)
            .map_err(vu("SET_VRING_KICK"))?;
        vhost
            .set_vring_enable(i, true)
            .map_err(vu("SET_VRING_ENABLE"))?;
        Ok(BlockQueue::new(
            i as u16,
            blk,
            Arc::clone(window),
            kick,
            call,
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
    pub fn config(&self) -> BlkConfig {
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
    pub fn queue(&self, index: u16) -> Result<MutexGuard<'_, BlockQueue>, FrontendError> {
        self.queues
            .get(index as usize)
            .ok_or(FrontendError::NoQueue(index))?
            .lock()
            .map_err(|_| FrontendError::Poisoned(index))
    }

    /// Reads from `sector` into `buf` (a multiple of 512 bytes) on queue 0.
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), FrontendError> {
        self.queue(0)?.read(sector, buf)
    }
    /// Writes `data` (a multiple of 512 bytes) at `sector` on queue 0.
    pub fn write(&self, sector: u64, data: &[u8]) -> Result<(), FrontendError> {
        self.queue(0)?.write(sector, data)
    }
    /// Flushes the device write cache (queue 0).
    pub fn flush(&self) -> Result<(), FrontendError> {
        self.queue(0)?.flush()
    }
    /// Reads the device id (queue 0).
    pub fn get_id(&self) -> Result<[u8; 20], FrontendError> {
        self.queue(0)?.get_id()
    }

    /// Counters summed over all queues.
    pub fn stats(&self) -> Result<FrontendStats, FrontendError> {
        let mut total = FrontendStats::default();
        for i in 0..self.num_queues() {
            total.add(&self.queue(i)?.stats());
        }
        Ok(total)
    }

    /// Stops every vring (GET_VRING_BASE) after draining in-flight requests, and closes the
    /// session. Returns, per queue, the avail index the backend reports it stopped at, which
    /// equals the number of requests this frontend published (mod 2^16).
    pub fn shutdown(self) -> Result<Vec<u16>, FrontendError> {
        let mut bases = Vec::with_capacity(self.queues.len());
        for i in 0..self.num_queues() {
            let mut q = self.queue(i)?;
            q.drain()?;
            let base = self
                .vhost
                .get_vring_base(i as usize)
                .map_err(vu("GET_VRING_BASE"))?;
            bases.push(base as u16);
        }
        Ok(bases)
    }
}
