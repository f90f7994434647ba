//! The frontend half of the xenbus walk for block devices, shared by every kind of guest
//! domain `splitvmm up` runs (a process domain, a KVM guest's VMM), as Linux shares its xenbus
//! frontend core between blkfront and netfront.
//!
//! A guest domain process is handed its store connection (bound to its domain id) and its
//! control channel to the toolstack. [`ManagedFrontend::run`] serves both: `AttachBlock`
//! brings a vhost-user connection for a device; the walk in the store sets the data path up
//! when the backend reaches InitWait (Initialised), goes Connected when the backend does, and
//! ends the session when the backend closes (Closing, Closed). What a kind of guest does at
//! those moments, and for a disk check, is its [`BlockFrontendKind`].
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

/// What one kind of guest does at the moments of the walk that need it.
pub trait BlockFrontendKind {
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
}

/// How often the loop wakes up when nothing happens.
const TICK: Duration = Duration::from_millis(20);

/// The watch token for a device's backend state.
fn token(devid: u32) -> String {
    format!("backend-{devid}")
}

/// Where one block device stands.
struct Device<S> {
    /// The vhost-user connection, until the session takes it.
    connection: Option<UnixStream>,
    session: Option<S>,
    capacity: u64,
    state: XenbusState,
}

/// A guest domain process managed by `splitvmm up`.
pub struct ManagedFrontend<K: BlockFrontendKind> {
    domid: u32,
    store: StoreClient,
    control: ControlChannel,
    kind: K,
    devices: BTreeMap<u32, Device<K::Session>>,
    stop: Option<Arc<AtomicBool>>,
}

