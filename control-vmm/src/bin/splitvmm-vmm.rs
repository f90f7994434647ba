//! `splitvmm-vmm`: runs one KVM guest (the tiny kernel, or with `--linux` a Linux bzImage)
//! until it powers off.
//!
//! Exit status: the guest's poweroff status (0..=99 by convention); 100 if the guest reset the
//! machine (e.g. a triple fault); 101 if the VMM failed; 102 if stopped by a signal. With
//! `--managed-domid`: 0 after an orderly shutdown, 101 on failure, 2 if run without the
//! descriptors `splitvmm up` hands it.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use control_vmm::vmm::arch::bzimage::LinuxBoot;
use control_vmm::vmm::devices::nvme::Namespace;
use control_vmm::vmm::driver_vm::{DriverVmConfig, ManagedEnds};
use control_vmm::vmm::layout::{GuestMode, WINDOW_DEFAULT_BYTES};
use control_vmm::vmm::linux::managed::{LinuxMachine, LinuxSettings, MachineSlot, ManagedLinuxVm};
use control_vmm::vmm::linux::LinuxVmConfig;
use control_vmm::vmm::managed::{KvmMachines, MachineSettings, ManagedVm};
use control_vmm::vmm::vhost_device::{VhostDevice, VirtioDeviceType};
use control_vmm::vmm::wakeups::ThreadWatch;
use control_vmm::vmm::{run, BlkAttachment, GuestMarkers, Outcome, RingMode, VmConfig};
use vmm_sys_util::eventfd::EventFd;

/// The virtio ring feature `--no-event-idx` hides.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Hello,
    Disk,
    TripleFault,
    BadInput,
    Halt,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Ring {
    Notify,
    EventIdx,
    Poll,
}

