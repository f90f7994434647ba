//! What the driver domain tells the store about the hardware it owns.
//!
//! At start-up, for each PCI function the toolstack says this domain owns, it publishes
//! `/local/domain/<id>/hardware/pci/dev-<n>/...` (store paths cannot hold ':' or '.', so the
//! address is a value, not a key): `address`, `vendor`, `device`, `class`, `driver`,
//! `iommu-group`, `sriov-total-vfs`, `sriov-num-vfs` and `state` ("present", or "missing: why").
//! `splitvmm devices` shows them.

use crate::hw::ops::HardwareOps;
use crate::hw::pci::{PciFunction, Sysfs};

use super::ManagedDriverDomain;

fn entries(f: &PciFunction) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("vendor", format!("{:04x}", f.vendor)),
        ("device", format!("{:04x}", f.device)),
        ("class", format!("{:06x}", f.class)),
        ("driver", f.driver.clone().unwrap_or_else(|| "none".into())),
        (
            "iommu-group",
            f.iommu_group
                .map_or_else(|| "none".into(), |g| g.to_string()),
        ),
        ("state", "present".into()),
    ];
    if let Some(sriov) = &f.sriov {
        out.push(("sriov-total-vfs", sriov.total_vfs.to_string()));
        out.push(("sriov-num-vfs", sriov.num_vfs.to_string()));
    }
    out
}

impl ManagedDriverDomain {
    /// Takes the owned functions (their VFs can be assigned to guests, through `hw`) and
    /// publishes them, read from `sysfs` (before this domain is confined). A function that
    /// cannot be read is reported as missing, with the reason; it fails nothing else.
    pub fn report_hardware(&mut self, sysfs: &Sysfs, owns: &[String], hw: Box<dyn HardwareOps>) {
        self.vfs = super::assign::VfPool::new(hw, owns);
        let base = format!("/local/domain/{}/hardware/pci", self.domid);
        for (n, address) in owns.iter().enumerate() {
            let dir = format!("{base}/dev-{n}");
            let found = address
                .parse()
                .map_err(|e| format!("{e}"))
                .and_then(|bdf| sysfs.function(bdf).map_err(|e| e.to_string()));
            let mut values = vec![("address", address.clone())];
            match found {
                Ok(function) => values.extend(entries(&function)),
                Err(reason) => {
                    log::warn!("owned function {address}: {reason}");
                    values.push(("state", format!("missing: {reason}")));
                }
            }
            for (key, value) in values {
                if let Err(e) = self.store.write(&format!("{dir}/{key}"), value.as_bytes()) {
                    log::error!("publishing {dir}/{key}: {e}");
                }
            }
        }
    }
}
