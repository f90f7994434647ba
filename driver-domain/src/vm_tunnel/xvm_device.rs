//! The cross-VM device as the driver VM sees it (docs/driver-vm.md): a PCI function (vendor
//! 0x1af4, device 0x1130) whose BAR0 holds the doorbell registers and whose BAR2 holds what
//! dom0 mapped of the guests' memory. Found in sysfs, enabled, BAR0 mapped through its
//! `resource0` file and BAR2 opened as `resource2`, whose duplicates back the memory tables
//! handed to the vhost-user backend.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use log::info;
use thiserror::Error;

use super::mapping::{Mapping, MappingError};
use crate::hw::pci::{Bdf, PciError, Sysfs};

/// PCI vendor of the cross-VM device (Red Hat's virtio range, as ivshmem).
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device id ("splitvmm cross-VM device"; not ivshmem's 0x1110: the registers differ).
pub const DEVICE_ID: u16 = 0x1130;
/// BAR0 offset 0: this magic ("SVMX"), read-only.
pub const MAGIC: u32 = 0x5356_4d58;
/// BAR0 offset 4: the number of doorbells.
const COUNT_OFFSET: usize = 4;
/// BAR0 offset of doorbell 0; doorbell n is the 32-bit register at `DOORBELL_BASE + 4 * n`.
pub const DOORBELL_BASE: usize = 0x100;
/// Doorbells the device has at most.
pub const DOORBELLS_MAX: u32 = 256;
/// Doorbell index = channel * QUEUES_PER_CHANNEL + queue.
pub const QUEUES_PER_CHANNEL: u32 = 16;
/// BAR0's size.
const BAR0_LEN: usize = 4096;
/// BAR0 offset 8: how many regions dom0 maps in BAR2 now; reading it latches the table.
const REGIONS_OFFSET: usize = 8;
/// BAR0 offset of the latched region table: entry i (BAR2 offset, length; 64 bits each, as
/// two 32-bit words, low first) at `REGION_TABLE + 16 * i`.
const REGION_TABLE: usize = 0x800;
/// Entries the table holds.
pub const REGION_TABLE_ENTRIES: u32 = 128;

/// Why the device could not be set up or used.
#[derive(Debug, Error)]
pub enum XvmDeviceError {
    /// Listing PCI functions failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// No function with the device's ids.
    #[error("no cross-VM device ({VENDOR_ID:04x}:{DEVICE_ID:04x}) in {0}")]
    NotFound(PathBuf),
    /// Enabling the function or opening a BAR file failed.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Mapping BAR0 failed.
    #[error("BAR0: {0}")]
    Map(#[source] MappingError),
    /// BAR0 does not start with the magic: not the device this code drives.
    #[error("BAR0 magic {0:#010x}, expected {MAGIC:#010x}")]
    BadMagic(u32),
    /// A doorbell past the device's count.
    #[error("no doorbell {0} (the device has {1})")]
    NoSuchDoorbell(u32, u32),
    /// More regions than BAR0's table holds.
    #[error("BAR2 maps {0} regions, more than the {REGION_TABLE_ENTRIES} BAR0's table lists")]
    TooManyRegions(u32),
}

/// The doorbell registers (BAR0): a 4-byte write to doorbell n signals the eventfd dom0
/// bound to it (a guest's interrupt).
#[derive(Debug)]
pub struct Doorbells {
    bar0: Mapping,
    count: u32,
    rung: AtomicU64,
}

impl Doorbells {
    /// Maps BAR0 from `file` (its `resource0`) and checks its magic.
    pub fn map(file: &File) -> Result<Self, XvmDeviceError> {
        let bar0 = Mapping::new(file, 0, BAR0_LEN, true).map_err(XvmDeviceError::Map)?;
        let magic = bar0.read_u32(0).map_err(XvmDeviceError::Map)?;
        if magic != MAGIC {
            return Err(XvmDeviceError::BadMagic(magic));
        }
        let count = bar0
            .read_u32(COUNT_OFFSET)
            .map_err(XvmDeviceError::Map)?
            .min(DOORBELLS_MAX);
        Ok(Doorbells {
            bar0,
            count,
            rung: AtomicU64::new(0),
        })
    }

    /// The number of doorbells.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Rings doorbell `n`.
    pub fn ring(&self, n: u32) -> Result<(), XvmDeviceError> {
        if n >= self.count {
            return Err(XvmDeviceError::NoSuchDoorbell(n, self.count));
        }
        self.bar0
            .write_u32(DOORBELL_BASE + 4 * n as usize, 1)
            .map_err(XvmDeviceError::Map)?;
        self.rung.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Doorbell writes so far.
    pub fn rung(&self) -> u64 {
        self.rung.load(Ordering::Relaxed)
    }

    /// The regions dom0 maps in BAR2 now, (offset, length) in offset order: BAR0's region
    /// table, latched by reading its count.
    pub fn bar2_regions(&self) -> Result<Vec<(u64, u64)>, XvmDeviceError> {
        let word = |at: usize| self.bar0.read_u32(at).map_err(XvmDeviceError::Map);
        let count = word(REGIONS_OFFSET)?;
        if count > REGION_TABLE_ENTRIES {
            return Err(XvmDeviceError::TooManyRegions(count));
        }
        (0..count as usize)
            .map(|i| {
                let at = REGION_TABLE + 16 * i;
                let offset = u64::from(word(at)?) | u64::from(word(at + 4)?) << 32;
                let len = u64::from(word(at + 8)?) | u64::from(word(at + 12)?) << 32;
                Ok((offset, len))
            })
            .collect()
    }
}

/// The cross-VM device, set up.
#[derive(Debug)]
pub struct CrossVmDevice {
    bdf: Bdf,
    doorbells: Doorbells,
    shm: File,
    shm_len: u64,
}

impl CrossVmDevice {
    /// Finds the device in `sysfs`, enables it (memory decoding), maps BAR0 and opens BAR2.
    pub fn open(sysfs: &Sysfs) -> Result<Self, XvmDeviceError> {
        let bdf = sysfs
            .functions()?
            .into_iter()
            .find(|f| f.vendor == VENDOR_ID && f.device == DEVICE_ID)
            .map(|f| f.bdf)
            .ok_or_else(|| XvmDeviceError::NotFound(sysfs.root().join("bus/pci/devices")))?;
        let dir = sysfs.device_dir(bdf);
        let file_err = |path: PathBuf| move |source| XvmDeviceError::File { path, source };
        let enable = dir.join("enable");
        std::fs::write(&enable, "1").map_err(file_err(enable.clone()))?;
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(file_err(path))
        };
        let doorbells = Doorbells::map(&open("resource0")?)?;
        let shm = open("resource2")?;
        let shm_len = shm
            .metadata()
            .map_err(file_err(dir.join("resource2")))?
            .len();
        info!(
            "cross-VM device {bdf}: {} doorbells, shared memory (BAR2) {} MiB",
            doorbells.count(),
            shm_len >> 20
        );
        Ok(CrossVmDevice {
            bdf,
            doorbells,
            shm,
            shm_len,
        })
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The doorbell registers.
    pub fn doorbells(&self) -> &Doorbells {
        &self.doorbells
    }

    /// BAR2, the shared memory (its `resource2` file).
    pub fn shm(&self) -> &File {
        &self.shm
    }

    /// BAR2's size in bytes.
    pub fn shm_len(&self) -> u64 {
        self.shm_len
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hw::pci::fake::FakeSysfs;
    use std::os::unix::fs::FileExt;

    /// A fake sysfs with the cross-VM device at 0000:00:04.0 (and an unrelated function
    /// before it): `resource0` a 4 KiB file with the magic and `doorbells`, `resource2` a
    /// file of `shm_len` bytes.
    pub(crate) fn fake_device(doorbells: u32, shm_len: u64) -> FakeSysfs {
        let fake = FakeSysfs::new();
        fake.add_function("0000:00:02.0", 0x1b36, 0x0010, 0x010802, 1);
        fake.add_function("0000:00:04.0", VENDOR_ID, DEVICE_ID, 0x050000, 2);
        let dir = fake.dir.path().join("devices/pci0000:00/0000:00:04.0");
        let mut bar0 = vec![0u8; BAR0_LEN];
        bar0[..4].copy_from_slice(&MAGIC.to_le_bytes());
        bar0[4..8].copy_from_slice(&doorbells.to_le_bytes());
        std::fs::write(dir.join("resource0"), bar0).unwrap();
        let shm = File::create(dir.join("resource2")).unwrap();
        shm.set_len(shm_len).unwrap();
        std::fs::write(dir.join("enable"), "0").unwrap();
        fake
    }

    /// Doorbell `n`'s register in the fake device's BAR0 file.
    pub(crate) fn doorbell_register(fake: &FakeSysfs, n: u32) -> u32 {
        let f = File::open(
            fake.dir
                .path()
                .join("devices/pci0000:00/0000:00:04.0/resource0"),
        )
        .unwrap();
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, (DOORBELL_BASE + 4 * n as usize) as u64)
            .unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_device_is_found_enabled_and_its_doorbells_reach_bar0() {
        let fake = fake_device(256, 1 << 20);
        let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
        assert_eq!(dev.bdf().to_string(), "0000:00:04.0");
        assert_eq!(fake.read("devices/pci0000:00/0000:00:04.0/enable"), "1");
        assert_eq!(dev.shm_len(), 1 << 20);
        assert_eq!(dev.doorbells().count(), 256);
        dev.doorbells().ring(17).unwrap();
        assert_eq!(doorbell_register(&fake, 17), 1);
        assert_eq!(doorbell_register(&fake, 16), 0);
        assert_eq!(dev.doorbells().rung(), 1);
    }

    #[test]
    fn doorbells_past_the_count_are_refused() {
        let fake = fake_device(20, 1 << 20);
        let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
        assert!(matches!(
            dev.doorbells().ring(20),
            Err(XvmDeviceError::NoSuchDoorbell(20, 20))
        ));
        // A device claiming more than the design's 256 is held to 256.
        let fake = fake_device(10_000, 1 << 20);
        let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
        assert_eq!(dev.doorbells().count(), DOORBELLS_MAX);
        assert!(dev.doorbells().ring(DOORBELLS_MAX).is_err());
    }

    #[test]
    fn a_device_without_the_magic_or_no_device_is_refused() {
        let fake = fake_device(256, 1 << 20);
        fake.write(
            "devices/pci0000:00/0000:00:04.0/resource0",
            &"x".repeat(4096),
        );
        assert!(matches!(
            CrossVmDevice::open(&fake.sysfs()),
            Err(XvmDeviceError::BadMagic(_))
        ));
        let empty = FakeSysfs::new();
        assert!(matches!(
            CrossVmDevice::open(&empty.sysfs()),
            Err(XvmDeviceError::NotFound(_))
        ));
    }
}
