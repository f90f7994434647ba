//! `driver-domain`: the backend domain's command line.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use driver_domain::blk::{BlkBackendConfig, BlkBackendDevice, BlkDisk, CacheMode};
use driver_domain::hw::helper::HelperClient;
use driver_domain::hw::ops::{DirectHardware, HardwareOps};
use driver_domain::hw::pci::Sysfs;
use driver_domain::managed::ManagedDriverDomain;
use driver_domain::vhost_user::{bind_atomically, serve_forever_on};
use driver_domain::virtio_core::SealPolicy;
use ipc::control::ControlChannel;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

mod net_serve;

#[derive(Parser)]
#[command(
    name = "driver-domain",
    about = "splitvmm driver domain: virtio backends"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run as `splitvmm up` starts it: store connection on fd 3, control channel on fd 4.
    Managed {
        /// This driver domain's id in the store.
        #[arg(long)]
        domid: u32,
        /// A PCI function this domain owns (repeatable); reported in the store at start-up.
        #[arg(long, value_name = "DDDD:BB:DD.F")]
        owns: Vec<String>,
        /// A tap interface (created if missing) to attach to the switch as the uplink.
        #[arg(long, value_name = "TAP")]
        uplink: Option<String>,
        /// The uplink's tap device, opened by the toolstack and handed over on this
        /// descriptor (without it, TAP is opened by name).
        #[arg(long, value_name = "FD", requires = "uplink")]
        uplink_fd: Option<i32>,
        /// Root of the sysfs tree to read devices from (tests point it at a fake tree).
        #[arg(long, env = "SPLITVMM_SYSFS_ROOT", default_value = "/sys", hide = true)]
        sysfs_root: std::path::PathBuf,
        /// The channel to the privileged hardware helper, handed over on this descriptor: VFs
        /// are enabled, bound, opened and reset through it (without it, through sysfs and
        /// /dev directly, which needs root).
        #[arg(long, value_name = "FD")]
        hw_helper_fd: Option<i32>,
        /// Accept guest memory that is a sysfs file, unsealed (the cross-VM device's BAR2
        /// `resource2`): set by `vm-serve --managed`, which runs this inside a driver VM.
        #[arg(long, hide = true)]
        memory_from_sysfs: bool,
    },
    /// Serve a vhost-user-blk device, or with `--net` vhost-user-net ports on one switch, on
    /// Unix sockets, one frontend after another.
    Serve {
        /// Raw disk image (size a multiple of 512 bytes).
        #[arg(long, value_name = "IMAGE", required_unless_present_any = ["null", "net"])]
        blk: Option<PathBuf>,
        /// Socket path to listen on (a stale socket file is replaced).
        #[arg(long, value_name = "PATH", required_unless_present = "net_sockets")]
        socket: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
        /// Refuse writes (offers VIRTIO_BLK_F_RO).
        #[arg(long)]
        readonly: bool,
        /// Number of virtqueues (with --net: queue pairs per port).
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Busy-poll an idle queue (net: an idle port) this many microseconds before sleeping
        /// (a fixed window, for experiments; disk queues otherwise poll adaptively, see
        /// --poll-max-us).
        #[arg(long, default_value_t = 0)]
        poll_us: u64,
        /// Without --poll-us, a disk queue polls adaptively as QEMU's iothreads do: while
        /// requests keep arriving within this many microseconds, never while it is idle
        /// (0: no polling).
        #[arg(long, value_name = "US", default_value_t = 32)]
        poll_max_us: u64,
        /// How a disk queue does its reads and writes: `io-uring` (each pass over the ring
        /// as one submission of inline transfers; falls back to `sync` where the kernel
        /// refuses a ring) or `sync` (one preadv/pwritev per request).
        #[arg(long, value_enum, default_value_t = IoEngine::IoUring)]
        io_engine: IoEngine,
        /// How the image is cached on the host: `writeback` (the page cache) or `none`
        /// (O_DIRECT, through an aligned bounce buffer; no io_uring).
        #[arg(long, value_enum, default_value_t = Cache::Writeback)]
        cache: Cache,
        /// Requests a disk queue serves per pass before it publishes them and signals the
        /// driver (experiments; default: the device's).
        #[arg(long, hide = true)]
        budget: Option<usize>,
        /// Serve a null device of SIZE bytes instead of an image (benchmarks).
        #[arg(long, value_name = "SIZE", conflicts_with = "blk")]
        null: Option<u64>,
        /// Refuse shared memory that is not (and cannot be) sealed against shrinking.
        #[arg(long)]
        require_sealed: bool,
        /// Disconnect a frontend that sends nothing for this long after connecting, so it
        /// cannot hold the socket from the next frontend.
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        greeting_timeout_ms: u64,
        /// Once the image is open and the socket bound, confine this process as the driver
        /// domain is confined (docs/security.md): uid and gid UID, no capabilities, its own
        /// mount, IPC, UTS and network namespaces, Landlock, the driver domain's seccomp
        /// allowlist. Needs root. Block devices only.
        #[arg(long, value_name = "UID", conflicts_with = "net")]
        confine_uid: Option<u32>,
        /// With --confine-uid: run without Landlock where the kernel has none.
        #[arg(long, requires = "confine_uid")]
        allow_no_landlock: bool,
    },
    /// Inside a driver-domain VM: serve virtio-blk disks to the guests whose vhost-user
    /// connections dom0's VMM relays over the tunnel (docs/driver-vm.md).
    VmServe {
        /// The tunnel's serial port (COM2 of the driver VM's VMM).
        #[arg(long, value_name = "TTY", default_value = "/dev/ttyS1")]
        tunnel: PathBuf,
        /// A disk to serve (a block device such as an assigned NVMe function's namespace, or
        /// a raw image); the Nth `--blk` serves channel N.
        #[arg(long, value_name = "DEV", required_unless_present = "managed")]
        blk: Vec<PathBuf>,
        /// A managed driver VM: run `driver-domain managed` behind the tunnel, its store
        /// connection and control channel carried by STORE and CONTROL frames; it serves the
        /// devices the toolstack asks for. Ends when it does.
        #[arg(long, conflicts_with = "blk", requires = "domid")]
        managed: bool,
        /// With --managed: the driver domain's id in the store.
        #[arg(long, requires = "managed")]
        domid: Option<u32>,
        /// Number of virtqueues of each disk.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// How the disks are cached in the driver VM: `writeback` (its page cache, lost with
        /// the VM unless flushed) or `none` (O_DIRECT, through an aligned bounce buffer).
        #[arg(long, value_enum, default_value_t = Cache::Writeback)]
        cache: Cache,
        /// Root of the sysfs tree the cross-VM device is found in (tests point it at a fake).
        #[arg(long, env = "SPLITVMM_SYSFS_ROOT", default_value = "/sys", hide = true)]
        sysfs_root: PathBuf,
    },
    /// Inside a driver-domain VM: the isolation probe (docs/driver-vm.md, "What the driver VM
    /// can see"). Waits for a guest's window marker in BAR2 of the cross-VM device, then scans
    /// all that dom0 maps there for a secret the guest keeps outside its window, samples the
    /// rest, tries to map past BAR2's end, and prints `DVM-PROBE` lines. Exit status 0 if
    /// isolation held, 3 if not (or the marker was never seen).
    #[command(hide = true)]
    VmProbe {
        /// The window marker (hex): must be found.
        #[arg(long, value_name = "HEX")]
        find: String,
        /// The guest's secret (hex): must not be found.
        #[arg(long, value_name = "HEX")]
        absent: String,
        /// Seconds to wait for the window marker.
        #[arg(long, default_value_t = 120)]
        wait_s: u64,
        /// Also scan this VM's own RAM (/proc/kcore) for the secret (/dev/mem is always tried:
        /// it must refuse RAM).
        #[arg(long)]
        scan_ram: bool,
        #[arg(long, env = "SPLITVMM_SYSFS_ROOT", default_value = "/sys", hide = true)]
        sysfs_root: PathBuf,
    },
    /// Confines this process as `managed` is confined, then tries what a driver domain must
    /// not be able to do (tests judge the confinement with it; see the `confine` crate).
    #[command(hide = true)]
    ConfinementProbe {
        /// open:PATH, connect:PATH, mem:PID, process-vm-readv:PID, forbidden-syscall
        probes: Vec<String>,
    },
    /// Hardware ownership: PCI functions, SR-IOV, VFIO (see docs/lab.md).
    Hw {
        #[command(subcommand)]
        cmd: driver_domain::hw::cli::HwCommand,
    },
}

