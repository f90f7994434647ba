//! The frontend half of the xenbus walk for block devices and network interfaces, shared by every kind of guest
//! domain `splitvmm up` runs (a process domain, a KVM guest's VMM), as Linux shares its xenbus
//! frontend core between blkfront and netfront.
//!
//! A guest domain process is handed its store connection (bound to its domain id) and its
//! control channel to the toolstack. [`ManagedFrontend::run`] serves both: `AttachBlock` and
//! `AttachNet` bring a vhost-user connection for a device; the walk in the store sets the data path up
//! when the backend reaches InitWait (Initialised), goes Connected when the backend does, and
//! ends the session when the backend closes (Closing, Closed). What a kind of guest does at
//! those moments, and for disk checks and pings, is its [`FrontendKind`].
//!
//! The loop is level-triggered: every wake-up (a watch event, or a tick) re-reads the states
//! that matter, so a missed or coalesced event costs nothing but a tick.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::control::messages::{fds, GuestEvent, GuestRequest, GuestStats};
use crate::control::{ChannelError, ControlChannel};
use crate::xenbus::{domain_path, keys, DeviceKind, XenbusState};
use crate::xenstore::client::{ClientError, StoreClient};
use crate::xenstore::wire::XsError;

/// Errors that end a managed guest domain.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("store")]
    Store(#[from] ClientError),
    #[error("control channel")]
    Control(#[from] ChannelError),
}

/// What one kind of guest does at the moments of the walk that need it, for its block
/// devices (vbd) and network interfaces (vif).
pub trait FrontendKind {
    /// The data-path session of one device.
    type Session;

    /// At backend InitWait: sets the data path up on the handed vhost-user connection.
    /// Returns the session and the disk's capacity in 512-byte sectors.
    fn connect(
        &mut self,
        devid: u32,
        connection: UnixStream,
    ) -> Result<(Self::Session, u64), String>;

    /// When the device closes: ends the session (stopping its vrings), keeping its counters.
    fn disconnect(&mut self, devid: u32, session: Self::Session);

    /// Writes (unless `verify_only`) and verifies a pattern over the first `bytes` of a
    /// Connected disk; a short description on success, the reason on failure.
    fn disk_check(
        &mut self,
        devid: u32,
        session: &mut Self::Session,
        seed: u64,
        bytes: u64,
        verify_only: bool,
    ) -> Result<String, String>;

    /// Counters over every session so far, the live ones included.
    fn stats<'a>(&self, live: impl Iterator<Item = &'a Self::Session>) -> GuestStats
    where
        Self::Session: 'a;

    /// How many block devices this kind can hold at once.
    fn max_devices(&self) -> usize {
        usize::MAX
    }

    /// When a block device has gone Connected (the toolstack has been told): a kind whose
    /// guest boots with its disks cold-plugged starts it here. An error fails the device.
    fn block_connected(&mut self, _devid: u32, _session: &mut Self::Session) -> Result<(), String> {
        Ok(())
    }

    /// On the toolstack's shutdown request: `true` (the default) closes every device and
    /// ends now; `false` when the kind has asked its guest to power off (a Linux guest's
    /// ACPI power button) and sets the stop flag once it has.
    fn shutdown_requested(&mut self) -> bool {
        true
    }

    /// The data-path session of one network interface.
    type NetSession;

    /// At backend InitWait of a vif: sets the data path up; returns the session and the MAC
    /// address the backend gave the interface. A kind without network interfaces refuses.
    fn connect_net(
        &mut self,
        devid: u32,
        connection: UnixStream,
        ip: [u8; 4],
    ) -> Result<(Self::NetSession, [u8; 6]), String>;

    /// When a vif closes.
    fn disconnect_net(&mut self, devid: u32, session: Self::NetSession);

    /// Resolves `peer` and exchanges `rounds` UDP echoes with it.
    fn net_ping(
        &mut self,
        devid: u32,
        session: &mut Self::NetSession,
        peer: [u8; 4],
        rounds: u32,
    ) -> Result<String, String>;

    /// Answers what the interface received meanwhile (ARP, UDP echo); called every tick
    /// while the interface is Connected, so a guest answers its peers while idle.
    fn net_poll(&mut self, devid: u32, session: &mut Self::NetSession);
}

/// How often the loop wakes up when nothing happens.
const TICK: Duration = Duration::from_millis(20);
/// How often it wakes up while a network interface is Connected.
const NET_TICK: Duration = Duration::from_millis(1);

/// The watch token for a device's backend state.
fn token((kind, devid): (DeviceKind, u32)) -> String {
    format!("backend-{kind}-{devid}")
}

