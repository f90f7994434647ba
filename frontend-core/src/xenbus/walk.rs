//! The walk: a guest domain process is handed its store connection (bound to its domain id)
//! and its control channel to the toolstack. [`ManagedFrontend::run`] serves both: `AttachBlock`
//! and `AttachNet` bring a vhost-user connection for a device; the walk in the store sets the
//! data path up when the backend reaches InitWait (Initialised), goes Connected when the backend
//! does, and ends the session when the backend closes (Closing, Closed).
//!
//! The loop is level-triggered: every wake-up (a watch event, or a tick) re-reads the states
//! that matter, so a missed or coalesced event costs nothing but a tick.
//!
//! A backend that goes away while the toolstack still wants the device (its state Closed,
//! `online` still 1, no `error` node: the driver domain died and is being restarted) is
//! waited for: the device keeps its session and queues, goes back to Initialising, and
//! reconnects on the fresh connection the toolstack hands over (`ReconnectBlock`,
//! `ReconnectNet`) once the new backend is at InitWait ([`reconnect`]).

mod reconnect;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::control::messages::{fds, GuestEvent, GuestRequest, GuestStats};
use ipc::control::{ChannelError, ControlChannel};
use ipc::xenbus::{domain_path, keys, DeviceKind, XenbusError, XenbusState};
use ipc::xenstore::client::{ClientError, StoreClient};
use ipc::xenstore::wire::XsError;
use thiserror::Error;

use super::{error_chain, DiskCheck, FrontendDiagnostics};