/// Options of `serve --net`.
#[derive(clap::Args)]
struct NetArgs {
    /// Serve virtio-net ports on a software switch instead of a block device.
    #[arg(long, conflicts_with_all = ["blk", "null", "readonly"])]
    net: bool,
    /// More net ports on the same switch, one socket each (comma separated).
    #[arg(long, value_name = "PATH,...", value_delimiter = ',', requires = "net")]
    net_sockets: Vec<PathBuf>,
    /// Attach the host tap device NAME (created if absent) to the switch as an uplink.
    #[arg(long, value_name = "NAME", requires = "net")]
    tap: Option<String>,
    /// MAC address of the first port; port i gets the last byte increased by i.
    #[arg(long, default_value = "52:54:00:12:34:56", requires = "net")]
    mac: String,
}

/// The hardware operations of a managed driver domain: the helper's channel on `fd` if the
/// toolstack handed one, sysfs and /dev directly otherwise.
fn hardware_ops(fd: Option<i32>, sysfs: &Sysfs) -> Result<Box<dyn HardwareOps>> {
    let Some(fd) = fd else {
        return Ok(Box::new(DirectHardware::new(sysfs.clone(), "/dev/vfio")));
    };
    ipc::startup::check_inherited_channel(fd, "the hardware helper's channel")
        .context("--hw-helper-fd")?;
    // SAFETY: `fd` was just checked to be an open seqpacket socket; the toolstack handed it
    // to this process for this use alone and nothing else here knows of it.
    let channel = ControlChannel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(Box::new(HelperClient::new(channel)))
}

