//! SR-IOV physical function management: enabling and disabling VFs through sysfs and, for an
//! NVMe PF, the Virtualization Management sequence that gives each secondary controller its
//! queue and interrupt resources and brings it online.
//!
//! The PF stays bound to the kernel `nvme` driver: its admin queue is reached through the
//! passthrough ioctl, and `vfio-pci` could not take a PF with VFs anyway without a VF token.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::nvme_admin::{NvmeAdmin, NvmeAdminError, ResourceType, VirtAction};
use super::pci::{write_value, Bdf, PciError, Sysfs};

/// Errors of SR-IOV management.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("{0} is not an SR-IOV physical function (no sriov_totalvfs)")]
    NotAPf(Bdf),
    #[error("{pf} supports at most {total} VFs, {requested} requested")]
    TooManyVfs { pf: Bdf, requested: u16, total: u16 },
    #[error("{0} has no driver; the PF's driver enables VFs, bind one first")]
    NoPfDriver(Bdf),
    #[error("{pf}: its driver {driver} refused {requested} VFs: {source}")]
    DriverRefused {
        pf: Bdf,
        driver: String,
        requested: u16,
        source: io::Error,
    },
    #[error("{pf}: {expected} VFs did not appear within {timeout:?} (found {found})")]
    VfsMissing {
        pf: Bdf,
        expected: u16,
        found: usize,
        timeout: Duration,
    },
    #[error("{0} is not bound to the nvme driver (no nvme/ directory)")]
    NotNvme(Bdf),
    #[error("{pf}: controller {dev} did not come back live after the reset within {timeout:?}")]
    ResetTimeout {
        pf: Bdf,
        dev: String,
        timeout: Duration,
    },
    #[error(transparent)]
    Admin(#[from] NvmeAdminError),
    #[error("{pf}: no secondary controller for VF {vf_number}")]
    NoSecondary { pf: Bdf, vf_number: u16 },
    #[error("{pf}: secondary controller {cntlid} still offline after Online")]
    StillOffline { pf: Bdf, cntlid: u16 },
}

/// How long VFs may take to appear or disappear after `sriov_numvfs` was written.
const VF_SETTLE: Duration = Duration::from_secs(5);
/// How long an NVMe controller may take to be live again after a function reset.
const RESET_SETTLE: Duration = Duration::from_secs(10);

/// Sets the number of enabled VFs of `pf` to `num` and returns their addresses.
///
/// The kernel only accepts a change from or to zero, so a different nonzero count goes
/// through zero. `autoprobe` is written to `sriov_drivers_autoprobe` first: with it off, no
/// driver takes a new VF until one is named by `driver_override`.
pub fn set_num_vfs(
    sysfs: &Sysfs,
    pf: Bdf,
    num: u16,
    autoprobe: bool,
) -> Result<Vec<Bdf>, SriovError> {
    let f = sysfs.function(pf)?;
    let state = f.sriov.ok_or(SriovError::NotAPf(pf))?;
    if num > state.total_vfs {
        return Err(SriovError::TooManyVfs {
            pf,
            requested: num,
            total: state.total_vfs,
        });
    }
    let Some(driver) = f.driver else {
        return Err(SriovError::NoPfDriver(pf));
    };
    let dir = sysfs.device_dir(pf);
    if state.num_vfs == num {
        return Ok(sysfs.virtfns(pf)?);
    }
    let write_num = |n: u16| -> Result<(), SriovError> {
        fs::write(dir.join("sriov_numvfs"), format!("{n}\n")).map_err(|source| {
            SriovError::DriverRefused {
                pf,
                driver: driver.clone(),
                requested: n,
                source,
            }
        })
    };
    if state.num_vfs != 0 {
        write_num(0)?;
        wait_vfs(sysfs, pf, 0)?;
    }
    if num == 0 {
        return Ok(Vec::new());
    }
    write_value(
        pf,
        &dir.join("sriov_drivers_autoprobe"),
        if autoprobe { "1" } else { "0" },
    )?;
    write_num(num)?;
    wait_vfs(sysfs, pf, num)
}

