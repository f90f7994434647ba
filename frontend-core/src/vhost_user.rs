//! The vhost-user frontend session of one device, on the `vhost` crate's [`Frontend`].
//!
//! Set-up runs in the order QEMU uses: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM (several queues), GET_CONFIG at connect; then, when the user knows them,
//! SET_FEATURES, SET_MEM_TABLE and per queue SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE. A queue
//! stops with GET_VRING_BASE: once that returns, the backend no longer touches the ring. With
//! REPLY_ACK (negotiated where offered) each of those set-up messages waits for the backend's
//! acknowledgement: a refused one fails at once, and a returned one has been acted on.
//!
//! In every memory table a region's "user address" is its guest-physical address, so ring
//! addresses are passed as GPAs and no host pointer of the frontend reaches the backend.
//!
//! The session owns each queue's kick and call eventfds (a VMM binds them in KVM as
//! ioeventfd/irqfd; a process guest writes and polls them) and keeps what it sent (acked
//! features, memory table, running vrings), which is what a new connection needs re-sent.
//!
//! A device whose rings belong to someone else (a VMM's guest) asks for in-flight tracking
//! ([`DeviceSpec::inflight`]): with INFLIGHT_SHMFD offered, the session gets the backend's log
//! (GET_INFLIGHT_FD) after the features and before the rings start, as QEMU's
//! `vhost_dev_prepare_inflight` does, and keeps its memfd. [`FrontendSession::resume`] hands it
//! to a restarted backend (SET_INFLIGHT_FD) before the rings, starts each ring at the used
//! index the caller read from the guest's used ring, and kicks: the backend resubmits what
//! the log marks in flight (libvhost-user's `vu_check_queue_inflights`).

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::reply_watchdog::ReplyWatchdog;