/// Run one KVM guest with a virtio-mmio disk served by the driver domain over vhost-user.
#[derive(Debug, Parser)]
#[command(name = "splitvmm-vmm", version)]
struct Cli {
    /// ELF kernel (the tiny kernel from guest-frontend/tiny-kernel), or with --linux a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Boot an unmodified Linux bzImage (ACPI, PCI, COM1) until it powers off.
    #[arg(long, conflicts_with = "mode")]
    linux: bool,
    /// Linux: an interactive console on this Unix socket (`splitvmm console`): what a
    /// client sends goes to COM1's input, COM1's output goes to it as well as to stdout.
    #[arg(long, requires = "linux")]
    console_socket: Option<PathBuf>,
    /// Linux with --managed-domid: boot once this many disks are Connected (cold-plugged).
    #[arg(long, requires = "linux", default_value_t = 0)]
    disks: usize,
    /// Linux with --managed-domid: and this many network interfaces.
    #[arg(long, requires = "linux", default_value_t = 0)]
    nics: usize,
    /// Linux: hide VIRTIO_RING_F_EVENT_IDX from the guest (measure an interrupt per
    /// completion and a notify per request).
    #[arg(long, requires = "linux")]
    no_event_idx: bool,
    /// Linux: read this tracefs histogram of `kvm_exit` keyed by `exit_reason` at the guest's
    /// phase marks (exits by reason in the exit table).
    #[arg(long, requires = "linux")]
    exit_reason_hist: Option<PathBuf>,
    /// Linux: count, over each measured phase, how many times this VMM's threads other than
    /// its vCPUs were scheduled in (`host.vmm_thread_runs`, from schedstat).
    #[arg(long, requires = "linux")]
    count_vmm_threads: bool,
    /// Linux: the same for every thread of process PID (e.g. the driver domain serving the
    /// disk): `host.backend_thread_runs`. Repeatable.
    #[arg(long, requires = "linux", value_name = "PID")]
    count_threads_of: Vec<u32>,
    /// Linux: the same for the threads of process PID other than its vCPU threads (the VMM
    /// of a driver VM serving this guest's disk: its vCPU runs the backend, its other
    /// threads must not run per request): `host.peer_vmm_thread_runs`. Repeatable.
    #[arg(long, requires = "linux", value_name = "PID")]
    count_non_vcpu_threads_of: Vec<u32>,
    /// Linux with --managed-domid: how long a detach waits for the guest to eject the device
    /// (ACPI hotplug) before removing it by force, in seconds.
    #[arg(long, requires = "linux", default_value_t = 20)]
    eject_timeout_s: u64,
    /// Linux with --managed-domid: boot once this many PCI functions have been handed over
    /// (AssignPci, each with its VFIO group).
    #[arg(long, requires = "managed_domid", default_value_t = 0)]
    pci: usize,
    /// Linux: the initramfs.
    #[arg(long, requires = "linux")]
    initrd: Option<PathBuf>,
    /// Linux: assign this PCI function (DDDD:BB:DD.F, bound to vfio-pci; its IOMMU group is
    /// found in sysfs and opened from /dev/vfio) to the guest. Repeatable.
    #[arg(long, requires = "linux", value_name = "BDF")]
    vfio: Vec<String>,
    /// Linux: an emulated NVMe controller (full emulation: every register and doorbell access
    /// traps to the VMM) whose namespace is this file, read-only unless `,rw` follows.
    /// Repeatable.
    #[arg(long, requires = "linux", value_name = "PATH[,rw]")]
    nvme: Vec<String>,
    /// Linux: as --nvme, on descriptor N inherited from the toolstack (N >= 5).
    #[arg(long, requires = "linux", value_name = "N[,rw]")]
    nvme_fd: Vec<String>,
    /// Linux: make this machine a driver VM serving guests over vhost-user socket PATH (a
    /// listener bound here; the first is channel 0, the next channel 1, ...): COM2 (ttyS1)
    /// carries the tunnel to `driver-domain vm-serve` in the VM, the cross-VM PCI device
    /// (1af4:1130) the guests' memory and doorbells. Repeatable (up to 16).
    #[arg(long, requires = "linux", value_name = "PATH")]
    driver_vm_socket: Vec<PathBuf>,
    /// Linux with --driver-vm-socket: the cross-VM device's shared-memory BAR in MiB (a power
    /// of two): room for every guest region the driver VM maps at once.
    #[arg(long, requires = "linux", default_value_t = control_vmm::vmm::driver_vm::SHM_DEFAULT_MIB)]
    driver_vm_shm_mib: u64,
    /// Linux: make this machine the driver VM of `splitvmm up` (`[driver_domain] kind =
    /// "vm"`), driver domain DOMID: its store connection (fd 3) and control channel (fd 4)
    /// are carried through COM2 to `driver-domain vm-serve --managed` in the VM, and each
    /// device the toolstack asks it to serve gets a channel of the tunnel.
    #[arg(long, requires = "linux", value_name = "DOMID", conflicts_with_all = ["driver_vm_socket", "managed_domid", "blk_socket"])]
    driver_vm_domid: Option<u32>,
    /// Linux: as --vfio, for function BDF whose VFIO group is descriptor N (>= 5), inherited
    /// from the toolstack (the confined VMM opens no /dev/vfio path). Repeatable.
    #[arg(long, requires = "linux", value_name = "N:BDF")]
    vfio_fd: Vec<String>,
    /// Linux: the kernel command line.
    #[arg(long, requires = "linux", default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest RAM in MiB (a multiple of 2).
    #[arg(long, default_value_t = 8)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// What the tiny kernel does.
    #[arg(long, value_enum, default_value_t = Mode::Hello)]
    mode: Mode,
    /// vhost-user-blk socket of the driver domain (`driver-domain serve --blk IMG --socket S`).
    #[arg(long)]
    blk_socket: Option<PathBuf>,
    /// Share all guest RAM with the backend, not only the I/O window.
    #[arg(long)]
    share_all_ram: bool,
    /// I/O window size in KiB.
    #[arg(long, default_value_t = WINDOW_DEFAULT_BYTES / 1024)]
    window_kib: u64,
    /// How the guest waits for completions.
    #[arg(long, value_enum, default_value_t = Ring::EventIdx)]
    ring: Ring,
    /// Disk requests (half 512-byte writes, half reads of the same sectors).
    #[arg(long, default_value_t = 32)]
    requests: u32,
    /// Requests submitted per batch (1..=16).
    #[arg(long, default_value_t = 1)]
    batch: u32,
    /// Skip the idle baseline (an idle phase as long as the I/O phase).
    #[arg(long)]
    no_idle_baseline: bool,
    /// Run as guest domain DOMID of `splitvmm up`: store connection on fd 3, control
    /// channel on fd 4; disks arrive with AttachBlock and each DiskCheck boots the kernel
    /// (with --linux: the guest boots once its disks are Connected and runs until it powers
    /// off; a shutdown request presses its power button).
    #[arg(long, value_name = "DOMID", conflicts_with_all = ["blk_socket", "mode"])]
    managed_domid: Option<u32>,
    /// Sectors per disk request, with --check-kib and in managed mode (1..=8).
    #[arg(long, default_value_t = 8)]
    sectors_per_request: u32,
    /// Check this many KiB from the start of the disk (instead of --requests single-sector
    /// requests), in requests of --sectors-per-request.
    #[arg(long)]
    check_kib: Option<u32>,
    /// Pattern seed of the disk check.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tiny kernel: write these bytes (hex, at most 4096) into guest RAM outside the I/O
    /// window before boot, at half the RAM size: private memory a backend must never see
    /// (the driver VM's isolation test, docs/driver-vm.md).
    #[arg(long, value_name = "HEX", conflicts_with_all = ["linux", "managed_domid"], value_parser = parse_hex)]
    private_marker: Option<HexBytes>,
    /// Tiny kernel: write these bytes (hex, at most 4096) at the start of the I/O window's
    /// last page before boot: shared memory the backend sees.
    #[arg(long, value_name = "HEX", conflicts_with_all = ["linux", "managed_domid"], value_parser = parse_hex)]
    window_marker: Option<HexBytes>,
}

