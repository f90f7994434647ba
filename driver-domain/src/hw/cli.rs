//! `driver-domain hw ...`: the hardware side of the driver domain from the command line.
//!
//! Exit codes: 0 success, 1 other failure, 3 no such device or driver, 4 invalid request
//! (malformed address, too many VFs, wrong kind of function or driver), 5 refused by the
//! kernel or the device (a driver refused to bind, an IOMMU group is not viable, an NVMe
//! command failed), 6 timeout (a device, interrupt or the host did not answer in time),
//! 7 a check failed (data read through a VF did not match).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Subcommand;

use super::nvme_probe::{NvmeController, ProbeError};
use super::pci::{Bdf, PciError, Sysfs};
use super::sriov::{set_num_vfs, NvmePf, SriovError};
use super::vfio::{wait_eventfds, VfioError, VfioPciDevice};

/// Errors of a `hw` command, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum HwCliError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Sriov(#[from] SriovError),
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("check failed: {0}")]
    Check(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

fn pci_code(e: &PciError) -> u8 {
    match e {
        PciError::NotFound(..) | PciError::NoSuchDriver { .. } => 3,
        PciError::BadAddress(_) => 4,
        PciError::BindRefused { .. } => 5,
        PciError::List { .. }
        | PciError::Read { .. }
        | PciError::Parse { .. }
        | PciError::Write { .. } => 1,
    }
}

fn vfio_code(e: &VfioError) -> u8 {
    match e {
        VfioError::Pci(p) => pci_code(p),
        VfioError::NotVfioBound { .. } => 4,
        VfioError::NoIommuGroup(_) | VfioError::GroupNotViable { .. } => 5,
        _ => 1,
    }
}

impl HwCliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            HwCliError::Pci(e) => pci_code(e),
            HwCliError::Sriov(e) => match e {
                SriovError::Pci(p) => pci_code(p),
                SriovError::NotAPf(_)
                | SriovError::TooManyVfs { .. }
                | SriovError::NoPfDriver(_)
                | SriovError::NotNvme(_) => 4,
                SriovError::DriverRefused { .. }
                | SriovError::Admin(_)
                | SriovError::NoSecondary { .. }
                | SriovError::StillOffline { .. } => 5,
                SriovError::VfsMissing { .. } | SriovError::ResetTimeout { .. } => 6,
            },
            HwCliError::Vfio(e) => vfio_code(e),
            HwCliError::Probe(e) => match e {
                ProbeError::Vfio(v) => vfio_code(v),
                ProbeError::ReadyTimeout { .. } | ProbeError::NoInterrupt { .. } => 6,
                ProbeError::Status { .. } | ProbeError::NoNamespace(_) => 5,
                _ => 1,
            },
            HwCliError::Check(_) => 7,
            HwCliError::Timeout(_) => 6,
        }
    }
}