/// Device feature: virtio 1.x. Every backend this frontend talks to must offer it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Most queues one session drives.
pub const MAX_QUEUES: u16 = 64;
/// How long a backend may take to answer one request, by default.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of a [`FrontendSession`].
#[derive(Debug, Error)]
pub enum FrontendSessionError {
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the reply watchdog")]
    Watchdog(#[source] std::io::Error),
    #[error("vhost-user {op}")]
    Protocol {
        op: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user {op}: no reply within {timeout:?}")]
    ReplyTimeout { op: &'static str, timeout: Duration },
    #[error("backend lacks {0}")]
    Unsupported(&'static str),
    #[error("backend has {offered} queues, {wanted} wanted")]
    TooFewQueues { offered: u64, wanted: u16 },
    #[error("{0} queues asked for (1..={MAX_QUEUES})")]
    QueueCount(u16),
    #[error("no queue {0}")]
    NoQueue(usize),
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("the restarted backend no longer offers features {missing:#x} acknowledged before")]
    FeaturesLost { missing: u64 },
    #[error("duplicating the connection")]
    Duplicate(#[source] std::io::Error),
    #[error("the restarted backend no longer offers in-flight tracking (INFLIGHT_SHMFD)")]
    InflightLost,
    #[error("queue {queue}: reading the guest's used index: {why}")]
    UsedIndex { queue: usize, why: String },
    #[error("signalling queue {0}")]
    Signal(usize, #[source] std::io::Error),
}

/// Whether a device needs its config space read over vhost-user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSpace {
    /// The CONFIG protocol feature is required; `bytes` are read at connect.
    Required { bytes: usize },
    /// Read if the backend offers CONFIG; otherwise the device has no config space.
    IfOffered { bytes: usize },
}

/// What a device asks of its backend.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSpec {
    /// Queues the device runs (more than one needs the MQ protocol feature).
    pub queues: u16,
    /// Queues it may run if the backend offers more (MQ and GET_QUEUE_NUM): up to this many.
    /// At most `queues` (e.g. 0) means exactly `queues`.
    pub max_queues: u16,
    /// Its config space.
    pub config: ConfigSpace,
    /// How long one reply may take (None: wait forever). Past it the session's socket is
    /// shut down and the session fails.
    pub reply_timeout: Option<Duration>,
    /// Ask for the backend's in-flight log (INFLIGHT_SHMFD, if offered), to hand it back to a
    /// restarted backend ([`FrontendSession::resume`]): for rings the frontend cannot re-post
    /// itself (a VMM's guest owns them). A process guest re-posts its own chains instead.
    pub inflight: bool,
}

/// A shared memory region announced to the backend: `len` bytes of the memfd `fd` from offset
/// 0, seen by the backend at guest-physical `gpa`. The owner of `fd` keeps it open for as long
/// as the session may send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedRegion {
    pub gpa: u64,
    pub len: u64,
    pub fd: RawFd,
}

/// One queue's ring layout (guest-physical addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringSetup {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The in-flight log a backend handed out (GET_INFLIGHT_FD): its memfd and shape, kept for
/// the next backend while the rings run.
struct InflightRegion {
    file: File,
    shape: VhostUserInflight,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("mmap_size", &self.shape.mmap_size)
            .field("num_queues", &self.shape.num_queues)
            .field("queue_size", &self.shape.queue_size)
            .finish()
    }
}

/// One queue's notifiers and, while it runs, its layout.
struct Vring {
    kick: EventFd,
    call: EventFd,
    running: Option<VringSetup>,
}

/// A connected vhost-user backend serving one device.
pub struct FrontendSession {
    frontend: Frontend,
    watchdog: Option<ReplyWatchdog>,
    reply_timeout: Option<Duration>,
    /// Features the device offers (the vhost-user protocol bit removed).
    device_features: u64,
    protocol: VhostUserProtocolFeatures,
    /// REPLY_ACK was negotiated: every set-up message asks for the backend's acknowledgement
    /// and waits for it, so a refusal is an error of that message, and once a message has
    /// returned the backend has acted on it.
    acks: bool,
    config: Option<Vec<u8>>,
    /// What was sent, for a new connection.
    acked_features: Option<u64>,
    memory: Vec<SharedRegion>,
    vrings: Vec<Vring>,
    /// The backend's in-flight log, while the rings run on one (see the module comment).
    inflight: Option<InflightRegion>,
}

impl std::fmt::Debug for FrontendSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendSession")
            .field(
                "device_features",
                &format_args!("{:#x}", self.device_features),
            )
            .field("protocol", &self.protocol)
            .field("memory", &self.memory)
            .field("inflight", &self.inflight)
            .field(
                "running",
                &self.vrings.iter().map(|v| v.running).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A backend that stops answering fails the device instead of hanging its user: the watchdog
/// of `stream`, when `spec` has a reply timeout.
fn watchdog_for(
    stream: &UnixStream,
    spec: &DeviceSpec,
) -> Result<Option<ReplyWatchdog>, FrontendSessionError> {
    match spec.reply_timeout {
        Some(timeout) => {
            let watched = stream.try_clone().map_err(FrontendSessionError::Watchdog)?;
            let w = ReplyWatchdog::new(watched, timeout).map_err(FrontendSessionError::Watchdog)?;
            Ok(Some(w))
        }
        None => Ok(None),
    }
}

/// Connects to `path`, retrying for up to `timeout` while the backend starts (socket not yet
/// created, or bound but not yet listening).
pub fn connect_with_retry(
    path: &Path,
    timeout: Duration,
) -> Result<UnixStream, FrontendSessionError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(FrontendSessionError::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
}

impl FrontendSession {
    /// Connects to the backend at `path` (see [`connect_with_retry`]) and runs the set-up.
    pub fn connect_path(
        path: &Path,
        timeout: Duration,
        spec: DeviceSpec,
    ) -> Result<Self, FrontendSessionError> {
        Self::connect(connect_with_retry(path, timeout)?, spec)
    }

    /// Runs the connect-time set-up over an already connected socket (e.g. one the toolstack
    /// handed over): owner, features, protocol features, queue count, config space.
    pub fn connect(stream: UnixStream, spec: DeviceSpec) -> Result<Self, FrontendSessionError> {
        if spec.queues == 0 || spec.queues > MAX_QUEUES || spec.max_queues > MAX_QUEUES {
            return Err(FrontendSessionError::QueueCount(
                spec.queues.max(spec.max_queues),
            ));
        }
        let watchdog = watchdog_for(&stream, &spec)?;
        let efd = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(FrontendSessionError::EventFd)
        };
        let mut session = Self {
            frontend: Frontend::from_stream(stream, u64::from(spec.queues.max(spec.max_queues))),
            watchdog,
            reply_timeout: spec.reply_timeout,
            device_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            acks: false,
            config: None,
            acked_features: None,
            memory: Vec::new(),
            vrings: Vec::new(),
            inflight: None,
        };
        let queues = session.negotiate(&spec)?;
        session.vrings = (0..queues)
            .map(|_| {
                Ok(Vring {
                    kick: efd()?,
                    call: efd()?,
                    running: None,
                })
            })
            .collect::<Result<_, FrontendSessionError>>()?;
        session.config = match spec.config {
            ConfigSpace::Required { bytes } | ConfigSpace::IfOffered { bytes }
                if session.protocol.contains(VhostUserProtocolFeatures::CONFIG) =>
            {
                Some(session.read_config(bytes)?)
            }
            _ => None,
        };
        Ok(session)
    }

    /// Runs the whole set-up again on `stream`, a new connection to a restarted backend: the
    /// connect-time negotiation, then what this session sent before (acknowledged features,
    /// memory table, every running vring with the same kick and call eventfds, from avail
    /// index 0). The frontend re-posts its in-flight requests from index 0 (see
    /// `SplitQueue::restart` on the guest side) *before* calling this: the backend may read a
    /// ring as soon as SET_VRING_KICK and SET_VRING_ENABLE reach it (at once if a kick the
    /// dead backend never read is pending), so a ring rewritten afterwards loses what it
    /// completed. The config space read at first connect is kept.
    pub fn reconnect(
        &mut self,
        stream: UnixStream,
        spec: DeviceSpec,
    ) -> Result<(), FrontendSessionError> {
        self.restart(stream, spec, &mut |_, _| Ok(0))?;
        Ok(())
    }

    /// Resumes rings the frontend cannot re-post (a VMM's guest owns them) on `stream`, a new
    /// connection to a restarted backend, as QEMU's vhost-user-blk does after a reconnect:
    /// the negotiation and features again, SET_INFLIGHT_FD with the log kept from the first
    /// backend (if one was negotiated), the memory table, then each running ring with its
    /// base set to `used_index(q, ring)` (the used index the caller reads from the guest's
    /// used ring); each ring is kicked, and its call signalled once (the dead backend may
    /// have published used elements without signalling them). With a log the backend
    /// resubmits what it marks in flight; without one (a network interface) requests between
    /// the used and the avail index are served again, and those the old backend had already
    /// fetched are served twice or not at all (frames resent or lost). Returns whether the
    /// log was handed back.
    pub fn resume(
        &mut self,
        stream: UnixStream,
        spec: DeviceSpec,
        used_index: &mut dyn FnMut(usize, VringSetup) -> Result<u16, String>,
    ) -> Result<bool, FrontendSessionError> {
        let handed_back = self.restart(stream, spec, used_index)?;
        for (q, v) in self.vrings.iter().enumerate() {
            if v.running.is_some() {
                v.kick
                    .write(1)
                    .map_err(|e| FrontendSessionError::Signal(q, e))?;
                v.call
                    .write(1)
                    .map_err(|e| FrontendSessionError::Signal(q, e))?;
            }
        }
        Ok(handed_back)
    }

    /// The set-up again on a new connection, each running ring at `base(q, ring)`. Returns
    /// whether the in-flight log was handed back.
    fn restart(
        &mut self,
        stream: UnixStream,
        spec: DeviceSpec,
        base: &mut dyn FnMut(usize, VringSetup) -> Result<u16, String>,
    ) -> Result<bool, FrontendSessionError> {
        if usize::from(spec.queues) > self.vrings.len()
            || usize::from(spec.queues.max(spec.max_queues)) < self.vrings.len()
        {
            return Err(FrontendSessionError::QueueCount(spec.queues));
        }
        self.watchdog = watchdog_for(&stream, &spec)?;
        self.reply_timeout = spec.reply_timeout;
        self.frontend = Frontend::from_stream(stream, self.vrings.len() as u64);
        let queues = self.negotiate(&spec)?;
        if usize::from(queues) < self.vrings.len() {
            return Err(FrontendSessionError::TooFewQueues {
                offered: u64::from(queues),
                wanted: self.vrings.len() as u16,
            });
        }
        if let Some(acked) = self.acked_features {
            let missing = acked & !self.device_features;
            if missing != 0 {
                return Err(FrontendSessionError::FeaturesLost { missing });
            }
            self.set_features(acked)?;
        }
        let mut handed_back = false;
        if self.any_running() {
            if let Some(log) = &self.inflight {
                if !self
                    .protocol
                    .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
                {
                    return Err(FrontendSessionError::InflightLost);
                }
                let (shape, fd) = (log.shape, log.file.as_raw_fd());
                self.send_acked("SET_INFLIGHT_FD", |f| f.set_inflight_fd(&shape, fd))?;
                handed_back = true;
            }
        } else {
            // Nothing in flight survives rings that were stopped.
            self.inflight = None;
        }
        if !self.memory.is_empty() {
            let memory = self.memory.clone();
            self.set_mem_table(&memory)?;
        }
        for q in 0..self.vrings.len() {
            if let Some(ring) = self.vrings[q].running.take() {
                let at = base(q, ring)
                    .map_err(|why| FrontendSessionError::UsedIndex { queue: q, why })?;
                self.start_vring_at(q, ring, at)?;
            }
        }
        Ok(handed_back)
    }

    /// A duplicate of the connection's socket: polling it shows when the backend goes away
    /// (end of file, or a hang-up), which no reply is awaited to reveal.
    pub fn peer(&self) -> Result<OwnedFd, FrontendSessionError> {
        // SAFETY: the descriptor is the session's socket, open for as long as `self.frontend`
        // lives, which outlasts this borrow; it is duplicated at once.
        let fd = unsafe { BorrowedFd::borrow_raw(self.frontend.as_raw_fd()) };
        fd.try_clone_to_owned()
            .map_err(FrontendSessionError::Duplicate)
    }

    /// Sends a set-up request that has no reply of its own: with REPLY_ACK negotiated it asks
    /// for (NEED_REPLY) and waits for the backend's acknowledgement, under the reply deadline.
    fn send_acked<T>(
        &mut self,
        op: &'static str,
        request: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendSessionError> {
        if !self.acks {
            return self.send(op, request);
        }
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let result = self.send(op, request);
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        result
    }

    /// Sends one request (and waits for its reply, if it has one) under the reply deadline.
    fn send<T>(
        &mut self,
        op: &'static str,
        request: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendSessionError> {
        let frontend = &mut self.frontend;
        let (result, overran) = match &self.watchdog {
            Some(w) => w.guard(|| request(frontend)),
            None => (request(frontend), false),
        };
        result.map_err(|source| match self.reply_timeout {
            Some(timeout) if overran => FrontendSessionError::ReplyTimeout { op, timeout },
            _ => FrontendSessionError::Protocol { op, source },
        })
    }

    /// Features the device offers (the vhost-user protocol bit removed).
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The config space read at connect; None if the backend has none over vhost-user.
    pub fn config(&self) -> Option<&[u8]> {
        self.config.as_deref()
    }

    /// The features last acknowledged with [`FrontendSession::set_features`].
    pub fn acked_features(&self) -> Option<u64> {
        self.acked_features
    }

    /// The memory table last sent.
    pub fn memory(&self) -> &[SharedRegion] {
        &self.memory
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.vrings.len()
    }

    fn vring(&self, q: usize) -> Result<&Vring, FrontendSessionError> {
        self.vrings.get(q).ok_or(FrontendSessionError::NoQueue(q))
    }

    /// Queue `q`'s kick eventfd: the frontend (or KVM's ioeventfd) signals it.
    pub fn kick(&self, q: usize) -> Result<&EventFd, FrontendSessionError> {
        Ok(&self.vring(q)?.kick)
    }

    /// Queue `q`'s call eventfd: the backend signals it on completions.
    pub fn call(&self, q: usize) -> Result<&EventFd, FrontendSessionError> {
        Ok(&self.vring(q)?.call)
    }

    /// Whether queue `q` runs in the backend.
    pub fn running(&self, q: usize) -> bool {
        self.vrings.get(q).is_some_and(|v| v.running.is_some())
    }

    /// Whether any queue runs in the backend.
    pub fn any_running(&self) -> bool {
        self.vrings.iter().any(|v| v.running.is_some())
    }

    /// Acknowledges `features` (a subset of [`FrontendSession::device_features`]).
    pub fn set_features(&mut self, features: u64) -> Result<(), FrontendSessionError> {
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.send_acked("SET_FEATURES", |f| f.set_features(features | proto_bit))?;
        self.acked_features = Some(features);
        Ok(())
    }

    /// Sends the memory table: the only memory the backend may map.
    pub fn set_mem_table(&mut self, regions: &[SharedRegion]) -> Result<(), FrontendSessionError> {
        let table: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                // Deliberately the GPA, not a mapping: the backend needs only a consistent
                // translation key, and the frontend's address space is none of its business.
                userspace_addr: r.gpa,
                mmap_offset: 0,
                mmap_handle: r.fd,
            })
            .collect();
        self.send_acked("SET_MEM_TABLE", |f| f.set_mem_table(&table))?;
        self.memory = regions.to_vec();
        Ok(())
    }

    /// Whether the backend keeps an in-flight log this session holds (see
    /// [`FrontendSession::prepare_inflight`]).
    pub fn holds_inflight_log(&self) -> bool {
        self.inflight.is_some()
    }

    /// Whether in-flight tracking was asked for and the backend offered it.
    pub fn inflight_negotiated(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// The in-flight log's memfd, while the session holds one (to inspect it from outside).
    pub fn inflight_log(&self) -> Option<&File> {
        self.inflight.as_ref().map(|r| &r.file)
    }

    /// After the features and before the rings start: gets the backend's in-flight log for
    /// every queue, of `queue_size` entries each (at least the largest ring), if tracking was
    /// negotiated and no log is held yet. Returns whether the session holds one.
    pub fn prepare_inflight(&mut self, queue_size: u16) -> Result<bool, FrontendSessionError> {
        if !self.inflight_negotiated() {
            return Ok(false);
        }
        if self.inflight.is_none() {
            let num_queues = u16::try_from(self.vrings.len())
                .map_err(|_| FrontendSessionError::QueueCount(MAX_QUEUES))?;
            let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
            let (shape, file) = self.send("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&ask))?;
            log::debug!(
                "in-flight log: {} bytes for {} queue(s) of {}",
                shape.mmap_size,
                shape.num_queues,
                shape.queue_size
            );
            self.inflight = Some(InflightRegion { file, shape });
        }
        Ok(true)
    }

    /// Starts queue `q` with `ring` at avail index 0 and its kick and call eventfds.
    pub fn start_vring(&mut self, q: usize, ring: VringSetup) -> Result<(), FrontendSessionError> {
        self.start_vring_at(q, ring, 0)
    }

    /// Starts queue `q` with `ring` at avail index `base` (SET_VRING_BASE).
    fn start_vring_at(
        &mut self,
        q: usize,
        ring: VringSetup,
        base: u16,
    ) -> Result<(), FrontendSessionError> {
        let vring = self.vring(q)?;
        let (kick, call) = (
            vring
                .kick
                .try_clone()
                .map_err(FrontendSessionError::EventFd)?,
            vring
                .call
                .try_clone()
                .map_err(FrontendSessionError::EventFd)?,
        );
        let addrs = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: ring.desc,
            used_ring_addr: ring.used,
            avail_ring_addr: ring.avail,
            log_addr: None,
        };
        self.send_acked("SET_VRING_NUM", |f| f.set_vring_num(q, ring.size))?;
        self.send_acked("SET_VRING_BASE", |f| f.set_vring_base(q, base))?;
        self.send_acked("SET_VRING_ADDR", |f| f.set_vring_addr(q, &addrs))?;
        self.send_acked("SET_VRING_CALL", |f| f.set_vring_call(q, &call))?;
        self.send_acked("SET_VRING_KICK", |f| f.set_vring_kick(q, &kick))?;
        self.send_acked("SET_VRING_ENABLE", |f| f.set_vring_enable(q, true))?;
        if let Some(v) = self.vrings.get_mut(q) {
            v.running = Some(ring);
        }
        Ok(())
    }

    /// Stops queue `q` and fetches its state back (GET_VRING_BASE): after this returns, the
    /// backend no longer touches the ring. Returns the avail index the backend stopped at, or
    /// None if the queue was not running.
    pub fn stop_vring(&mut self, q: usize) -> Result<Option<u32>, FrontendSessionError> {
        let v = self
            .vrings
            .get_mut(q)
            .ok_or(FrontendSessionError::NoQueue(q))?;
        if v.running.take().is_none() {
            return Ok(None);
        }
        if !self.any_running() {
            // Stopped rings keep nothing in flight: the next start gets a fresh log.
            self.inflight = None;
        }
        let base = self.send("GET_VRING_BASE", |f| f.get_vring_base(q))?;
        Ok(Some(base))
    }
}

impl FrontendSession {
    /// SET_OWNER and the feature negotiation: the device features (protocol bit removed) and
    /// the protocol features acknowledged. Returns the number of queues the session runs.
    fn negotiate(&mut self, spec: &DeviceSpec) -> Result<u16, FrontendSessionError> {
        use FrontendSessionError::Unsupported;
        self.acks = false;
        self.send("SET_OWNER", |f| f.set_owner())?;
        let offered = self.send("GET_FEATURES", |f| f.get_features())?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & proto_bit == 0 {
            return Err(Unsupported("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(Unsupported("VIRTIO_F_VERSION_1"));
        }
        let proto = self.send("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        let config = VhostUserProtocolFeatures::CONFIG;
        if matches!(spec.config, ConfigSpace::Required { .. }) && !proto.contains(config) {
            return Err(Unsupported("the CONFIG protocol feature"));
        }
        // REPLY_ACK, where offered, makes set-up failures (a refused memory table) synchronous
        // errors instead of a silently dead queue.
        let mut want = proto & (config | VhostUserProtocolFeatures::REPLY_ACK);
        if spec.inflight {
            want |= proto & VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        let mq = proto.contains(VhostUserProtocolFeatures::MQ);
        if spec.queues > 1 && !mq {
            return Err(Unsupported("the MQ protocol feature"));
        }
        let may_grow = spec.max_queues > spec.queues && mq;
        if spec.queues > 1 || may_grow {
            want |= VhostUserProtocolFeatures::MQ;
        }
        self.send("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(want))?;
        self.acks = want.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let mut queues = spec.queues;
        if spec.queues > 1 || may_grow {
            let offered = self.send("GET_QUEUE_NUM", |f| f.get_queue_num())?;
            if offered < u64::from(spec.queues) {
                return Err(FrontendSessionError::TooFewQueues {
                    offered,
                    wanted: spec.queues,
                });
            }
            if may_grow {
                // At most max_queues (a u16): the conversion cannot fail.
                queues = u16::try_from(offered.min(u64::from(spec.max_queues))).unwrap_or(queues);
            }
        }
        self.device_features = offered & !proto_bit;
        self.protocol = want;
        Ok(queues)
    }

    /// GET_CONFIG of `bytes` bytes; a shorter answer is padded with zeros.
    fn read_config(&mut self, bytes: usize) -> Result<Vec<u8>, FrontendSessionError> {
        let len =
            u32::try_from(bytes).map_err(|_| FrontendSessionError::Unsupported("config size"))?;
        let zeros = vec![0u8; bytes];
        let (_, raw) = self.send("GET_CONFIG", |f| {
            f.get_config(0, len, VhostUserConfigFlags::empty(), &zeros)
        })?;
        let mut config = vec![0u8; bytes];
        let n = raw.len().min(bytes);
        config[..n].copy_from_slice(&raw[..n]);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(queues: u16) -> DeviceSpec {
        DeviceSpec {
            queues,
            max_queues: 0,
            config: ConfigSpace::Required { bytes: 8 },
            reply_timeout: Some(Duration::from_millis(200)),
            inflight: false,
        }
    }

    #[test]
    fn a_silent_backend_fails_the_session_instead_of_hanging_it() {
        let (ours, _silent_peer) = UnixStream::pair().expect("socketpair");
        let started = Instant::now();
        let err = FrontendSession::connect(ours, spec(1)).expect_err("no answer");
        assert!(
            matches!(
                err,
                FrontendSessionError::ReplyTimeout {
                    op: "GET_FEATURES",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn impossible_queue_counts_are_refused_before_any_message() {
        for queues in [0, MAX_QUEUES + 1] {
            let (ours, peer) = UnixStream::pair().expect("socketpair");
            let err = FrontendSession::connect(ours, spec(queues)).expect_err("refused");
            assert!(matches!(err, FrontendSessionError::QueueCount(q) if q == queues));
            peer.set_nonblocking(true).expect("nonblocking");
            let mut byte = [0u8; 1];
            let sent = std::io::Read::read(&mut &peer, &mut byte);
            assert!(
                !matches!(sent, Ok(n) if n > 0),
                "a message was sent: {sent:?}"
            );
        }
    }

    #[test]
    fn a_missing_socket_is_reported_with_its_path_once_the_deadline_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no-such.sock");
        let err = connect_with_retry(&path, Duration::ZERO).expect_err("missing");
        match err {
            FrontendSessionError::Connect { path: p, source } => {
                assert_eq!(p, path.display().to_string());
                assert_eq!(source.kind(), ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_listening_backend_is_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("be.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let stream = connect_with_retry(&path, Duration::from_secs(1)).expect("connects");
        let (accepted, _) = listener.accept().expect("accept");
        assert_eq!(
            stream
                .peer_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned)),
            Some(path.clone())
        );
        drop(accepted);
    }
}