/// Errors that end a managed guest domain.
#[derive(Debug, Error)]
pub enum WalkError {
    #[error("store")]
    Store(#[from] ClientError),
    #[error("control channel")]
    Control(#[from] ChannelError),
}

/// Why one device failed: it is closed and reported, the domain goes on.
#[derive(Debug, Error)]
enum DeviceError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: ClientError,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: ClientError,
    },
    #[error("watching {path}")]
    Watch {
        path: String,
        #[source]
        source: ClientError,
    },
    #[error("{path}")]
    BadState {
        path: String,
        #[source]
        source: XenbusError,
    },
    #[error("device vanished")]
    Vanished,
    #[error("no vhost-user connection was handed over")]
    NoConnection,
    #[error("vhost-user set-up")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("this kind of guest cannot keep a disk across a backend restart")]
    CannotReconnect,
    #[error("control channel")]
    Control(#[from] ChannelError),
}

/// How often the loop wakes up when nothing happens.
const TICK: Duration = Duration::from_millis(20);
/// How long a check waits for its device's backend to come back after a restart.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Why a check waits for its device rather than running.
const RESTARTING: &str = "the backend is being restarted";
/// How often it wakes up while a network interface is Connected.
const NET_TICK: Duration = Duration::from_millis(1);

/// A check's outcome as the toolstack hears it: passed, and the detail or the reason.
fn verdict(result: Result<String, String>) -> (bool, String) {
    match result {
        Ok(detail) => (true, detail),
        Err(reason) => (false, reason),
    }
}

/// The watch token for a device's backend state.
fn token((kind, devid): (DeviceKind, u32)) -> String {
    format!("backend-{kind}-{devid}")
}

/// A device's data-path session.
enum Session<K: FrontendDiagnostics> {
    Block(K::BlockSession),
    Net(K::NetSession),
}

/// Where one device stands.
struct Device<K: FrontendDiagnostics> {
    /// The vhost-user connection, until the session takes it.
    connection: Option<UnixStream>,
    session: Option<Session<K>>,
    /// Block: capacity in sectors.
    capacity: u64,
    /// Net: this interface's address, and the MAC the backend gave it.
    ip: [u8; 4],
    mac: [u8; 6],
    state: XenbusState,
    /// The backend went away while the device was wanted: the session is kept, to be
    /// reconnected when the backend is back.
    resuming: bool,
    /// A check saw the backend's connection end: the session is dead until it has been set
    /// up again on a restarted backend, whatever the store still says.
    backend_lost: bool,
}

/// A device of this domain: its kind and number.
type DevKey = (DeviceKind, u32);

/// A guest domain process managed by `splitvmm up`.
pub struct ManagedFrontend<K: FrontendDiagnostics> {
    domid: u32,
    store: StoreClient,
    control: ControlChannel,
    kind: K,
    devices: BTreeMap<DevKey, Device<K>>,
    stop: Option<Arc<AtomicBool>>,
    /// Requests that arrived while a check waited for its backend to come back.
    deferred: VecDeque<(GuestRequest, Vec<OwnedFd>)>,
}

impl<K: FrontendDiagnostics> std::fmt::Debug for ManagedFrontend<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedFrontend")
            .field("domid", &self.domid)
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<K: FrontendDiagnostics> ManagedFrontend<K> {
    /// A guest domain on an already connected store client and control channel.
    pub fn new(domid: u32, store: StoreClient, control: ControlChannel, kind: K) -> Self {
        ManagedFrontend {
            domid,
            store,
            control,
            kind,
            devices: BTreeMap::new(),
            stop: None,
            deferred: VecDeque::new(),
        }
    }

    /// Takes over the descriptors `splitvmm up` hands a guest domain process
    /// ([`fds::STORE`], [`fds::CONTROL`]).
    ///
    /// # Safety
    /// Those descriptors must be the store connection and the control channel, owned by
    /// nobody else in this process.
    pub unsafe fn from_inherited_fds(domid: u32, kind: K) -> Self {
        // SAFETY: the caller guarantees both descriptors are ours alone.
        let (store, control) = unsafe {
            (
                UnixStream::from_raw_fd(fds::STORE),
                OwnedFd::from_raw_fd(fds::CONTROL),
            )
        };
        Self::new(
            domid,
            StoreClient::from_stream(store),
            ControlChannel::from_fd(control),
            kind,
        )
    }

    /// Shuts down as on the toolstack's request when `stop` becomes true (a signal handler's
    /// flag).
    pub fn with_stop_flag(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn device_dir(&self, (kind, devid): DevKey) -> String {
        format!("{}/device/{kind}/{devid}", domain_path(self.domid))
    }

    /// Runs until the toolstack says shut down (or the stop flag is set): Ok; or until the
    /// toolstack or the store goes away: Err.
    pub fn run(mut self) -> Result<(), WalkError> {
        let devices_dir = format!("{}/device", domain_path(self.domid));
        self.store.watch(&devices_dir, "devices")?;
        loop {
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                return self.shut_down();
            }
            while let Some((request, fds)) = self.next_request()? {
                if self.handle(request, fds)? {
                    return self.shut_down();
                }
            }
            // With an interface up, wake often enough to answer peers promptly.
            let tick = if self.has_connected_net() {
                NET_TICK
            } else {
                TICK
            };
            match self.store.read_watch_event(Some(tick)) {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(e) => return Err(e.into()),
            }
            self.poll_nets();
            let keys: Vec<DevKey> = self.devices.keys().copied().collect();
            for key in keys {
                if let Err(e) = self.step(key) {
                    let reason = error_chain(&e);
                    log::error!("{} {}: {reason}", key.0, key.1);
                    self.fail(key, reason)?;
                }
            }
        }
    }

    /// The next request: one deferred during a check first, then the control channel's.
    fn next_request(&mut self) -> Result<Option<(GuestRequest, Vec<OwnedFd>)>, WalkError> {
        if let Some(request) = self.deferred.pop_front() {
            return Ok(Some(request));
        }
        Ok(self.control.try_recv::<GuestRequest>()?)
    }

    /// Serves one request of the toolstack; true when it asks this domain to shut down now.
    fn handle(&mut self, request: GuestRequest, fds: Vec<OwnedFd>) -> Result<bool, WalkError> {
        match request {
            GuestRequest::AttachBlock { devid } => {
                self.attach((DeviceKind::Vbd, devid), [0; 4], fds)?
            }
            GuestRequest::AttachNet { devid, ip } => {
                self.attach((DeviceKind::Vif, devid), ip, fds)?
            }
            GuestRequest::ReconnectBlock { devid } => {
                self.take_reconnection((DeviceKind::Vbd, devid), fds)
            }
            GuestRequest::ReconnectNet { devid } => {
                self.take_reconnection((DeviceKind::Vif, devid), fds)
            }
            GuestRequest::NetPing {
                devid,
                peer,
                rounds,
            } => {
                let event = self.net_ping(devid, peer, rounds);
                self.control.send(&event, &[])?;
            }
            GuestRequest::DiskCheck {
                devid,
                seed,
                bytes,
                verify_only,
            } => {
                let event = self.disk_check(devid, seed, bytes, verify_only);
                self.publish_counters();
                self.control.send(&event, &[])?;
            }
            GuestRequest::AssignPci { index, address } => {
                let event = match self.kind.assign_pci(index, &address, fds) {
                    Ok(()) => GuestEvent::PciAssigned { index },
                    Err(reason) => {
                        log::error!("PCI {index} ({address}): {reason}");
                        GuestEvent::PciFailed { index, reason }
                    }
                };
                self.control.send(&event, &[])?;
            }
            GuestRequest::DetachPci { index } => {
                let event = match self.kind.detach_pci(index) {
                    Ok(()) => GuestEvent::PciDetached { index },
                    Err(reason) => GuestEvent::PciFailed { index, reason },
                };
                self.control.send(&event, &[])?;
            }
            GuestRequest::Shutdown if self.kind.shutdown_requested() => return Ok(true),
            GuestRequest::Shutdown => log::info!("shutdown asked of the guest"),
        }
        Ok(false)
    }

    fn attach(&mut self, key: DevKey, ip: [u8; 4], mut fds: Vec<OwnedFd>) -> Result<(), WalkError> {
        let (kind, devid) = key;
        let blocks = self
            .devices
            .keys()
            .filter(|k| k.0 == DeviceKind::Vbd)
            .count();
        let reason = match fds.pop().filter(|_| fds.is_empty()) {
            None => "attach came without exactly one connection".to_owned(),
            Some(_) if self.devices.contains_key(&key) => format!("{kind} {devid} exists"),
            Some(_) if kind == DeviceKind::Vbd && blocks >= self.kind.max_block_devices() => {
                format!(
                    "this guest has room for {} block device(s)",
                    self.kind.max_block_devices()
                )
            }
            Some(fd) => {
                self.devices.insert(
                    key,
                    Device {
                        connection: Some(UnixStream::from(fd)),
                        session: None,
                        capacity: 0,
                        ip,
                        mac: [0; 6],
                        state: XenbusState::Initialising,
                        resuming: false,
                        backend_lost: false,
                    },
                );
                return Ok(());
            }
        };
        log::error!("{kind} {devid}: {reason}");
        self.control
            .send(&GuestEvent::DeviceFailed { devid, reason }, &[])?;
        Ok(())
    }

    /// A device's state as its peer wrote it; a missing node reads as Closed.
    fn read_state(&mut self, dir: &str) -> Result<XenbusState, DeviceError> {
        let path = format!("{dir}/{}", keys::STATE);
        match self.store.read(&path) {
            Ok(v) => String::from_utf8_lossy(&v)
                .parse()
                .map_err(|source| DeviceError::BadState { path, source }),
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(XenbusState::Closed),
            Err(source) => Err(DeviceError::Read { path, source }),
        }
    }

    fn set_state(&mut self, key: DevKey, state: XenbusState) -> Result<(), DeviceError> {
        let path = format!("{}/{}", self.device_dir(key), keys::STATE);
        if let Err(source) = self.store.write(&path, state.to_string().as_bytes()) {
            return Err(DeviceError::Write { path, source });
        }
        if let Some(dev) = self.devices.get_mut(&key) {
            dev.state = state;
        }
        log::info!("{} {}: frontend {state:?}", key.0, key.1);
        Ok(())
    }

    fn backend_dir(&mut self, key: DevKey) -> Result<Option<String>, DeviceError> {
        let path = format!("{}/{}", self.device_dir(key), keys::BACKEND);
        match self.store.read(&path) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            // The toolstack has not written the directory yet.
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(None),
            Err(source) => Err(DeviceError::Read { path, source }),
        }
    }

