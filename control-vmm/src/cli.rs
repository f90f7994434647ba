//! The `splitvmm` command line: its commands and options, from which the help, the man pages
//! (`splitvmm man`) and the shell completions (`splitvmm completions SHELL`) are generated.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::location::HostArg;
use crate::vdev::Vdev;
use crate::xs::XsOp;

/// The exit statuses of `splitvmm`, for `--help` and the man page.
pub const EXIT_STATUS: &str = "\
Exit status:
  0      success
  1      the command failed: an error, a failed check, a domain that did not shut down
         cleanly
  3      bench-approaches: this host lacks KVM, the store, the VF or the guest files
  2      usage error (clap); an internal binary (driver-domain managed, process-guest,
         splitvmm-vmm --managed-domid) run without what `splitvmm up` hands it
  130    `up` or `store` stopped by SIGINT (Ctrl-C) after shutting down in order (129 for
         SIGHUP); stopped by SIGTERM, they exit 0 if all went well

Commands find the running host through its run directory: --run-dir DIR, else
$SPLITVMM_RUN_DIR, else <tmp>/splitvmm. Logs: RUST_LOG=info or debug; every domain's output
goes to <run_dir>/logs/<name>.log.";

#[derive(Parser)]
#[command(
    name = "splitvmm",
    version,
    about = "Toolstack of a Xen-style driver-domain split I/O stack on KVM",
    after_help = EXIT_STATUS
)]
pub struct Cli {
    #[command(flatten)]
    pub host: HostArg,
    #[command(subcommand)]
    pub command: Command,
}

