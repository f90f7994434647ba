//! PCI functions as sysfs shows them, and moving a function between drivers.
//!
//! Everything here goes through a [`Sysfs`] root (normally `/sys`), so the logic is tested
//! against a fake tree in a temporary directory. Binding uses `driver_override` followed by
//! `drivers_probe`: it works for virtual functions whose PF has `sriov_drivers_autoprobe` off,
//! and it never adds an ID to a driver's table (which would grab every matching device).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Errors of PCI discovery and driver binding.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("malformed PCI address {0:?} (expected DDDD:BB:DD.F, for example 0000:00:02.1)")]
    BadAddress(String),
    #[error("no PCI function {0} (no {1})")]
    NotFound(Bdf, PathBuf),
    #[error("no driver {driver:?} is loaded (no {path})")]
    NoSuchDriver { driver: String, path: PathBuf },
    #[error("{bdf}: {driver} refused to bind{hint}")]
    BindRefused {
        bdf: Bdf,
        driver: String,
        hint: String,
    },
    #[error("listing {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("{bdf}: reading {path}: {source}")]
    Read {
        bdf: Bdf,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{bdf}: {path} holds {value:?}, not a number")]
    Parse {
        bdf: Bdf,
        path: PathBuf,
        value: String,
    },
    #[error("{bdf}: writing {value:?} to {path}: {source}")]
    Write {
        bdf: Bdf,
        path: PathBuf,
        value: String,
        source: io::Error,
    },
}