/// How a disk queue does its reads and writes (`serve --io-engine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IoEngine {
    /// One preadv/pwritev per request, in the queue's thread.
    Sync,
    /// Each pass over the ring as one io_uring submission.
    IoUring,
}

/// How an image is cached on the host (`--cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Cache {
    /// Buffered, through the page cache.
    Writeback,
    /// O_DIRECT.
    None,
}

impl From<Cache> for CacheMode {
    fn from(c: Cache) -> Self {
        match c {
            Cache::Writeback => CacheMode::Writeback,
            Cache::None => CacheMode::None,
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Managed { domid, .. } => {
            ipc::startup::init_logging(&format!("driver-domain[{domid}]"), "warn")
        }
        _ => ipc::startup::init_logging("driver-domain", "info"),
    }
    match cli.cmd {
        Cmd::Hw { cmd } => std::process::exit(i32::from(cmd.run())),
        Cmd::ConfinementProbe { probes } => std::process::exit(confine::probe::main(
            confine::Profile::DriverDomain,
            &probes,
        )),
        Cmd::Managed {
            domid,
            owns,
            uplink,
            uplink_fd,
            sysfs_root,
            hw_helper_fd,
            memory_from_sysfs,
        } => {
            if let Err(e) = ipc::startup::check_inherited_fds() {
                eprintln!(
                    "{}",
                    ipc::startup::not_managed_message("driver-domain managed", &e)
                );
                std::process::exit(ipc::startup::EXIT_NOT_MANAGED.into());
            }
            // SAFETY: fds 3 and 4 were just checked to be the sockets `splitvmm up` hands
            // this program, and nothing else in this process uses them.
            let mut driver = unsafe { ManagedDriverDomain::from_inherited_fds(domid) };
            if memory_from_sysfs {
                driver.accept_sysfs_memory();
            }
            let sysfs = Sysfs::new(sysfs_root);
            let hw = hardware_ops(hw_helper_fd, &sysfs)?;
            driver.report_hardware(&sysfs, &owns, hw);
            // Everything it needs from the host is held now (the uplink's tap too, handed
            // over as a descriptor): confine it before it serves any guest or starts a thread
            // (the toolstack's plan is in the environment).
            let uplink = match uplink {
                Some(name) => Some(uplink_device(&name, uplink_fd)?),
                None => None,
            };
            if let Err(e) = confine::enter_if_planned(confine::Profile::DriverDomain, &[]) {
                eprintln!("driver-domain managed: cannot be confined: {e}");
                std::process::exit(1);
            }
            if let Some((name, tap)) = uplink {
                driver
                    .attach_uplink_device(&name, tap)
                    .with_context(|| format!("uplink {name}"))?;
            }
            driver.run().context("managed driver domain")?;
            Ok(())
        }
        Cmd::VmServe {
            tunnel,
            managed: true,
            domid: Some(domid),
            sysfs_root,
            ..
        } => vm_serve_managed(&tunnel, domid, sysfs_root),
        Cmd::VmServe {
            tunnel,
            blk,
            queues,
            cache,
            sysfs_root,
            ..
        } => vm_serve(&tunnel, &blk, queues, cache.into(), sysfs_root),
        Cmd::VmProbe {
            find,
            absent,
            wait_s,
            scan_ram,
            sysfs_root,
        } => vm_probe(&find, &absent, wait_s, scan_ram, sysfs_root),
        Cmd::Serve {
            blk,
            socket,
            net,
            readonly,
            queues,
            poll_us,
            poll_max_us,
            io_engine,
            cache,
            budget,
            null,
            require_sealed,
            confine_uid,
            allow_no_landlock,
            greeting_timeout_ms,
        } => {
            let greeting = std::time::Duration::from_millis(greeting_timeout_ms);
            let seal_policy = if require_sealed {
                SealPolicy::RequireSealed
            } else {
                SealPolicy::AllowUnsealedChecked
            };
            if net.net {
                let mut sockets: Vec<PathBuf> = socket.into_iter().collect();
                sockets.extend(net.net_sockets);
                return net_serve::run(
                    &sockets,
                    net.tap.as_deref(),
                    &net.mac,
                    queues,
                    poll_us,
                    seal_policy,
                    greeting,
                );
            }
            let Some(socket) = socket else {
                bail!("--socket PATH is required");
            };
            let disk = match (blk, null) {
                (_, Some(size)) => BlkDisk::null(size, readonly),
                (Some(path), None) => {
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(!readonly)
                        .custom_flags(CacheMode::from(cache).open_flags())
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    lock_image(&file, &path, readonly)?;
                    BlkDisk::from_file(file, readonly)?
                }
                (None, None) => bail!("--blk IMAGE or --null SIZE is required"),
            };
            let cfg = BlkBackendConfig {
                num_queues: queues,
                poll_us,
                poll_max_us,
                seal_policy,
                io_uring: io_engine == IoEngine::IoUring,
                cache: cache.into(),
                budget: budget.unwrap_or(BlkBackendConfig::default().budget),
                ..BlkBackendConfig::default()
            };
            let disk = Arc::new(disk);
            let listener = bind_atomically(&socket)?;
            log::info!("vhost-user: listening on {}", socket.display());
            if let Some(uid) = confine_uid {
                let allow = if allow_no_landlock {
                    vec![confine::Feature::Landlock]
                } else {
                    Vec::new()
                };
                let plan = confine::Plan {
                    uid,
                    gid: uid,
                    allow_missing: allow,
                    memlock: 0,
                };
                confine::enter_standalone(&plan, confine::Profile::DriverDomain)
                    .map_err(|e| anyhow::anyhow!(confine::error_chain(&e)))
                    .context("confining")?;
            }
            serve_forever_on(listener, &AtomicBool::new(false), greeting, || {
                BlkBackendDevice::new(disk.clone(), cfg.clone())
            })?;
            Ok(())
        }
    }
}

/// `vm-serve`: the disks opened (with `cache` none, O_DIRECT through a bounce buffer: the
/// guest's memory is BAR2 of the cross-VM device, a PFN mapping direct I/O cannot pin), the
/// cross-VM device and the tunnel set up, then the server until the tunnel ends.
fn vm_serve(
    tunnel: &std::path::Path,
    blk: &[PathBuf],
    queues: u16,
    cache: CacheMode,
    sysfs: PathBuf,
) -> Result<()> {
    use driver_domain::vm_tunnel::{tty, CrossVmDevice, TunnelWriter, VmServer};
    let mut disks = Vec::new();
    for path in blk {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(cache.open_flags())
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        lock_image(&file, path, false)?;
        let disk = BlkDisk::from_file(file, false)?;
        log::info!(
            "vm-serve: channel {} serves {} ({} sectors)",
            disks.len(),
            path.display(),
            disk.capacity_sectors()
        );
        disks.push(Arc::new(disk));
    }
    let device = Arc::new(CrossVmDevice::open(&Sysfs::new(sysfs)).context("cross-VM device")?);
    let tty = tty::open_raw(tunnel)?;
    let out = tty.try_clone().context("the tunnel's tty")?;
    let writer = Arc::new(TunnelWriter::new(Box::new(out)));
    let cfg = BlkBackendConfig {
        num_queues: queues,
        seal_policy: SealPolicy::RequireSealedOrSysfs,
        cache,
        ..BlkBackendConfig::default()
    };
    let mut server = VmServer::new(device, writer, |channel: u16| {
        let disk = disks
            .get(usize::from(channel))
            .ok_or_else(|| format!("no --blk for channel {channel}"))?;
        BlkBackendDevice::new(disk.clone(), cfg.clone()).map_err(|e| e.to_string())
    })?;
    server.run(tty)?;
    Ok(())
}

/// `vm-serve --managed`: the cross-VM device and the tunnel set up, `driver-domain managed`
/// started behind them (the same binary), then the server until either ends. The driver
/// domain's exit ends `vm-serve` (failing if it failed); the tunnel's end kills it.
fn vm_serve_managed(tunnel: &std::path::Path, domid: u32, sysfs: PathBuf) -> Result<()> {
    use driver_domain::vm_tunnel::managed::spawn_driver_domain;
    use driver_domain::vm_tunnel::{
        tty, CrossVmDevice, Ended, ManagedLink, TunnelWriter, VmServer,
    };
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let device = Arc::new(CrossVmDevice::open(&Sysfs::new(sysfs)).context("cross-VM device")?);
    let tty = tty::open_raw(tunnel)?;
    let out = tty.try_clone().context("the tunnel's tty")?;
    let writer = Arc::new(TunnelWriter::new(Box::new(out)));
    let (link, ends) = ManagedLink::pairs()?;
    let exe = std::fs::read_link("/proc/self/exe").context("/proc/self/exe")?;
    let pid = spawn_driver_domain(&exe, domid, ends)?;
    let child = nix::unistd::Pid::from_raw(pid);
    log::info!("vm-serve: driver domain {domid} started (pid {pid})");
    let ended = VmServer::managed(device, writer, link).and_then(|mut s| s.run(tty));
    // Gone (its sockets closed): it is exiting, give it a moment; otherwise stop it.
    let grace = match ended {
        Ok(Ended::DriverDomain) => std::time::Duration::from_secs(5),
        _ => std::time::Duration::ZERO,
    };
    let deadline = std::time::Instant::now() + grace;
    let status = loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(WaitStatus::StillAlive) => {
                log::info!("vm-serve: stopping the driver domain");
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                break waitpid(child, None);
            }
            Err(nix::errno::Errno::EINTR) => {}
            other => break other,
        }
    };
    let failed = !matches!(status, Ok(WaitStatus::Exited(_, 0)));
    match (&ended, status) {
        (Ok(Ended::Tunnel), s) => log::info!("vm-serve: the driver domain: {s:?}"),
        (_, Ok(WaitStatus::Exited(_, 0))) => log::info!("vm-serve: the driver domain exited"),
        (_, s) => log::error!("vm-serve: the driver domain failed: {s:?}"),
    }
    match ended? {
        Ended::DriverDomain if failed => bail!("the driver domain failed"),
        _ => Ok(()),
    }
}

