//! `splitvmm-hw-helper`: the privileged hardware helper of a confined driver domain
//! (docs/security.md, "The hardware helper"). `splitvmm up` starts it as root, beside the
//! driver domain, with the helper's end of their channel on fd 3; it serves the driver
//! domain's requests on the PFs named by `--owns` and their VFs, and exits when the driver
//! domain closes the channel.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use driver_domain::hw::helper::HardwareHelper;
use driver_domain::hw::ops::DirectHardware;
use driver_domain::hw::pci::{Bdf, Sysfs};
use ipc::control::ControlChannel;

/// The descriptor the channel to the driver domain is handed on.
const CHANNEL_FD: i32 = 3;
/// `CAP_SYS_ADMIN` of `<linux/capability.h>` (libc does not define capability numbers).
const CAP_SYS_ADMIN: u32 = 21;

#[derive(Parser)]
#[command(
    name = "splitvmm-hw-helper",
    about = "splitvmm's privileged hardware helper (started by `splitvmm up`)"
)]
struct Cli {
    /// The driver domain's id (for the log).
    #[arg(long)]
    domid: u32,
    /// A PF the host file gives the driver domain (repeatable): the helper acts on these and
    /// their VFs only.
    #[arg(long, value_name = "DDDD:BB:DD.F", required = true)]
    owns: Vec<Bdf>,
    /// Root of the sysfs tree (tests point it at a fake tree).
    #[arg(long, env = "SPLITVMM_SYSFS_ROOT", default_value = "/sys", hide = true)]
    sysfs_root: PathBuf,
    /// Where the VFIO group nodes are (tests point it elsewhere).
    #[arg(
        long,
        env = "SPLITVMM_VFIO_DIR",
        default_value = "/dev/vfio",
        hide = true
    )]
    vfio_dir: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ipc::startup::init_logging(&format!("hw-helper[{}]", cli.domid), "info");
    if let Err(e) = ipc::startup::check_inherited_channel(CHANNEL_FD, "the driver domain's channel")
    {
        eprintln!(
            "splitvmm-hw-helper: {e}\nit is started by `splitvmm up`, which hands it its \
             channel to the driver domain on fd {CHANNEL_FD}"
        );
        std::process::exit(ipc::startup::EXIT_NOT_MANAGED.into());
    }
    // Root it stays (sysfs and the device nodes are root's), but with CAP_SYS_ADMIN alone (the
    // NVMe admin passthrough needs it) and no_new_privs: it never executes anything.
    confine::keep_only_capabilities(1 << CAP_SYS_ADMIN)
        .context("dropping every capability but CAP_SYS_ADMIN")?;
    // SAFETY: fd 3 was just checked to be the seqpacket socket `splitvmm up` hands this
    // program, and nothing else in this process uses it.
    let channel = ControlChannel::from_fd(unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) });
    let owned: Vec<String> = cli.owns.iter().map(Bdf::to_string).collect();
    log::info!("serving the driver domain for {}", owned.join(" "));
    let hw = DirectHardware::new(Sysfs::new(cli.sysfs_root), cli.vfio_dir);
    HardwareHelper::new(hw, cli.owns)
        .serve(&channel)
        .context("hardware helper")?;
    log::info!("the driver domain closed its channel; exiting");
    Ok(())
}