/// A device's data-path session.
enum Session<K: FrontendKind> {
    Block(K::Session),
    Net(K::NetSession),
}

/// Where one device stands.
struct Device<K: FrontendKind> {
    /// The vhost-user connection, until the session takes it.
    connection: Option<UnixStream>,
    session: Option<Session<K>>,
    /// Block: capacity in sectors.
    capacity: u64,
    /// Net: this interface's address, and the MAC the backend gave it.
    ip: [u8; 4],
    mac: [u8; 6],
    state: XenbusState,
}

/// A device of this domain: its kind and number.
type DevKey = (DeviceKind, u32);

/// A guest domain process managed by `splitvmm up`.
pub struct ManagedFrontend<K: FrontendKind> {
    domid: u32,
    store: StoreClient,
    control: ControlChannel,
    kind: K,
    devices: BTreeMap<DevKey, Device<K>>,
    stop: Option<Arc<AtomicBool>>,
}

impl<K: FrontendKind> std::fmt::Debug for ManagedFrontend<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedFrontend")
            .field("domid", &self.domid)
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<K: FrontendKind> ManagedFrontend<K> {
    /// A guest domain on an already connected store client and control channel.
    pub fn new(domid: u32, store: StoreClient, control: ControlChannel, kind: K) -> Self {
        ManagedFrontend {
            domid,
            store,
            control,
            kind,
            devices: BTreeMap::new(),
            stop: None,
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
    pub fn run(mut self) -> Result<(), FrontendError> {
        let devices_dir = format!("{}/device", domain_path(self.domid));
        self.store.watch(&devices_dir, "devices")?;
        loop {
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                return self.shut_down();
            }
            while let Some((request, fds)) = self.control.try_recv::<GuestRequest>()? {
                match request {
                    GuestRequest::AttachBlock { devid } => {
                        self.attach((DeviceKind::Vbd, devid), [0; 4], fds)?
                    }
                    GuestRequest::AttachNet { devid, ip } => {
                        self.attach((DeviceKind::Vif, devid), ip, fds)?
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
                    GuestRequest::Shutdown if self.kind.shutdown_requested() => {
                        return self.shut_down()
                    }
                    GuestRequest::Shutdown => log::info!("shutdown asked of the guest"),
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
                if let Err(reason) = self.step(key) {
                    log::error!("{} {}: {reason}", key.0, key.1);
                    self.fail(key, reason)?;
                }
            }
        }
    }

    fn attach(
        &mut self,
        key: DevKey,
        ip: [u8; 4],
        mut fds: Vec<OwnedFd>,
    ) -> Result<(), FrontendError> {
        let (kind, devid) = key;
        let blocks = self
            .devices
            .keys()
            .filter(|k| k.0 == DeviceKind::Vbd)
            .count();
        let reason = match fds.pop().filter(|_| fds.is_empty()) {
            None => "attach came without exactly one connection".to_owned(),
            Some(_) if self.devices.contains_key(&key) => format!("{kind} {devid} exists"),
            Some(_) if kind == DeviceKind::Vbd && blocks >= self.kind.max_devices() => format!(
                "this guest has room for {} block device(s)",
                self.kind.max_devices()
            ),
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
    fn read_state(&mut self, dir: &str) -> Result<XenbusState, String> {
        match self.store.read(&format!("{dir}/{}", keys::STATE)) {
            Ok(v) => String::from_utf8_lossy(&v)
                .parse()
                .map_err(|e| format!("{dir}: {e}")),
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(XenbusState::Closed),
            Err(e) => Err(format!("{dir}: {e}")),
        }
    }

    fn set_state(&mut self, key: DevKey, state: XenbusState) -> Result<(), String> {
        let path = format!("{}/{}", self.device_dir(key), keys::STATE);
        self.store
            .write(&path, state.to_string().as_bytes())
            .map_err(|e| format!("writing {path}: {e}"))?;
        if let Some(dev) = self.devices.get_mut(&key) {
            dev.state = state;
        }
        log::info!("{} {}: frontend {state:?}", key.0, key.1);
        Ok(())
    }

    fn backend_dir(&mut self, key: DevKey) -> Result<Option<String>, String> {
        let dir = self.device_dir(key);
        match self.store.read(&format!("{dir}/{}", keys::BACKEND)) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            // The toolstack has not written the directory yet.
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(None),
            Err(e) => Err(format!("reading {dir}/backend: {e}")),
        }
    }

    /// Sets the data path up on the handed connection, by device kind.
    fn connect(&mut self, key: DevKey) -> Result<(), String> {
        let (kind, devid) = key;
        let dev = self.devices.get_mut(&key).ok_or("device vanished")?;
        let connection = dev
            .connection
            .take()
            .ok_or("no vhost-user connection was handed over")?;
        let ip = dev.ip;
        let (session, capacity, mac) = match kind {
            DeviceKind::Vbd => {
                let (s, capacity) = self.kind.connect(devid, connection)?;
                (Session::Block(s), capacity, [0; 6])
            }
            DeviceKind::Vif => {
                let (s, mac) = self.kind.connect_net(devid, connection, ip)?;
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
    fn step(&mut self, key: DevKey) -> Result<(), String> {
        let (kind, devid) = key;
        let Some(backend) = self.backend_dir(key)? else {
            return Ok(());
        };
        let backend_state = self.read_state(&backend)?;
        let Some(state) = self.devices.get(&key).map(|d| d.state) else {
            return Ok(());
        };
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
                    Err(e) => return Err(format!("watching {backend}/state: {e}")),
                }
                self.set_state(key, XenbusState::Initialised)
            }
            (XenbusState::Initialised, XenbusState::Connected) => {
                self.set_state(key, XenbusState::Connected)?;
                let dev = self.devices.get(&key).ok_or("device vanished")?;
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
                self.control.send(&event, &[]).map_err(|e| e.to_string())?;
                match self.devices.get_mut(&key).and_then(|d| d.session.as_mut()) {
                    Some(Session::Block(s)) => self.kind.block_connected(devid, s),
                    _ => Ok(()),
                }
            }
            (
                XenbusState::Initialised | XenbusState::Connected,
                XenbusState::Closing | XenbusState::Closed,
            ) => self.close(key),
            _ => Ok(()),
        }
    }

    /// Ends the session and forgets the device.
    fn end_session(&mut self, key: DevKey) {
        if let Some(backend) = self.backend_dir(key).ok().flatten() {
            let _ = self
                .store
                .unwatch(&format!("{backend}/{}", keys::STATE), &token(key));
        }
        match self.devices.remove(&key).and_then(|d| d.session) {
            Some(Session::Block(s)) => self.kind.disconnect(key.1, s),
            Some(Session::Net(s)) => self.kind.disconnect_net(key.1, s),
            None => {}
        }
    }

    /// The frontend's side of a detach: stop I/O, end the session, Closing then Closed.
    fn close(&mut self, key: DevKey) -> Result<(), String> {
        self.set_state(key, XenbusState::Closing)?;
        self.end_session(key);
        self.set_state(key, XenbusState::Closed)?;
        self.control
            .send(&GuestEvent::Closed { devid: key.1 }, &[])
            .map_err(|e| e.to_string())
    }

    fn fail(&mut self, key: DevKey, reason: String) -> Result<(), FrontendError> {
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
        self.devices
            .iter()
            .any(|(k, d)| k.0 == DeviceKind::Vif && d.state == XenbusState::Connected)
    }

    /// Lets every Connected interface answer what it received.
    fn poll_nets(&mut self) {
        for ((kind, devid), dev) in self.devices.iter_mut() {
            if let (DeviceKind::Vif, XenbusState::Connected, Some(Session::Net(s))) =
                (kind, dev.state, dev.session.as_mut())
            {
                self.kind.net_poll(*devid, s);
            }
        }
    }

    fn net_ping(&mut self, devid: u32, peer: [u8; 4], rounds: u32) -> GuestEvent {
        let result = match self.devices.get_mut(&(DeviceKind::Vif, devid)) {
            Some(Device {
                state: XenbusState::Connected,
                session: Some(Session::Net(session)),
                ..
            }) => self.kind.net_ping(devid, session, peer, rounds),
            _ => Err("interface is not Connected".to_owned()),
        };
        let (passed, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        GuestEvent::NetPing {
            devid,
            passed,
            detail,
        }
    }

    fn disk_check(&mut self, devid: u32, seed: u64, bytes: u64, verify_only: bool) -> GuestEvent {
        let result = match self.devices.get_mut(&(DeviceKind::Vbd, devid)) {
            Some(Device {
                state: XenbusState::Connected,
                session: Some(Session::Block(session)),
                ..
            }) => self
                .kind
                .disk_check(devid, session, seed, bytes, verify_only),
            _ => Err("device is not Connected".to_owned()),
        };
        let (passed, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
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

    fn shut_down(mut self) -> Result<(), FrontendError> {
        let keys: Vec<DevKey> = self.devices.keys().copied().collect();
        for key in keys {
            if let Err(e) = self.close(key) {
                log::warn!("{} {}: closing on shutdown: {e}", key.0, key.1);
            }
        }
        let stats = self.stats();
        self.control.send(&GuestEvent::Stats(stats), &[])?;
        Ok(())
    }
}