/// A PCI function address, `domain:bus:device.function`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl FromStr for Bdf {
    type Err = PciError;

    fn from_str(s: &str) -> Result<Self, PciError> {
        let bad = || PciError::BadAddress(s.to_string());
        let hex = |part: &str, width: usize| -> Result<u32, PciError> {
            if part.len() != width || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(part, 16).map_err(|_| bad())
        };
        let (domain, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let device = hex(device, 2)?;
        let function = hex(function, 1)?;
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(Bdf {
            domain: hex(domain, 4)? as u16,
            bus: hex(bus, 2)? as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// SR-IOV state of a physical function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SriovState {
    pub total_vfs: u16,
    pub num_vfs: u16,
    pub drivers_autoprobe: bool,
}

/// One PCI function as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Class code, 24 bits (base class, subclass, programming interface).
    pub class: u32,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub iommu_group: Option<u32>,
    /// Present on SR-IOV capable physical functions.
    pub sriov: Option<SriovState>,
    /// The physical function, for a virtual function.
    pub physfn: Option<Bdf>,
}

/// Drivers that leave an IOMMU group viable for VFIO besides having no driver at all.
const VFIO_FRIENDLY_DRIVERS: &[&str] = &["vfio-pci", "pcieport"];

impl PciFunction {
    /// Whether a member of an IOMMU group bound like this keeps the group usable by VFIO.
    pub fn leaves_group_viable(&self) -> bool {
        self.driver
            .as_deref()
            .is_none_or(|d| VFIO_FRIENDLY_DRIVERS.contains(&d))
    }
}

/// How long an unbind may take to show up in sysfs.
const BIND_SETTLE: Duration = Duration::from_secs(1);
/// How long a bound driver may take to appear after `drivers_probe`.
const PROBE_GRACE: Duration = Duration::from_millis(500);

/// A sysfs tree (`/sys` on a real system).
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/sys")
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/bus/pci/devices/<bdf>`.
    pub fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf.to_string())
    }

    fn driver_dir(&self, driver: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(driver)
    }

    /// Fails with [`PciError::NotFound`] unless the function exists.
    pub fn check_exists(&self, bdf: Bdf) -> Result<PathBuf, PciError> {
        let dir = self.device_dir(bdf);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(PciError::NotFound(bdf, dir))
        }
    }

    /// Every PCI function, sorted by address.
    pub fn functions(&self) -> Result<Vec<PciFunction>, PciError> {
        let dir = self.root.join("bus/pci/devices");
        let entries = fs::read_dir(&dir).map_err(|source| PciError::List {
            path: dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            // Entries that are not function addresses are not functions; skip them.
            if let Some(bdf) = name.to_str().and_then(|n| n.parse::<Bdf>().ok()) {
                out.push(self.function(bdf)?);
            }
        }
        out.sort_by_key(|f| f.bdf);
        Ok(out)
    }

    /// One function's identity, driver, IOMMU group and SR-IOV state.
    pub fn function(&self, bdf: Bdf) -> Result<PciFunction, PciError> {
        let dir = self.check_exists(bdf)?;
        let sriov = if dir.join("sriov_totalvfs").exists() {
            Some(SriovState {
                total_vfs: read_num(bdf, &dir.join("sriov_totalvfs"))? as u16,
                num_vfs: read_num(bdf, &dir.join("sriov_numvfs"))? as u16,
                drivers_autoprobe: read_num(bdf, &dir.join("sriov_drivers_autoprobe"))
                    .map(|v| v != 0)
                    .unwrap_or(true),
            })
        } else {
            None
        };
        Ok(PciFunction {
            bdf,
            vendor: read_num(bdf, &dir.join("vendor"))? as u16,
            device: read_num(bdf, &dir.join("device"))? as u16,
            class: read_num(bdf, &dir.join("class"))? as u32,
            driver: link_name(&dir.join("driver")),
            driver_override: read_text(bdf, &dir.join("driver_override"))
                .ok()
                .filter(|s| !s.is_empty() && s != "(null)"),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
            sriov,
            physfn: link_name(&dir.join("physfn")).and_then(|p| p.parse().ok()),
        })
    }

    /// The virtual functions of a PF, in VF order (`virtfn0`, `virtfn1`, ...).
    pub fn virtfns(&self, pf: Bdf) -> Result<Vec<Bdf>, PciError> {
        let dir = self.check_exists(pf)?;
        let mut out = Vec::new();
        for i in 0.. {
            match link_name(&dir.join(format!("virtfn{i}"))) {
                Some(name) => out.push(name.parse()?),
                None => break,
            }
        }
        Ok(out)
    }

    /// The functions in IOMMU group `group`.
    pub fn iommu_group_members(&self, group: u32) -> Result<Vec<PciFunction>, PciError> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| PciError::List {
            path: dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if let Some(bdf) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.push(self.function(bdf)?);
            }
        }
        out.sort_by_key(|f| f.bdf);
        Ok(out)
    }

    /// Binds `bdf` to `driver` (driver_override + drivers_probe), unbinding its current
    /// driver first. On refusal the previous driver is restored and the error says why.
    pub fn bind(&self, bdf: Bdf, driver: &str) -> Result<(), PciError> {
        let before = self.function(bdf)?;
        if before.driver.as_deref() == Some(driver) {
            return Ok(());
        }
        let driver_dir = self.driver_dir(driver);
        if !driver_dir.is_dir() {
            return Err(PciError::NoSuchDriver {
                driver: driver.to_string(),
                path: driver_dir,
            });
        }
        self.detach(bdf, &before)?;
        self.set_override(bdf, driver)?;
        self.probe(bdf)?;
        if self.wait_driver(bdf, Some(driver)) {
            return Ok(());
        }
        let mut hint = String::new();
        if let Some(s) = before
            .sriov
            .filter(|s| s.num_vfs > 0 && driver == "vfio-pci")
        {
            hint = format!(
                ": a PF with SR-IOV enabled ({} VFs) cannot be bound to vfio-pci, disable its VFs first",
                s.num_vfs
            );
        }
        if hint.is_empty() {
            hint = ": its probe failed (the kernel log says why)".to_string();
        }
        // Give the function back to where it was, best effort: the refusal is the error.
        match &before.driver {
            Some(old) => {
                if self.set_override(bdf, old).is_ok()
                    && self.probe(bdf).is_ok()
                    && !self.wait_driver(bdf, Some(old))
                {
                    log::warn!("{bdf}: could not give it back to {old}");
                }
                let _ = self.clear_override(bdf);
            }
            None => {
                let _ = self.clear_override(bdf);
            }
        }
        Err(PciError::BindRefused {
            bdf,
            driver: driver.to_string(),
            hint,
        })
    }

    /// Unbinds `bdf` from its driver and clears its override: no driver owns it afterwards.
    pub fn unbind(&self, bdf: Bdf) -> Result<(), PciError> {
        let before = self.function(bdf)?;
        self.detach(bdf, &before)?;
        self.clear_override(bdf)
    }

    fn detach(&self, bdf: Bdf, before: &PciFunction) -> Result<(), PciError> {
        if let Some(old) = &before.driver {
            write_value(bdf, &self.driver_dir(old).join("unbind"), &bdf.to_string())?;
            if !self.wait_driver(bdf, None) {
                return Err(PciError::Write {
                    bdf,
                    path: self.driver_dir(old).join("unbind"),
                    value: bdf.to_string(),
                    source: io::Error::new(io::ErrorKind::TimedOut, "the driver stayed bound"),
                });
            }
        }
        Ok(())
    }

    fn set_override(&self, bdf: Bdf, driver: &str) -> Result<(), PciError> {
        write_value(bdf, &self.device_dir(bdf).join("driver_override"), driver)
    }

    fn clear_override(&self, bdf: Bdf) -> Result<(), PciError> {
        write_value(bdf, &self.device_dir(bdf).join("driver_override"), "\n")
    }

    fn probe(&self, bdf: Bdf) -> Result<(), PciError> {
        write_value(
            bdf,
            &self.root.join("bus/pci/drivers_probe"),
            &bdf.to_string(),
        )
    }

    /// Waits until the function's driver is `want`; false on timeout.
    ///
    /// `drivers_probe` and `unbind` act synchronously; the wait only covers a driver that
    /// probes asynchronously, so a refused probe costs [`PROBE_GRACE`], not more.
    fn wait_driver(&self, bdf: Bdf, want: Option<&str>) -> bool {
        let timeout = if want.is_some() {
            PROBE_GRACE
        } else {
            BIND_SETTLE
        };
        let deadline = Instant::now() + timeout;
        loop {
            if link_name(&self.device_dir(bdf).join("driver")).as_deref() == want {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The last path component of a symlink's target, if the link exists.
fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

fn read_text(bdf: Bdf, path: &Path) -> Result<String, PciError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| PciError::Read {
            bdf,
            path: path.to_path_buf(),
            source,
        })
}

/// Reads a decimal or `0x` hexadecimal number.
pub(crate) fn read_num(bdf: Bdf, path: &Path) -> Result<u64, PciError> {
    let text = read_text(bdf, path)?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| PciError::Parse {
        bdf,
        path: path.to_path_buf(),
        value: text,
    })
}

pub(crate) fn write_value(bdf: Bdf, path: &Path, value: &str) -> Result<(), PciError> {
    // sysfs attributes take one write; OpenOptions without create so a missing attribute is
    // reported, not invented.
    let result = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| io::Write::write_all(&mut f, value.as_bytes()));
    result.map_err(|source| PciError::Write {
        bdf,
        path: path.to_path_buf(),
        value: value.trim().to_string(),
        source,
    })
}

#[cfg(any(test, feature = "fake-sysfs"))]
pub mod fake {
    //! A fake sysfs tree for tests (the `fake-sysfs` feature lends it to other crates' tests).
    #![allow(clippy::unwrap_used)] // a test fixture: a failure is the test's
    use super::*;
    use std::os::unix::fs::symlink;

    pub struct FakeSysfs {
        pub dir: tempfile::TempDir,
    }

    impl Default for FakeSysfs {
        fn default() -> Self {
            FakeSysfs::new()
        }
    }

    impl FakeSysfs {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for d in ["bus/pci/devices", "bus/pci/drivers", "devices/pci0000:00"] {
                fs::create_dir_all(dir.path().join(d)).unwrap();
            }
            fs::write(dir.path().join("bus/pci/drivers_probe"), "").unwrap();
            FakeSysfs { dir }
        }

        pub fn sysfs(&self) -> Sysfs {
            Sysfs::new(self.dir.path())
        }

        pub fn add_driver(&self, name: &str) {
            let d = self.dir.path().join("bus/pci/drivers").join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("bind"), "").unwrap();
            fs::write(d.join("unbind"), "").unwrap();
        }

        /// Adds a function; `group` puts it in an IOMMU group.
        pub fn add_function(&self, bdf: &str, vendor: u16, device: u16, class: u32, group: u32) {
            let real = self.dir.path().join("devices/pci0000:00").join(bdf);
            fs::create_dir_all(&real).unwrap();
            fs::write(real.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
            fs::write(real.join("device"), format!("0x{device:04x}\n")).unwrap();
            fs::write(real.join("class"), format!("0x{class:06x}\n")).unwrap();
            fs::write(real.join("driver_override"), "(null)\n").unwrap();
            fs::write(real.join("reset"), "").unwrap();
            symlink(&real, self.dir.path().join("bus/pci/devices").join(bdf)).unwrap();
            let g = self
                .dir
                .path()
                .join("kernel/iommu_groups")
                .join(group.to_string());
            fs::create_dir_all(g.join("devices")).unwrap();
            symlink(&real, g.join("devices").join(bdf)).unwrap();
            symlink(&g, real.join("iommu_group")).unwrap();
        }

        pub fn make_pf(&self, bdf: &str, total: u16) {
            let real = self.dir.path().join("devices/pci0000:00").join(bdf);
            fs::write(real.join("sriov_totalvfs"), format!("{total}\n")).unwrap();
            fs::write(real.join("sriov_numvfs"), "0\n").unwrap();
            fs::write(real.join("sriov_drivers_autoprobe"), "1\n").unwrap();
        }

        pub fn add_vf(&self, pf: &str, index: u32, vf: &str, group: u32) {
            self.add_function(vf, 0x1b36, 0x0010, 0x010802, group);
            let root = self.dir.path().join("devices/pci0000:00");
            symlink(root.join(vf), root.join(pf).join(format!("virtfn{index}"))).unwrap();
            symlink(root.join(pf), root.join(vf).join("physfn")).unwrap();
        }

        pub fn bind(&self, bdf: &str, driver: &str) {
            let real = self.dir.path().join("devices/pci0000:00").join(bdf);
            let _ = fs::remove_file(real.join("driver"));
            symlink(
                self.dir.path().join("bus/pci/drivers").join(driver),
                real.join("driver"),
            )
            .unwrap();
        }

        /// Writes `text` to `rel` under the tree, making its directory if needed.
        pub fn write(&self, rel: &str, text: &str) {
            let path = self.dir.path().join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(path, text).unwrap();
        }

        pub fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.dir.path().join(rel)).unwrap()
        }

        /// The hardware-helper fixture: an owned NVMe PF `0000:00:02.0` (group 1) with two VFs
        /// enabled (`.1` on vfio-pci in group 4, `.2` unbound in group 5) and a foreign NVMe PF
        /// `0000:00:03.0` (group 2) with one VF (`.1` on vfio-pci, group 6); `vfio/N` are plain
        /// files naming their group, standing in for `/dev/vfio/N`.
        pub fn owned_and_foreign_pfs() -> FakeSysfs {
            let fake = FakeSysfs::new();
            fake.add_driver("nvme");
            fake.add_driver("vfio-pci");
            for (pf, group) in [("0000:00:02.0", 1), ("0000:00:03.0", 2)] {
                fake.add_function(pf, 0x1b36, 0x0010, 0x010802, group);
                fake.make_pf(pf, 2);
                fake.bind(pf, "nvme");
            }
            fake.add_vf("0000:00:02.0", 0, "0000:00:02.1", 4);
            fake.add_vf("0000:00:02.0", 1, "0000:00:02.2", 5);
            fake.add_vf("0000:00:03.0", 0, "0000:00:03.1", 6);
            fake.bind("0000:00:02.1", "vfio-pci");
            fake.bind("0000:00:03.1", "vfio-pci");
            fake.write("bus/pci/devices/0000:00:02.0/sriov_numvfs", "2\n");
            fake.write("bus/pci/devices/0000:00:03.0/sriov_numvfs", "1\n");
            for group in [4, 5, 6] {
                fake.write(&format!("vfio/{group}"), &format!("group {group}"));
            }
            fake
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSysfs;
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn bdf_parses_and_prints() {
        let b = bdf("0000:00:02.1");
        assert_eq!((b.domain, b.bus, b.device, b.function), (0, 0, 2, 1));
        assert_eq!(b.to_string(), "0000:00:02.1");
        assert_eq!(bdf("abcd:ff:1f.7").to_string(), "abcd:ff:1f.7");
        for bad in [
            "",
            "00:02.1",
            "0000:00:02",
            "0000:00:20.0",
            "0000:00:02.8",
            "0000:0g:02.0",
            "0000:00:02.1x",
            "00000:00:02.1",
            "+000:00:02.1",
        ] {
            assert!(
                matches!(bad.parse::<Bdf>(), Err(PciError::BadAddress(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn discovers_functions_drivers_groups_and_sriov() {
        let fake = FakeSysfs::new();
        fake.add_driver("nvme");
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 3);
        fake.make_pf("0000:00:02.0", 2);
        fake.bind("0000:00:02.0", "nvme");
        fake.add_vf("0000:00:02.0", 0, "0000:00:02.1", 7);
        fake.add_function("0000:00:1f.0", 0x8086, 0x2918, 0x060100, 5);
        let sysfs = fake.sysfs();
        let all = sysfs.functions().unwrap();
        assert_eq!(all.len(), 3);
        let pf = &all[0];
        assert_eq!(pf.bdf, bdf("0000:00:02.0"));
        assert_eq!((pf.vendor, pf.device, pf.class), (0x1b36, 0x0010, 0x010802));
        assert_eq!(pf.driver.as_deref(), Some("nvme"));
        assert_eq!(pf.driver_override, None);
        assert_eq!(pf.iommu_group, Some(3));
        assert_eq!(
            pf.sriov,
            Some(SriovState {
                total_vfs: 2,
                num_vfs: 0,
                drivers_autoprobe: true
            })
        );
        let vf = &all[1];
        assert_eq!(vf.physfn, Some(pf.bdf));
        assert_eq!(vf.sriov, None);
        assert_eq!(vf.driver, None);
        assert_eq!(sysfs.virtfns(pf.bdf).unwrap(), vec![vf.bdf]);
        let members = sysfs.iommu_group_members(7).unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].bdf, vf.bdf);
    }

    #[test]
    fn missing_function_and_driver_are_precise_errors() {
        let fake = FakeSysfs::new();
        fake.add_function("0000:00:03.0", 0x1af4, 0x1000, 0x020000, 4);
        let sysfs = fake.sysfs();
        let err = sysfs.function(bdf("0000:00:09.0")).unwrap_err();
        assert!(matches!(err, PciError::NotFound(b, _) if b == bdf("0000:00:09.0")));
        assert!(err.to_string().contains("no PCI function 0000:00:09.0"));
        let err = sysfs.bind(bdf("0000:00:03.0"), "vfio-pci").unwrap_err();
        assert!(matches!(err, PciError::NoSuchDriver { ref driver, .. } if driver == "vfio-pci"));
    }

    #[test]
    fn bind_writes_override_and_probe_then_reports_refusal() {
        // The fake kernel never binds anything, so the bind must be reported as refused, after
        // the old driver was unbound, and the override must be cleared again.
        let fake = FakeSysfs::new();
        fake.add_driver("nvme");
        fake.add_driver("vfio-pci");
        fake.add_function("0000:00:02.1", 0x1b36, 0x0010, 0x010802, 7);
        let sysfs = fake.sysfs();
        let err = sysfs.bind(bdf("0000:00:02.1"), "vfio-pci").unwrap_err();
        assert!(
            matches!(err, PciError::BindRefused { ref driver, .. } if driver == "vfio-pci"),
            "{err}"
        );
        assert_eq!(fake.read("bus/pci/drivers_probe"), "0000:00:02.1");
        assert_eq!(
            fake.read("bus/pci/devices/0000:00:02.1/driver_override"),
            "\n"
        );
    }

    #[test]
    fn bind_to_current_driver_is_a_no_op_and_unbind_writes_unbind() {
        let fake = FakeSysfs::new();
        fake.add_driver("nvme");
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 3);
        fake.bind("0000:00:02.0", "nvme");
        let sysfs = fake.sysfs();
        sysfs.bind(bdf("0000:00:02.0"), "nvme").unwrap();
        assert_eq!(fake.read("bus/pci/drivers_probe"), "");
        // The fake driver stays bound (no kernel), so unbind times out with a precise error
        // after writing the address to the driver's unbind file.
        let err = sysfs.unbind(bdf("0000:00:02.0")).unwrap_err();
        assert!(err.to_string().contains("the driver stayed bound"), "{err}");
        assert_eq!(fake.read("bus/pci/drivers/nvme/unbind"), "0000:00:02.0");
    }

    #[test]
    fn viability_of_group_members() {
        let fake = FakeSysfs::new();
        fake.add_driver("serial");
        fake.add_driver("vfio-pci");
        fake.add_function("0000:00:05.0", 0x1b36, 0x0002, 0x070002, 9);
        fake.add_function("0000:00:05.1", 0x1b36, 0x0005, 0x00ff00, 9);
        let sysfs = fake.sysfs();
        assert!(sysfs
            .iommu_group_members(9)
            .unwrap()
            .iter()
            .all(PciFunction::leaves_group_viable));
        fake.bind("0000:00:05.0", "serial");
        fake.bind("0000:00:05.1", "vfio-pci");
        let members = sysfs.iommu_group_members(9).unwrap();
        assert!(!members[0].leaves_group_viable());
        assert!(members[1].leaves_group_viable());
    }
}
