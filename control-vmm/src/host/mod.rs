//! A running host: the store, the driver domain and the guests, as `splitvmm up` brings them
//! up, with the operations the toolstack performs on them.
//!
//! Each guest sits behind its own lock, so management requests to different guests run at the
//! same time (the toolstack serves each on its own thread): a guest that is slow to answer
//! holds up requests to itself only. Store writes go through a connection per operation; the
//! driver domain's control channel is locked only while a message is sent, and while the
//! answer about a VF is awaited (up to a minute: enabling SR-IOV resets the PF).
//!
//! - [`devices`]: attach, detach, disk checks and pings on one guest;
//! - [`images`]: the disk images held (and locked) for the guests;
//! - [`lifecycle`]: create, shutdown, reboot and destroy of one guest, and the host's shutdown;
//! - [`pci`]: VFs of the driver domain's PFs assigned to Linux guests.
//! - [`supervision`]: every domain process watched; dead guests torn down, a dead driver
//!   domain restarted with its devices.

mod devices;
mod driver_vm;
mod images;
mod lifecycle;
mod nvme;
mod pci;
mod supervision;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ipc::control::messages::{BackendEvent, GuestEvent, GuestStats};
use ipc::control::ControlChannel;
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn as spawn_store, ServerError, StoreConfig, StoreHandle};

use crate::config::{
    DiskConfig, DriverDomainConfig, DriverDomainKind, GuestConfig, GuestKind, HostConfig, NicConfig,
};
use crate::confinement::Confinement;
use crate::domains;
use crate::supervisor::{DomainProcess, Launch, FIRST_HANDED_FD};
use images::ImageRegistry;
use ipc::connection;

pub use lifecycle::ShutdownReport;

