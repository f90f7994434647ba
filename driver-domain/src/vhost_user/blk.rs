//! vhost-user-blk: a thin adapter from `vhost-user-backend` to the transport-independent core
//! in [`crate::blk`].
//!
//! The adapter only translates: it answers feature/config queries from [`BlkConfig`], checks
//! every memory table the frontend sends ([`crate::blk::memory`]), and on a kick hands the
//! vring's `Queue` and the current guest memory to [`BlkQueue::process`]. Queues are spread over
//! at most `min(num_queues, cores)` worker threads; a thread serving several queues visits them
//! round-robin with the per-queue budget.
//!
//! Serving entry points:
//! - [`serve_blk`]: bind a socket path and serve one frontend after another, forever.
//! - [`serve_blk_listener`]: serve the one frontend pending on a handed-over listener (managed
//!   mode; see control-vmm's `connection` module for how the toolstack makes it).

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::checked_memory::{CheckedMemory, GuestMem};
use crate::blk::{BlkConfig, BlkConfigSpace, BlkDisk, BlkQueue, InflightError, InflightLog};

/// Errors of the vhost-user-blk adapter.
#[derive(Debug, Error)]
pub enum VhostUserBlkError {
    /// The configuration is unusable.
    #[error("invalid block device configuration: {0}")]
    Config(&'static str),
    /// The in-flight log could not be created.
    #[error(transparent)]
    Inflight(#[from] InflightError),
    /// Eventfd creation failed.
    #[error("cannot create an exit event: {0}")]
    Event(#[source] io::Error),
    /// Binding the socket failed.
    #[error("cannot listen on the vhost-user socket: {0}")]
    Listen(#[source] vhost::vhost_user::Error),
    /// The vhost-user daemon could not be created or started.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// One vhost-user-blk device instance (one frontend connection).
pub struct VhostUserBlk {
    cfg: BlkConfig,
    features: u64,
    config_space: BlkConfigSpace,
    memory: CheckedMemory,
    queues: Vec<Mutex<BlkQueue>>,
    /// Global queue indexes served by each worker thread, in vring order.
    thread_queues: Vec<Vec<usize>>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    _inflight: InflightLog,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("cfg", &self.cfg)
            .field("threads", &self.thread_queues)
            .finish()
    }
}

impl VhostUserBlk {
    /// A device on `disk` with options `cfg`.
    pub fn new(disk: Arc<BlkDisk>, cfg: BlkConfig) -> Result<Self, VhostUserBlkError> {
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(VhostUserBlkError::Config("queues must be 1..=64"));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(VhostUserBlkError::Config(
                "queue size must be a power of two <= 32768",
            ));
        }
        let log = InflightLog::new(cfg.num_queues, cfg.queue_size)?;
        let mut queues = Vec::new();
        for q in 0..cfg.num_queues {
            let iq = log
                .queue(q)
                .ok_or(VhostUserBlkError::Config("in-flight log too small"))?;
            queues.push(Mutex::new(BlkQueue::new(q, disk.clone(), &cfg, iq)));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let nthreads = usize::from(cfg.num_queues).min(cores).max(1);
        let mut thread_queues = vec![Vec::new(); nthreads];
        for q in 0..usize::from(cfg.num_queues) {
            thread_queues[q % nthreads].push(q);
        }
        let mut exits = Vec::new();
        for _ in 0..nthreads {
            exits.push(
                new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                    .map_err(VhostUserBlkError::Event)?,
            );
        }
        Ok(VhostUserBlk {
            features: cfg.features(disk.read_only())
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            config_space: BlkConfigSpace::new(&cfg, disk.capacity_sectors()),
            cfg,
            memory: CheckedMemory::default(),
            queues,
            thread_queues,
            exits,
            _inflight: log,
        })
    }

    /// Stop this device's worker threads (after its connection ended).
    pub fn stop_workers(&self) {
        for (_, n) in &self.exits {
            let _ = n.notify();
        }
    }

    fn current_mem(&self) -> Option<GuestMem> {
        self.memory.current()
    }

    /// Serve the queues of `thread_id` until none has work left, round-robin.
    fn serve_thread_queues(&self, vrings: &[VringRwLock], thread_id: usize) {
        let Some(globals) = self.thread_queues.get(thread_id) else {
            return;
        };
        let Some(atomic) = self.current_mem() else {
            warn!("blk: kick before any memory table; ignored");
            return;
        };
        let mut pending = vec![true; vrings.len().min(globals.len())];
        while pending.iter().any(|p| *p) {
            for (local, more) in pending.iter_mut().enumerate() {
                if !*more {
                    continue;
                }
                *more = false;
                let mut state = vrings[local].get_mut();
                if !(state.get_queue().ready() && state.is_enabled()) {
                    continue;
                }
                let mut bq = match self.queues[globals[local]].lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                // A memory table may be refused while this loop runs (polling keeps it busy).
                if bq.broken().is_some() || !self.memory.usable() {
                    continue;
                }
                // A fresh snapshot per call: the frontend may add regions between calls.
                let mem = atomic.memory();
                if let Ok(p) = bq.process(state.get_queue_mut(), &*mem) {
                    if p.notify {
                        match state.signal_used_queue() {
                            Ok(()) => self.cfg.counters.add_interrupt(),
                            Err(e) => warn!(
                                "blk queue {}: cannot signal the driver: {e}",
                                globals[local]
                            ),
                        }
                    }
                    *more = p.more;
                }
            }
        }
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // virtio-queue tracks EVENT_IDX per queue; vhost-user-backend sets it there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk configuration space is read-only here",
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.memory.update(mem, self.cfg.seal_policy, "blk")
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.thread_queues
            .iter()
            .map(|qs| qs.iter().fold(0u64, |m, q| m | (1u64 << q)))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(q) = self.queues.get(queue_index as usize) {
            match q.lock() {
                Ok(mut g) => g.reset(),
                Err(p) => p.into_inner().reset(),
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if usize::from(device_event) >= vrings.len() {
            return Ok(());
        }
        self.cfg.counters.add_kick();
        if !self.memory.usable() {
            warn!("blk: kick ignored, the memory table was refused or is missing");
            return Ok(());
        }
        self.serve_thread_queues(vrings, thread_id);
        Ok(())
    }
}

fn log_session_end(r: Result<(), vhost_user_backend::Error>) {
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::Error as DaemonError;
    match r {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => {
            info!("blk: frontend disconnected")
        }
        Err(e) => warn!("blk: session ended with an error: {e}"),
    }
}

fn new_daemon(
    disk: &Arc<BlkDisk>,
    cfg: &BlkConfig,
) -> Result<(Arc<VhostUserBlk>, VhostUserDaemon<Arc<VhostUserBlk>>), VhostUserBlkError> {
    let backend = Arc::new(VhostUserBlk::new(disk.clone(), cfg.clone())?);
    let daemon = VhostUserDaemon::new(
        "driver-domain-blk".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserBlkError::Daemon(e.to_string()))?;
    Ok((backend, daemon))
}

/// Serve one frontend connection accepted from `listener`, until it disconnects. Errors of
/// the session (a hostile or buggy frontend) are logged and end only that session.
pub fn serve_one(
    listener: &mut Listener,
    disk: &Arc<BlkDisk>,
    cfg: &BlkConfig,
) -> Result<(), VhostUserBlkError> {
    let (backend, mut daemon) = new_daemon(disk, cfg)?;
    daemon
        .start(listener)
        .map_err(|e| VhostUserBlkError::Daemon(e.to_string()))?;
    info!("blk: frontend connected");
    log_session_end(daemon.wait());
    backend.stop_workers();
    Ok(())
}

/// Bind and listen under a temporary name, then rename onto `socket`: the path appears only
/// once it accepts connections (a plain bind creates the file before `listen`, and a client
/// that connects in between gets ECONNREFUSED). A stale socket file is replaced.
fn bind_atomically(socket: &Path) -> Result<Listener, VhostUserBlkError> {
    let io = |e: io::Error| VhostUserBlkError::Listen(vhost::vhost_user::Error::SocketError(e));
    let name = socket
        .file_name()
        .ok_or_else(|| io(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = socket.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    if let Err(e) = std::fs::rename(&tmp, socket) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(Listener::from(listener))
}

/// Bind `socket` (replacing a stale socket file) and serve frontends one after another until
/// `stop` becomes true (checked between connections) or accepting fails.
pub fn serve_blk(
    socket: &Path,
    disk: Arc<BlkDisk>,
    cfg: BlkConfig,
    stop: &AtomicBool,
) -> Result<(), VhostUserBlkError> {
    let mut listener = bind_atomically(socket)?;
    info!("blk: listening on {}", socket.display());
    while !stop.load(Ordering::Acquire) {
        serve_one(&mut listener, &disk, &cfg)?;
    }
    Ok(())
}

/// Serve the one frontend whose connection is pending on `listener` (managed mode: the
/// toolstack bound a listener in a private directory, connected the frontend to it, unlinked
/// the path and handed the listener over, so no other peer can ever reach it). `started`
/// receives a handle that ends the session from another thread. Returns when the frontend
/// disconnects or the session is shut down.
pub fn serve_blk_listener(
    mut listener: Listener,
    disk: Arc<BlkDisk>,
    cfg: BlkConfig,
    started: impl FnOnce(vhost_user_backend::ShutdownHandle),
) -> Result<(), VhostUserBlkError> {
    let (backend, mut daemon) = new_daemon(&disk, &cfg)?;
    daemon
        .start(&mut listener)
        .map_err(|e| VhostUserBlkError::Daemon(e.to_string()))?;
    // Nobody else may connect: the listener goes as soon as its one connection is accepted.
    drop(listener);
    if let Some(handle) = daemon.shutdown_handle() {
        started(handle);
    }
    info!("blk: frontend connected");
    log_session_end(daemon.wait());
    backend.stop_workers();
    Ok(())
}