/// `vm-probe`: the isolation probe's report on stdout; exit status 3 unless isolated.
fn vm_probe(find: &str, absent: &str, wait_s: u64, scan_ram: bool, sysfs: PathBuf) -> Result<()> {
    use driver_domain::vm_tunnel::probe::{self, ProbeConfig, Secret};
    use driver_domain::vm_tunnel::CrossVmDevice;
    let cfg = ProbeConfig {
        find: probe::parse_hex(find)?,
        secret: Secret::from_hex(absent)?,
        wait: std::time::Duration::from_secs(wait_s),
        poll: std::time::Duration::from_millis(500),
        devmem: Some("/dev/mem".into()),
        kcore: scan_ram.then(|| "/proc/kcore".into()),
    };
    let device = CrossVmDevice::open(&Sysfs::new(sysfs)).context("cross-VM device")?;
    let started = std::time::Instant::now();
    let report = probe::run(&device, &cfg, &mut |at, after| {
        println!(
            "DVM-PROBE window-marker seen at {at:#x} after {:.1} s",
            after.as_secs_f64()
        );
    })?;
    for line in report.lines() {
        println!("{line}");
    }
    println!(
        "DVM-PROBE took {:.1} s, {:.1} s of it after the marker",
        started.elapsed().as_secs_f64(),
        (started.elapsed() - report.waited).as_secs_f64()
    );
    if !report.isolated() {
        std::process::exit(3);
    }
    Ok(())
}

