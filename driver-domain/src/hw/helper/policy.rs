//! What the hardware helper may touch: the PFs the host file gives the driver domain
//! (`[driver_domain] owns`, passed as `--owns`), and the VFs sysfs says are theirs. Addresses
//! arrive as text from the driver domain, which is not trusted: they are parsed strictly (a
//! canonical `DDDD:BB:DD.F`, so nothing like `../` ever reaches a path), and a VF is
//! accepted only if its `physfn` is an owned PF, the PF lists it among its `virtfn*`, and
//! every member of its IOMMU group is owned too (the group's descriptor reaches every member
//! bound to vfio-pci).

use super::super::pci::{Bdf, PciError, Sysfs};

/// Why a request is outside what the driver domain owns.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("malformed PCI address {0:?} (expected DDDD:BB:DD.F)")]
    BadAddress(String),
    #[error("{0} is not a PF the host file gives the driver domain")]
    NotOwned(Bdf),
    #[error("{0} is not a virtual function (no physfn)")]
    NotAVf(Bdf),
    #[error("{vf} is a VF of {pf}, which the host file does not give the driver domain")]
    ForeignPf { vf: Bdf, pf: Bdf },
    #[error("{vf} is not among the enabled VFs of {pf}")]
    NotListed { vf: Bdf, pf: Bdf },
    #[error("{vf} is in no IOMMU group")]
    NoGroup { vf: Bdf },
    #[error(
        "IOMMU group {group} of {vf} also holds {other}, which the driver domain does not own"
    )]
    ForeignGroupMember { vf: Bdf, group: u32, other: Bdf },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("{pf} has {enabled} VFs enabled; changing that to {requested} would take them from their guests")]
    AlreadyEnabled {
        pf: Bdf,
        enabled: u16,
        requested: u16,
    },
    #[error(transparent)]
    Sysfs(#[from] PciError),
}

/// The owned PFs.
#[derive(Debug, Clone)]
pub struct Ownership {
    owns: Vec<Bdf>,
}

/// Parses an address from a request.
fn parse(text: &str) -> Result<Bdf, PolicyError> {
    text.parse()
        .map_err(|_| PolicyError::BadAddress(text.chars().take(64).collect()))
}

impl Ownership {
    pub fn new(owns: Vec<Bdf>) -> Self {
        Ownership { owns }
    }

    /// `text` as an owned PF.
    pub fn owned_pf(&self, text: &str) -> Result<Bdf, PolicyError> {
        let pf = parse(text)?;
        if self.owns.contains(&pf) {
            Ok(pf)
        } else {
            Err(PolicyError::NotOwned(pf))
        }
    }

    /// `text` as an enabled VF of an owned PF.
    pub fn owned_vf(&self, sysfs: &Sysfs, text: &str) -> Result<Bdf, PolicyError> {
        let vf = parse(text)?;
        let pf = sysfs.function(vf)?.physfn.ok_or(PolicyError::NotAVf(vf))?;
        if !self.owns.contains(&pf) {
            return Err(PolicyError::ForeignPf { vf, pf });
        }
        if !sysfs.virtfns(pf)?.contains(&vf) {
            return Err(PolicyError::NotListed { vf, pf });
        }
        Ok(vf)
    }

    /// Checks that every member of `vf`'s IOMMU group is owned: an owned PF or a VF of one.
    pub fn check_group(&self, sysfs: &Sysfs, vf: Bdf) -> Result<(), PolicyError> {
        let group = sysfs
            .function(vf)?
            .iommu_group
            .ok_or(PolicyError::NoGroup { vf })?;
        for member in sysfs.iommu_group_members(group)? {
            let owned = self.owns.contains(&member.bdf)
                || member.physfn.is_some_and(|pf| self.owns.contains(&pf));
            if !owned {
                return Err(PolicyError::ForeignGroupMember {
                    vf,
                    group,
                    other: member.bdf,
                });
            }
        }
        Ok(())
    }
}