    /// Sets the data path up on the handed connection, by device kind.
    fn connect(&mut self, key: DevKey) -> Result<(), DeviceError> {
        let (kind, devid) = key;
        let dev = self.devices.get_mut(&key).ok_or(DeviceError::Vanished)?;
        let connection = dev.connection.take().ok_or(DeviceError::NoConnection)?;
        let ip = dev.ip;
        let (session, capacity, mac) = match kind {
            DeviceKind::Vbd => {
                let (s, capacity) = self
                    .kind
                    .connect_block(devid, connection)
                    .map_err(|e| DeviceError::Connect(Box::new(e)))?;
                (Session::Block(s), capacity, [0; 6])
            }
            DeviceKind::Vif => {
                let (s, mac) = self
                    .kind
                    .connect_net(devid, connection, ip)
                    .map_err(|e| DeviceError::Connect(Box::new(e)))?;
                (Session::Net(s), 0, mac)
            }
        };
        if let Some(dev) = self.devices.get_mut(&key) {
            dev.session = Some(session);
            dev.capacity = capacity;
            dev.mac = mac;
        }
        Ok(())
    }

    /// One step of the frontend half of the walk for a device.
    fn step(&mut self, key: DevKey) -> Result<(), DeviceError> {
        let (kind, devid) = key;
        let Some(backend) = self.backend_dir(key)? else {
            return Ok(());
        };
        let backend_state = self.read_state(&backend)?;
        let Some((state, resuming)) = self.devices.get(&key).map(|d| (d.state, d.resuming)) else {
            return Ok(());
        };
        if let Some(result) = self.restart_step(key, &backend, state, backend_state, resuming) {
            return result;
        }
        match (state, backend_state) {
            (XenbusState::Initialising, XenbusState::InitWait) => {
                self.connect(key)?;
                match self
                    .store
                    .watch(&format!("{backend}/{}", keys::STATE), &token(key))
                {
                    Ok(()) => {}
                    // Still registered from an earlier attach of the same device.
                    Err(e) if e.xs_error() == Some(XsError::EEXIST) => {}
                    Err(source) => {
                        return Err(DeviceError::Watch {
                            path: format!("{backend}/{}", keys::STATE),
                            source,
                        })
                    }
                }
                self.set_state(key, XenbusState::Initialised)
            }
            (XenbusState::Initialised, XenbusState::Connected) => {
                self.set_state(key, XenbusState::Connected)?;
                let dev = self.devices.get(&key).ok_or(DeviceError::Vanished)?;
                let event = match kind {
                    DeviceKind::Vbd => GuestEvent::Connected {
                        devid,
                        sectors: dev.capacity,
                    },
                    DeviceKind::Vif => GuestEvent::NetConnected {
                        devid,
                        mac: dev.mac,
                    },
                };
                self.control.send(&event, &[])?;
                match self.devices.get_mut(&key).and_then(|d| d.session.as_mut()) {
                    Some(Session::Block(s)) => self
                        .kind
                        .block_connected(devid, s)
                        .map_err(|e| DeviceError::Connect(Box::new(e))),
                    Some(Session::Net(s)) => self
                        .kind
                        .net_connected(devid, s)
                        .map_err(|e| DeviceError::Connect(Box::new(e))),
                    None => Ok(()),
                }
            }
            (
                XenbusState::Initialised | XenbusState::Connected,
                XenbusState::Closing | XenbusState::Closed,
            ) => {
                self.set_state(key, XenbusState::Closing)?;
                self.finish_close(key)
            }
            (XenbusState::Closing, _) => self.finish_close(key),
            _ => Ok(()),
        }
    }