/// Bytes given as hex digit pairs.
#[derive(Debug, Clone)]
struct HexBytes(Vec<u8>);

/// Bytes from a string of hex digit pairs.
fn parse_hex(s: &str) -> Result<HexBytes, String> {
    ipc::hex::bytes(s)
        .map(HexBytes)
        .ok_or_else(|| format!("{s:?}: not an even number of hex digits"))
}

fn ring_mode(r: Ring) -> RingMode {
    match r {
        Ring::Notify => RingMode::Notify,
        Ring::EventIdx => RingMode::EventIdx,
        Ring::Poll => RingMode::Poll,
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    match cli.managed_domid {
        Some(domid) => ipc::startup::init_logging(&format!("splitvmm-vmm[{domid}]"), "warn"),
        None => match cli.driver_vm_domid {
            Some(domid) => {
                ipc::startup::init_logging(&format!("splitvmm-vmm[driver {domid}]"), "warn")
            }
            None => ipc::startup::init_logging("splitvmm-vmm", "warn"),
        },
    }
    // A Linux guest's console listens from the start (before confinement: the confined VMM
    // sees no run directory).
    let console = if cli.linux {
        match console_listener(cli.console_socket.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("splitvmm-vmm: {e}");
                return ExitCode::from(101);
            }
        }
    } else {
        None
    };
    // A driver VM's sockets: bound before confinement, as the console's.
    let driver_vm = match driver_vm_listeners(&cli) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("splitvmm-vmm: {e}");
            return ExitCode::from(101);
        }
    };
    // The emulated NVMe disks' files: opened (or adopted) before confinement.
    let nvme = if cli.linux {
        match nvme_namespaces(&cli) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("splitvmm-vmm: {e}");
                return ExitCode::from(101);
            }
        }
    } else {
        Vec::new()
    };
    // Confined (as `splitvmm up` asks) before its first thread starts; kept open meanwhile:
    // the kernel and initrd it reads through /proc/self/fd.
    let _held = match confine_vmm(&mut cli) {
        Ok(held) => held,
        Err(e) => {
            eprintln!("splitvmm-vmm: cannot be confined: {e}");
            return ExitCode::from(101);
        }
    };
    let button = if cli.linux {
        match power_button_on_sigusr1() {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("splitvmm-vmm: {e}");
                return ExitCode::from(101);
            }
        }
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = Arc::clone(&stop);
    if let Err(e) = control_vmm::signals::handle_termination(move |sig| {
        log::warn!("{sig}: stopping the guest");
        on_signal.store(true, Ordering::SeqCst);
    }) {
        eprintln!("splitvmm-vmm: {e}");
        return ExitCode::from(101);
    }
    if let Some(button) = button {
        return match cli.managed_domid {
            Some(domid) => run_managed_linux(domid, cli, (console, nvme), stop, button),
            None => run_linux(cli, (console, nvme, driver_vm), stop, button),
        };
    }

    if let Some(domid) = cli.managed_domid {
        let settings = MachineSettings {
            kernel: cli.kernel,
            ram_bytes: cli.mem_mib << 20,
            window_bytes: cli.window_kib << 10,
            ring: ring_mode(cli.ring),
            batch: cli.batch,
            sectors_per_request: cli.sectors_per_request,
            idle_baseline: !cli.no_idle_baseline,
        };
        if let Some(code) = not_managed() {
            return code;
        }
        // SAFETY: fds 3 and 4 were just checked to be the sockets `splitvmm up` hands this
        // program, and nothing else in this process uses them.
        let vm = unsafe {
            ManagedVm::from_inherited_fds(domid, KvmMachines::new(settings, Arc::clone(&stop)))
        }
        .with_stop_flag(stop);
        return match vm.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("splitvmm-vmm: managed guest {domid}: {e}");
                ExitCode::from(101)
            }
        };
    }
    let cfg = VmConfig {
        kernel: cli.kernel,
        ram_bytes: cli.mem_mib << 20,
        vcpus: cli.vcpus,
        mode: match cli.mode {
            Mode::Hello => GuestMode::Hello,
            Mode::Disk => GuestMode::Disk,
            Mode::TripleFault => GuestMode::TripleFault,
            Mode::BadInput => GuestMode::BadInput,
            Mode::Halt => GuestMode::Halt,
        },
        blk: cli
            .blk_socket
            .map_or(BlkAttachment::None, BlkAttachment::Socket),
        share_all_ram: cli.share_all_ram,
        window_bytes: cli.window_kib << 10,
        ring: ring_mode(cli.ring),
        requests: cli.requests,
        batch: cli.batch,
        seed: cli.seed,
        verify_only: false,
        sectors_per_request: if cli.check_kib.is_some() {
            cli.sectors_per_request
        } else {
            1
        },
        check_sectors: cli.check_kib.map_or(0, |k| k.saturating_mul(2)),
        idle_baseline: !cli.no_idle_baseline,
        markers: GuestMarkers {
            private: cli.private_marker.map(|h| h.0).unwrap_or_default(),
            window: cli.window_marker.map(|h| h.0).unwrap_or_default(),
        },
        connect_timeout: Duration::from_secs(5),
        console: Box::new(std::io::stdout()),
        stop,
    };
    match run(cfg) {
        Ok(report) => {
            eprint!("{}", report.table());
            exit_code(&report.outcome)
        }
        Err(e) => {
            eprintln!("splitvmm-vmm: {e}");
            ExitCode::from(101)
        }
    }
}

