//! A running host: the store, the driver domain and the guests, as `splitvmm up` brings them
//! up, with the operations the toolstack performs on them (attach, detach, checks, shutdown).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ipc::control::messages::{
    BackendDeviceStats, BackendEvent, BackendRequest, GuestEvent, GuestRequest, GuestStats,
};
use ipc::control::ControlChannel;
use ipc::xenbus::{keys, DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn as spawn_store, ServerError, StoreConfig, StoreHandle};

use crate::config::{DiskConfig, GuestKind, HostConfig, NicConfig};
use crate::image::{self, OpenImage};
use crate::supervisor::DomainProcess;
use crate::{connection, domains};

/// How long a device may take to walk to Connected or Closed.
pub const WALK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a disk check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// One domain process with its control channel.
struct Domain {
    domid: u32,
    name: String,
    process: DomainProcess,
    channel: ControlChannel,
}

/// A guest's place in the host.
pub struct Guest {
    domain: Domain,
    disks: Vec<DiskConfig>,
    /// Bytes one disk check covers on this guest.
    check_bytes: u64,
    /// Counters reported by the guest when it shut down.
    pub stats: Option<GuestStats>,
}

/// Everything `splitvmm up` started.
pub struct Host {
    started: Instant,
    stop: Arc<AtomicBool>,
    store: StoreHandle,
    store_thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
    client: StoreClient,
    driver: Domain,
    guests: BTreeMap<String, Guest>,
    /// Where private vhost-user connections are made (0700, paths unlinked at once).
    private_dir: PathBuf,
    attach_serial: u64,
    /// (guest, kind, devid) of every attached device.
    attached: BTreeSet<(String, DeviceKind, u32)>,
    /// The images held for each (guest, vbd), locked: the registry that names who holds an
    /// image when another attach is refused.
    images: BTreeMap<(String, u32), HeldImage>,
    /// (st_dev, st_ino) of the images this toolstack created: scratch for as long as it runs.
    created: BTreeSet<(u64, u64)>,
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the splitvmm binary")?;
    let dir = exe.parent().context("splitvmm binary has no directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found next to splitvmm (build the workspace: cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A disk image the toolstack holds for one guest's vbd, attached or about to be.
struct HeldImage {
    image: OpenImage,
    path: PathBuf,
    /// Disk checks may write to it (`scratch = true`, or the toolstack created it).
    scratch: bool,
}

/// Opens and locks `disk`'s image; `images` is the registry that names a holder on this host.
fn open_held(
    disk: &DiskConfig,
    images: &BTreeMap<(String, u32), HeldImage>,
    created: &mut BTreeSet<(u64, u64)>,
) -> Result<HeldImage> {
    let holder_of = |id| {
        images
            .iter()
            .find(|(_, h)| h.image.info.id == id)
            .map(|((guest, devid), _)| format!("{guest}'s vbd {devid} on this host"))
    };
    let image = image::open_disk(disk, &holder_of)?;
    if image.created {
        created.insert(image.info.id);
    }
    let scratch = disk.scratch || created.contains(&image.info.id);
    Ok(HeldImage {
        image,
        path: disk.image.clone(),
        scratch,
    })
}

impl Host {
    /// Starts the store, creates the domains in it and starts their processes.
    pub fn bring_up(config: &HostConfig, stop: Arc<AtomicBool>) -> Result<Host> {
        let started = Instant::now();
        // Every image is opened and locked before anything starts: one held elsewhere, or
        // named twice, fails here.
        let mut images = BTreeMap::new();
        let mut created = BTreeSet::new();
        for guest in &config.guests {
            for disk in &guest.disks {
                let held = open_held(disk, &images, &mut created)?;
                images.insert((guest.name.clone(), disk.devid), held);
            }
        }
        std::fs::create_dir_all(&config.run_dir)
            .with_context(|| format!("creating run_dir {}", config.run_dir.display()))?;
        let private_dir = config.run_dir.join("vhost-user");
        connection::prepare_dir(&private_dir)
            .with_context(|| format!("creating {}", private_dir.display()))?;
        let socket = config.store_socket();
        let (store, store_thread) = spawn_store(StoreConfig {
            socket: socket.clone(),
            ..StoreConfig::default()
        })
        .with_context(|| format!("starting the store on {}", socket.display()))?;
        let mut client = StoreClient::connect(&socket).context("connecting to the store")?;
        log::info!("store listening on {}", socket.display());

        let dd = &config.driver_domain;
        domains::create_domain(&mut client, dd.domid, &dd.name)?;
        let mut command = Command::new(sibling_binary("driver-domain")?);
        command
            .arg("managed")
            .arg("--domid")
            .arg(dd.domid.to_string());
        for bdf in &dd.owns {
            command.arg("--owns").arg(bdf);
        }
        if let Some(tap) = &dd.uplink {
            // The driver domain opens the tap itself: it is the one moving its frames.
            command.arg("--uplink").arg(tap);
        }
        let driver = Self::start_domain(&store, dd.domid, &dd.name, command)?;
        let mut host = Host {
            started,
            stop,
            store,
            store_thread: Some(store_thread),
            client,
            driver,
            guests: BTreeMap::new(),
            private_dir,
            attach_serial: 0,
            attached: BTreeSet::new(),
            images,
            created,
        };
        match host
            .driver
            .channel
            .recv_timeout::<BackendEvent>(WALK_TIMEOUT)?
        {
            Some((BackendEvent::Ready, _)) => host.progress(&format!("{}: ready", dd.name)),
            other => bail!("driver domain did not report ready: {other:?}"),
        }

        for guest in &config.guests {
            domains::create_domain(&mut host.client, guest.domid, &guest.name)?;
            let command = match (guest.kind, &guest.kernel) {
                (GuestKind::Kvm, Some(kernel)) => {
                    let mut command = Command::new(sibling_binary("splitvmm-vmm")?);
                    command
                        .arg("--kernel")
                        .arg(kernel)
                        .arg("--managed-domid")
                        .arg(guest.domid.to_string())
                        .args(["--no-idle-baseline", "--batch", "4"]);
                    // The guest's serial console, the VMM's exit tables and its log go to a
                    // file, like `xl`'s console log, not into the toolstack's output.
                    let log_path = config.run_dir.join(format!("{}.console.log", guest.name));
                    let log = File::create(&log_path)
                        .with_context(|| format!("creating {}", log_path.display()))?;
                    let log_err = log
                        .try_clone()
                        .with_context(|| format!("opening {}", log_path.display()))?;
                    command.stdout(log).stderr(log_err);
                    command
                }
                _ => {
                    let mut command = Command::new(sibling_binary("process-guest")?);
                    command
                        .arg("--domid")
                        .arg(guest.domid.to_string())
                        .arg("--name")
                        .arg(&guest.name);
                    command
                }
            };
            let domain = Self::start_domain(&host.store, guest.domid, &guest.name, command)?;
            host.guests.insert(
                guest.name.clone(),
                Guest {
                    domain,
                    disks: guest.disks.clone(),
                    check_bytes: guest.kind.check_bytes(),
                    stats: None,
                },
            );
        }
        Ok(host)
    }

    fn start_domain(
        store: &StoreHandle,
        domid: u32,
        name: &str,
        command: Command,
    ) -> Result<Domain> {
        let store_conn: OwnedFd = store
            .connect_domain(domid)
            .with_context(|| format!("connecting {name} to the store"))?
            .into();
        let (ours, theirs) = ControlChannel::pair()?;
        let mut command = command;
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let process = DomainProcess::spawn(name, command, vec![store_conn, theirs.into_fd()])?;
        Ok(Domain {
            domid,
            name: name.to_owned(),
            process,
            channel: ours,
        })
    }

    /// Prints a progress line with the time since bring-up started.
    pub fn progress(&self, what: &str) {
        println!("[{:7.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn check_stop(&self) -> Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Names of the guests, in order.
    pub fn guest_names(&self) -> Vec<String> {
        self.guests.keys().cloned().collect()
    }

    /// The disks of guest `name`.
    pub fn disks(&self, name: &str) -> Vec<DiskConfig> {
        self.guests
            .get(name)
            .map(|g| g.disks.clone())
            .unwrap_or_default()
    }

    fn guest(&self, name: &str) -> Result<&Guest> {
        self.guests
            .get(name)
            .ok_or_else(|| anyhow!("no guest named {name}"))
    }

    fn device(&self, guest: &str, devid: u32) -> Result<DeviceId> {
        Ok(DeviceId {
            kind: DeviceKind::Vbd,
            backend: self.driver.domid,
            frontend: self.guest(guest)?.domain.domid,
            devid,
        })
    }

    /// Waits for the next event from a guest, failing on timeout, stop or a dead guest.
    fn guest_event(&mut self, name: &str, timeout: Duration) -> Result<GuestEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_stop()?;
            let guest = self
                .guests
                .get_mut(name)
                .ok_or_else(|| anyhow!("no guest named {name}"))?;
            if let Some(status) = guest.domain.process.try_wait()? {
                bail!("{name} exited ({})", crate::supervisor::describe(&status));
            }
            if let Some((event, _)) = guest
                .domain
                .channel
                .recv_timeout::<GuestEvent>(Duration::from_millis(100))?
            {
                return Ok(event);
            }
            if Instant::now() >= deadline {
                bail!("{name} did not answer within {timeout:?}");
            }
        }
    }

    /// Attaches disk `disk` to guest `name`: hands the image and one end of a fresh
    /// vhost-user connection to the driver domain, the other end to the guest, writes both
    /// device directories, and waits for the guest to report Connected.
    pub fn attach_disk(&mut self, name: &str, disk: &DiskConfig) -> Result<u64> {
        let dev = self.device(name, disk.devid)?;
        if self
            .attached
            .contains(&(name.to_owned(), DeviceKind::Vbd, disk.devid))
        {
            bail!("{name} already has a vbd {}", disk.devid);
        }
        let key = (name.to_owned(), disk.devid);
        if !self.images.contains_key(&key) {
            let held = open_held(disk, &self.images, &mut self.created)?;
            self.images.insert(key.clone(), held);
        }
        let result = self.connect_disk(name, disk, dev);
        if result.is_err() {
            // Leave nothing half-attached: no directories (if they were written), no lock.
            let written = self
                .client
                .read(&format!("{}/{}", dev.backend_path(), keys::FRONTEND))
                .is_ok();
            if let Err(e) = written.then(|| self.tear_down(&dev)).transpose() {
                log::warn!("{name}: removing the failed vbd {}: {e:#}", dev.devid);
            }
            if let Some(held) = self.images.remove(&key) {
                held.image.release();
            }
        }
        result
    }

    fn connect_disk(&mut self, name: &str, disk: &DiskConfig, dev: DeviceId) -> Result<u64> {
        let image = self
            .images
            .get(&(name.to_owned(), disk.devid))
            .context("image not held")?
            .image
            .file
            .try_clone()
            .context("duplicating the image descriptor")?;
        self.attach_serial += 1;
        let sock_name = format!("{}-{}-{}.sock", dev.frontend, dev.devid, self.attach_serial);
        let (backend_end, frontend_end) =
            connection::private_connection(&self.private_dir, &sock_name)
                .context("creating the vhost-user connection")?;
        self.driver.channel.send(
            &BackendRequest::ServeBlock {
                frontend: dev.frontend,
                devid: dev.devid,
                readonly: disk.readonly,
            },
            &[image.as_fd(), backend_end.as_fd()],
        )?;
        self.guest(name)?.domain.channel.send(
            &GuestRequest::AttachBlock { devid: dev.devid },
            &[frontend_end.as_fd()],
        )?;
        drop((image, backend_end, frontend_end));
        let mode = if disk.readonly { "r" } else { "w" };
        domains::add_device(
            &mut self.client,
            &dev,
            &[
                (keys::MODE, mode.to_owned()),
                (keys::TYPE, "file".to_owned()),
                (keys::PARAMS, disk.image.display().to_string()),
                (keys::TRANSPORT, "vhost-user".to_owned()),
                (keys::VHOST_USER, "fd".to_owned()),
            ],
            &[(keys::VIRTUAL_DEVICE, dev.devid.to_string())],
        )?;
        match self.guest_event(name, WALK_TIMEOUT)? {
            GuestEvent::Connected { devid, sectors } if devid == dev.devid => {
                self.attached
                    .insert((name.to_owned(), DeviceKind::Vbd, devid));
                self.progress(&format!(
                    "{name}: vbd {devid} Connected ({} MiB)",
                    sectors / 2048
                ));
                Ok(sectors)
            }
            other => bail!("{name}: attaching vbd {}: {other:?}", dev.devid),
        }
    }

    /// Attaches interface `nic` to guest `name`: a new port of the driver domain's switch,
    /// reached over a private vhost-user connection as for disks; waits for Connected.
    /// Returns the interface's IPv4 address.
    pub fn attach_nic(&mut self, name: &str, nic: &NicConfig) -> Result<[u8; 4]> {
        let guest = self.guest(name)?;
        let domid = guest.domain.domid;
        let dev = DeviceId {
            kind: DeviceKind::Vif,
            backend: self.driver.domid,
            frontend: domid,
            devid: nic.devid,
        };
        if self
            .attached
            .contains(&(name.to_owned(), DeviceKind::Vif, nic.devid))
        {
            bail!("{name} already has a vif {}", nic.devid);
        }
        let mac = nic.mac_of(domid).context("MAC address")?;
        let ip = nic.ip_of(domid).context("IPv4 address")?;
        self.attach_serial += 1;
        let sock_name = format!("vif-{domid}-{}-{}.sock", nic.devid, self.attach_serial);
        let (backend_end, frontend_end) =
            connection::private_connection(&self.private_dir, &sock_name)
                .context("creating the vhost-user connection")?;
        self.driver.channel.send(
            &BackendRequest::ServeNet {
                frontend: domid,
                devid: nic.devid,
                mac,
            },
            &[backend_end.as_fd()],
        )?;
        self.guest(name)?.domain.channel.send(
            &GuestRequest::AttachNet {
                devid: nic.devid,
                ip,
            },
            &[frontend_end.as_fd()],
        )?;
        drop((backend_end, frontend_end));
        let mac_text = mac.map(|b| format!("{b:02x}")).join(":");
        domains::add_device(
            &mut self.client,
            &dev,
            &[("mac", mac_text.clone()), ("handle", nic.devid.to_string())],
            &[("mac", mac_text), ("handle", nic.devid.to_string())],
        )?;
        match self.guest_event(name, WALK_TIMEOUT)? {
            GuestEvent::NetConnected { devid, mac: got } if devid == nic.devid && got == mac => {
                self.attached
                    .insert((name.to_owned(), DeviceKind::Vif, devid));
                self.progress(&format!(
                    "{name}: vif {devid} Connected ({}, {}.{}.{}.{})",
                    got.map(|b| format!("{b:02x}")).join(":"),
                    ip[0],
                    ip[1],
                    ip[2],
                    ip[3]
                ));
                Ok(ip)
            }
            other => bail!("{name}: attaching vif {}: {other:?}", nic.devid),
        }
    }

    /// Has guest `name` resolve `peer` on interface `devid` and exchange UDP echoes with it
    /// through the driver domain's switch.
    pub fn net_ping(&mut self, name: &str, devid: u32, peer: [u8; 4], rounds: u32) -> Result<bool> {
        self.guest(name)?.domain.channel.send(
            &GuestRequest::NetPing {
                devid,
                peer,
                rounds,
            },
            &[],
        )?;
        match self.guest_event(name, CHECK_TIMEOUT)? {
            GuestEvent::NetPing {
                devid: d,
                passed,
                detail,
            } if d == devid => {
                let verdict = if passed { "passed" } else { "FAILED" };
                self.progress(&format!("{name}: vif {devid} ping {verdict}: {detail}"));
                Ok(passed)
            }
            other => bail!("{name}: ping on vif {devid}: {other:?}"),
        }
    }

    /// Detaches disk `devid` from guest `name` with the xenbus walk: online=0 and backend
    /// Closing; both sides reach Closed; the directories are removed.
    pub fn detach_disk(&mut self, name: &str, devid: u32) -> Result<()> {
        self.detach(name, DeviceKind::Vbd, devid)
    }

    /// Detaches interface `devid` from guest `name`, as [`Host::detach_disk`] does disks.
    pub fn detach_nic(&mut self, name: &str, devid: u32) -> Result<()> {
        self.detach(name, DeviceKind::Vif, devid)
    }

    fn detach(&mut self, name: &str, kind: DeviceKind, devid: u32) -> Result<()> {
        let dev = DeviceId {
            kind,
            ..self.device(name, devid)?
        };
        if !self.attached.remove(&(name.to_owned(), kind, devid)) {
            bail!("{name} has no {kind} {devid} attached");
        }
        domains::request_close(&mut self.client, &dev)?;
        match self.guest_event(name, WALK_TIMEOUT)? {
            GuestEvent::Closed { devid: d } if d == devid => {}
            other => bail!("{name}: detaching {kind} {devid}: {other:?}"),
        }
        domains::wait_for_state(
            &mut self.client,
            &dev.backend_path(),
            XenbusState::Closed,
            WALK_TIMEOUT,
        )?;
        domains::remove_device(&mut self.client, &dev)?;
        if kind == DeviceKind::Vbd {
            if let Some(held) = self.images.remove(&(name.to_owned(), devid)) {
                held.image.release();
            }
        }
        self.progress(&format!("{name}: {kind} {devid} detached"));
        Ok(())
    }

    /// Asks guest `name` to write (unless `verify_only`) and verify a pattern on a disk, over
    /// as many bytes as its kind checks.
    pub fn disk_check(
        &mut self,
        name: &str,
        devid: u32,
        seed: u64,
        verify_only: bool,
    ) -> Result<bool> {
        let bytes = self.guest(name)?.check_bytes;
        if !verify_only && !self.is_scratch(name, devid) {
            let path = self
                .images
                .get(&(name.to_owned(), devid))
                .map_or_else(|| "its image".to_owned(), |h| h.path.display().to_string());
            bail!(
                "{name}: vbd {devid}: refusing to write a check pattern to {path}: it is not a \
                 scratch image (not created by this toolstack, not marked scratch = true / \
                 block-attach --scratch); --verify-only only reads"
            );
        }
        self.guest(name)?.domain.channel.send(
            &GuestRequest::DiskCheck {
                devid,
                seed,
                bytes,
                verify_only,
            },
            &[],
        )?;
        match self.guest_event(name, CHECK_TIMEOUT)? {
            GuestEvent::DiskCheck {
                devid: d,
                passed,
                detail,
            } if d == devid => {
                let verdict = if passed { "passed" } else { "FAILED" };
                self.progress(&format!("{name}: vbd {devid} check {verdict}: {detail}"));
                Ok(passed)
            }
            other => bail!("{name}: disk check on vbd {devid}: {other:?}"),
        }
    }

    /// Whether checks may write to guest `name`'s vbd `devid` (see [`HeldImage::scratch`]).
    pub fn is_scratch(&self, name: &str, devid: u32) -> bool {
        self.images
            .get(&(name.to_owned(), devid))
            .is_some_and(|h| h.scratch)
    }

    /// The store client, for reads by the caller (tests, the final table).
    pub fn store_client(&mut self) -> &mut StoreClient {
        &mut self.client
    }

    /// Destroys guest `name`, as `xl destroy` does: its process is stopped at once, its
    /// devices are torn down on the backend side (close requested, then its frontend
    /// directories removed, so the driver domain reads them as Closed and need not wait for a
    /// dead guest), and the domain is released in the store, so a reused id inherits nothing.
    pub fn destroy_guest(&mut self, domain: &str) -> Result<()> {
        // By name, or by domain id.
        let name = match self.guests.get(domain) {
            Some(_) => domain.to_owned(),
            None => self
                .guests
                .iter()
                .find(|(_, g)| domain.parse() == Ok(g.domain.domid))
                .map(|(n, _)| n.clone())
                .ok_or_else(|| anyhow!("no guest named or numbered {domain:?}"))?,
        };
        let name = name.as_str();
        let mut guest = self
            .guests
            .remove(name)
            .ok_or_else(|| anyhow!("no guest named {name}"))?;
        let status = guest.domain.process.stop();
        let domid = guest.domain.domid;
        let devices: Vec<(DeviceKind, u32)> = self
            .attached
            .iter()
            .filter(|(g, _, _)| g == name)
            .map(|(_, kind, devid)| (*kind, *devid))
            .collect();
        self.attached.retain(|(g, _, _)| g != name);
        let held: Vec<(String, u32)> = self
            .images
            .keys()
            .filter(|(g, _)| g == name)
            .cloned()
            .collect();
        for (kind, devid) in devices {
            let dev = DeviceId {
                kind,
                backend: self.driver.domid,
                frontend: domid,
                devid,
            };
            self.tear_down(&dev)?;
        }
        for key in held {
            if let Some(held) = self.images.remove(&key) {
                held.image.release();
            }
        }
        domains::destroy_domain(&mut self.client, domid)?;
        let how = status.map_or_else(|| "ended".to_owned(), |s| crate::supervisor::describe(&s));
        self.progress(&format!("{name}: destroyed ({how})"));
        Ok(())
    }

    /// Removes a device whose frontend is gone or never took it, from the backend's side.
    fn tear_down(&mut self, dev: &DeviceId) -> Result<()> {
        // Ask first, then take the frontend's directory away: the backend then finds the
        // request already there when it sees its frontend gone, and its Closed comes last;
        // only then do the directories go, so no late backend write brings one back.
        domains::request_close(&mut self.client, dev)?;
        domains::remove_frontend(&mut self.client, dev)?;
        let closed = domains::wait_for_state(
            &mut self.client,
            &dev.backend_path(),
            XenbusState::Closed,
            WALK_TIMEOUT,
        );
        domains::remove_device(&mut self.client, dev)?;
        Ok(closed?)
    }

    /// Stops every guest (collecting its counters), then the driver domain, then the store.
    pub fn shut_down(mut self) -> ShutdownReport {
        let mut clean = true;
        let mut stats = Vec::new();
        for (name, guest) in self.guests.iter_mut() {
            let _ = guest.domain.channel.send(&GuestRequest::Shutdown, &[]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match guest
                    .domain
                    .channel
                    .recv_timeout::<GuestEvent>(Duration::from_millis(200))
                {
                    Ok(Some((GuestEvent::Stats(s), _))) => {
                        guest.stats = Some(s);
                        break;
                    }
                    Ok(Some(_)) | Ok(None) => continue,
                    Err(_) => break,
                }
            }
            match guest.domain.process.wait_timeout(Duration::from_secs(10)) {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    log::error!("{name} {}", crate::supervisor::describe(&status));
                    clean = false;
                }
                _ => {
                    log::error!("{name} did not exit; stopping it");
                    guest.domain.process.stop();
                    clean = false;
                }
            }
            stats.push((name.clone(), guest.domain.domid, guest.stats));
        }
        let mut backend = Vec::new();
        if self
            .driver
            .channel
            .send(&BackendRequest::Stats, &[])
            .is_ok()
        {
            if let Ok(Some((BackendEvent::Stats(s), _))) =
                self.driver.channel.recv_timeout(Duration::from_secs(5))
            {
                backend = s;
            }
        }
        let _ = self.driver.channel.send(&BackendRequest::Shutdown, &[]);
        match self.driver.process.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(status)) if status.success() => {}
            other => {
                log::error!("{} did not exit cleanly: {other:?}", self.driver.name);
                self.driver.process.stop();
                clean = false;
            }
        }
        self.store.shutdown();
        if let Some(thread) = self.store_thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    log::error!("store: {e}");
                    clean = false;
                }
                Err(_) => {
                    log::error!("store thread panicked");
                    clean = false;
                }
            }
        }
        ShutdownReport {
            guests: stats,
            driver: (self.driver.name.clone(), self.driver.domid),
            backend,
            clean,
        }
    }
}

/// What `Host::shut_down` found out.
pub struct ShutdownReport {
    /// Each guest's name, id and counters (None if it did not report).
    pub guests: Vec<(String, u32, Option<GuestStats>)>,
    /// The driver domain's name and id.
    pub driver: (String, u32),
    /// The driver domain's per-device counters.
    pub backend: Vec<BackendDeviceStats>,
    /// Whether every process exited cleanly.
    pub clean: bool,
}
