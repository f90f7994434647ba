//! Managed mode: the driver domain as `splitvmm up` runs it.
//!
//! The driver domain is an unprivileged store client (its store connection, fd 3, is bound to
//! its domain id) and gets everything else over its control channel (fd 4): each device's
//! disk image and a vhost-user listener whose one pending connection is the frontend's. It opens no path after
//! start-up, except for the hardware it owns (sysfs, `/dev/vfio`: [`assign`]). It watches its backend directories and walks the backend half of the xenbus
//! state machine for each device (see docs/protocol.md):
//!
//! Initialising --(handed fds)--> InitWait --(frontend Initialised)--> Connected
//!   --(toolstack Closing / online=0 / frontend Closing)--> Closed
//!
//! A driver domain restarted by the toolstack finds its devices' directories already there,
//! marked Closed by the toolstack; it serves each again once handed its descriptors, and goes
//! Connected only when the frontend has reconnected (Initialised), not on a Connected left
//! over from the dead backend. A device whose session fails is written Closed with an
//! `error` node saying why, as a Xen backend's `xenbus_dev_fatal` does.

pub mod assign;
mod hardware;
mod publish;
mod session;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use ipc::control::messages::{fds, BackendDeviceStats, BackendEvent, BackendRequest, MemoryGrant};
use ipc::control::{ChannelError, ControlChannel};
use ipc::xenbus::{backend_kind_dir, keys, DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::{ClientError, StoreClient};
use ipc::xenstore::wire::XsError;

use session::Session;

use crate::virtio_core::counters::CounterValues;
use crate::virtio_core::SealPolicy;

use crate::net::format_mac;
use crate::net::switch::{Switch, SwitchConfig};
use crate::net::TapUplink;
use std::sync::Arc;

/// Errors that end the driver domain.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error("store")]
    Store(#[from] ClientError),
    #[error("control channel")]
    Control(#[from] ChannelError),
    #[error("uplink switch port")]
    UplinkPort(#[from] crate::net::SwitchError),
    #[error("uplink tap")]
    Uplink(#[from] crate::net::TapError),
}

/// How often the loop wakes up when nothing happens.
const TICK: Duration = Duration::from_millis(20);
/// The kinds of split devices served.
const KINDS: [DeviceKind; 2] = [DeviceKind::Vbd, DeviceKind::Vif];

/// How long a closing backend waits for its frontend to close before closing anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// A device of some frontend: its kind, the frontend's id and the device number.
type DevKey = (DeviceKind, u32, u32);

/// What the toolstack handed over for a device, waiting for its store directory. Each holds
/// a listener whose only pending connection is the frontend's (its path is gone).
enum Handed {
    Block {
        image: File,
        listener: UnixListener,
        readonly: bool,
        grant: MemoryGrant,
        queues: u16,
    },
    Net {
        listener: UnixListener,
        mac: [u8; 6],
        grant: MemoryGrant,
        offloads: bool,
    },
}

/// One backend device.
struct Device {
    id: DeviceId,
    state: XenbusState,
    session: Option<Session>,
    closing_since: Option<Instant>,
    /// Found marked Closed (by the toolstack, after this domain's predecessor died): the
    /// frontend must reconnect (Initialised) before this backend goes Connected.
    restarted: bool,
}

/// The driver domain in managed mode.
pub struct ManagedDriverDomain {
    domid: u32,
    store: StoreClient,
    control: ControlChannel,
    handed: HashMap<DevKey, Handed>,
    devices: BTreeMap<DevKey, Device>,
    sessions: HashMap<DevKey, u64>,
    /// Counters of sessions that ended, per device.
    past_counters: HashMap<DevKey, CounterValues>,
    /// What was last written to the store, per device, and when.
    published: HashMap<DevKey, CounterValues>,
    last_publish: Instant,
    /// The switch every vif is a port of.
    switch: Arc<Switch>,
    /// The tap uplink on that switch, if the host file names one.
    uplink: Option<TapUplink>,
    /// The owned PFs and the VFs guests hold.
    vfs: assign::VfPool,
    /// How the guests' memory must be protected against shrinking.
    seal_policy: SealPolicy,
}

impl ManagedDriverDomain {
    /// Takes over the descriptors `splitvmm up` handed this process.
    ///
    /// # Safety
    /// fds 3 and 4 must be the store connection and the control channel, owned by nobody
    /// else in this process.
    pub unsafe fn from_inherited_fds(domid: u32) -> ManagedDriverDomain {
        // SAFETY: the caller guarantees both descriptors are ours alone.
        let (store, control) = unsafe {
            (
                UnixStream::from_raw_fd(fds::STORE),
                OwnedFd::from_raw_fd(fds::CONTROL),
            )
        };
        ManagedDriverDomain {
            domid,
            store: StoreClient::from_stream(store),
            control: ControlChannel::from_fd(control),
            handed: HashMap::new(),
            devices: BTreeMap::new(),
            sessions: HashMap::new(),
            past_counters: HashMap::new(),
            published: HashMap::new(),
            last_publish: Instant::now(),
            switch: Switch::new(SwitchConfig::default()),
            uplink: None,
            vfs: assign::VfPool::default(),
            seal_policy: SealPolicy::RequireSealed,
        }
    }

    /// Inside a managed driver VM (`vm-serve --managed`): guest memory arrives as the
    /// cross-VM device's BAR2 `resource` file (sysfs, fixed size, unsealable), which is then
    /// accepted unsealed ([`SealPolicy::RequireSealedOrSysfs`]); anything else must still be
    /// sealed.
    pub fn accept_sysfs_memory(&mut self) {
        self.seal_policy = SealPolicy::RequireSealedOrSysfs;
    }

    /// Opens tap `name` (creating it if missing) and attaches it to the switch as the
    /// uplink port: exempt from the source-address check, not from the table bounds.
    pub fn attach_uplink(&mut self, name: &str) -> Result<(), ManagedError> {
        let port = self.switch.attach(&format!("tap:{name}"))?;
        self.uplink = Some(TapUplink::open(name, port)?);
        Ok(())
    }

    /// Attaches tap `name`, already open (the toolstack's descriptor), as the uplink.
    pub fn attach_uplink_device(&mut self, name: &str, tap: File) -> Result<(), ManagedError> {
        let port = self.switch.attach(&format!("tap:{name}"))?;
        self.uplink = Some(TapUplink::from_device(tap, name, port)?);
        Ok(())
    }

    /// Runs until the toolstack says shut down (Ok) or goes away (Err).
    pub fn run(mut self) -> Result<(), ManagedError> {
        for kind in KINDS {
            self.store
                .watch(&backend_kind_dir(self.domid, kind), kind.as_str())?;
        }
        self.control.send(&BackendEvent::Ready, &[])?;
        loop {
            while let Some((request, fds)) = self.control.try_recv::<BackendRequest>()? {
                match request {
                    BackendRequest::ServeBlock {
                        frontend,
                        devid,
                        readonly,
                        grant,
                        queues,
                        device: _,
                    } => self.take_handed((DeviceKind::Vbd, frontend, devid), fds, |mut fds| {
                        let listener = UnixListener::from(fds.pop()?);
                        let image = File::from(fds.pop()?);
                        fds.is_empty().then_some(Handed::Block {
                            image,
                            listener,
                            readonly,
                            grant,
                            queues,
                        })
                    }),
                    BackendRequest::ServeNet {
                        frontend,
                        devid,
                        mac,
                        grant,
                        offloads,
                    } => self.take_handed((DeviceKind::Vif, frontend, devid), fds, |mut fds| {
                        let listener = UnixListener::from(fds.pop()?);
                        fds.is_empty().then_some(Handed::Net {
                            listener,
                            mac,
                            grant,
                            offloads,
                        })
                    }),
                    BackendRequest::Stats => {
                        let stats = self.stats();
                        self.control.send(&BackendEvent::Stats(stats), &[])?;
                    }
                    BackendRequest::AssignVf { frontend, pf, vf } => {
                        drop(fds);
                        self.assign_vf(frontend, &pf, vf)?;
                    }
                    BackendRequest::ReleaseVf { frontend, address } => {
                        drop(fds);
                        let event = match self.vfs.release(frontend, &address) {
                            Ok((_, reset)) => BackendEvent::VfReleased {
                                frontend,
                                address,
                                reset: reset.is_ok(),
                                detail: reset.err().unwrap_or_default(),
                            },
                            Err(detail) => BackendEvent::VfReleased {
                                frontend,
                                address,
                                reset: false,
                                detail,
                            },
                        };
                        self.control.send(&event, &[])?;
                    }
                    BackendRequest::Shutdown => {
                        self.shut_down();
                        return Ok(());
                    }
                }
            }
            match self.store.read_watch_event(Some(TICK)) {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(e) => return Err(e.into()),
            }
            self.scan()?;
            let keys: Vec<DevKey> = self.devices.keys().copied().collect();
            for key in keys {
                if let Err(reason) = self.step(key) {
                    log::error!("{} {}/{}: {reason}", key.0, key.1, key.2);
                    self.fail(key, reason)?;
                }
            }
            self.publish_counters();
        }
    }

    /// Prepares a VF for `frontend` and hands its VFIO group over, keeping no copy.
    fn assign_vf(&mut self, frontend: u32, pf: &str, vf: Option<u16>) -> Result<(), ManagedError> {
        match self.vfs.assign(frontend, pf, vf) {
            Ok(handed) => {
                let event = BackendEvent::VfAssigned {
                    frontend,
                    pf: pf.to_owned(),
                    vf: handed.vf,
                    address: handed.address.to_string(),
                };
                let sent = self.control.send(&event, &[handed.group.as_fd()]);
                // `handed.group` closes here: the receiver's is the only descriptor left.
                drop(handed);
                sent?;
            }
            Err(reason) => {
                log::error!("VF for domain {frontend}: {reason}");
                self.control
                    .send(&BackendEvent::VfRefused { frontend, reason }, &[])?;
            }
        }
        Ok(())
    }

    fn take_handed(
        &mut self,
        key: DevKey,
        fds: Vec<OwnedFd>,
        parse: impl FnOnce(Vec<OwnedFd>) -> Option<Handed>,
    ) {
        let count = fds.len();
        match parse(fds) {
            Some(handed) => {
                self.handed.insert(key, handed);
            }
            None => log::error!(
                "{} {}/{}: the toolstack handed over {count} descriptors, not what this device needs",
                key.0,
                key.1,
                key.2
            ),
        }
    }

    /// Finds device directories the toolstack created (and notices removed ones).
    fn scan(&mut self) -> Result<(), ManagedError> {
        let mut present = Vec::new();
        for kind in KINDS {
            let dir = backend_kind_dir(self.domid, kind);
            for frontend in self.list(&dir)? {
                let fe_dir = format!("{dir}/{frontend}");
                for devid in self.list(&fe_dir)? {
                    let path = format!("{fe_dir}/{devid}");
                    if let Some(id) = DeviceId::from_backend_path(self.domid, kind, &path) {
                        present.push(id);
                    }
                }
            }
        }
        let key_of = |id: &DeviceId| (id.kind, id.frontend, id.devid);
        for id in &present {
            self.devices.entry(key_of(id)).or_insert_with(|| Device {
                id: *id,
                state: XenbusState::Initialising,
                session: None,
                closing_since: None,
                restarted: false,
            });
        }
        // A directory removed under a live device: stop serving it.
        let gone: Vec<DevKey> = self
            .devices
            .keys()
            .filter(|k| !present.iter().any(|id| key_of(id) == **k))
            .copied()
            .collect();
        for key in gone {
            if let Some(mut dev) = self.devices.remove(&key) {
                if let Some(session) = dev.session.take() {
                    log::warn!("{}: directory removed while serving; stopping", dev.id);
                    self.end_session(key, session);
                }
            }
        }
        Ok(())
    }

    fn list(&mut self, path: &str) -> Result<Vec<String>, ManagedError> {
        match self.store.directory(path) {
            Ok(entries) => Ok(entries),
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a node; `None` if it is not there. A node under a directory we may not read
    /// (a frontend directory already removed: its parent is private to the guest) answers
    /// EACCES instead of ENOENT, as in Xen, and means the same here.
    fn read(&mut self, path: &str) -> Result<Option<String>, String> {
        match self.store.read(path) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(e) if matches!(e.xs_error(), Some(XsError::ENOENT | XsError::EACCES)) => Ok(None),
            Err(e) => Err(format!("reading {path}: {e}")),
        }
    }

    fn write(&mut self, path: &str, value: &str) -> Result<(), String> {
        self.store
            .write(path, value.as_bytes())
            .map_err(|e| format!("writing {path}: {e}"))
    }

    fn set_state(&mut self, key: DevKey, state: XenbusState) -> Result<(), String> {
        let Some(dev) = self.devices.get_mut(&key) else {
            return Ok(());
        };
        let path = format!("{}/{}", dev.id.backend_path(), keys::STATE);
        dev.state = state;
        log::info!("{}: backend {state:?}", dev.id);
        self.write(&path, &state.to_string())
    }

    /// One step of the backend half of the walk.
    fn step(&mut self, key: DevKey) -> Result<(), String> {
        let Some((id, ours)) = self.devices.get(&key).map(|d| (d.id, d.state)) else {
            return Ok(());
        };
        let be = id.backend_path();
        // The frontend path must be the one this backend's layout implies: a toolstack bug
        // or a forged entry must not make us follow another domain's directory.
        let fe = id.frontend_path();
        if let Some(named) = self.read(&format!("{be}/{}", keys::FRONTEND))? {
            if named != fe {
                return Err(format!("frontend key names {named}, expected {fe}"));
            }
        }
        let written = self
            .read(&format!("{be}/{}", keys::STATE))?
            .and_then(|s| s.parse::<XenbusState>().ok())
            .unwrap_or(XenbusState::Unknown);
        let online = self.read(&format!("{be}/{}", keys::ONLINE))?;
        let fe_state = self
            .read(&format!("{fe}/{}", keys::STATE))?
            .map(|s| s.parse::<XenbusState>().unwrap_or(XenbusState::Unknown))
            // A vanished frontend directory reads as Closed.
            .unwrap_or(XenbusState::Closed);
        let close_requested = written == XenbusState::Closing
            || online.as_deref() == Some("0")
            || (ours >= XenbusState::InitWait
                && matches!(fe_state, XenbusState::Closing | XenbusState::Closed));

        // The toolstack removed and re-created the directory between two looks: a new
        // attach of the same device.
        if ours == XenbusState::Closed && written == XenbusState::Initialising {
            if let Some(dev) = self.devices.get_mut(&key) {
                dev.state = XenbusState::Initialising;
                dev.closing_since = None;
            }
            return Ok(());
        }
        // Level-triggered: a Closed backend keeps saying so, even if a late write (a close
        // request racing with a frontend that vanished) overwrote it.
        if ours == XenbusState::Closed && written == XenbusState::Closing {
            return self.write(
                &format!("{be}/{}", keys::STATE),
                &XenbusState::Closed.to_string(),
            );
        }
        if close_requested && ours != XenbusState::Closed {
            return self.close_step(key, fe_state);
        }
        if let Some(reason) = self
            .devices
            .get(&key)
            .and_then(|d| d.session.as_ref())
            .and_then(Session::failure)
        {
            return Err(reason);
        }
        let restarted = self.devices.get(&key).is_some_and(|d| d.restarted);
        match ours {
            XenbusState::Initialising => {
                if written == XenbusState::Closed && !restarted {
                    if let Some(dev) = self.devices.get_mut(&key) {
                        dev.restarted = true;
                        log::warn!(
                            "{}: found Closed: serving it again for a reconnecting frontend",
                            dev.id
                        );
                    }
                }
                self.start(key)
            }
            XenbusState::InitWait
                if fe_state == XenbusState::Initialised
                    || (fe_state == XenbusState::Connected && !restarted) =>
            {
                if restarted {
                    log::info!("{id}: the frontend reconnected (Initialised)");
                }
                self.set_state(key, XenbusState::Connected)
            }
            _ => Ok(()),
        }
    }

    /// Starts serving once both the directory and the handed descriptors are here.
    fn start(&mut self, key: DevKey) -> Result<(), String> {
        let Some(handed) = self.handed.remove(&key) else {
            return Ok(());
        };
        let Some(dev) = self.devices.get(&key) else {
            return Ok(());
        };
        let id = dev.id;
        let be = id.backend_path();
        let (session, features): (Session, Vec<(&str, String)>) = match handed {
            Handed::Block {
                image,
                listener,
                readonly,
                grant,
                queues,
            } => {
                let session = Session::start_block(
                    id,
                    image,
                    listener,
                    (readonly, queues),
                    (grant, self.seal_policy),
                )?;
                let mut features = vec![
                    (keys::SECTORS, session.capacity_sectors().to_string()),
                    (keys::SECTOR_SIZE, "512".to_owned()),
                    ("feature-flush-cache", "1".to_owned()),
                ];
                if !readonly {
                    features.push(("feature-discard", "1".to_owned()));
                }
                (session, features)
            }
            Handed::Net {
                listener,
                mac,
                grant,
                offloads,
            } => {
                let session = Session::start_net(
                    id,
                    &self.switch,
                    listener,
                    (mac, offloads),
                    (grant, self.seal_policy),
                )?;
                (session, vec![("mac", format_mac(&mac))])
            }
        };
        if let Some(dev) = self.devices.get_mut(&key) {
            dev.session = Some(session);
        }
        *self.sessions.entry(key).or_default() += 1;
        // A failure reported by an earlier session is history now.
        match self.store.rm(&format!("{be}/{}", keys::ERROR)) {
            Ok(()) => {}
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => {}
            Err(e) => log::warn!("{id}: removing the old error node: {e}"),
        }
        for (k, v) in features {
            self.write(&format!("{be}/{k}"), &v)?;
        }
        self.set_state(key, XenbusState::InitWait)
    }

    /// Closing: wait for the frontend to close (at most the grace period), then end the
    /// session and report Closed.
    fn close_step(&mut self, key: DevKey, fe_state: XenbusState) -> Result<(), String> {
        let Some(dev) = self.devices.get_mut(&key) else {
            return Ok(());
        };
        let since = *dev.closing_since.get_or_insert_with(Instant::now);
        let frontend_done = matches!(
            fe_state,
            XenbusState::Closed | XenbusState::Initialising | XenbusState::Unknown
        );
        if !frontend_done && since.elapsed() < CLOSE_GRACE {
            if dev.state != XenbusState::Closing {
                dev.state = XenbusState::Closing;
                log::info!("{}: backend Closing, waiting for the frontend", dev.id);
            }
            return Ok(());
        }
        if !frontend_done {
            log::warn!("{}: frontend did not close within {CLOSE_GRACE:?}", dev.id);
        }
        if let Some(session) = dev.session.take() {
            self.end_session(key, session);
        }
        self.set_state(key, XenbusState::Closed)
    }

    fn fail(&mut self, key: DevKey, reason: String) -> Result<(), ManagedError> {
        if let Some(mut dev) = self.devices.remove(&key) {
            if let Some(session) = dev.session.take() {
                self.end_session(key, session);
            }
            // Why first, then the state: whoever sees Closed finds the reason there.
            let be = dev.id.backend_path();
            let error = format!("{be}/{}", keys::ERROR);
            if let Err(e) = self.store.write(&error, reason.as_bytes()) {
                log::warn!("{error}: {e}");
            }
            let path = format!("{be}/{}", keys::STATE);
            let _ = self
                .store
                .write(&path, XenbusState::Closed.to_string().as_bytes());
        }
        self.control.send(
            &BackendEvent::DeviceFailed {
                frontend: key.1,
                devid: key.2,
                reason,
            },
            &[],
        )?;
        Ok(())
    }

    fn stats(&self) -> Vec<BackendDeviceStats> {
        self.sessions
            .iter()
            .map(|(&(_, frontend, devid), &sessions)| BackendDeviceStats {
                frontend,
                devid,
                sessions,
            })
            .collect()
    }

    fn shut_down(&mut self) {
        for (_, mut dev) in std::mem::take(&mut self.devices) {
            if let Some(session) = dev.session.take() {
                let _ = session.stop();
            }
        }
    }
}