/// Boots a Linux guest; `button` is its ACPI power button.
fn run_linux(
    cli: Cli,
    (console_socket, nvme, driver_vm): (
        Option<UnixListener>,
        Vec<Namespace>,
        Option<DriverVmConfig>,
    ),
    stop: Arc<AtomicBool>,
    button: Arc<EventFd>,
) -> ExitCode {
    let boot = linux_boot(&cli);
    let mut assigned = match vfio_fds(&cli) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("splitvmm-vmm: {e}");
            return ExitCode::from(101);
        }
    };
    for bdf in &cli.vfio {
        match control_vmm::vmm::vfio::Assignment::by_address(bdf) {
            Ok(a) => assigned.push(a),
            Err(e) => {
                eprintln!("splitvmm-vmm: --vfio {bdf}: {e}");
                return ExitCode::from(101);
            }
        }
    }
    let mut devices = Vec::new();
    if let Some(path) = &cli.blk_socket {
        match VhostDevice::connect_blk(path, Duration::from_secs(5), Vec::new()) {
            Ok(mut disk) => {
                if cli.no_event_idx {
                    disk.hide_features(VIRTIO_RING_F_EVENT_IDX);
                }
                devices.push(((VirtioDeviceType::Blk, 0), disk))
            }
            Err(e) => {
                eprintln!("splitvmm-vmm: the disk's backend: {e}");
                return ExitCode::from(101);
            }
        }
    }
    let cfg = LinuxVmConfig {
        boot,
        ram_bytes: cli.mem_mib << 20,
        vcpus: cli.vcpus,
        console: Box::new(std::io::stdout()),
        console_socket,
        stop,
        power_button: Some(button),
        devices,
        share_all_ram: cli.share_all_ram,
        cmdline_extra: String::new(),
        hotplug: None,
        exit_reason_hist: cli.exit_reason_hist.clone(),
        assigned,
        functions: Default::default(),
        nvme,
        watch_threads: ThreadWatch {
            own_non_vcpu: cli.count_vmm_threads,
            others: cli.count_threads_of.clone(),
            peer_vmms: cli.count_non_vcpu_threads_of.clone(),
        },
        driver_vm,
        reconnect: cli
            .blk_socket
            .iter()
            .map(|p| ((VirtioDeviceType::Blk, 0), p.clone()))
            .collect(),
    };
    match control_vmm::vmm::linux::run(cfg) {
        Ok(report) => {
            eprint!("{}", report.table());
            exit_code(&report.outcome)
        }
        Err(e) => {
            eprintln!("splitvmm-vmm: {e}");
            ExitCode::from(101)
        }
    }
}

