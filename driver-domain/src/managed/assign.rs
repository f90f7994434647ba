//! Direct assignment, the driver domain's half (after `xl pci-assignable-add`): the driver
//! domain owns the PF; on the toolstack's request it prepares a VF for a guest (SR-IOV
//! enabled with the NVMe secondary controllers online if it is not yet, the VF bound to
//! vfio-pci), opens the VF's VFIO group and hands the descriptor over, closing its own: the
//! guest's VMM then holds the only one (a VFIO group can be open only once, so nobody else can
//! take the VF meanwhile, the driver domain included). When the guest ends, the toolstack
//! says so; the driver domain resets the VF (function reset through sysfs) and can give it to
//! the next guest.
//!
//! The pool decides which guest gets which VF; the hardware work goes through
//! [`HardwareOps`]: sysfs directly when this driver domain runs unconfined, the privileged
//! hardware helper (`crate::hw::helper`) when it is confined.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use ipc::control::hardware::VfEnabling;

use crate::hw::ops::{DirectHardware, HardwareOps};
use crate::hw::pci::Bdf;

/// The owned PFs and which guest holds which VF.
pub struct VfPool {
    /// The hardware: sysfs directly, or the hardware helper of a confined driver domain.
    hw: Box<dyn HardwareOps>,
    owns: Vec<Bdf>,
    /// VF address -> the guest (domain id) holding it.
    held: BTreeMap<Bdf, u32>,
}

impl Default for VfPool {
    fn default() -> Self {
        VfPool::new(Box::new(DirectHardware::default()), &[])
    }
}

/// A VF handed over.
#[derive(Debug)]
pub struct HandedVf {
    pub address: Bdf,
    /// 1-based VF number on its PF.
    pub vf: u16,
    pub group: OwnedFd,
}

impl VfPool {
    pub fn new(hw: Box<dyn HardwareOps>, owns: &[String]) -> Self {
        Self {
            hw,
            owns: owns.iter().filter_map(|a| a.parse().ok()).collect(),
            held: BTreeMap::new(),
        }
    }

    /// Prepares VF `vf` (1-based) of `pf`, or the first VF no guest holds, for `frontend`.
    pub fn assign(&mut self, frontend: u32, pf: &str, vf: Option<u16>) -> Result<HandedVf, String> {
        let pf: Bdf = pf.parse().map_err(|e| format!("{e}"))?;
        if !self.owns.contains(&pf) {
            return Err(format!("{pf} is not owned by this driver domain"));
        }
        let state = self.hw.describe_pf(pf).map_err(|e| e.to_string())?;
        let vfs = if state.num_vfs == 0 {
            let how = VfEnabling::for_pf_driver(state.driver.as_deref());
            log::info!("{pf}: enabling its {} VFs ({how:?})", state.total_vfs);
            self.hw
                .enable_vfs(pf, state.total_vfs, how)
                .map_err(|e| e.to_string())?
        } else {
            state.vfs
        };
        let (index, address) = match vf {
            Some(n) => {
                let address = *usize::from(n)
                    .checked_sub(1)
                    .and_then(|i| vfs.get(i))
                    .ok_or_else(|| format!("{pf} has no VF {n} ({} enabled)", vfs.len()))?;
                if let Some(holder) = self.held.get(&address) {
                    return Err(format!("VF {n} ({address}) is held by domain {holder}"));
                }
                (n, address)
            }
            None => vfs
                .iter()
                .enumerate()
                .find(|(_, a)| !self.held.contains_key(a))
                .map(|(i, a)| (i as u16 + 1, *a))
                .ok_or_else(|| format!("every VF of {pf} is held by a guest"))?,
        };
        let group = self.hw.bind_vfio(address).map_err(|e| e.to_string())?;
        self.held.insert(address, frontend);
        log::info!(
            "VF {index} of {pf} ({address}, group {}) handed to domain {frontend}",
            group.number
        );
        Ok(HandedVf {
            address,
            vf: index,
            group: group.fd,
        })
    }