/// Waits until the PF lists exactly `num` VFs that exist as functions.
fn wait_vfs(sysfs: &Sysfs, pf: Bdf, num: u16) -> Result<Vec<Bdf>, SriovError> {
    let deadline = Instant::now() + VF_SETTLE;
    loop {
        let vfs = sysfs.virtfns(pf)?;
        if vfs.len() == usize::from(num) && vfs.iter().all(|v| sysfs.check_exists(*v).is_ok()) {
            return Ok(vfs);
        }
        if Instant::now() >= deadline {
            return Err(SriovError::VfsMissing {
                pf,
                expected: num,
                found: vfs.len(),
                timeout: VF_SETTLE,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One step of the NVMe sequence, for the caller's log.
pub type StepLog<'a> = &'a mut dyn FnMut(&str);

/// An NVMe physical function bound to the kernel nvme driver.
pub struct NvmePf<'a> {
    sysfs: &'a Sysfs,
    pf: Bdf,
    ctrl: String,
    admin: NvmeAdmin,
}

impl<'a> NvmePf<'a> {
    /// Finds the PF's controller (`nvmeN`) and opens `/dev/nvmeN`.
    pub fn open(sysfs: &'a Sysfs, pf: Bdf) -> Result<Self, SriovError> {
        let ctrl = nvme_controller_name(sysfs, pf)?;
        let admin = NvmeAdmin::open(&PathBuf::from("/dev").join(&ctrl))?;
        Ok(NvmePf {
            sysfs,
            pf,
            ctrl,
            admin,
        })
    }

    pub fn admin(&self) -> &NvmeAdmin {
        &self.admin
    }

    /// Creates `num` VFs and brings their secondary controllers online, each with `vq` queue
    /// and `vi` interrupt resources. The VFs are left without a driver (autoprobe off).
    pub fn enable_vfs(
        &self,
        num: u16,
        vq: u16,
        vi: u16,
        log: StepLog<'_>,
    ) -> Result<Vec<Bdf>, SriovError> {
        let f = self.sysfs.function(self.pf)?;
        let state = f.sriov.ok_or(SriovError::NotAPf(self.pf))?;
        if num > state.total_vfs {
            return Err(SriovError::TooManyVfs {
                pf: self.pf,
                requested: num,
                total: state.total_vfs,
            });
        }
        if state.num_vfs != 0 {
            self.disable_vfs(log)?;
        }
        let caps = self.admin.primary_caps()?;
        log(&format!(
            "primary controller {}: VQ flexible {} (primary {}), VI flexible {} (primary {})",
            caps.cntlid,
            caps.vq_flexible_total,
            caps.vq_flexible_primary,
            caps.vi_flexible_total,
            caps.vi_flexible_primary
        ));
        for rt in [ResourceType::Vq, ResourceType::Vi] {
            self.admin
                .virt_mgmt(caps.cntlid, rt, VirtAction::PrimaryFlexibleAllocation, 0)?;
            log(&format!(
                "released the primary's flexible {rt:?} resources: ok"
            ));
        }
        self.reset()?;
        log(&format!(
            "function reset of {}: {} live again",
            self.pf, self.ctrl
        ));
        let vfs = set_num_vfs(self.sysfs, self.pf, num, false)?;
        log(&format!(
            "sriov_numvfs={num} (autoprobe off): {}",
            vfs.iter().map(Bdf::to_string).collect::<Vec<_>>().join(" ")
        ));
        let secondaries = self.admin.secondary_controllers()?;
        for vf_number in 1..=num {
            let sc = secondaries
                .iter()
                .find(|s| s.vf_number == vf_number)
                .ok_or(SriovError::NoSecondary {
                    pf: self.pf,
                    vf_number,
                })?;
            self.admin
                .virt_mgmt(sc.cntlid, ResourceType::Vi, VirtAction::SecondaryAssign, vi)?;
            self.admin
                .virt_mgmt(sc.cntlid, ResourceType::Vq, VirtAction::SecondaryAssign, vq)?;
            self.admin
                .virt_mgmt(sc.cntlid, ResourceType::Vq, VirtAction::SecondaryOnline, 0)?;
            log(&format!(
                "secondary controller {} (VF {vf_number}): assigned {vq} VQ + {vi} VI, online: ok",
                sc.cntlid
            ));
        }
        for sc in self.admin.secondary_controllers()? {
            if (1..=num).contains(&sc.vf_number) && !sc.online {
                return Err(SriovError::StillOffline {
                    pf: self.pf,
                    cntlid: sc.cntlid,
                });
            }
        }
        Ok(vfs)
    }

    /// Takes every secondary controller offline and disables the VFs.
    pub fn disable_vfs(&self, log: StepLog<'_>) -> Result<(), SriovError> {
        for sc in self.admin.secondary_controllers()? {
            if sc.online {
                self.admin.virt_mgmt(
                    sc.cntlid,
                    ResourceType::Vq,
                    VirtAction::SecondaryOffline,
                    0,
                )?;
                log(&format!("secondary controller {} offline: ok", sc.cntlid));
            }
        }
        set_num_vfs(self.sysfs, self.pf, 0, false)?;
        log("sriov_numvfs=0");
        Ok(())
    }

    /// Function-level reset through sysfs; waits until the controller is live again.
    fn reset(&self) -> Result<(), SriovError> {
        write_value(self.pf, &self.sysfs.device_dir(self.pf).join("reset"), "1")?;
        let state = self
            .sysfs
            .root()
            .join("class/nvme")
            .join(&self.ctrl)
            .join("state");
        let deadline = Instant::now() + RESET_SETTLE;
        loop {
            if fs::read_to_string(&state).is_ok_and(|s| s.trim() == "live") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SriovError::ResetTimeout {
                    pf: self.pf,
                    dev: self.ctrl.clone(),
                    timeout: RESET_SETTLE,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The kernel nvme controller (`nvmeN`) of a function bound to the nvme driver.
pub fn nvme_controller_name(sysfs: &Sysfs, bdf: Bdf) -> Result<String, SriovError> {
    let dir = sysfs.check_exists(bdf)?.join("nvme");
    let entries = fs::read_dir(&dir).map_err(|_| SriovError::NotNvme(bdf))?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .find(|n| n.starts_with("nvme"))
        .ok_or(SriovError::NotNvme(bdf))
}

#[cfg(test)]
mod tests {
    use super::super::pci::fake::FakeSysfs;
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    fn fake_pf() -> FakeSysfs {
        let fake = FakeSysfs::new();
        fake.add_driver("nvme");
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 3);
        fake.make_pf("0000:00:02.0", 2);
        fake.add_function("0000:00:03.0", 0x1af4, 0x1000, 0x020000, 4);
        fake
    }

    #[test]
    fn refuses_too_many_vfs_before_touching_sysfs() {
        let fake = fake_pf();
        fake.bind("0000:00:02.0", "nvme");
        let err = set_num_vfs(&fake.sysfs(), bdf("0000:00:02.0"), 3, false).unwrap_err();
        assert!(
            matches!(
                err,
                SriovError::TooManyVfs {
                    requested: 3,
                    total: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            fake.read("bus/pci/devices/0000:00:02.0/sriov_numvfs"),
            "0\n"
        );
    }

    #[test]
    fn refuses_a_function_without_sriov_or_without_driver() {
        let fake = fake_pf();
        let sysfs = fake.sysfs();
        let err = set_num_vfs(&sysfs, bdf("0000:00:03.0"), 1, false).unwrap_err();
        assert!(matches!(err, SriovError::NotAPf(_)), "{err}");
        let err = set_num_vfs(&sysfs, bdf("0000:00:02.0"), 1, false).unwrap_err();
        assert!(matches!(err, SriovError::NoPfDriver(_)), "{err}");
        let err = set_num_vfs(&sysfs, bdf("0000:00:07.0"), 1, false).unwrap_err();
        assert!(
            matches!(err, SriovError::Pci(PciError::NotFound(..))),
            "{err}"
        );
    }

    #[test]
    fn writes_autoprobe_and_numvfs_then_waits_for_the_vfs() {
        let fake = fake_pf();
        fake.bind("0000:00:02.0", "nvme");
        // The fake kernel creates the VFs before the call, as the real one does during the write.
        fake.add_vf("0000:00:02.0", 0, "0000:00:02.1", 7);
        let vfs = set_num_vfs(&fake.sysfs(), bdf("0000:00:02.0"), 1, false).unwrap();
        assert_eq!(vfs, vec![bdf("0000:00:02.1")]);
        assert_eq!(
            fake.read("bus/pci/devices/0000:00:02.0/sriov_numvfs"),
            "1\n"
        );
        assert_eq!(
            fake.read("bus/pci/devices/0000:00:02.0/sriov_drivers_autoprobe"),
            "0"
        );
    }

    #[test]
    fn missing_vfs_time_out_with_a_count() {
        let fake = fake_pf();
        fake.bind("0000:00:02.0", "nvme");
        let err = set_num_vfs(&fake.sysfs(), bdf("0000:00:02.0"), 2, true).unwrap_err();
        assert!(
            matches!(
                err,
                SriovError::VfsMissing {
                    expected: 2,
                    found: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn finds_the_nvme_controller_or_says_it_is_not_nvme() {
        let fake = fake_pf();
        let sysfs = fake.sysfs();
        let err = nvme_controller_name(&sysfs, bdf("0000:00:02.0")).unwrap_err();
        assert!(matches!(err, SriovError::NotNvme(_)), "{err}");
        fs::create_dir_all(sysfs.device_dir(bdf("0000:00:02.0")).join("nvme/nvme0")).unwrap();
        assert_eq!(
            nvme_controller_name(&sysfs, bdf("0000:00:02.0")).unwrap(),
            "nvme0"
        );
    }
}