/// The namespaces of `--nvme` (files opened here, read-write only with `,rw`) and
/// `--nvme-fd` (descriptors the toolstack opened and handed over).
fn nvme_namespaces(cli: &Cli) -> Result<Vec<Namespace>, String> {
    use std::os::fd::FromRawFd;
    let split = |spec: &str| match spec.strip_suffix(",rw") {
        Some(rest) => (rest.to_owned(), true),
        None => (spec.to_owned(), false),
    };
    let mut out = Vec::new();
    for spec in &cli.nvme {
        let (path, writable) = split(spec);
        let file = std::fs::File::options()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| format!("--nvme {path}: {e}"))?;
        out.push(Namespace::new(file, writable).map_err(|e| format!("--nvme {path}: {e}"))?);
    }
    let mut fds = Vec::new();
    for spec in &cli.nvme_fd {
        let (n, writable) = split(spec);
        let fd: i32 = n
            .parse()
            .ok()
            .filter(|fd| *fd >= 5 && !fds.iter().any(|(f, _)| f == fd))
            .ok_or_else(|| format!("--nvme-fd {spec}: not a descriptor >= 5 given once"))?;
        // SAFETY: F_GETFD only inspects the descriptor table; the result is checked.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("--nvme-fd {fd}: not an open descriptor"));
        }
        fds.push((fd, writable));
    }
    for (fd, writable) in fds {
        // SAFETY: the toolstack handed this descriptor for this disk alone; it is open (checked
        // above), named once, and nothing else in this process owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        out.push(Namespace::new(file, writable).map_err(|e| format!("--nvme-fd {fd}: {e}"))?);
    }
    Ok(out)
}

/// What a Linux guest boots.
fn linux_boot(cli: &Cli) -> LinuxBoot {
    LinuxBoot {
        kernel: cli.kernel.clone(),
        initrd: cli.initrd.clone(),
        cmdline: cli.cmdline.clone(),
    }
}

