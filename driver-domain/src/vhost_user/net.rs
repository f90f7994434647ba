//! vhost-user-net: a thin adapter from `vhost-user-backend` to the virtio-net core in
//! [`crate::net`], one switch port per frontend.
//!
//! The adapter answers feature and configuration queries from [`NetConfig`], checks every
//! memory table ([`crate::virtio_core::memory`]), records the negotiated features, and on a kick
//! (or when the switch queues a frame for the port: the port's wake eventfd is registered with
//! the worker's epoll) runs the TX queues into the switch and the switch's frames into RX.
//! One worker thread serves all queues of a device, round-robin with a per-queue budget.
//! Frames are received on the first queue pair (any enabled RX queue is valid for virtio);
//! every pair transmits.
//!
//! Serving entry points:
//! - [`serve_net`]: bind a socket path and serve one frontend after another on one port.
//! - [`serve_net_listener`]: serve the one frontend pending on a handed-over listener.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
use crate::net::{Negotiated, NetConfig, NetConfigSpace, RxQueue, SwitchPort, TxQueue};

/// Errors of the vhost-user-net adapter.
#[derive(Debug, Error)]
pub enum VhostUserNetError {
    /// The configuration is unusable.
    #[error("invalid net device configuration: {0}")]
    Config(&'static str),
    /// Eventfd creation failed.
    #[error("cannot create an exit event: {0}")]
    Event(#[source] io::Error),
    /// Binding the socket failed.
    #[error("cannot listen on the vhost-user socket: {0}")]
    Listen(#[source] vhost::vhost_user::Error),
    /// The vhost-user daemon could not be created, started or wired.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One vhost-user-net device instance (one frontend connection) on a switch port.
pub struct VhostUserNet {
    cfg: NetConfig,
    features: u64,
    config_space: NetConfigSpace,
    port: Arc<SwitchPort>,
    memory: CheckedMemory,
    rx: Vec<Mutex<RxQueue>>,
    tx: Vec<Mutex<TxQueue>>,
    exit: (EventConsumer, EventNotifier),
}

impl std::fmt::Debug for VhostUserNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserNet")
            .field("cfg", &self.cfg)
            .field("port", &self.port.id())
            .finish()
    }
}

impl VhostUserNet {
    /// A device with options `cfg` on `port`.
    pub fn new(port: Arc<SwitchPort>, cfg: NetConfig) -> Result<Self, VhostUserNetError> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > 16 {
            return Err(VhostUserNetError::Config("queue pairs must be 1..=16"));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(VhostUserNetError::Config(
                "queue size must be a power of two <= 32768",
            ));
        }
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for p in 0..cfg.queue_pairs {
            rx.push(Mutex::new(RxQueue::new(2 * p, port.clone(), cfg.budget)));
            tx.push(Mutex::new(TxQueue::new(
                2 * p + 1,
                port.clone(),
                cfg.budget,
            )));
        }
        Ok(VhostUserNet {
            features: cfg.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            config_space: NetConfigSpace::new(&cfg),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                .map_err(VhostUserNetError::Event)?,
            cfg,
            port,
            memory: CheckedMemory::default(),
            rx,
            tx,
        })
    }

    /// The epoll token of the port's wake eventfd (above the queues and the exit event).
    fn wake_token(&self) -> u64 {
        self.cfg.num_queues() as u64 + 1
    }

    /// Stop this device's worker thread.
    pub fn stop_workers(&self) {
        let _ = self.exit.1.notify();
    }

    fn current_mem(&self) -> Option<GuestMem> {
        self.memory.current()
    }

    fn set_idle_notify(&self, on: bool) {
        for q in &self.tx {
            lock(q).set_idle_notify(on);
        }
        for q in &self.rx {
            lock(q).set_idle_notify(on);
        }
    }

    /// Run every TX queue and the first RX queue until none has work left; with `poll_us`,
    /// keep polling (guest kicks and switch wake-ups off) until the queues stayed idle that
    /// long, then re-enable notifications with a last pass.
    fn serve(&self, vrings: &[VringRwLock]) {
        let Some(atomic) = self.current_mem() else {
            return;
        };
        let mem = atomic.memory();
        let poll = Duration::from_micros(self.cfg.poll_us);
        if !poll.is_zero() {
            self.set_idle_notify(false);
            let mut deadline = Instant::now() + poll;
            let mut idle_passes = 0u32;
            loop {
                let (more, worked) = self.pass(vrings, &mem);
                if more || worked {
                    idle_passes = 0;
                    if worked {
                        deadline = Instant::now() + poll;
                    }
                    continue;
                }
                // Read the clock only every few idle passes: it costs more than a pass.
                idle_passes += 1;
                if idle_passes & 31 == 0 && Instant::now() >= deadline {
                    break;
                }
                std::hint::spin_loop();
            }
            self.set_idle_notify(true);
        }
        while self.pass(vrings, &mem).0 {}
    }

    /// One round over the queues; returns (a budget ran out, any frame moved).
    fn pass(&self, vrings: &[VringRwLock], mem: &GuestMemoryMmap) -> (bool, bool) {
        let mut more = false;
        let mut worked = false;
        for (p, txq) in self.tx.iter().enumerate() {
            let Some(vring) = vrings.get(2 * p + 1) else {
                continue;
            };
            let mut state = vring.get_mut();
            if !(state.get_queue().ready() && state.is_enabled()) {
                continue;
            }
            let mut q = lock(txq);
            if q.broken().is_some() {
                continue;
            }
            if let Ok(prog) = q.process(state.get_queue_mut(), mem) {
                if prog.notify {
                    match state.signal_used_queue() {
                        Ok(()) => self.cfg.counters.add_interrupt(),
                        Err(e) => warn!("net: cannot signal TX queue {}: {e}", 2 * p + 1),
                    }
                }
                more |= prog.more;
                worked |= prog.frames > 0;
            }
        }
        if let (Some(vring), Some(rxq)) = (vrings.first(), self.rx.first()) {
            let mut state = vring.get_mut();
            if state.get_queue().ready() && state.is_enabled() {
                let mut q = lock(rxq);
                if q.broken().is_none() {
                    if let Ok(prog) = q.process(state.get_queue_mut(), mem) {
                        if prog.notify {
                            match state.signal_used_queue() {
                                Ok(()) => self.cfg.counters.add_interrupt(),
                                Err(e) => warn!("net: cannot signal RX queue 0: {e}"),
                            }
                        }
                        more |= prog.more;
                        worked |= prog.frames > 0;
                    }
                }
            }
        }
        (more, worked)
    }
}

impl VhostUserBackend for VhostUserNet {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        let neg = Negotiated::from_features(features);
        info!(
            "net port {}: features {features:#x} acked (header {} bytes, mrg_rxbuf {})",
            self.port.id(),
            neg.hdr_len,
            neg.mrg_rxbuf
        );
        for q in &self.rx {
            lock(q).set_negotiated(neg);
        }
        for q in &self.tx {
            lock(q).set_negotiated(neg);
        }
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
            "virtio-net configuration space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.memory.update(mem, self.cfg.seal_policy, "net")
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.cfg.num_queues()) - 1]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        if thread_index != 0 {
            return None;
        }
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let i = queue_index as usize;
        if i & 1 == 0 {
            if let Some(q) = self.rx.get(i / 2) {
                lock(q).reset();
            }
        } else if let Some(q) = self.tx.get(i / 2) {
            lock(q).reset();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if u64::from(device_event) == self.wake_token() {
            // Consume the wake-up; the counter value does not matter.
            let _ = self.port.wake_fd().read();
        } else if usize::from(device_event) >= vrings.len() {
            return Ok(());
        } else {
            self.cfg.counters.add_kick();
        }
        if !self.memory.usable() {
            return Ok(());
        }
        self.serve(vrings);
        Ok(())
    }
}