/// Locks the image as QEMU does (shared when read-only, exclusive when writable), so QEMU,
/// qemu-storage-daemon and splitvmm refuse to write one image together.
fn lock_image(file: &std::fs::File, path: &std::path::Path, readonly: bool) -> Result<()> {
    use ipc::image::{ImageAccess, LockError};
    let access = if readonly {
        ImageAccess::ReadOnly
    } else {
        ImageAccess::ReadWrite
    };
    match ipc::image::lock::lock(file, access) {
        Ok(()) => Ok(()),
        Err(LockError::Conflict(e)) => bail!(
            "{}: in use by {}: {e}",
            path.display(),
            ipc::image::describe_holders(file)
        ),
        Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// The uplink tap `name`: the descriptor the toolstack handed over as `fd`, or (run by hand)
/// opened by name.
fn uplink_device(name: &str, fd: Option<i32>) -> Result<(String, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let tap = match fd {
        Some(fd) => {
            // SAFETY: F_GETFD only asks whether `fd` is open.
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            if fd <= ipc::control::messages::fds::CONTROL || !open {
                bail!("--uplink-fd {fd} is not an open descriptor handed to this process");
            }
            // SAFETY: `fd` is open, above the store and control descriptors, and handed to
            // this process for the uplink alone; nothing else adopts it.
            unsafe { std::fs::File::from_raw_fd(fd) }
        }
        None => ipc::tap::open(name).with_context(|| format!("uplink {name}"))?,
    };
    Ok((name.to_owned(), tap))
}