/// Confines this VMM if `splitvmm up` asked for it (its plan is in the environment): opens
/// `/dev/kvm`, the kernel and the initrd first, and points `cli` at the files through
/// `/proc/self/fd` (the confined VMM sees no other path). Returns the files to keep open.
fn confine_vmm(cli: &mut Cli) -> Result<Vec<std::fs::File>, String> {
    use std::os::fd::{AsFd, AsRawFd};
    let plan = match confine::Plan::from_env() {
        Ok(Some(plan)) => plan,
        Ok(None) => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    control_vmm::vmm::kvm_device::preopen().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    // One VFIO container per function the toolstack will hand over (AssignPci).
    control_vmm::vmm::vfio::preopen_containers(cli.pci + cli.vfio_fd.len())
        .map_err(|e| format!("opening /dev/vfio/vfio: {e}"))?;
    let mut held = Vec::new();
    let open = |path: &Path| {
        std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))
    };
    let kernel = open(&cli.kernel)?;
    cli.kernel = PathBuf::from(format!("/proc/self/fd/{}", kernel.as_raw_fd()));
    held.push(kernel);
    if let Some(initrd) = &cli.initrd {
        let file = open(initrd)?;
        cli.initrd = Some(PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())));
        held.push(file);
    }
    let read_only: Vec<_> = held.iter().map(|f| f.as_fd()).collect();
    confine::enter(&plan, confine::Profile::Vmm, &read_only)
        .map_err(|e| confine::error_chain(&e))?;
    Ok(held)
}

/// The listeners of `--driver-vm-socket` (stale socket files replaced), if any.
fn driver_vm_listeners(cli: &Cli) -> Result<Option<DriverVmConfig>, String> {
    if cli.driver_vm_socket.is_empty() && cli.driver_vm_domid.is_none() {
        return Ok(None);
    }
    if cli.managed_domid.is_some() {
        return Err("--driver-vm-socket: not with --managed-domid".into());
    }
    let managed = match cli.driver_vm_domid {
        Some(domid) => {
            ipc::startup::check_inherited_fds().map_err(|e| {
                ipc::startup::not_managed_message("splitvmm-vmm --driver-vm-domid", &e)
            })?;
            // SAFETY: fds 3 and 4 were just checked to be the sockets `splitvmm up` hands
            // this program, and nothing else in this process uses them.
            Some(unsafe { ManagedEnds::from_inherited_fds(domid) })
        }
        None => None,
    };
    let mib = cli.driver_vm_shm_mib;
    if !mib.is_power_of_two() || !(2..=32 << 10).contains(&mib) {
        return Err(format!(
            "--driver-vm-shm-mib {mib}: a power of two from 2 to 32768"
        ));
    }
    let mut sockets = Vec::new();
    for path in &cli.driver_vm_socket {
        let listener = console_listener(Some(path))
            .map_err(|e| format!("--driver-vm-socket: {e}"))?
            .ok_or("--driver-vm-socket: no path")?;
        sockets.push(listener);
    }
    Ok(Some(DriverVmConfig {
        sockets,
        managed,
        shm_bytes: mib << 20,
    }))
}

/// The functions of `--vfio-fd N:BDF`: each group a descriptor the toolstack handed over.
fn vfio_fds(cli: &Cli) -> Result<Vec<control_vmm::vmm::vfio::Assignment>, String> {
    use control_vmm::vmm::vfio::{valid_bdf, Assignment, GroupSource};
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut out: Vec<Assignment> = Vec::new();
    let mut seen = Vec::new();
    for spec in &cli.vfio_fd {
        let (n, bdf) = spec
            .split_once(':')
            .ok_or_else(|| format!("--vfio-fd {spec}: not N:BDF"))?;
        let fd: i32 = n
            .parse()
            .ok()
            .filter(|fd| *fd >= 5 && !seen.contains(fd))
            .ok_or_else(|| format!("--vfio-fd {spec}: not a descriptor >= 5 given once"))?;
        if !valid_bdf(bdf) {
            return Err(format!("--vfio-fd {spec}: {bdf} is not DDDD:BB:DD.F"));
        }
        // SAFETY: F_GETFD only inspects the descriptor table; the result is checked.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("--vfio-fd {spec}: {fd} is not an open descriptor"));
        }
        seen.push(fd);
        // SAFETY: the toolstack handed this descriptor for this function alone; it is open
        // (checked above), named once, and nothing else in this process owns it.
        let group = unsafe { OwnedFd::from_raw_fd(fd) };
        out.push(Assignment {
            bdf: bdf.to_owned(),
            group: GroupSource::Fd(group),
        });
    }
    Ok(out)
}

