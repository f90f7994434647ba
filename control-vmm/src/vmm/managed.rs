//! `splitvmm-vmm managed`: the VMM as a guest domain process of `splitvmm up`.
//!
//! It speaks the same protocol as a process-domain guest (`process-guest`): the store
//! connection on fd 3 (bound to its domain id), the control channel to the toolstack on fd 4.
//! `AttachBlock` hands it the frontend end of a vhost-user connection to the driver domain; it
//! walks the xenbus states in the store (set up vhost-user at backend InitWait, Initialised,
//! Connected). Each `DiskCheck` boots the tiny kernel in a fresh KVM machine on that same
//! vhost-user session; the guest writes and verifies the pattern through the driver domain and
//! powers off with its verdict. The exit table of every machine goes to stderr; `Shutdown`
//! answers with the summed guest counters.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc::control::messages::{fds, GuestEvent, GuestRequest, GuestStats};
use ipc::control::{ChannelError, ControlChannel};
use ipc::xenbus::{domain_path, keys, DeviceKind, XenbusState};
use ipc::xenstore::client::{ClientError, StoreClient};
use ipc::xenstore::wire::XsError;

use super::layout::{GuestMode, GUEST_REPORT_SLOTS};
use super::machine::{run_keeping_backend, BlkAttachment, Outcome, RingMode, VmConfig};
use super::vhost_blk::{BlkBackend, VhostBlk};