/// How long a device may take to walk to Connected or Closed.
pub const WALK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a disk check or a ping may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest asked to shut down has to report and exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for a Linux guest: its power button may be pressed while it still boots (a
/// nested boot takes 8-18 s), and its power-off runs its shutdown scripts.
const LINUX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// RAM of a tiny KVM guest (`splitvmm-vmm`'s default, MiB).
const KVM_GUEST_RAM_MIB: u64 = 8;

/// A domain's plan and its cgroup's `cgroup.procs` (when the host file asks for limits).
type DomainConfinement = (confine::Plan, Option<File>);

/// Domain (`domid`, `name`)'s confinement under `confinement`, with `ram_mib` of guest RAM
/// on top of its memory limit.
fn domain_confinement(
    confinement: Option<&Confinement>,
    domid: u32,
    name: &str,
    ram_mib: u64,
) -> Result<Option<DomainConfinement>> {
    let Some(c) = confinement else {
        return Ok(None);
    };
    let cgroup = c
        .cgroup(name, ram_mib)
        .with_context(|| format!("the cgroup of {name}"))?;
    Ok(Some((c.plan(domid), cgroup)))
}

/// RAM of a Linux guest whose host file says nothing (MiB).
const LINUX_DEFAULT_MEMORY_MIB: u64 = 256;

/// How long guest `config` has to shut down when asked.
fn shutdown_timeout(config: &GuestConfig) -> Duration {
    match config.kind {
        GuestKind::Linux => LINUX_SHUTDOWN_TIMEOUT,
        _ => SHUTDOWN_TIMEOUT,
    }
}

/// One domain process with its control channel.
struct Domain {
    domid: u32,
    name: String,
    process: DomainProcess,
    channel: ControlChannel,
    /// The privileged hardware helper serving it (a confined driver domain that owns PCI
    /// functions); it goes with the domain.
    hw_helper: Option<DomainProcess>,
}

/// A guest's place in the host: what never changes, and the rest behind the guest's lock.
struct GuestSlot {
    config: GuestConfig,
    /// Set when the guest is destroyed or shut down: requests waiting for it give up.
    gone: AtomicBool,
    /// Its current process's pidfd and control channel, for the supervisor.
    watch: Mutex<supervision::Watched>,
    state: Mutex<Guest>,
}

/// A guest's running state.
struct Guest {
    domain: Domain,
    /// Disks and interfaces attached now, by device number.
    disks: BTreeMap<u32, DiskConfig>,
    nics: BTreeMap<u32, NicConfig>,
    /// VFs the guest holds (its VMM has their VFIO groups).
    pci: Vec<pci::HeldVf>,
    /// Counters reported by the guest when it shut down.
    stats: Option<GuestStats>,
}

/// Everything `splitvmm up` started.
pub struct Host {
    started: Instant,
    stop: Arc<AtomicBool>,
    store: StoreHandle,
    store_thread: Mutex<Option<JoinHandle<Result<(), ServerError>>>>,
    store_socket: PathBuf,
    run_dir: PathBuf,
    driver_config: DriverDomainConfig,
    driver: Mutex<Domain>,
    guests: Mutex<BTreeMap<String, Arc<GuestSlot>>>,
    /// Held while a guest is checked against the others and added: two `create`s of the same
    /// name or id cannot both pass.
    creating: Mutex<()>,
    /// Where private vhost-user connections are made (0700, paths unlinked at once).
    private_dir: PathBuf,
    attach_serial: AtomicU64,
    /// The images held for the guests' disks (locked after a guest's own lock, briefly).
    images: Mutex<ImageRegistry>,
    /// How domain processes are confined (`None`: the host file turned it off).
    confinement: Option<Confinement>,
    /// The driver domain's uplink tap: its name and the toolstack's descriptor of it.
    uplink: Option<(String, OwnedFd)>,
    /// The thread watching every domain process, while it runs.
    supervision: Mutex<Option<supervision::Supervisor>>,
    /// When the driver domain was restarted lately.
    restarts: Mutex<supervision::RestartHistory>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A request thread that panicked leaves the data as consistent as any failed request.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// The file a domain's standard output and error go to: `<run_dir>/logs/<name>.log`, where
/// `splitvmm console NAME` reads it (a KVM guest's serial console is there too).
pub fn log_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("logs").join(format!("{name}.log"))
}

/// The interactive console socket of Linux guest `name`: `<run_dir>/console/<name>.sock`,
/// where its VMM listens and `splitvmm console NAME` connects.
pub fn console_socket(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("console").join(format!("{name}.sock"))
}

impl Host {
    /// Starts the store, creates the driver domain in it and starts its process, then creates
    /// each guest (without attaching its devices: see [`Host::attach_all`]).
    pub fn bring_up(config: &HostConfig, stop: Arc<AtomicBool>) -> Result<Host> {
        let started = Instant::now();
        // What this machine cannot confine is said, and refused unless allowed, first.
        let confinement = Confinement::prepare(&config.confinement)?;
        // Every image is opened and locked before anything starts: one held elsewhere, or
        // named twice, fails here.
        let mut images = ImageRegistry::default();
        for guest in &config.guests {
            for disk in &guest.disks {
                images.hold(&guest.name, disk)?;
            }
        }
        std::fs::create_dir_all(config.run_dir.join("logs"))
            .with_context(|| format!("creating run_dir {}", config.run_dir.display()))?;
        connection::prepare_dir(&config.run_dir.join("console"))
            .with_context(|| format!("creating {}/console", config.run_dir.display()))?;
        let private_dir = config.run_dir.join("vhost-user");
        connection::prepare_dir(&private_dir)
            .with_context(|| format!("creating {}", private_dir.display()))?;
        let socket = config.store_socket();
        let (store, store_thread) = spawn_store(StoreConfig {
            socket: socket.clone(),
            ..StoreConfig::default()
        })
        .with_context(|| format!("starting the store on {}", socket.display()))?;
        log::info!("store listening on {}", socket.display());

        let dd = &config.driver_domain;
        domains::create_domain(&mut StoreClient::connect(&socket)?, dd.domid, &dd.name)?;
        let uplink = match &dd.uplink {
            // Opened here, in the host's network namespace: the confined driver domain has no
            // /dev/net/tun and a network namespace of its own. The toolstack keeps a
            // descriptor, so the tap outlives a driver domain that dies and is handed to the
            // next one; it goes with the host.
            Some(tap) => {
                let device =
                    ipc::tap::open(tap).with_context(|| format!("the uplink tap {tap}"))?;
                Some((tap.clone(), OwnedFd::from(device)))
            }
            None => None,
        };
        let driver = start_driver_domain(
            &store,
            &config.run_dir,
            (dd, uplink.as_ref()),
            confinement.as_ref(),
            false,
        )?;
        let host = Host {
            started,
            stop,
            store,
            store_thread: Mutex::new(Some(store_thread)),
            store_socket: socket,
            run_dir: config.run_dir.clone(),
            driver_config: dd.clone(),
            driver: Mutex::new(driver),
            guests: Mutex::new(BTreeMap::new()),
            creating: Mutex::new(()),
            private_dir,
            attach_serial: AtomicU64::new(0),
            images: Mutex::new(images),
            confinement,
            uplink,
            supervision: Mutex::new(None),
            restarts: Mutex::new(Default::default()),
        };
        host.progress(&format!("{}: ready", dd.name));
        for guest in &config.guests {
            host.create_guest(guest.clone(), None)?;
        }
        Ok(host)
    }

    /// Guest `config`'s confinement: its plan and cgroup, unless confinement is off.
    fn confinement_of(&self, config: &GuestConfig) -> Result<Option<DomainConfinement>> {
        let ram_mib = match config.kind {
            GuestKind::Process => 0,
            GuestKind::Kvm => KVM_GUEST_RAM_MIB,
            GuestKind::Linux => config.memory.unwrap_or(LINUX_DEFAULT_MEMORY_MIB),
        };
        let confinement = domain_confinement(
            self.confinement.as_ref(),
            config.domid,
            &config.name,
            ram_mib,
        )?;
        // VFIO pins all RAM of a guest with an assigned function, counted in RLIMIT_MEMLOCK,
        // which a confined VMM cannot raise itself.
        let pinned = if config.pci.is_empty() {
            0
        } else {
            (ram_mib << 20) + crate::vmm::vfio::MEMLOCK_SLACK
        };
        Ok(confinement.map(|(plan, cgroup)| (plan.with_memlock(pinned), cgroup)))
    }

    /// The run directory: the store and management sockets, the logs.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The store's privileged socket.
    pub fn store_socket(&self) -> &Path {
        &self.store_socket
    }

    /// A fresh connection to the store, for one operation.
    fn client(&self) -> Result<StoreClient> {
        StoreClient::connect(&self.store_socket).context("connecting to the store")
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

    /// Whether checks may write to guest `name`'s vbd `devid` (an image marked scratch, or
    /// one this toolstack created).
    pub fn is_scratch(&self, name: &str, devid: u32) -> bool {
        lock(&self.images).is_scratch(name, devid)
    }

    /// Names of the guests, in order.
    pub fn guest_names(&self) -> Vec<String> {
        lock(&self.guests).keys().cloned().collect()
    }

    /// The guest called `domain`, or numbered so.
    fn slot(&self, domain: &str) -> Result<(String, Arc<GuestSlot>)> {
        let guests = lock(&self.guests);
        let found = match guests.get_key_value(domain) {
            Some((name, slot)) => Some((name.clone(), slot.clone())),
            None => guests
                .iter()
                .find(|(_, s)| domain.parse() == Ok(s.config.domid))
                .map(|(n, s)| (n.clone(), s.clone())),
        };
        found.ok_or_else(|| anyhow!("no guest named or numbered {domain:?}"))
    }

    /// Runs `op` on guest `domain` under its lock; requests to other guests go on meanwhile.
    fn with_guest<T>(
        &self,
        domain: &str,
        op: impl FnOnce(&str, &GuestSlot, &mut Guest) -> Result<T>,
    ) -> Result<T> {
        let (name, slot) = self.slot(domain)?;
        let mut guest = lock(&slot.state);
        if slot.gone.load(Ordering::SeqCst) {
            bail!("{name} is gone (destroyed or shut down)");
        }
        op(&name, &slot, &mut guest)
    }

    /// Waits for the next event from a guest, failing on timeout, stop, destroy or a dead
    /// guest.
    fn guest_event(
        &self,
        name: &str,
        slot: &GuestSlot,
        guest: &mut Guest,
        timeout: Duration,
    ) -> Result<GuestEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_stop()?;
            if slot.gone.load(Ordering::SeqCst) {
                bail!("{name} was destroyed meanwhile");
            }
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

    /// The process that runs guest `config`, with its output going to its log file.
    fn guest_command(&self, config: &GuestConfig) -> Result<Command> {
        Ok(match (config.kind, &config.kernel) {
            (GuestKind::Kvm, Some(kernel)) => {
                let mut command = Command::new(sibling_binary("splitvmm-vmm")?);
                command
                    .arg("--kernel")
                    .arg(kernel)
                    .arg("--managed-domid")
                    .arg(config.domid.to_string())
                    .args(["--no-idle-baseline", "--batch", "4"]);
                command
            }
            (GuestKind::Linux, Some(kernel)) => {
                let mut command = Command::new(sibling_binary("splitvmm-vmm")?);
                command
                    .arg("--linux")
                    .arg("--kernel")
                    .arg(kernel)
                    .arg("--managed-domid")
                    .arg(config.domid.to_string())
                    .arg("--disks")
                    .arg(config.disks.len().to_string())
                    .arg("--nics")
                    .arg(config.nics.len().to_string())
                    .arg("--console-socket")
                    .arg(console_socket(&self.run_dir, &config.name));
                if config.share.as_deref() == Some("all-ram") {
                    // The host file's consent: devices (also hot-plugged ones) see all RAM.
                    command.arg("--share-all-ram");
                }
                if let Some(ramdisk) = &config.ramdisk {
                    command.arg("--initrd").arg(ramdisk);
                }
                if let Some(extra) = &config.extra {
                    command.arg("--cmdline").arg(extra);
                }
                if let Some(t) = config.eject_timeout {
                    command.arg("--eject-timeout-s").arg(t.to_string());
                }
                if !config.pci.is_empty() {
                    command.arg("--pci").arg(config.pci.len().to_string());
                }
                let memory = config.memory.unwrap_or(LINUX_DEFAULT_MEMORY_MIB);
                let vcpus = config.vcpus.unwrap_or(1);
                command.arg("--mem-mib").arg(memory.to_string());
                command.arg("--vcpus").arg(vcpus.to_string());
                command
            }
            _ => {
                let mut command = Command::new(sibling_binary("process-guest")?);
                command
                    .arg("--domid")
                    .arg(config.domid.to_string())
                    .arg("--name")
                    .arg(&config.name);
                command
            }
        })
    }
}

/// Starts the driver domain `dd` (its domain already in the store), with a duplicate of the
/// uplink tap's descriptor if it has one and, confined with PCI functions to own, a channel to
/// its hardware helper (started here); waits until it says it is ready. `append` continues its
/// log (a restart).
fn start_driver_domain(
    store: &StoreHandle,
    run_dir: &Path,
    (dd, uplink): (&DriverDomainConfig, Option<&(String, OwnedFd)>),
    confinement: Option<&Confinement>,
    append: bool,
) -> Result<Domain> {
    if let (DriverDomainKind::Vm, Some(vm)) = (dd.kind, &dd.vm) {
        return driver_vm::start_driver_vm(store, run_dir, (dd, vm), confinement, append);
    }
    let mut command = Command::new(sibling_binary("driver-domain")?);
    command
        .arg("managed")
        .arg("--domid")
        .arg(dd.domid.to_string());
    for bdf in &dd.owns {
        command.arg("--owns").arg(bdf);
    }
    let mut handed = Vec::new();
    if let Some((tap, device)) = uplink {
        let fd = FIRST_HANDED_FD + 2;
        command
            .arg("--uplink")
            .arg(tap)
            .arg("--uplink-fd")
            .arg(fd.to_string());
        handed.push(
            device
                .try_clone()
                .with_context(|| format!("duplicating the uplink tap {tap}"))?,
        );
    }
    let hw_helper = if confinement.is_some() && !dd.owns.is_empty() {
        let (helper, driver_end) = start_hw_helper(run_dir, dd, append)?;
        let fd = FIRST_HANDED_FD + 2 + i32::try_from(handed.len())?;
        command.arg("--hw-helper-fd").arg(fd.to_string());
        handed.push(driver_end.into_fd());
        Some(helper)
    } else {
        None
    };
    let mut driver = start_domain(
        store,
        run_dir,
        (dd.domid, &dd.name),
        (command, handed),
        domain_confinement(confinement, dd.domid, &dd.name, 0)?,
        append,
    )?;
    driver.hw_helper = hw_helper;
    match driver.channel.recv_timeout::<BackendEvent>(WALK_TIMEOUT)? {
        Some((BackendEvent::Ready, _)) => Ok(driver),
        other => bail!("driver domain did not report ready: {other:?}"),
    }
}

/// Starts the confined driver domain `dd`'s hardware helper (docs/security.md): as root in
/// the host's namespaces (it keeps CAP_SYS_ADMIN alone itself), acting only on the PFs `dd`
/// owns and their VFs; its output goes to `<name>-hw-helper`'s log. Returns it and the driver
/// domain's end of its channel.
fn start_hw_helper(
    run_dir: &Path,
    dd: &DriverDomainConfig,
    append: bool,
) -> Result<(DomainProcess, ControlChannel)> {
    let name = format!("{}-hw-helper", dd.name);
    let mut command = Command::new(sibling_binary("splitvmm-hw-helper")?);
    command.arg("--domid").arg(dd.domid.to_string());
    for bdf in &dd.owns {
        command.arg("--owns").arg(bdf);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    let path = log_path(run_dir, &name);
    let log = File::options()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let (helper_end, driver_end) = ControlChannel::pair()?;
    let launch = Launch {
        command,
        output: Some(log),
        confine: None,
        cgroup: None,
    };
    let process = DomainProcess::spawn(&name, launch, vec![helper_end.into_fd()])?;
    Ok((process, driver_end))
}

/// Starts domain `name`'s process with its store connection (fd 3), control channel (fd 4)
/// and `handed` (fds 5, ...); its standard output and error go to [`log_path`] (started
/// afresh, or with `append` after what is there: a rebooted guest's log goes on).
fn start_domain(
    store: &StoreHandle,
    run_dir: &Path,
    (domid, name): (u32, &str),
    (mut command, handed): (Command, Vec<OwnedFd>),
    confinement: Option<DomainConfinement>,
    append: bool,
) -> Result<Domain> {
    let store_conn: OwnedFd = store
        .connect_domain(domid)
        .with_context(|| format!("connecting {name} to the store"))?
        .into();
    let (ours, theirs) = ControlChannel::pair()?;
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
    let path = log_path(run_dir, name);
    let log = File::options()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let (plan, cgroup) = confinement.map_or((None, None), |(p, c)| (Some(p), c));
    let launch = Launch {
        command,
        output: Some(log),
        confine: plan,
        cgroup,
    };
    let mut fds = vec![store_conn, theirs.into_fd()];
    fds.extend(handed);
    let process = DomainProcess::spawn(name, launch, fds)?;
    Ok(Domain {
        domid,
        name: name.to_owned(),
        process,
        channel: ours,
        hw_helper: None,
    })
}