/// Listens on the console socket `path` (a stale socket file there is replaced).
fn console_listener(path: Option<&Path>) -> Result<Option<UnixListener>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        _ => {}
    }
    UnixListener::bind(path)
        .map(Some)
        .map_err(|e| format!("console socket {}: {e}", path.display()))
}

/// Whether this process lacks the descriptors `splitvmm up` hands it (then its exit status).
fn not_managed() -> Option<ExitCode> {
    let e = ipc::startup::check_inherited_fds().err()?;
    eprintln!(
        "{}",
        ipc::startup::not_managed_message("splitvmm-vmm --managed-domid", &e)
    );
    Some(ExitCode::from(ipc::startup::EXIT_NOT_MANAGED))
}

/// Runs a Linux guest as guest domain `domid` of `splitvmm up`: 0 once it powered off (by
/// itself or at the toolstack's request) and the walk ended in order.
fn run_managed_linux(
    domid: u32,
    cli: Cli,
    (console_socket, nvme): (Option<UnixListener>, Vec<Namespace>),
    stop: Arc<AtomicBool>,
    button: Arc<EventFd>,
) -> ExitCode {
    if let Some(code) = not_managed() {
        return code;
    }
    let boot = linux_boot(&cli);
    let settings = LinuxSettings {
        boot,
        ram_bytes: cli.mem_mib << 20,
        vcpus: cli.vcpus,
        devices: cli.disks + cli.nics,
        pci: cli.pci,
        console_socket,
        share_all_ram: cli.share_all_ram,
        eject_timeout: Duration::from_secs(cli.eject_timeout_s),
        nvme,
    };
    let slot = MachineSlot::default();
    let machine = match LinuxMachine::new(settings, Arc::clone(&stop), button, slot.clone()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("splitvmm-vmm: managed guest {domid}: {e}");
            return ExitCode::from(101);
        }
    };
    // SAFETY: fds 3 and 4 were just checked to be the sockets `splitvmm up` hands this
    // program, and nothing else in this process uses them.
    let vm = unsafe { ManagedLinuxVm::from_inherited_fds(domid, machine) }
        .with_stop_flag(Arc::clone(&stop));
    let walk = vm.run();
    let ended = slot.finish(&stop);
    if let Some(Ok(report)) = &ended {
        eprint!("{}", report.table());
    }
    match (walk, ended) {
        (Err(e), _) => {
            eprintln!("splitvmm-vmm: managed guest {domid}: {e}");
            ExitCode::from(101)
        }
        (Ok(()), Some(Err(e))) => {
            eprintln!("splitvmm-vmm: managed guest {domid}: {e}");
            ExitCode::from(101)
        }
        (Ok(()), Some(Ok(report))) => match report.outcome {
            Outcome::Poweroff(_) | Outcome::Terminated => ExitCode::SUCCESS,
            other => exit_code(&other),
        },
        (Ok(()), None) => ExitCode::SUCCESS,
    }
}

/// The process's exit status for how the machine ended.
fn exit_code(outcome: &Outcome) -> ExitCode {
    match outcome {
        Outcome::Poweroff(s) => ExitCode::from(*s),
        Outcome::Reset(_) => ExitCode::from(100),
        Outcome::Failed(_) => ExitCode::from(101),
        Outcome::Terminated => ExitCode::from(102),
    }
}

/// The power button of a Linux guest, pressed by SIGUSR1. Must run before any other thread
/// starts, so that every thread blocks the signal and only the waiting thread takes it.
fn power_button_on_sigusr1() -> Result<Arc<EventFd>, String> {
    let button = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
    let press = Arc::clone(&button);
    control_vmm::signals::handle_power_button(move || {
        log::warn!("SIGUSR1: pressing the guest's ACPI power button");
        if let Err(e) = press.write(1) {
            log::error!("pressing the power button: {e}");
        }
    })
    .map_err(|e| e.to_string())?;
    Ok(button)
}
