//! `splitvmm-vmm`: runs one KVM guest (the tiny kernel) until it powers off.
//!
//! Exit status: the guest's poweroff status (0..=99 by convention); 100 if the guest reset the
//! machine (e.g. a triple fault); 101 if the VMM failed; 102 if stopped by a signal. With
//! `--managed-domid`: 0 after an orderly shutdown, 101 on failure, 2 if run without the
//! descriptors `splitvmm up` hands it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use control_vmm::vmm::layout::{GuestMode, WINDOW_DEFAULT_BYTES};
use control_vmm::vmm::managed::{KvmMachines, MachineSettings, ManagedVm};
use control_vmm::vmm::{run, BlkAttachment, Outcome, RingMode, VmConfig};

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
    /// ELF kernel (the tiny kernel from guest-frontend/tiny-kernel).
    #[arg(long)]
    kernel: PathBuf,
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
    /// channel on fd 4; disks arrive with AttachBlock and each DiskCheck boots the kernel.
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
}

fn ring_mode(r: Ring) -> RingMode {
    match r {
        Ring::Notify => RingMode::Notify,
        Ring::EventIdx => RingMode::EventIdx,
        Ring::Poll => RingMode::Poll,
    }
}

fn main() -> ExitCode {
    ipc::startup::restore_sigpipe();
    let cli = Cli::parse();
    match cli.managed_domid {
        Some(domid) => ipc::startup::init_logging(&format!("splitvmm-vmm[{domid}]"), "warn"),
        None => ipc::startup::init_logging("splitvmm-vmm", "warn"),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = Arc::clone(&stop);
    if let Err(e) = control_vmm::signals::handle_termination(move |sig| {
        log::warn!("{sig}: stopping the guest");
        on_signal.store(true, Ordering::SeqCst);
    }) {
        eprintln!("splitvmm-vmm: {e}");
        return ExitCode::from(101);
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
        if let Err(e) = ipc::startup::check_inherited_fds() {
            eprintln!(
                "{}",
                ipc::startup::not_managed_message("splitvmm-vmm --managed-domid", &e)
            );
            return ExitCode::from(ipc::startup::EXIT_NOT_MANAGED);
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
        connect_timeout: Duration::from_secs(5),
        console: Box::new(std::io::stdout()),
        stop,
    };
    match run(cfg) {
        Ok(report) => {
            eprint!("{}", report.table());
            match report.outcome {
                Outcome::Poweroff(s) => ExitCode::from(s),
                Outcome::Reset(_) => ExitCode::from(100),
                Outcome::Failed(_) => ExitCode::from(101),
                Outcome::Terminated => ExitCode::from(102),
            }
        }
        Err(e) => {
            eprintln!("splitvmm-vmm: {e}");
            ExitCode::from(101)
        }
    }
}