    /// Takes VF `address` back from `frontend`: function reset (the guest's VMM has closed
    /// the group, so nobody uses it). Returns whether the reset succeeded, and why not.
    pub fn release(
        &mut self,
        frontend: u32,
        address: &str,
    ) -> Result<(Bdf, Result<(), String>), String> {
        let address: Bdf = address.parse().map_err(|e| format!("{e}"))?;
        match self.held.get(&address) {
            Some(holder) if *holder == frontend => {}
            Some(holder) => {
                return Err(format!(
                    "{address} is held by domain {holder}, not {frontend}"
                ))
            }
            None => return Err(format!("{address} is held by no guest")),
        }
        self.held.remove(&address);
        let reset = self
            .hw
            .reset_vf(address)
            .map_err(|e| format!("function reset of {address}: {e}"));
        match &reset {
            Ok(()) => log::info!("{address}: reset and back from domain {frontend}"),
            Err(e) => log::error!("{address}: back from domain {frontend}, but {e}"),
        }
        Ok((address, reset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::pci::fake::FakeSysfs;

    fn pool() -> (FakeSysfs, VfPool) {
        let fake = FakeSysfs::new();
        fake.add_driver("nvme");
        fake.add_driver("vfio-pci");
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 1);
        fake.make_pf("0000:00:02.0", 2);
        fake.add_vf("0000:00:02.0", 0, "0000:00:02.1", 4);
        fake.add_vf("0000:00:02.0", 1, "0000:00:02.2", 5);
        let numvfs = fake
            .sysfs()
            .root()
            .join("bus/pci/devices/0000:00:02.0/sriov_numvfs");
        std::fs::write(numvfs, "2\n").unwrap();
        let hw = DirectHardware::new(fake.sysfs(), fake.dir.path().join("vfio"));
        let pool = VfPool::new(Box::new(hw), &["0000:00:02.0".into()]);
        (fake, pool)
    }

    #[test]
    fn only_owned_pfs_and_existing_vfs_are_assigned() {
        let (_fake, mut pool) = pool();
        let e = pool.assign(2, "0000:00:03.0", None).unwrap_err();
        assert!(e.contains("not owned"), "{e}");
        let e = pool.assign(2, "0000:00:02.0", Some(3)).unwrap_err();
        assert!(e.contains("has no VF 3"), "{e}");
        let e = pool.assign(2, "0000:00:02.0", Some(0)).unwrap_err();
        assert!(e.contains("has no VF 0"), "{e}");
        let e = pool.assign(2, "not-an-address", None).unwrap_err();
        assert!(!e.is_empty());
    }

    #[test]
    fn any_free_vf_goes_to_the_next_guest_with_its_group() {
        let (fake, mut pool) = pool();
        // The fake kernel binds nothing: the VFs are on vfio-pci already.
        fake.bind("0000:00:02.1", "vfio-pci");
        fake.bind("0000:00:02.2", "vfio-pci");
        fake.write("vfio/4", "group 4");
        fake.write("vfio/5", "group 5");
        let first = pool.assign(2, "0000:00:02.0", None).unwrap();
        assert_eq!(
            (first.vf, first.address.to_string()),
            (1, "0000:00:02.1".into())
        );
        let second = pool.assign(3, "0000:00:02.0", None).unwrap();
        assert_eq!(
            (second.vf, second.address.to_string()),
            (2, "0000:00:02.2".into())
        );
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(second.group), &mut text).unwrap();
        assert_eq!(text, "group 5");
        let e = pool.assign(4, "0000:00:02.0", None).unwrap_err();
        assert!(e.contains("every VF of 0000:00:02.0 is held"), "{e}");
        pool.release(2, "0000:00:02.1").unwrap().1.unwrap();
        assert_eq!(pool.assign(4, "0000:00:02.0", None).unwrap().vf, 1);
    }

    #[test]
    fn a_vf_is_released_only_by_its_holder() {
        let (_fake, mut pool) = pool();
        pool.held.insert("0000:00:02.1".parse().unwrap(), 2);
        let e = pool.assign(3, "0000:00:02.0", Some(1)).unwrap_err();
        assert!(e.contains("held by domain 2"), "{e}");
        let e = pool.release(3, "0000:00:02.1").unwrap_err();
        assert!(e.contains("held by domain 2, not 3"), "{e}");
        let e = pool.release(2, "0000:00:02.2").unwrap_err();
        assert!(e.contains("held by no guest"), "{e}");
        let (bdf, reset) = pool.release(2, "0000:00:02.1").unwrap();
        assert_eq!(bdf.to_string(), "0000:00:02.1");
        assert!(reset.is_ok(), "the fake function has a reset file");
        assert!(pool.held.is_empty());
        let e = pool.release(2, "0000:00:02.1").unwrap_err();
        assert!(e.contains("held by no guest"), "{e}");
    }
}