    /// A detach in progress: once the guest has let go of the device, ends the session and
    /// goes Closed.
    fn finish_close(&mut self, key: DevKey) -> Result<(), DeviceError> {
        let (kind, devid) = (&mut self.kind, key.1);
        let released = match self.devices.get_mut(&key).and_then(|d| d.session.as_mut()) {
            Some(Session::Block(s)) => kind.release_block(devid, s),
            Some(Session::Net(s)) => kind.release_net(devid, s),
            None => true,
        };
        if !released {
            return Ok(());
        }
        self.end_session(key);
        self.set_state(key, XenbusState::Closed)?;
        Ok(self.control.send(&GuestEvent::Closed { devid }, &[])?)
    }

    /// Ends the session and forgets the device.
    fn end_session(&mut self, key: DevKey) {
        if let Some(backend) = self.backend_dir(key).ok().flatten() {
            let _ = self
                .store
                .unwatch(&format!("{backend}/{}", keys::STATE), &token(key));
        }
        match self.devices.remove(&key).and_then(|d| d.session) {
            Some(Session::Block(s)) => self.kind.disconnect_block(key.1, s),
            Some(Session::Net(s)) => self.kind.disconnect_net(key.1, s),
            None => {}
        }
    }

    /// The frontend's side of a detach without waiting for the guest (the domain shuts
    /// down): stop I/O, end the session, Closing then Closed.
    fn close(&mut self, key: DevKey) -> Result<(), DeviceError> {
        self.set_state(key, XenbusState::Closing)?;
        self.end_session(key);
        self.set_state(key, XenbusState::Closed)?;
        Ok(self
            .control
            .send(&GuestEvent::Closed { devid: key.1 }, &[])?)
    }

    fn fail(&mut self, key: DevKey, reason: String) -> Result<(), WalkError> {
        self.end_session(key);
        let _ = self.set_state(key, XenbusState::Closed);
        self.control.send(
            &GuestEvent::DeviceFailed {
                devid: key.1,
                reason,
            },
            &[],
        )?;
        Ok(())
    }

    fn has_connected_net(&self) -> bool {
        K::ANSWERS_PEERS
            && self
                .devices
                .iter()
                .any(|(k, d)| k.0 == DeviceKind::Vif && d.state == XenbusState::Connected)
    }

