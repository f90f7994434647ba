//! Direct assignment of a PCI function (an SR-IOV VF) to a Linux guest through VFIO: the
//! guest's stock driver drives the device; the VMM sets it up and then stays off its data
//! path (BARs are KVM memory slots, interrupts are VFIO eventfds bound as KVM irqfds, DMA goes
//! through the IOMMU to guest RAM mapped at IOVA = guest-physical address).
//!
//! - [`sys`]: the VFIO ioctls, over `vfio-bindings` (why not `vfio-ioctls`: see there);
//! - [`config`]: the configuration space the guest sees;
//! - [`device`]: the function on the guest's PCI bus.
//!
//! See docs/vmm.md ("Assigned devices").

pub mod config;
pub mod device;
pub mod sys;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use device::VfioPciDevice;

pub use sys::preopen_containers;
use sys::{VfioContainer, VfioGroup, VfioSysError};

/// The MSI window: the IOVA range where the IOMMU (with interrupt remapping) takes device
/// writes as interrupts. Guest RAM mapped for DMA must stay below it.
pub const MSI_WINDOW_GPA: u64 = 0xfee0_0000;
/// Headroom over guest RAM for RLIMIT_MEMLOCK (type1 pins what it maps and counts it there).
pub const MEMLOCK_SLACK: u64 = 64 << 20;

/// Errors preparing an assignment.
#[derive(Debug, thiserror::Error)]
pub enum AssignmentError {
    #[error(transparent)]
    Sys(#[from] VfioSysError),
    #[error("{0} is not a PCI address (DDDD:BB:DD.F)")]
    BadAddress(String),
    #[error("{bdf} has no IOMMU group ({source}); is it bound to vfio-pci with the IOMMU on?")]
    NoGroup { bdf: String, source: std::io::Error },
    #[error("guest RAM ends at {0:#x}, beyond the MSI window at {MSI_WINDOW_GPA:#x}")]
    RamOverMsiWindow(u64),
    #[error(
        "RLIMIT_MEMLOCK is {have} bytes (hard limit {hard}); mapping {need} bytes of guest RAM \
         for DMA pins it all: raise the hard limit (ulimit -l) or grant CAP_IPC_LOCK"
    )]
    Memlock { have: u64, hard: u64, need: u64 },
    #[error("DMA-mapping guest RAM: {0}")]
    MapRam(VfioSysError),
}

/// Where the function's group comes from.
#[derive(Debug)]
pub enum GroupSource {
    /// Opened by the VMM from `/dev/vfio/<n>` (by hand: `splitvmm-vmm --vfio BDF`).
    Path(PathBuf),
    /// Received from the driver domain (SCM_RIGHTS); the VMM opens nothing itself.
    Fd(OwnedFd),
}

/// One function to assign.
#[derive(Debug)]
pub struct Assignment {
    /// Its PCI address on the host (the name VFIO knows it by).
    pub bdf: String,
    pub group: GroupSource,
}

/// Checks a PCI address `DDDD:BB:DD.F`.
pub fn valid_bdf(s: &str) -> bool {
    s.len() == 12
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b':',
            10 => b == b'.',
            _ => b.is_ascii_hexdigit(),
        })
}

impl Assignment {
    /// The function at `bdf`, its group found in sysfs and opened by path.
    pub fn by_address(bdf: &str) -> Result<Self, AssignmentError> {
        if !valid_bdf(bdf) {
            return Err(AssignmentError::BadAddress(bdf.into()));
        }
        let link = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group")).map_err(
            |source| AssignmentError::NoGroup {
                bdf: bdf.into(),
                source,
            },
        )?;
        let group = link
            .file_name()
            .map(|n| PathBuf::from("/dev/vfio").join(n))
            .ok_or_else(|| AssignmentError::NoGroup {
                bdf: bdf.into(),
                source: std::io::Error::other("empty iommu_group link"),
            })?;
        Ok(Self {
            bdf: bdf.into(),
            group: GroupSource::Path(group),
        })
    }

    /// Opens a fresh container and attaches the group to it.
    pub fn open(self) -> Result<(String, VfioContainer, VfioGroup), AssignmentError> {
        let group = match self.group {
            GroupSource::Path(p) => VfioGroup::open(&p)?,
            GroupSource::Fd(fd) => VfioGroup::from_fd(fd),
        };
        let mut container = VfioContainer::open()?;
        group.attach(&mut container)?;
        Ok((self.bdf, container, group))
    }
}