fn log_session_end(port: usize, r: Result<(), vhost_user_backend::Error>) {
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::Error as DaemonError;
    match r {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => {
            info!("net port {port}: frontend disconnected")
        }
        Err(e) => warn!("net port {port}: session ended with an error: {e}"),
    }
}

type Daemon = VhostUserDaemon<Arc<VhostUserNet>>;

fn new_daemon(
    port: &Arc<SwitchPort>,
    cfg: &NetConfig,
) -> Result<(Arc<VhostUserNet>, Daemon), VhostUserNetError> {
    let backend = Arc::new(VhostUserNet::new(port.clone(), cfg.clone())?);
    let daemon = VhostUserDaemon::new(
        format!("driver-domain-net-{}", port.id()),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserNetError::Daemon(e.to_string()))?;
    for h in daemon.get_epoll_handlers() {
        h.register_listener(
            port.wake_fd().as_raw_fd(),
            EventSet::IN,
            backend.wake_token(),
        )
        .map_err(|e| VhostUserNetError::Daemon(format!("registering the wake eventfd: {e}")))?;
    }
    Ok((backend, daemon))
}

/// Serve one frontend connection accepted from `listener` on `port`, until it disconnects.
/// Errors of the session are logged and end only that session.
pub fn serve_net_one(
    listener: &mut Listener,
    port: &Arc<SwitchPort>,
    cfg: &NetConfig,
) -> Result<(), VhostUserNetError> {
    let (backend, mut daemon) = new_daemon(port, cfg)?;
    daemon
        .start(listener)
        .map_err(|e| VhostUserNetError::Daemon(e.to_string()))?;
    info!("net port {}: frontend connected", port.id());
    log_session_end(port.id(), daemon.wait());
    backend.stop_workers();
    log_counters(port);
    Ok(())
}