/// Errors that end the managed VMM.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error("store")]
    Store(#[from] ClientError),
    #[error("control channel")]
    Control(#[from] ChannelError),
}

/// How each machine is built.
#[derive(Debug, Clone)]
pub struct MachineSettings {
    pub kernel: PathBuf,
    pub ram_bytes: u64,
    pub window_bytes: u64,
    pub ring: RingMode,
    pub batch: u32,
    /// Sectors per request (1..=8).
    pub sectors_per_request: u32,
    pub idle_baseline: bool,
}

const TICK: Duration = Duration::from_millis(20);
/// Largest disk check one machine runs: the tiny guest is meant to stay small (1 MiB is about
/// 3.4 M guest instructions, ~3 s on a software-emulated /dev/kvm).
pub const MAX_CHECK_BYTES: u64 = 4 << 20;

fn token(devid: u32) -> String {
    format!("backend-{devid}")
}

struct Device {
    connection: Option<UnixStream>,
    session: Option<VhostBlk>,
    capacity: u64,
    state: XenbusState,
}

/// The managed VMM process.
pub struct ManagedVm {
    domid: u32,
    store: StoreClient,
    control: ControlChannel,
    settings: MachineSettings,
    devices: BTreeMap<u32, Device>,
    totals: GuestStats,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ManagedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedVm")
            .field("domid", &self.domid)
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ManagedVm {
    /// Takes over the descriptors `splitvmm up` handed this process.
    ///
    /// # Safety
    /// fds 3 and 4 must be the store connection and the control channel, owned by nobody
    /// else in this process.
    pub unsafe fn from_inherited_fds(
        domid: u32,
        settings: MachineSettings,
        stop: Arc<AtomicBool>,
    ) -> Self {
        // SAFETY: the caller guarantees both descriptors are ours alone.
        let (store, control) = unsafe {
            (
                UnixStream::from_raw_fd(fds::STORE),
                OwnedFd::from_raw_fd(fds::CONTROL),
            )
        };
        Self {
            domid,
            store: StoreClient::from_stream(store),
            control: ControlChannel::from_fd(control),
            settings,
            devices: BTreeMap::new(),
            totals: GuestStats::default(),
            stop,
        }
    }

    fn device_dir(&self, devid: u32) -> String {
        format!(
            "{}/device/{}/{devid}",
            domain_path(self.domid),
            DeviceKind::Vbd
        )
    }

    /// Runs until the toolstack says shut down (Ok), the toolstack goes away, or a signal.
    pub fn run(mut self) -> Result<(), ManagedError> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
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
                    self.devices.remove(&devid);
                    let _ = self.set_state(devid, XenbusState::Closed);
                    self.control
                        .send(&GuestEvent::DeviceFailed { devid, reason }, &[])?;
                }
            }
        }
    }

    fn attach(&mut self, devid: u32, mut fds: Vec<OwnedFd>) -> Result<(), ManagedError> {
        let reason = match fds.pop().filter(|_| fds.is_empty()) {
            None => "attach came without exactly one connection",
            // One virtio-mmio slot: one disk per machine.
            Some(_) if !self.devices.is_empty() => "a KVM guest has room for one disk",
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
        self.control.send(
            &GuestEvent::DeviceFailed {
                devid,
                reason: reason.to_owned(),
            },
            &[],
        )?;
        Ok(())
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

    /// One step of the frontend half of the xenbus walk.
    fn step(&mut self, devid: u32) -> Result<(), String> {
        let dir = self.device_dir(devid);
        let backend = match self.store.read(&format!("{dir}/{}", keys::BACKEND)) {
            Ok(v) => String::from_utf8_lossy(&v).into_owned(),
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => return Ok(()),
            Err(e) => return Err(format!("reading {dir}/backend: {e}")),
        };
        let backend_state = self.read_state(&backend)?;
        let Some(state) = self.devices.get(&devid).map(|d| d.state) else {
            return Ok(());
        };
        match (state, backend_state) {
            (XenbusState::Initialising, XenbusState::InitWait) => {
                let dev = self.devices.get_mut(&devid).ok_or("device vanished")?;
                let stream = dev
                    .connection
                    .take()
                    .ok_or("no vhost-user connection was handed over")?;
                // The memory table is sent per machine (each has its own window).
                let session = VhostBlk::from_stream(stream, Vec::new())
                    .map_err(|e| format!("vhost-user set-up: {e}"))?;
                let cfg = session.config();
                let mut cap = [0u8; 8];
                cap.copy_from_slice(cfg.get(..8).ok_or("short config space")?);
                dev.capacity = u64::from_le_bytes(cap);
                dev.session = Some(session);
                match self
                    .store
                    .watch(&format!("{backend}/{}", keys::STATE), &token(devid))
                {
                    Ok(()) => {}
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

    fn close(&mut self, devid: u32) -> Result<(), String> {
        self.set_state(devid, XenbusState::Closing)?;
        if let Ok(v) = self
            .store
            .read(&format!("{}/{}", self.device_dir(devid), keys::BACKEND))
        {
            let backend = String::from_utf8_lossy(&v).into_owned();
            let _ = self
                .store
                .unwatch(&format!("{backend}/{}", keys::STATE), &token(devid));
        }
        // Machines stop their queue (GET_VRING_BASE) when they end; dropping the session
        // closes the connection.
        self.devices.remove(&devid);
        self.set_state(devid, XenbusState::Closed)?;
        self.control
            .send(&GuestEvent::Closed { devid }, &[])
            .map_err(|e| e.to_string())
    }

    fn disk_check(&mut self, devid: u32, seed: u64, bytes: u64, verify_only: bool) -> GuestEvent {
        let fail = |detail: String| GuestEvent::DiskCheck {
            devid,
            passed: false,
            detail,
        };
        let Some(dev) = self
            .devices
            .get_mut(&devid)
            .filter(|d| d.state == XenbusState::Connected)
        else {
            return fail("device is not Connected".into());
        };
        if bytes > MAX_CHECK_BYTES {
            return fail(format!(
                "check of {bytes} bytes exceeds the tiny guest's limit of {MAX_CHECK_BYTES}"
            ));
        }
        let sectors = bytes / 512;
        if bytes == 0
            || !bytes.is_multiple_of(512)
            || sectors > dev.capacity
            || sectors > u64::from(u32::MAX)
        {
            return fail(format!(
                "check of {bytes} bytes does not fit the {}-sector disk in whole sectors",
                dev.capacity
            ));
        }
        let Some(session) = dev.session.take() else {
            return fail("the vhost-user session was lost by an earlier machine".into());
        };
        let s = &self.settings;
        let cfg = VmConfig {
            kernel: s.kernel.clone(),
            ram_bytes: s.ram_bytes,
            vcpus: 1,
            mode: GuestMode::Disk,
            blk: BlkAttachment::Connected(Box::new(session)),
            share_all_ram: false,
            window_bytes: s.window_bytes,
            ring: s.ring,
            requests: 0,
            batch: s.batch,
            seed,
            verify_only,
            sectors_per_request: s.sectors_per_request,
            check_sectors: sectors as u32,
            idle_baseline: s.idle_baseline,
            connect_timeout: Duration::from_secs(5),
            console: Box::new(std::io::stderr()),
            stop: Arc::clone(&self.stop),
        };
        let (report, session) = match run_keeping_backend(cfg) {
            Ok(r) => r,
            Err(e) => return fail(format!("machine: {e}")),
        };
        dev.session = session;
        eprint!("{}", report.table());
        let g: [u64; GUEST_REPORT_SLOTS] = report.guest;
        self.totals.requests += g[4];
        self.totals.bytes += bytes * if verify_only { 1 } else { 2 };
        self.totals.kicks_sent += g[0];
        self.totals.kicks_suppressed += g[1];
        self.totals.interrupts += g[2];
        let per = report.per_request().unwrap_or_default();
        self.totals.vmm_exits += (per.vmm_exits * per.requests as f64).round() as u64;
        self.publish_counters();
        let detail = format!(
            "{} {} KiB in a KVM guest: {} requests, {:.2} kicks, {:.2} interrupts, {:.2} VMM exits per request",
            if verify_only { "verified" } else { "wrote and verified" },
            bytes / 1024,
            per.requests,
            per.kicks,
            per.interrupts,
            per.vmm_exits
        );
        match report.outcome {
            Outcome::Poweroff(0) => GuestEvent::DiskCheck {
                devid,
                passed: true,
                detail,
            },
            other => fail(format!("guest ended with {other:?}")),
        }
    }

    /// Publishes the running counters under the domain's own `data/io` directory, where
    /// `splitvmm list` and `splitvmm top` read them.
    fn publish_counters(&mut self) {
        let t = self.totals;
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

    fn shut_down(mut self) -> Result<(), ManagedError> {
        let devids: Vec<u32> = self.devices.keys().copied().collect();
        for devid in devids {
            if let Err(e) = self.close(devid) {
                log::warn!("vbd {devid}: closing on shutdown: {e}");
            }
        }
        self.control.send(&GuestEvent::Stats(self.totals), &[])?;
        Ok(())
    }
}