impl<K: BlockFrontendKind> std::fmt::Debug for ManagedFrontend<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedFrontend")
            .field("domid", &self.domid)
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<K: BlockFrontendKind> ManagedFrontend<K> {
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

    fn device_dir(&self, devid: u32) -> String {
        format!(
            "{}/device/{}/{devid}",
            domain_path(self.domid),
            DeviceKind::Vbd
        )
    }

    /// Runs until the toolstack says shut down (or the stop flag is set): Ok; or until the
    /// toolstack or the store goes away: Err.
    pub fn run(mut self) -> Result<(), FrontendError> {
        let devices_dir = format!("{}/device/{}", domain_path(self.domid), DeviceKind::Vbd);
        self.store.watch(&devices_dir, "devices")?;
        loop {
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                return self.shut_down();
            }
            while let Some((request, fds)) = self.control.try_recv::<GuestRequest>()? {
                match request {
                    GuestRequest::AttachBlock { devid } => self.attach(devid, fds)?,
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
                    GuestRequest::Shutdown => return self.shut_down(),
                }
            }
            match self.store.read_watch_event(Some(TICK)) {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(e) => return Err(e.into()),
            }
            let devids: Vec<u32> = self.devices.keys().copied().collect();
            for devid in devids {
                if let Err(reason) = self.step(devid) {
                    log::error!("vbd {devid}: {reason}");
                    self.fail(devid, reason)?;
                }
            }
        }
    }

    fn attach(&mut self, devid: u32, mut fds: Vec<OwnedFd>) -> Result<(), FrontendError> {
        let reason = match fds.pop().filter(|_| fds.is_empty()) {
            None => "attach came without exactly one connection".to_owned(),
            Some(_) if self.devices.contains_key(&devid) => format!("vbd {devid} exists"),
            Some(_) if self.devices.len() >= self.kind.max_devices() => format!(
                "this guest has room for {} block device(s)",
                self.kind.max_devices()
            ),
            Some(fd) => {
                self.devices.insert(
                    devid,
                    Device {
                        connection: Some(UnixStream::from(fd)),
                        session: None,
                        capacity: 0,
                        state: XenbusState::Initialising,
                    },
                );
                return Ok(());
            }
        };
        log::error!("vbd {devid}: {reason}");
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

    fn set_state(&mut self, devid: u32, state: XenbusState) -> Result<(), String> {
        let path = format!("{}/{}", self.device_dir(devid), keys::STATE);
        self.store
            .write(&path, state.to_string().as_bytes())
            .map_err(|e| format!("writing {path}: {e}"))?;
        if let Some(dev) = self.devices.get_mut(&devid) {
            dev.state = state;
        }
        log::info!("vbd {devid}: frontend {state:?}");
        Ok(())
    }

    fn backend_dir(&mut self, devid: u32) -> Result<Option<String>, String> {
        let dir = self.device_dir(devid);
        match self.store.read(&format!("{dir}/{}", keys::BACKEND)) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            // The toolstack has not written the directory yet.
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(None),
            Err(e) => Err(format!("reading {dir}/backend: {e}")),
        }
    }

    /// One step of the frontend half of the walk for `devid`.
    fn step(&mut self, devid: u32) -> Result<(), String> {
        let Some(backend) = self.backend_dir(devid)? else {
            return Ok(());
        };
        let backend_state = self.read_state(&backend)?;
        let Some(state) = self.devices.get(&devid).map(|d| d.state) else {
            return Ok(());
        };
        match (state, backend_state) {
            (XenbusState::Initialising, XenbusState::InitWait) => {
                let dev = self.devices.get_mut(&devid).ok_or("device vanished")?;
                let connection = dev
                    .connection
                    .take()
                    .ok_or("no vhost-user connection was handed over")?;
                let (session, capacity) = self.kind.connect(devid, connection)?;
                if let Some(dev) = self.devices.get_mut(&devid) {
                    dev.session = Some(session);
                    dev.capacity = capacity;
                }
                match self
                    .store
                    .watch(&format!("{backend}/{}", keys::STATE), &token(devid))
                {
                    Ok(()) => {}
                    // Still registered from an earlier attach of the same device.
                    Err(e) if e.xs_error() == Some(XsError::EEXIST) => {}
                    Err(e) => return Err(format!("watching {backend}/state: {e}")),
                }
                self.set_state(devid, XenbusState::Initialised)
            }
            (XenbusState::Initialised, XenbusState::Connected) => {
                self.set_state(devid, XenbusState::Connected)?;
                let sectors = self.devices.get(&devid).map_or(0, |d| d.capacity);
                self.control
                    .send(&GuestEvent::Connected { devid, sectors }, &[])
                    .map_err(|e| e.to_string())
            }
            (
                XenbusState::Initialised | XenbusState::Connected,
                XenbusState::Closing | XenbusState::Closed,
            ) => self.close(devid),
            _ => Ok(()),
        }
    }

    /// Ends the session and forgets the device.
    fn end_session(&mut self, devid: u32) {
        if let Some(backend) = self.backend_dir(devid).ok().flatten() {
            let _ = self
                .store
                .unwatch(&format!("{backend}/{}", keys::STATE), &token(devid));
        }
        if let Some(session) = self.devices.remove(&devid).and_then(|d| d.session) {
            self.kind.disconnect(devid, session);
        }
    }

    /// The frontend's side of a detach: stop I/O, end the session, Closing then Closed.
    fn close(&mut self, devid: u32) -> Result<(), String> {
        self.set_state(devid, XenbusState::Closing)?;
        self.end_session(devid);
        self.set_state(devid, XenbusState::Closed)?;
        self.control
            .send(&GuestEvent::Closed { devid }, &[])
            .map_err(|e| e.to_string())
    }

    fn fail(&mut self, devid: u32, reason: String) -> Result<(), FrontendError> {
        self.end_session(devid);
        let _ = self.set_state(devid, XenbusState::Closed);
        self.control
            .send(&GuestEvent::DeviceFailed { devid, reason }, &[])?;
        Ok(())
    }

    fn disk_check(&mut self, devid: u32, seed: u64, bytes: u64, verify_only: bool) -> GuestEvent {
        let result = match self.devices.get_mut(&devid) {
            Some(Device {
                state: XenbusState::Connected,
                session: Some(session),
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
            .stats(self.devices.values().filter_map(|d| d.session.as_ref()))
    }

    /// Publishes the running counters under the domain's own `data/io` directory, where
    /// `splitvmm list` and `splitvmm top` read them.
    fn publish_counters(&mut self) {
        let t = self.stats();
        let dir = format!("{}/data/io", domain_path(self.domid));
        for (key, value) in [
            ("requests", t.requests),
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
        let devids: Vec<u32> = self.devices.keys().copied().collect();
        for devid in devids {
            if let Err(e) = self.close(devid) {
                log::warn!("vbd {devid}: closing on shutdown: {e}");
            }
        }
        let stats = self.stats();
        self.control.send(&GuestEvent::Stats(stats), &[])?;
        Ok(())
    }
}