/// `driver-domain hw` subcommands.
#[derive(Debug, Subcommand)]
pub enum HwCommand {
    /// List PCI functions: ids, class, driver, IOMMU group, SR-IOV state.
    List {
        #[arg(long, default_value = "/sys")]
        sysfs: PathBuf,
    },
    /// Set the number of VFs of an SR-IOV PF. For an NVMe PF bound to nvme, also runs the
    /// Virtualization Management sequence and brings the secondary controllers online.
    Sriov {
        /// The physical function, DDDD:BB:DD.F.
        pf: String,
        /// Number of VFs (0 disables them).
        num: u16,
        /// Queue resources per NVMe secondary controller (admin queue included).
        #[arg(long, default_value_t = 2)]
        vq: u16,
        /// Interrupt resources per NVMe secondary controller.
        #[arg(long, default_value_t = 1)]
        vi: u16,
        /// Only write sriov_numvfs, even for an NVMe PF.
        #[arg(long)]
        plain: bool,
        /// Let drivers probe new VFs (sriov_drivers_autoprobe=1; plain mode only).
        #[arg(long)]
        autoprobe: bool,
        #[arg(long, default_value = "/sys")]
        sysfs: PathBuf,
    },
    /// Bind a function to a driver (driver_override + drivers_probe).
    Bind {
        bdf: String,
        driver: String,
        #[arg(long, default_value = "/sys")]
        sysfs: PathBuf,
    },
    /// Unbind a function from its driver and clear its override.
    Unbind {
        bdf: String,
        #[arg(long, default_value = "/sys")]
        sysfs: PathBuf,
    },
    /// Own an NVMe function through VFIO: config space, BAR0, DMA, admin queue, Identify by
    /// interrupt, then read block 0 of a namespace through an I/O queue.
    VfioProbe {
        bdf: String,
        /// Namespace to read.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// Fail unless block 0 starts with these bytes.
        #[arg(long)]
        expect: Option<String>,
    },
    /// Own NVMe functions through VFIO until the host asks for them back (device request
    /// interrupt); after each release, the others must still answer Identify.
    Hold {
        bdfs: Vec<String>,
        /// Give up after this many seconds (exit code 6).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

impl HwCommand {
    /// Runs the command, prints the outcome, and returns the process exit code.
    pub fn run(self) -> u8 {
        match self.execute() {
            Ok(()) => 0,
            Err(e) => {
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let text = s.to_string();
                    if !msg.contains(&text) {
                        msg.push_str(": ");
                        msg.push_str(&text);
                    }
                    source = s.source();
                }
                let code = e.exit_code();
                eprintln!("driver-domain hw: error (exit {code}): {msg}");
                code
            }
        }
    }

    fn execute(self) -> Result<(), HwCliError> {
        let sys = Sysfs::default();
        match self {
            HwCommand::List { sysfs } => list(&Sysfs::new(sysfs)),
            HwCommand::Sriov {
                pf,
                num,
                vq,
                vi,
                plain,
                autoprobe,
                sysfs,
            } => sriov(
                &Sysfs::new(sysfs),
                pf.parse()?,
                num,
                vq,
                vi,
                plain,
                autoprobe,
            ),
            HwCommand::Bind { bdf, driver, sysfs } => {
                let bdf: Bdf = bdf.parse()?;
                Sysfs::new(sysfs).bind(bdf, &driver)?;
                println!("{bdf}: bound to {driver}");
                Ok(())
            }
            HwCommand::Unbind { bdf, sysfs } => {
                let bdf: Bdf = bdf.parse()?;
                Sysfs::new(sysfs).unbind(bdf)?;
                println!("{bdf}: no driver");
                Ok(())
            }
            HwCommand::VfioProbe { bdf, nsid, expect } => {
                vfio_probe(&sys, bdf.parse()?, nsid, expect.as_deref())
            }
            HwCommand::Hold { bdfs, timeout } => {
                let bdfs = bdfs
                    .iter()
                    .map(|b| b.parse())
                    .collect::<Result<Vec<Bdf>, _>>()?;
                hold(&sys, &bdfs, Duration::from_secs(timeout))
            }
        }
    }
}

fn list(sysfs: &Sysfs) -> Result<(), HwCliError> {
    println!(
        "{:<12} {:<9} {:<6} {:<10} {:>5}  {:<9} physfn",
        "address", "id", "class", "driver", "group", "sriov"
    );
    for f in sysfs.functions()? {
        let sriov = f
            .sriov
            .map(|s| format!("{}/{}", s.num_vfs, s.total_vfs))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<12} {:04x}:{:04x} {:06x} {:<10} {:>5}  {:<9} {}",
            f.bdf,
            f.vendor,
            f.device,
            f.class,
            f.driver.as_deref().unwrap_or("-"),
            f.iommu_group
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            sriov,
            f.physfn
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

fn sriov(
    sysfs: &Sysfs,
    pf: Bdf,
    num: u16,
    vq: u16,
    vi: u16,
    plain: bool,
    autoprobe: bool,
) -> Result<(), HwCliError> {
    let f = sysfs.function(pf)?;
    let nvme = !plain && f.driver.as_deref() == Some("nvme");
    let vfs = if nvme {
        let nvme_pf = NvmePf::open(sysfs, pf)?;
        let mut log = |step: &str| println!("{pf}: {step}");
        if num == 0 {
            nvme_pf.disable_vfs(&mut log)?;
            Vec::new()
        } else {
            nvme_pf.enable_vfs(num, vq, vi, &mut log)?
        }
    } else {
        set_num_vfs(sysfs, pf, num, autoprobe)?
    };
    for vf in &vfs {
        let f = sysfs.function(*vf)?;
        println!(
            "{pf}: VF {vf} {:04x}:{:04x} iommu_group={} driver={}",
            f.vendor,
            f.device,
            f.iommu_group
                .map(|g| g.to_string())
                .unwrap_or_else(|| "none".into()),
            f.driver.as_deref().unwrap_or("none")
        );
    }
    println!("{pf}: {} VFs enabled", vfs.len());
    Ok(())
}

fn vfio_probe(sysfs: &Sysfs, bdf: Bdf, nsid: u32, expect: Option<&str>) -> Result<(), HwCliError> {
    let mut dev = VfioPciDevice::open(sysfs, bdf)?;
    println!(
        "{bdf}: opened through VFIO (IOMMU group {}), request interrupt armed",
        dev.iommu_group()
    );
    let id = dev.config_read_u32(0)?;
    let class = dev.config_read_u32(8)? >> 8;
    println!(
        "{bdf}: config space vendor=0x{:04x} device=0x{:04x} class=0x{class:06x}",
        id & 0xffff,
        id >> 16
    );
    let bar = dev.bar0()?;
    println!("{bdf}: BAR0 mapped, {} bytes", bar.len());
    let mut ctrl = NvmeController::bring_up(dev)?;
    println!(
        "{bdf}: NVMe CAP=0x{:016x} VS={}.{}.{}; admin queue up in DMA memory at iova 0x{:x}, interrupts by {:?}",
        ctrl.cap,
        ctrl.version >> 16,
        (ctrl.version >> 8) & 0xff,
        ctrl.version & 0xff,
        super::nvme_probe::PROBE_IOVA,
        ctrl.irq_mode()
    );
    let idc = ctrl.identify_controller()?;
    println!(
        "{bdf}: Identify Controller by interrupt: vid=0x{:04x} serial={:?} model={:?} cntlid={} namespaces={}",
        idc.vid, idc.serial, idc.model, idc.cntlid, idc.namespaces
    );
    let (blocks, bs) = ctrl.identify_namespace(nsid)?;
    println!("{bdf}: namespace {nsid}: {blocks} blocks of {bs} bytes");
    let block = ctrl.read_block(nsid, 0, bs)?;
    let shown: String = block
        .iter()
        .take(32)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    println!("{bdf}: block 0 starts with {shown:?}");
    let stats = ctrl.stats;
    println!(
        "{bdf}: {} commands, {} completed by interrupt",
        stats.commands, stats.interrupts
    );
    drop(ctrl);
    println!("{bdf}: released");
    if let Some(want) = expect {
        if !block.starts_with(want.as_bytes()) {
            return Err(HwCliError::Check(format!(
                "block 0 of namespace {nsid} through {bdf} starts with {shown:?}, expected {want:?}"
            )));
        }
        println!("{bdf}: block 0 matches the expected pattern");
    }
    Ok(())
}

fn hold(sysfs: &Sysfs, bdfs: &[Bdf], timeout: Duration) -> Result<(), HwCliError> {
    let deadline = Instant::now() + timeout;
    let mut held: Vec<NvmeController> = Vec::new();
    for &bdf in bdfs {
        let mut ctrl = NvmeController::bring_up(VfioPciDevice::open(sysfs, bdf)?)?;
        let id = ctrl.identify_controller()?;
        println!(
            "{bdf}: holding (cntlid {}), request interrupt armed",
            id.cntlid
        );
        held.push(ctrl);
    }
    println!("HOLDING {}", held.len());
    while !held.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let fds: Vec<_> = held.iter().map(|c| c.device().request_eventfd()).collect();
        let fired = wait_eventfds(&fds, remaining)
            .map_err(|e| HwCliError::Timeout(format!("waiting for a device request: {e}")))?;
        let Some(i) = fired else {
            let names: Vec<String> = held.iter().map(|c| c.device().bdf().to_string()).collect();
            return Err(HwCliError::Timeout(format!(
                "the host did not ask for {} within {timeout:?}",
                names.join(" ")
            )));
        };
        let mut ctrl = held.remove(i);
        ctrl.mark_requested();
        let bdf = ctrl.device().bdf();
        println!("{bdf}: the host asked for the device back; releasing");
        drop(ctrl);
        println!("{bdf}: released");
        for other in held.iter_mut() {
            let id = other.identify_controller()?;
            println!(
                "{}: still served after {bdf} left: Identify by interrupt ok (cntlid {})",
                other.device().bdf(),
                id.cntlid
            );
        }
    }
    println!("all devices released");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::pci::fake::FakeSysfs;

    fn code(cmd: HwCommand) -> u8 {
        cmd.run()
    }

    #[test]
    fn exit_codes_follow_the_kind_of_failure() {
        let fake = FakeSysfs::new();
        fake.add_driver("nvme");
        fake.add_driver("vfio-pci");
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 1);
        fake.make_pf("0000:00:02.0", 2);
        fake.bind("0000:00:02.0", "nvme");
        fake.add_function("0000:00:05.1", 0x1b36, 0x0005, 0x00ff00, 2);
        let sysfs = fake.dir.path().to_path_buf();
        let bind = |bdf: &str, driver: &str| HwCommand::Bind {
            bdf: bdf.into(),
            driver: driver.into(),
            sysfs: sysfs.clone(),
        };
        let sriov = |pf: &str, num| HwCommand::Sriov {
            pf: pf.into(),
            num,
            vq: 2,
            vi: 1,
            plain: true,
            autoprobe: false,
            sysfs: sysfs.clone(),
        };
        assert_eq!(code(bind("0000:07:00.0", "vfio-pci")), 3);
        assert_eq!(code(bind("0000:00:02.0", "no-such-driver")), 3);
        assert_eq!(code(bind("00:02.0", "vfio-pci")), 4);
        assert_eq!(code(sriov("0000:00:02.0", 3)), 4);
        assert_eq!(code(sriov("0000:00:05.1", 1)), 4);
        // The fake kernel never creates VFs: a timeout.
        assert_eq!(code(sriov("0000:00:02.0", 1)), 6);
        // ... and never binds: a refusal.
        assert_eq!(code(bind("0000:00:05.1", "vfio-pci")), 5);
        assert_eq!(
            code(HwCommand::List {
                sysfs: sysfs.clone()
            }),
            0
        );
    }

    #[test]
    fn a_refused_pf_with_vfs_says_to_disable_them() {
        let fake = FakeSysfs::new();
        fake.add_driver("vfio-pci");
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 1);
        fake.make_pf("0000:00:02.0", 2);
        std::fs::write(
            fake.dir
                .path()
                .join("bus/pci/devices/0000:00:02.0/sriov_numvfs"),
            "2\n",
        )
        .unwrap();
        let err = Sysfs::new(fake.dir.path())
            .bind("0000:00:02.0".parse().unwrap(), "vfio-pci")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("a PF with SR-IOV enabled (2 VFs) cannot be bound to vfio-pci"),
            "{err}"
        );
        assert_eq!(HwCliError::from(err).exit_code(), 5);
    }
}
