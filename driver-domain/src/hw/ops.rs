//! The privileged hardware operations the driver domain needs to hand VFs to guests, behind
//! one trait: [`HardwareOps`]. Two implementations:
//!
//! - [`DirectHardware`]: sysfs and `/dev` directly, as root. The hardware helper runs it (after
//!   its policy check, see [`super::helper`]); so do `driver-domain hw` and an unconfined
//!   managed driver domain.
//! - [`super::helper::HelperClient`]: the same requests sent to the hardware helper, for a
//!   confined driver domain, which can reach neither sysfs nor `/dev`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use ipc::control::hardware::VfEnabling;
use ipc::control::ChannelError;

use super::pci::{write_value, Bdf, PciError, Sysfs};
use super::sriov::{set_num_vfs, NvmePf, SriovError};

/// Errors of the hardware operations.
#[derive(Debug, thiserror::Error)]
pub enum HwOpsError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Sriov(#[from] SriovError),
    #[error("{0} is not an SR-IOV physical function")]
    NotAPf(Bdf),
    #[error("{0} is in no IOMMU group")]
    NoIommuGroup(Bdf),
    #[error("opening {path}: {source}")]
    OpenGroup { path: PathBuf, source: io::Error },
    #[error("the hardware helper refused: {0}")]
    Refused(String),
    #[error("talking to the hardware helper")]
    Channel(#[from] ChannelError),
    #[error("the hardware helper did not answer within {0:?}")]
    HelperTimeout(std::time::Duration),
    #[error("the hardware helper answered out of turn: {0}")]
    HelperAnswer(String),
}

/// The SR-IOV state of a PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfState {
    pub driver: Option<String>,
    pub total_vfs: u16,
    pub num_vfs: u16,
    /// The enabled VFs, in VF order.
    pub vfs: Vec<Bdf>,
}

/// A VF's VFIO group, open.
#[derive(Debug)]
pub struct VfioGroup {
    pub number: u32,
    pub fd: OwnedFd,
}

/// What the driver domain asks of the hardware to hand VFs to guests.
pub trait HardwareOps: Send {
    /// The SR-IOV state of PF `pf`.
    fn describe_pf(&mut self, pf: Bdf) -> Result<PfState, HwOpsError>;
    /// Enables `count` VFs of `pf` (which has none), `how` says how; returns them in order.
    fn enable_vfs(&mut self, pf: Bdf, count: u16, how: VfEnabling) -> Result<Vec<Bdf>, HwOpsError>;
    /// Binds VF `vf` to vfio-pci and opens its VFIO group.
    fn bind_vfio(&mut self, vf: Bdf) -> Result<VfioGroup, HwOpsError>;
    /// Function-level reset of `vf`.
    fn reset_vf(&mut self, vf: Bdf) -> Result<(), HwOpsError>;
}

/// The operations done here, through sysfs and `/dev` (root needed).
#[derive(Debug, Clone)]
pub struct DirectHardware {
    sysfs: Sysfs,
    /// Where VFIO group nodes are (`/dev/vfio`; tests point it elsewhere).
    vfio_dir: PathBuf,
}

impl Default for DirectHardware {
    fn default() -> Self {
        DirectHardware::new(Sysfs::default(), "/dev/vfio")
    }
}

impl DirectHardware {
    pub fn new(sysfs: Sysfs, vfio_dir: impl Into<PathBuf>) -> Self {
        DirectHardware {
            sysfs,
            vfio_dir: vfio_dir.into(),
        }
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }
}

impl HardwareOps for DirectHardware {
    fn describe_pf(&mut self, pf: Bdf) -> Result<PfState, HwOpsError> {
        let f = self.sysfs.function(pf)?;
        let sriov = f.sriov.ok_or(HwOpsError::NotAPf(pf))?;
        Ok(PfState {
            driver: f.driver,
            total_vfs: sriov.total_vfs,
            num_vfs: sriov.num_vfs,
            vfs: self.sysfs.virtfns(pf)?,
        })
    }

    fn enable_vfs(&mut self, pf: Bdf, count: u16, how: VfEnabling) -> Result<Vec<Bdf>, HwOpsError> {
        let mut log = |step: &str| log::info!("{pf}: {step}");
        Ok(match how {
            VfEnabling::Nvme(r) => NvmePf::open(&self.sysfs, pf)?.enable_vfs(
                count,
                r.queues,
                r.interrupts,
                &mut log,
            )?,
            VfEnabling::Plain => set_num_vfs(&self.sysfs, pf, count, false)?,
        })
    }

    fn bind_vfio(&mut self, vf: Bdf) -> Result<VfioGroup, HwOpsError> {
        self.sysfs.bind(vf, "vfio-pci")?;
        let number = self
            .sysfs
            .function(vf)?
            .iommu_group
            .ok_or(HwOpsError::NoIommuGroup(vf))?;
        let path = self.vfio_dir.join(number.to_string());
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| HwOpsError::OpenGroup { path, source })?
            .into();
        Ok(VfioGroup { number, fd })
    }

    fn reset_vf(&mut self, vf: Bdf) -> Result<(), HwOpsError> {
        write_value(vf, &self.sysfs.device_dir(vf).join("reset"), "1")?;
        Ok(())
    }
}
