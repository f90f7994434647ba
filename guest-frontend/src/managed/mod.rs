//! A managed process domain: a guest that is a host process, started by `splitvmm up`.
//!
//! It is handed two descriptors (see `ipc::control::messages::fds`): its store connection,
//! which the store already bound to its domain id, and its control channel to the toolstack.
//! Devices arrive as a pre-connected vhost-user socket on the control channel; the xenbus walk
//! with the backend happens in the store, and the guest does I/O only once both sides are
//! Connected. Everything it shares with the driver domain lives in each device's I/O window.

mod disk_check;

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ipc::control::messages::{fds, GuestEvent, GuestRequest, GuestStats};
use ipc::control::{ChannelError, ControlChannel};
use ipc::xenbus::{domain_path, keys, DeviceKind, XenbusState};
use ipc::xenstore::client::{ClientError, StoreClient};
use ipc::xenstore::wire::XsError;

use crate::process::{BlockFrontend, FrontendConfig, FrontendStats};

/// Errors that end a managed guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("store")]
    Store(#[from] ClientError),
    #[error("control channel")]
    Control(#[from] ChannelError),
}

/// The watch token for a device's backend state.
fn token(devid: u32) -> String {
    format!("backend-{devid}")
}

/// How often the loop wakes up when nothing happens.
const TICK: Duration = Duration::from_millis(20);

/// Where one of the guest's block devices stands.
struct Device {
    /// The vhost-user connection, until the frontend takes it.
    connection: Option<UnixStream>,
    frontend: Option<BlockFrontend>,
    state: XenbusState,
    /// Counters of sessions that already ended.
    finished: FrontendStats,
}

/// The guest process.
pub struct ManagedGuest {
    domid: u32,
    store: StoreClient,
    control: ControlChannel,
    devices: BTreeMap<u32, Device>,
    totals: FrontendStats,
}

impl ManagedGuest {
    /// Takes over the descriptors `splitvmm up` handed this process.
    ///
    /// # Safety
    /// fds 3 and 4 must be the store connection and the control channel, owned by nobody
    /// else in this process.
    pub unsafe fn from_inherited_fds(domid: u32) -> ManagedGuest {
        // SAFETY: the caller guarantees both descriptors are ours alone.
        let (store, control) = unsafe {
            (
                UnixStream::from_raw_fd(fds::STORE),
                OwnedFd::from_raw_fd(fds::CONTROL),
            )
        };
        ManagedGuest {
            domid,
            store: StoreClient::from_stream(store),
            control: ControlChannel::from_fd(control),
            devices: BTreeMap::new(),
            totals: FrontendStats::default(),
        }
    }

    fn device_dir(&self, devid: u32) -> String {
        format!(
            "{}/device/{}/{devid}",
            domain_path(self.domid),
            DeviceKind::Vbd
        )
    }

    /// Runs until the toolstack says shut down (Ok) or the toolstack goes away (Err).
    pub fn run(mut self) -> Result<(), GuestError> {
        let devices_dir = format!("{}/device/{}", domain_path(self.domid), DeviceKind::Vbd);
        self.store.watch(&devices_dir, "devices")?;
        loop {
            while let Some((request, fds)) = self.control.try_recv::<GuestRequest>()? {
                match request {
                    GuestRequest::AttachBlock { devid } => self.attach(devid, fds),
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
            // Level-triggered: every wake-up re-reads the states that matter.
            match self.store.read_watch_event(Some(TICK)) {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(e) => return Err(e.into()),
            }
            let devids: Vec<u32> = self.devices.keys().copied().collect();
            for devid in devids {
                if let Err(reason) = self.step(devid) {
                    log::error!("vbd {devid}: {reason}");
                    self.fail_device(devid, reason)?;
                }
            }
        }
    }

    fn attach(&mut self, devid: u32, mut fds: Vec<OwnedFd>) {
        let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
            log::error!("vbd {devid}: attach came without exactly one connection");
            return;
        };
        self.devices.insert(
            devid,
            Device {
                connection: Some(UnixStream::from(fd)),
                frontend: None,
                state: XenbusState::Initialising,
                finished: FrontendStats::default(),
            },
        );
    }

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

    /// One step of the frontend half of the xenbus walk for `devid`.
    fn step(&mut self, devid: u32) -> Result<(), String> {
        let dir = self.device_dir(devid);
        let backend = match self.store.read(&format!("{dir}/{}", keys::BACKEND)) {
            Ok(v) => String::from_utf8_lossy(&v).into_owned(),
            // The toolstack has not written the directory yet.
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => return Ok(()),
            Err(e) => return Err(format!("reading {dir}/backend: {e}")),
        };
        let backend_state = self.read_state(&backend)?;
        let Some(dev) = self.devices.get(&devid) else {
            return Ok(());
        };
        match (dev.state, backend_state) {
            (XenbusState::Initialising, XenbusState::InitWait) => {
                let Some(dev) = self.devices.get_mut(&devid) else {
                    return Ok(());
                };
                let stream = dev
                    .connection
                    .take()
                    .ok_or("no vhost-user connection was handed over")?;
                let frontend = BlockFrontend::connect(stream, FrontendConfig::default())
                    .map_err(|e| format!("vhost-user set-up: {e}"))?;
                dev.frontend = Some(frontend);
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
                let sectors = self
                    .devices
                    .get(&devid)
                    .and_then(|d| d.frontend.as_ref())
                    .map(|f| f.capacity())
                    .unwrap_or(0);
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

    /// The frontend's side of a detach: stop I/O, end the session, Closing then Closed.
    fn close(&mut self, devid: u32) -> Result<(), String> {
        self.set_state(devid, XenbusState::Closing)?;
        let backend = self
            .store
            .read(&format!("{}/{}", self.device_dir(devid), keys::BACKEND))
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        if let Ok(backend) = backend {
            let _ = self
                .store
                .unwatch(&format!("{backend}/{}", keys::STATE), &token(devid));
        }
        if let Some(dev) = self.devices.get_mut(&devid) {
            if let Some(frontend) = dev.frontend.take() {
                if let Ok(stats) = frontend.stats() {
                    dev.finished.add(&stats);
                }
                if let Err(e) = frontend.shutdown() {
                    log::warn!("vbd {devid}: ending the vhost-user session: {e}");
                }
            }
        }
        self.set_state(devid, XenbusState::Closed)?;
        if let Some(dev) = self.devices.remove(&devid) {
            self.totals.add(&dev.finished);
        }
        self.control
            .send(&GuestEvent::Closed { devid }, &[])
            .map_err(|e| e.to_string())
    }

    fn fail_device(&mut self, devid: u32, reason: String) -> Result<(), GuestError> {
        if let Some(dev) = self.devices.remove(&devid) {
            self.totals.add(&dev.finished);
        }
        let _ = self.set_state(devid, XenbusState::Closed);
        self.control
            .send(&GuestEvent::DeviceFailed { devid, reason }, &[])?;
        Ok(())
    }

    fn disk_check(&mut self, devid: u32, seed: u64, bytes: u64, verify_only: bool) -> GuestEvent {
        let frontend = self
            .devices
            .get(&devid)
            .filter(|d| d.state == XenbusState::Connected)
            .and_then(|d| d.frontend.as_ref());
        let Some(frontend) = frontend else {
            return GuestEvent::DiskCheck {
                devid,
                passed: false,
                detail: "device is not Connected".to_owned(),
            };
        };
        match disk_check::run(frontend, seed, bytes, verify_only) {
            Ok(detail) => GuestEvent::DiskCheck {
                devid,
                passed: true,
                detail,
            },
            Err(detail) => GuestEvent::DiskCheck {
                devid,
                passed: false,
                detail,
            },
        }
    }

    /// Counters of ended sessions plus the live ones.
    fn counters(&self) -> FrontendStats {
        let mut t = self.totals;
        for dev in self.devices.values() {
            t.add(&dev.finished);
            if let Some(Ok(live)) = dev.frontend.as_ref().map(|f| f.stats()) {
                t.add(&live);
            }
        }
        t
    }

    /// Publishes the running counters under the domain's own `data/io` directory, where
    /// `splitvmm list` and `splitvmm top` read them.
    fn publish_counters(&mut self) {
        let t = self.counters();
        let dir = format!("{}/data/io", domain_path(self.domid));
        for (key, value) in [
            ("requests", t.requests),
            ("kicks", t.kicks_sent),
            ("interrupts", t.interrupts),
            ("vmm-exits", 0),
        ] {
            if let Err(e) = self
                .store
                .write(&format!("{dir}/{key}"), value.to_string().as_bytes())
            {
                log::warn!("publishing {dir}/{key}: {e}");
            }
        }
    }

    fn shut_down(mut self) -> Result<(), GuestError> {
        let devids: Vec<u32> = self.devices.keys().copied().collect();
        for devid in devids {
            if let Err(e) = self.close(devid) {
                log::warn!("vbd {devid}: closing on shutdown: {e}");
            }
        }
        let t = self.totals;
        let stats = GuestStats {
            requests: t.requests,
            bytes: t.bytes_read + t.bytes_written,
            kicks_sent: t.kicks_sent,
            kicks_suppressed: t.kicks_suppressed,
            interrupts: t.interrupts,
            vmm_exits: 0,
        };
        self.control.send(&GuestEvent::Stats(stats), &[])?;
        Ok(())
    }
}