/// Raises RLIMIT_MEMLOCK's soft limit to cover `bytes` of pinned guest RAM (plus slack), up to
/// the hard limit, and returns the limit now in force (type1 counts pinned pages against it
/// unless the process has CAP_IPC_LOCK, as root in the lab has).
pub fn raise_memlock(bytes: u64) -> (u64, u64) {
    let need = bytes + MEMLOCK_SLACK;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills in a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 || lim.rlim_cur >= need {
        return (lim.rlim_cur, lim.rlim_max);
    }
    let want = libc::rlimit {
        rlim_cur: need.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) } != 0 {
        return (lim.rlim_cur, lim.rlim_max);
    }
    log::info!(
        "RLIMIT_MEMLOCK {} -> {} bytes: {bytes} bytes of guest RAM are pinned for DMA",
        lim.rlim_cur,
        want.rlim_cur
    );
    (want.rlim_cur, want.rlim_max)
}

/// DMA-maps guest RAM (`len` bytes at GPA 0, mapped in this process at `host`) in
/// `container` at IOVA = GPA, after raising RLIMIT_MEMLOCK.
///
/// # Safety
/// `host..host + len` must stay mapped while the container lives.
pub unsafe fn map_guest_ram(
    container: &VfioContainer,
    host: u64,
    len: u64,
) -> Result<(), AssignmentError> {
    if len > MSI_WINDOW_GPA {
        return Err(AssignmentError::RamOverMsiWindow(len));
    }
    let (have, hard) = raise_memlock(len);
    // SAFETY: the caller keeps the mapping alive as long as the container.
    match unsafe { container.map_dma(0, len, host) } {
        Ok(()) => Ok(()),
        Err(VfioSysError::Ioctl { source, .. })
            if source.raw_os_error() == Some(libc::ENOMEM) && have < len + MEMLOCK_SLACK =>
        {
            Err(AssignmentError::Memlock {
                have,
                hard,
                need: len + MEMLOCK_SLACK,
            })
        }
        Err(e) => Err(AssignmentError::MapRam(e)),
    }
}

/// The assigned functions of a machine, by host address: the machine adds each as it plugs
/// it; a managed VMM lets one go on `pci-detach` while the guest runs.
#[derive(Debug, Clone, Default)]
pub struct AssignedFunctions(Arc<Mutex<Vec<(String, SharedFunction)>>>);

/// An assigned function, shared by the bus and [`AssignedFunctions`].
pub type SharedFunction = Arc<Mutex<VfioPciDevice>>;

impl AssignedFunctions {
    pub fn add(&self, bdf: &str, device: SharedFunction) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((bdf.to_owned(), device));
    }

    /// Releases function `bdf` ([`VfioPciDevice::release`]); false if the machine has none.
    pub fn release(&self, bdf: &str) -> bool {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match list.iter().find(|(b, _)| b == bdf) {
            Some((_, device)) => {
                device.lock().unwrap_or_else(|p| p.into_inner()).release();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked_before_any_path_is_built() {
        assert!(valid_bdf("0000:00:02.1"));
        assert!(!valid_bdf("0000:00:02.1/../../x"));
        assert!(!valid_bdf("00:02.1"));
        assert!(!valid_bdf("0000-00:02.1"));
        assert!(matches!(
            Assignment::by_address("../../dev/sda0"),
            Err(AssignmentError::BadAddress(_))
        ));
    }
}