/// `--json`: machine-readable output.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct JsonArg {
    /// Print JSON (a stable format: fields are added, never renamed or removed).
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the xenstore-compatible store standalone; PATH is the privileged (dom0) socket.
    Store {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Bring up a host described in a TOML file: the store, the driver domain, the guests;
    /// attach their devices and run the checks the file's [checks] asks for. --run-dir (or
    /// $SPLITVMM_RUN_DIR) replaces the file's run_dir.
    Up {
        config: PathBuf,
        /// Keep the host up after the checks, managed through its run directory, until
        /// SIGINT or SIGTERM.
        #[arg(long)]
        stay: bool,
        /// Run every check (disk, ping, replug) whatever [checks] says. Disk checks write
        /// only to scratch images.
        #[arg(long)]
        check: bool,
    },
    /// Create a guest on a running host from its own description (the keys of a
    /// `[[guest]]` entry of the host file) and attach its disks and interfaces.
    Create {
        /// The guest's TOML file.
        file: PathBuf,
    },
    /// Shut a guest down in order: its devices close through the xenbus walk, its process
    /// ends, it is released.
    Shutdown {
        /// Domain name or id.
        domain: String,
    },
    /// Reboot a guest: an orderly shutdown, then a fresh process (for a KVM guest, a fresh
    /// VM) with the disks and interfaces it had.
    Reboot {
        /// Domain name or id.
        domain: String,
    },
    /// Destroy a domain at once: with a running toolstack, stop its process and tear its
    /// devices down; always remove its store directories and release it.
    Destroy {
        /// Domain name or id.
        domain: String,
    },
    /// List the domains the store knows, with their counters and the devices they serve.
    List {
        #[command(flatten)]
        json: JsonArg,
    },
    /// `list`, refreshed every second, until Ctrl-C (plain tables when not on a terminal).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1)]
        interval: u64,
        /// Stop after this many refreshes.
        #[arg(short = 'n', long)]
        rounds: Option<u64>,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List a domain's disks: name, number, states, mode, image, backend counters.
    BlockList {
        /// Domain name or id.
        domain: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// List a domain's network interfaces: number, states, MAC, IPv4, backend counters.
    NetworkList {
        /// Domain name or id.
        domain: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Attach a disk image to a guest of a running host.
    BlockAttach {
        guest: String,
        image: PathBuf,
        /// Disk name (xvda, xvdb, ...) or Xen device number (51728 is xvdb).
        #[arg(long, default_value = "xvdb")]
        devid: Vdev,
        #[arg(long)]
        readonly: bool,
        /// Create (or grow) the image to this many MiB. An image created so is scratch.
        #[arg(long)]
        size_mib: Option<u64>,
        /// The image holds nothing anyone needs: `disk-check` may write to it.
        #[arg(long)]
        scratch: bool,
        /// Virtqueues the driver domain serves the disk with (a Linux guest's, 1-16).
        #[arg(long, default_value_t = 1)]
        queues: u16,
    },
    /// Detach a disk from a guest of a running host.
    BlockDetach {
        guest: String,
        /// Disk name (xvdb) or number (51728).
        devid: Vdev,
    },
    /// Attach a network interface (a port of the driver domain's switch) to a guest of a
    /// running host.
    NetworkAttach {
        guest: String,
        #[arg(long, default_value_t = 0)]
        devid: u32,
        /// MAC address [default: 02:00:00:<domid>:<devid>].
        #[arg(long)]
        mac: Option<String>,
        /// IPv4 address on the host's internal switch [default: 10.0.0.<domid>].
        #[arg(long)]
        ip: Option<String>,
    },
    /// Detach a network interface from a guest of a running host.
    NetworkDetach { guest: String, devid: u32 },
    /// Have a guest resolve PEER (ARP) and exchange UDP echoes with it.
    NetPing {
        guest: String,
        devid: u32,
        peer: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 20)]
        rounds: u32,
    },
    /// Have a guest write and verify (or only verify) a pattern on one of its disks. Writing
    /// is refused unless the image is scratch.
    DiskCheck {
        guest: String,
        /// Disk name (xvda) or number (51712).
        devid: Vdev,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        verify_only: bool,
    },
    /// Show a domain's output (a KVM guest's serial console), following it.
    Console {
        /// Domain name.
        domain: String,
        /// Print what is there and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// List the PCI functions driver domains own, as they reported them.
    Devices,
    /// List the PCI functions (VFs) assigned to guests, as the store records them.
    PciList,
    /// Take a PCI function away from a guest of a running host (no hotplug: a running guest
    /// sees it vanish) and give the VF back to the driver domain, reset.
    PciDetach {
        guest: String,
        /// Its index in the guest's `[[pci]]` entries (as `pci-list` shows it).
        #[arg(default_value_t = 0)]
        index: u32,
    },
    /// Read and change the store, like xenstore-read/-write/-ls/-rm/-watch.
    Xs {
        #[command(subcommand)]
        op: XsOp,
    },
    /// Measure the three I/O approaches and native on one store with one guest program
    /// (docs/approaches.md): an emulated NVMe controller, virtio-blk through the driver
    /// domain, an assigned NVMe VF, and the program on the host. Prints a markdown table:
    /// ops/s, % of native, exits, interrupts and host thread runs per request.
    BenchApproaches(BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page, or with --dir write one per command (splitvmm.1,
    /// splitvmm-up.1, ...) into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `splitvmm bench-approaches`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The guest's Linux bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// The guest's initramfs: tests/lab/guest-init as /init and l2-bench in /bin (the lab
    /// packs one: tests/lab/work/root/lab/linux/initrd.gz).
    #[arg(long)]
    pub initrd: PathBuf,
    /// The backing store: the NVMe namespace's block device on the host's nvme driver (e.g.
    /// /dev/nvme1n1). Its data from 8 MiB on is overwritten.
    #[arg(long)]
    pub store: PathBuf,
    /// The NVMe VF to assign for the vf row (DDDD:BB:DD.F, bound to vfio-pci), a function of
    /// the device whose namespace is the store.
    #[arg(long, value_name = "BDF")]
    pub vf: Option<String>,
    /// The rows, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "emulated,virtio,vf,native"
    )]
    pub rows: Vec<String>,
    /// Seconds each workload runs (4 KiB random read and write at QD1 and QD32).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// The guest's RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// l2-bench for the native row [default: next to splitvmm, else /bin/l2-bench].
    #[arg(long)]
    pub l2_bench: Option<PathBuf>,
    /// Where each row's console and VMM output are kept [default: <tmp>/splitvmm-bench].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Seconds a row may take, boot included.
    #[arg(long, default_value_t = 300)]
    pub row_timeout_s: u64,
    /// Also count exits by hardware reason: this tracefs histogram of `kvm_exit` keyed by
    /// `exit_reason`, which must exist (`echo 'hist:keys=exit_reason:size=256' >
    /// /sys/kernel/tracing/events/kvm/kvm_exit/trigger`; the file is `.../kvm_exit/hist`).
    #[arg(long)]
    pub exit_reason_hist: Option<PathBuf>,
    /// More guest kernel arguments.
    #[arg(
        long,
        default_value = "nvme_core.io_timeout=5 nvme_core.admin_timeout=5"
    )]
    pub guest_args: String,
}