    /// Lets every Connected interface answer what it received.
    fn poll_nets(&mut self) {
        for ((kind, devid), dev) in self.devices.iter_mut() {
            if let (DeviceKind::Vif, XenbusState::Connected, Some(Session::Net(s))) =
                (kind, dev.state, dev.session.as_mut())
            {
                if let Err(e) = self.kind.answer_peers(*devid, s) {
                    log::warn!("vif {devid}: {}", error_chain(&e));
                }
            }
        }
    }

    fn net_ping(&mut self, devid: u32, peer: [u8; 4], rounds: u32) -> GuestEvent {
        let key = (DeviceKind::Vif, devid);
        let deadline = Instant::now() + RECONNECT_TIMEOUT;
        let mut cause = RESTARTING.to_owned();
        let result = loop {
            if self.reconnecting(key) {
                if let Err(reason) = self.await_reconnect(key, deadline, &cause) {
                    break Err(reason);
                }
            }
            let attempt = match self.devices.get_mut(&key) {
                Some(Device {
                    state: XenbusState::Connected,
                    session: Some(Session::Net(session)),
                    ..
                }) => self.kind.net_ping(devid, session, peer, rounds),
                _ => break Err("interface is not Connected".to_owned()),
            };
            match attempt {
                Ok(detail) => break Ok(detail),
                Err(e) if K::backend_gone(&e) => {
                    cause = error_chain(&e);
                    self.lose_backend(key, &cause);
                }
                Err(e) => break Err(error_chain(&e)),
            }
        };
        if let Err(reason) = &result {
            log::warn!("vif {devid}: ping failed: {reason}");
        }
        let (passed, detail) = verdict(result);
        GuestEvent::NetPing {
            devid,
            passed,
            detail,
        }
    }

    fn disk_check(&mut self, devid: u32, seed: u64, bytes: u64, verify_only: bool) -> GuestEvent {
        let key = (DeviceKind::Vbd, devid);
        let check = DiskCheck {
            seed,
            bytes,
            verify_only,
        };
        let deadline = Instant::now() + RECONNECT_TIMEOUT;
        let mut cause = RESTARTING.to_owned();
        let result = loop {
            // The backend is being restarted: the requests in flight are resubmitted on
            // reconnect, and the check runs (again) once the disk is back.
            if self.reconnecting(key) {
                if let Err(reason) = self.await_reconnect(key, deadline, &cause) {
                    break Err(reason);
                }
            }
            let attempt = match self.devices.get_mut(&key) {
                Some(Device {
                    state: XenbusState::Connected,
                    session: Some(Session::Block(session)),
                    ..
                }) => self.kind.disk_check(devid, session, check),
                _ => break Err("device is not Connected".to_owned()),
            };
            match attempt {
                Ok(detail) => break Ok(detail),
                Err(e) if K::backend_gone(&e) => {
                    cause = error_chain(&e);
                    self.lose_backend(key, &cause);
                }
                Err(e) => break Err(error_chain(&e)),
            }
        };
        if let Err(reason) = &result {
            log::warn!("vbd {devid}: check failed: {reason}");
        }
        let (passed, detail) = verdict(result);
        GuestEvent::DiskCheck {
            devid,
            passed,
            detail,
        }
    }

    fn stats(&self) -> GuestStats {
        self.kind
            .stats(self.devices.values().filter_map(|d| match &d.session {
                Some(Session::Block(s)) => Some(s),
                _ => None,
            }))
    }

    /// Publishes the running counters under the domain's own `data/io` directory, where
    /// `splitvmm list` and `splitvmm top` read them.
    fn publish_counters(&mut self) {
        let t = self.stats();
        let dir = format!("{}/data/io", domain_path(self.domid));
        for (key, value) in [
            ("requests", t.requests),
            ("bytes", t.bytes),
            ("kicks", t.kicks_sent),
            ("interrupts", t.interrupts),
            ("vmm-exits", t.vmm_exits),
        ] {
            if let Err(e) = self
                .store
                .write(&format!("{dir}/{key}"), value.to_string().as_bytes())
            {
                log::warn!("publishing {dir}/{key}: {e}");
            }
        }
    }

    fn shut_down(mut self) -> Result<(), WalkError> {
        let keys: Vec<DevKey> = self.devices.keys().copied().collect();
        for key in keys {
            if let Err(e) = self.close(key) {
                log::warn!(
                    "{} {}: closing on shutdown: {}",
                    key.0,
                    key.1,
                    error_chain(&e)
                );
            }
        }
        let stats = self.stats();
        self.control.send(&GuestEvent::Stats(stats), &[])?;
        Ok(())
    }
}