fn log_counters(port: &SwitchPort) {
    let c = port.counters();
    info!(
        "net port {}: counters tx_frames={} tx_bytes={} tx_invalid={} tx_dropped={} \
         tx_filtered={} rx_frames={} rx_bytes={} rx_dropped={}",
        port.id(),
        c.tx_frames,
        c.tx_bytes,
        c.tx_invalid,
        c.tx_dropped,
        c.tx_filtered,
        c.rx_frames,
        c.rx_bytes,
        c.rx_dropped
    );
}

/// Bind `socket` (replacing a stale socket file) and serve frontends on `port` one after
/// another until `stop` becomes true (checked between connections) or accepting fails.
pub fn serve_net(
    socket: &Path,
    port: Arc<SwitchPort>,
    cfg: NetConfig,
    stop: &AtomicBool,
) -> Result<(), VhostUserNetError> {
    let mut listener = Listener::new(socket, true).map_err(VhostUserNetError::Listen)?;
    info!("net port {}: listening on {}", port.id(), socket.display());
    while !stop.load(Ordering::Acquire) {
        serve_net_one(&mut listener, &port, &cfg)?;
    }
    Ok(())
}

/// Serve the one frontend whose connection is pending on `listener` on `port` (managed mode,
/// as [`crate::vhost_user::blk::serve_blk_listener`]: the listener was bound privately,
/// connected, unlinked and handed over). `started` receives a handle that ends the session from
/// another thread. Returns when the frontend disconnects or the session is shut down; the port
/// stays attached until the caller drops its last handle.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use driver_domain::net::{NetConfig, Switch, SwitchConfig};
/// # use driver_domain::vhost_user::net::serve_net_listener;
/// # fn handed_over() -> std::os::unix::net::UnixListener { unimplemented!() }
/// let switch = Switch::new(SwitchConfig::default()); // one per driver domain
/// let port = Arc::new(switch.attach("vif2.0")?);
/// let cfg = NetConfig { mac: [0x02, 0, 0, 0, 2, 0], ..NetConfig::default() };
/// serve_net_listener(handed_over(), port.clone(), cfg, |_shutdown| {})?;
/// println!("{:?}", port.counters()); // per-port counters for the toolstack
/// drop(port); // detaches the port from the switch
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn serve_net_listener(
    listener: impl Into<Listener>,
    port: Arc<SwitchPort>,
    cfg: NetConfig,
    started: impl FnOnce(vhost_user_backend::ShutdownHandle),
) -> Result<(), VhostUserNetError> {
    let mut listener = listener.into();
    let (backend, mut daemon) = new_daemon(&port, &cfg)?;
    daemon
        .start(&mut listener)
        .map_err(|e| VhostUserNetError::Daemon(e.to_string()))?;
    drop(listener);
    if let Some(handle) = daemon.shutdown_handle() {
        started(handle);
    }
    info!("net port {}: frontend connected", port.id());
    log_session_end(port.id(), daemon.wait());
    backend.stop_workers();
    log_counters(&port);
    Ok(())
}
