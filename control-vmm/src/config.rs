//! The host description that `splitvmm up` brings up: the store, the driver domain and the
//! guests, read from a TOML file.
//!
//! Every error names the file, the key and what was expected, so a user can fix the file
//! without reading this code.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod driver_vm;
mod linux;
mod load;
pub mod nvme;
pub mod pci;

pub use driver_vm::{DriverDomainKind, DriverVmSettings};
pub use linux::{LINUX_MAX_MEMORY_MIB, LINUX_MAX_VCPUS};
use load::read_bounded;
pub use load::MAX_HOST_FILE;

/// Errors found while reading a host description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {expected}")]
    Invalid {
        file: PathBuf,
        key: String,
        expected: String,
    },
}

/// Lowest domain id a guest or driver domain may have; 0 is the control domain.
pub const FIRST_DOMID: u32 = 1;
/// Xen reserves ids from 0x7FF0 (DOMID_FIRST_RESERVED) upwards.
pub const DOMID_FIRST_RESERVED: u32 = 0x7FF0;

/// A whole host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Where the store and the per-run sockets live. Relative paths are relative to the
    /// config file's directory.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    pub driver_domain: DriverDomainConfig,
    /// Self-tests `up` runs after attaching; none unless asked for.
    #[serde(default)]
    pub checks: ChecksConfig,
    #[serde(default, rename = "guest")]
    pub guests: Vec<GuestConfig>,
    /// How domain processes are confined (see `confinement`).
    #[serde(default)]
    pub confinement: crate::confinement::ConfinementConfig,
}

/// The self-tests `splitvmm up` runs once every device is attached. Each is off unless the host
/// file (`[checks]`) or the command line (`up --check`) asks for it: `up` alone attaches and
/// serves, and never writes to an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksConfig {
    /// Each guest writes and verifies a pattern at the start of each of its scratch disks
    /// (`scratch = true`, or created by the toolstack in this run); other disks are skipped.
    #[serde(default)]
    pub disk: bool,
    /// Each guest resolves the next one's address and exchanges UDP echoes with it.
    #[serde(default)]
    pub ping: bool,
    /// The last guest's first disk is detached and re-attached while the others keep working
    /// (with `disk`, its pattern must survive).
    #[serde(default)]
    pub replug: bool,
}

impl ChecksConfig {
    /// Every check (`up --check`).
    pub const ALL: ChecksConfig = ChecksConfig {
        disk: true,
        ping: true,
        replug: true,
    };

    /// Whether any check is asked for.
    pub fn any(&self) -> bool {
        self.disk || self.ping || self.replug
    }
}

fn default_run_dir() -> PathBuf {
    std::env::temp_dir().join("splitvmm")
}

/// The domain that owns devices and serves backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverDomainConfig {
    pub name: String,
    pub domid: u32,
    /// PCI functions (`DDDD:BB:DD.F`) the driver domain owns and reports in the store.
    #[serde(default)]
    pub owns: Vec<String>,
    /// A tap interface (created if missing) that the driver domain attaches to its switch as
    /// the uplink: guests' frames reach the host's network through it.
    #[serde(default)]
    pub uplink: Option<String>,
    /// A host process (the default) or a VM (`"vm"`, with `[driver_domain.vm]`).
    #[serde(default)]
    pub kind: DriverDomainKind,
    /// The driver VM, with `kind = "vm"`.
    #[serde(default)]
    pub vm: Option<DriverVmSettings>,
}

/// How a guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestKind {
    /// A host process running the frontend library (like DPDK's virtio-user).
    Process,
    /// A KVM virtual machine run by `splitvmm-vmm`, booting `kernel` (the tiny guest kernel).
    Kvm,
    /// An unmodified Linux kernel (bzImage) under `splitvmm-vmm --linux`, keys after xl.cfg:
    /// `kernel`, `ramdisk`, `extra`, `memory`, `vcpus`, `share`; runs until it powers off.
    Linux,
}

impl GuestKind {
    /// Bytes a disk check writes and verifies: a KVM guest on a software-emulated /dev/kvm
    /// is slow, so it checks less.
    pub fn check_bytes(self) -> u64 {
        match self {
            GuestKind::Process => 1024 * 1024,
            GuestKind::Kvm | GuestKind::Linux => 64 * 1024,
        }
    }
}

/// One guest domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    pub name: String,
    pub domid: u32,
    #[serde(default = "default_kind")]
    pub kind: GuestKind,
    /// The kernel a `kvm` or `linux` guest boots (relative to the host file).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// `linux`: the initramfs (relative to the host file).
    #[serde(default)]
    pub ramdisk: Option<PathBuf>,
    /// `linux`: the kernel command line (xl.cfg's `extra`).
    #[serde(default)]
    pub extra: Option<String>,
    /// `linux`: RAM in MiB (default 256).
    #[serde(default)]
    pub memory: Option<u64>,
    /// `linux`: number of vCPUs (default 1).
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// `linux`: guest memory the driver domain may map; `"all-ram"` (Linux puts disk buffers
    /// anywhere in its RAM), required with a disk and refused without one.
    #[serde(default)]
    pub share: Option<String>,
    /// `linux`: seconds a detach waits for the guest to eject the device (ACPI hotplug)
    /// before removing it by force (default 20).
    #[serde(default)]
    pub eject_timeout: Option<u64>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, rename = "nic")]
    pub nics: Vec<NicConfig>,
    /// `linux`: PCI functions (VFs of owned PFs) assigned to the guest.
    #[serde(default, rename = "pci")]
    pub pci: Vec<pci::PciConfig>,
    /// `linux`: emulated NVMe controllers (full emulation in the guest's VMM).
    #[serde(default)]
    pub nvme: Vec<nvme::NvmeConfig>,
}

impl GuestConfig {
    /// Reads one guest's description, as `splitvmm create` takes it: the keys of a
    /// `[[guest]]` entry of the host file, at the top level. Paths are relative to the file's
    /// directory. The running toolstack checks it against the host it joins.
    pub fn load(file: &Path) -> Result<GuestConfig, ConfigError> {
        let text = read_bounded(file)?;
        let mut guest: GuestConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        guest.resolve_paths(file.parent().unwrap_or(Path::new(".")));
        Ok(guest)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let boot_files = self.kernel.iter_mut().chain(self.ramdisk.iter_mut());
        for path in boot_files.filter(|p| p.is_relative()) {
            *path = base.join(&*path);
        }
        for disk in self
            .disks
            .iter_mut()
            .filter(|d| d.image.is_relative() && !d.image.as_os_str().is_empty())
        {
            disk.image = base.join(&disk.image);
        }
        for n in self.nvme.iter_mut().filter(|n| n.image.is_relative()) {
            n.image = base.join(&n.image);
        }
    }
}

/// A virtual network interface (vif) of a guest: a port of the driver domain's switch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Interface number (0 is the first).
    #[serde(default)]
    pub devid: u32,
    /// MAC address, `xx:xx:xx:xx:xx:xx`; default `02:00:00:<domid>:<devid>` (locally
    /// administered).
    #[serde(default)]
    pub mac: Option<String>,
    /// IPv4 address on the host's internal switch; default `10.0.0.<domid>`.
    #[serde(default)]
    pub ip: Option<String>,
    /// Offer the guest checksum offload and TCP segmentation both ways (virtio-net `CSUM`,
    /// `GUEST_CSUM`, `HOST_TSO4/6`, `GUEST_TSO4/6`, `HOST_ECN`, `GUEST_ECN`); default true.
    /// Off, the guest's driver computes checksums and segments itself, and receives only
    /// finished frames.
    #[serde(default = "default_offloads")]
    pub offloads: bool,
}

fn default_offloads() -> bool {
    true
}

impl NicConfig {
    /// The MAC address, given or derived from the domain id.
    pub fn mac_of(&self, domid: u32) -> Option<[u8; 6]> {
        match &self.mac {
            Some(text) => parse_mac(text),
            None => {
                let d = domid.to_be_bytes();
                Some([0x02, 0x00, d[1], d[2], d[3], self.devid as u8])
            }
        }
    }

    /// The IPv4 address, given or derived from the domain id.
    pub fn ip_of(&self, domid: u32) -> Option<[u8; 4]> {
        match &self.ip {
            Some(text) => text.parse::<std::net::Ipv4Addr>().ok().map(|a| a.octets()),
            None => u8::try_from(domid)
                .ok()
                .filter(|d| *d < 255)
                .map(|d| [10, 0, 0, d]),
        }
    }
}

/// `xx:xx:xx:xx:xx:xx` (hex, either case), unicast.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

fn default_kind() -> GuestKind {
    GuestKind::Process
}

/// A virtual block device (vbd) of a guest, served by the driver domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Backing image on the host. Relative to the config file's directory. Empty (left out)
    /// for a disk served from a `device` of a driver VM.
    #[serde(default)]
    pub image: PathBuf,
    /// With `[driver_domain] kind = "vm"` and no `image`: a block device inside the driver
    /// VM (`/dev/nvme0n1`: a namespace of the function it owns), served with O_DIRECT.
    #[serde(default)]
    pub device: Option<String>,
    /// Create (or grow) the image to this many MiB if it is smaller.
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// Xen virtual device number (51712 is xvda), or the disk's name (`"xvdb"`).
    #[serde(
        default = "default_devid",
        deserialize_with = "crate::vdev::deserialize_devid"
    )]
    pub devid: u32,
    #[serde(default)]
    pub readonly: bool,
    /// The image holds nothing anyone needs: disk checks may write to it. An image the
    /// toolstack creates (`size_mib` given, no file there) is scratch for the run anyway.
    #[serde(default)]
    pub scratch: bool,
    /// Virtqueues the driver domain serves the disk with (VIRTIO_BLK_F_MQ when more than
    /// one, each polled adaptively; Linux guests only), 1 to [`MAX_DISK_QUEUES`].
    #[serde(default = "default_disk_queues")]
    pub queues: u16,
}

/// The most virtqueues a disk may have (a Linux guest's MSI-X table has one vector each).
pub const MAX_DISK_QUEUES: u16 = 16;

fn default_disk_queues() -> u16 {
    1
}

fn default_devid() -> u32 {
    51712
}

impl HostConfig {
    /// The store's privileged (dom0) socket.
    pub fn store_socket(&self) -> PathBuf {
        self.run_dir.join("xenstored.sock")
    }
}

/// `DDDD:BB:DD.F` as sysfs spells it (lower-case hex, device <= 0x1f, function <= 7).
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && (b'0'..=b'7').contains(&b[11])
        && u8::from_str_radix(&s[8..10], 16).is_ok_and(|d| d <= 0x1f)
}

/// Names are used as store values and in messages; keep them plain.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        run_dir = "run"
        [driver_domain]
        name = "driver"
        domid = 1

        [[guest]]
        name = "guest-a"
        domid = 2
        [[guest.disk]]
        image = "a.img"
        size_mib = 8

        [[guest]]
        name = "guest-b"
        domid = 3
    "#;

    fn parse(text: &str) -> Result<HostConfig, ConfigError> {
        HostConfig::parse(Path::new("host.toml"), text)
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.guests.len(), 2);
        assert_eq!(config.guests[0].disks[0].devid, 51712);
        assert!(!config.guests[0].disks[0].readonly);
        assert_eq!(config.guests[0].kind, GuestKind::Process);
    }

    fn expect_invalid(text: &str, key: &str) {
        match parse(text) {
            Err(ConfigError::Invalid { key: k, file, .. }) => {
                assert_eq!(k, key);
                assert_eq!(file, Path::new("host.toml"));
            }
            other => panic!("expected an error at {key}, got {other:?}"),
        }
    }

    #[test]
    fn duplicate_domid_names_the_key() {
        expect_invalid(&GOOD.replace("domid = 3", "domid = 2"), "guest[1].domid");
    }

    #[test]
    fn control_domain_id_is_refused() {
        expect_invalid(
            &GOOD.replace("domid = 1", "domid = 0"),
            "driver_domain.domid",
        );
    }

    #[test]
    fn bad_name_is_refused() {
        expect_invalid(&GOOD.replace("\"guest-b\"", "\"guest b\""), "guest[1].name");
    }

    #[test]
    fn uplink_is_an_interface_name() {
        let with = |tap: &str| GOOD.replace("domid = 1\n", &format!("domid = 1\nuplink = {tap}\n"));
        let config = parse(&with(r#""tap0""#)).unwrap();
        assert_eq!(config.driver_domain.uplink.as_deref(), Some("tap0"));
        assert_eq!(parse(GOOD).unwrap().driver_domain.uplink, None);
        expect_invalid(&with(r#""a-name-longer-than-15""#), "driver_domain.uplink");
        expect_invalid(&with(r#""tap/0""#), "driver_domain.uplink");
        expect_invalid(&with(r#""""#), "driver_domain.uplink");
    }

    #[test]
    fn owned_functions_are_pci_addresses() {
        let with = |owns: &str| GOOD.replace("domid = 1\n", &format!("domid = 1\nowns = {owns}\n"));
        assert_eq!(
            parse(&with(r#"["0000:00:02.0", "0000:00:02.1"]"#))
                .unwrap()
                .driver_domain
                .owns
                .len(),
            2
        );
        expect_invalid(&with(r#"["00:02.0"]"#), "driver_domain.owns[0]");
        expect_invalid(&with(r#"["0000:00:20.0"]"#), "driver_domain.owns[0]");
        expect_invalid(&with(r#"["0000:00:02.8"]"#), "driver_domain.owns[0]");
        expect_invalid(
            &with(r#"["0000:00:02.0", "0000:00:02.0"]"#),
            "driver_domain.owns[1]",
        );
    }

    #[test]
    fn kvm_guests_need_a_kernel_and_process_guests_none() {
        let kvm = GOOD.replace("domid = 3", "domid = 3\nkind = \"kvm\"");
        expect_invalid(&kvm, "guest[1].kernel");
        let with_kernel = kvm.replace("kind = \"kvm\"", "kind = \"kvm\"\nkernel = \"k.elf\"");
        assert_eq!(parse(&with_kernel).unwrap().guests[1].kind, GuestKind::Kvm);
        let process_with_kernel = GOOD.replace("domid = 3", "domid = 3\nkernel = \"k.elf\"");
        expect_invalid(&process_with_kernel, "guest[1].kernel");
    }

    #[test]
    fn several_disk_queues_are_for_linux_guests_and_at_most_sixteen() {
        let linux = GOOD.replace(
            "domid = 3",
            "domid = 3\nkind = \"linux\"\nkernel = \"bzImage\"",
        );
        let disk = |queues: u16| {
            format!(
                "{linux}share = \"all-ram\"\n[[guest.disk]]\nimage = \"b.img\"\nqueues = {queues}\n"
            )
        };
        assert_eq!(parse(&disk(4)).unwrap().guests[1].disks[0].queues, 4);
        assert_eq!(parse(GOOD).unwrap().guests[0].disks[0].queues, 1);
        expect_invalid(&disk(0), "guest[1].disk[0].queues");
        expect_invalid(&disk(17), "guest[1].disk[0].queues");
        let process = GOOD.replace("size_mib = 8", "size_mib = 8\nqueues = 2");
        expect_invalid(&process, "guest[0].disk[0].queues");
    }

    #[test]
    fn emulated_nvme_belongs_to_linux_guests_and_is_read_only_by_default() {
        let linux = GOOD.replace(
            "domid = 3",
            "domid = 3\nkind = \"linux\"\nkernel = \"bzImage\"",
        );
        let one = format!("{linux}\n[[guest.nvme]]\nimage = \"n.img\"\n");
        let g = &parse(&one).unwrap().guests[1];
        assert_eq!(g.nvme.len(), 1);
        assert!(!g.nvme[0].writable, "read-only unless asked");
        assert!(g.nvme[0].as_disk().readonly);
        let rw = format!("{one}writable = true\n");
        assert!(parse(&rw).unwrap().guests[1].nvme[0].writable);
        let process = format!("{GOOD}\n[[guest.nvme]]\nimage = \"n.img\"\n");
        expect_invalid(&process, "guest[1].nvme");
        let five = format!(
            "{linux}{}",
            "\n[[guest.nvme]]\nimage = \"n.img\"\n".repeat(5)
        );
        expect_invalid(&five, "guest[1].nvme");
        expect_invalid(
            &format!("{linux}\n[[guest.nvme]]\nimage = \"\"\n"),
            "guest[1].nvme[0].image",
        );
        assert!(parse(&format!("{one}size = 3\n")).is_err(), "unknown key");
    }

    #[test]
    fn linux_guest_keys_are_checked() {
        let diskless = GOOD.replace(
            "domid = 3",
            "domid = 3\nkind = \"linux\"\nkernel = \"bzImage\"\nmemory = 256\nvcpus = 2",
        );
        parse(&diskless).unwrap();
        let linux = format!("{diskless}\n[[guest.disk]]\nimage = \"b.img\"\n");
        let with_share = linux.replace("vcpus = 2", "vcpus = 2\nshare = \"all-ram\"");
        let g = &parse(&with_share).unwrap().guests[1];
        assert_eq!(
            (g.kind, g.memory, g.vcpus),
            (GuestKind::Linux, Some(256), Some(2))
        );
        // Two disks and two interfaces with the share: fine; an interface alone needs it too.
        let devices = format!(
            "{with_share}[[guest.disk]]\ndevid = \"xvdb\"\nimage = \"c.img\"\n\
             [[guest.nic]]\n[[guest.nic]]\ndevid = 1\nip = \"10.0.1.3\"\n"
        );
        let g = &parse(&devices).unwrap().guests[1];
        assert_eq!((g.disks.len(), g.nics.len()), (2, 2));
        let timed = with_share.replace("vcpus = 2", "vcpus = 2\neject_timeout = 5");
        assert_eq!(parse(&timed).unwrap().guests[1].eject_timeout, Some(5));
        let nic_only = format!("{diskless}\n[[guest.nic]]\n");
        let many: String = (0..=super::linux::LINUX_MAX_DEVICES)
            .map(|i| format!("[[guest.nic]]\ndevid = {i}\nip = \"10.0.2.{i}\"\n"))
            .collect();
        let too_many = format!("{with_share}{many}");
        let needless = diskless.replace("vcpus = 2", "vcpus = 2\nshare = \"all-ram\"");
        let other = |k: &str| GOOD.replace("domid = 3", &format!("domid = 3\n{k}"));
        for (text, key) in [
            // A disk without an explicit share, a share the guest does not need, a bad one.
            (linux.clone(), "share"),
            (nic_only, "share"),
            (too_many, "disk"),
            (needless, "share"),
            (with_share.replace("\"all-ram\"", "\"window\""), "share"),
            (
                with_share.replace("memory = 256", "memory = 4096"),
                "memory",
            ),
            (with_share.replace("memory = 256", "memory = 255"), "memory"),
            (with_share.replace("vcpus = 2", "vcpus = 0"), "vcpus"),
            (
                with_share.replace("vcpus = 2", "vcpus = 2\neject_timeout = 0"),
                "eject_timeout",
            ),
            (
                with_share.replace("vcpus = 2", "vcpus = 2\neject_timeout = 26"),
                "eject_timeout",
            ),
            (other("eject_timeout = 5"), "eject_timeout"),
            (with_share.replace("kernel = \"bzImage\"\n", ""), "kernel"),
            // Linux-only keys elsewhere.
            (other("memory = 64"), "memory"),
            (other("share = \"all-ram\""), "share"),
        ] {
            expect_invalid(&text, &format!("guest[1].{key}"));
        }
    }

    #[test]
    fn a_linux_kernel_must_be_a_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host.toml");
        let text = GOOD.replace("domid = 3", "domid = 3\nkind = \"linux\"\nkernel = \"k\"");
        std::fs::write(&host, &text).unwrap();
        let mut image = vec![0u8; 0x400];
        std::fs::write(dir.path().join("k"), &image).unwrap();
        let e = HostConfig::load(&host).unwrap_err().to_string();
        assert!(e.contains("guest[1].kernel") && e.contains("HdrS"), "{e}");
        image[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(dir.path().join("k"), &image).unwrap();
        HostConfig::load(&host).unwrap();
        let with_ramdisk = text.replace("kernel =", "ramdisk = \"r.gz\"\nkernel =");
        std::fs::write(&host, &with_ramdisk).unwrap();
        // Missing, empty, a directory: refused; a non-empty file: taken.
        let e = HostConfig::load(&host).unwrap_err().to_string();
        assert!(e.contains("guest[1].ramdisk"), "{e}");
        std::fs::write(dir.path().join("r.gz"), b"").unwrap();
        let e = HostConfig::load(&host).unwrap_err().to_string();
        assert!(e.contains("guest[1].ramdisk") && e.contains("empty"), "{e}");
        std::fs::remove_file(dir.path().join("r.gz")).unwrap();
        std::fs::create_dir(dir.path().join("r.gz")).unwrap();
        let e = HostConfig::load(&host).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir(dir.path().join("r.gz")).unwrap();
        std::fs::write(dir.path().join("r.gz"), b"\x1f\x8b").unwrap();
        HostConfig::load(&host).unwrap();
    }

    #[test]
    fn nics_get_derived_addresses_and_bad_ones_are_refused() {
        let with_nic =
            |nic: &str| GOOD.replace("domid = 3\n", &format!("domid = 3\n[[guest.nic]]\n{nic}\n"));
        let config = parse(&with_nic("devid = 0")).unwrap();
        let nic = &config.guests[1].nics[0];
        assert_eq!(nic.mac_of(3), Some([2, 0, 0, 0, 3, 0]));
        assert_eq!(nic.ip_of(3), Some([10, 0, 0, 3]));
        assert!(nic.offloads, "offloads are on unless turned off");
        let off = parse(&with_nic("offloads = false")).unwrap();
        assert!(!off.guests[1].nics[0].offloads);
        assert!(parse(&with_nic("offloads = \"no\"")).is_err());
        expect_invalid(
            &with_nic("mac = \"01:00:00:00:00:01\""),
            "guest[1].nic[0].mac",
        );
        expect_invalid(&with_nic("mac = \"02:00:00:00:00\""), "guest[1].nic[0].mac");
        expect_invalid(&with_nic("ip = \"10.0.0\""), "guest[1].nic[0].ip");
    }

    #[test]
    fn zero_size_disk_is_refused() {
        expect_invalid(
            &GOOD.replace("size_mib = 8", "size_mib = 0"),
            "guest[0].disk[0].size_mib",
        );
    }

    #[test]
    fn unknown_key_is_a_parse_error_naming_it() {
        let err = parse(&GOOD.replace("size_mib = 8", "sise_mib = 8")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("host.toml"), "{text}");
        assert!(text.contains("sise_mib"), "{text}");
    }

    #[test]
    fn disks_take_names_or_xen_numbers() {
        let named = parse(&GOOD.replace("size_mib = 8", "size_mib = 8\ndevid = \"xvdb\""));
        assert_eq!(named.unwrap().guests[0].disks[0].devid, 51728);
        assert!(parse(&GOOD.replace("size_mib = 8", "size_mib = 8\ndevid = \"sda\"")).is_err());
    }

    #[test]
    fn one_guest_file_loads_with_paths_next_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "name = \"c\"\ndomid = 4\n[[disk]]\nimage = \"c.img\"\n",
        )
        .unwrap();
        let guest = GuestConfig::load(&file).unwrap();
        assert_eq!(guest.disks[0].image, dir.path().join("c.img"));
        std::fs::write(&file, "name = \"c\"\ndomid = 4\nbogus = 1\n").unwrap();
        assert!(GuestConfig::load(&file)
            .unwrap_err()
            .to_string()
            .contains("bogus"));
    }

    #[test]
    fn checks_are_off_unless_asked_for() {
        let config = parse(GOOD).unwrap();
        assert!(!config.checks.any());
        assert!(!config.guests[0].disks[0].scratch);
        let asked = parse(&format!("{GOOD}\n[checks]\ndisk = true\n")).unwrap();
        assert!(asked.checks.disk && !asked.checks.ping && !asked.checks.replug);
    }

    #[test]
    fn macs_and_ips_are_unique_on_the_host() {
        let nics = GOOD
            .replace(
                "size_mib = 8\n",
                "size_mib = 8\n[[guest.nic]]\nip = \"10.0.0.9\"\n",
            )
            .replace(
                "domid = 3\n",
                "domid = 3\n[[guest.nic]]\nip = \"10.0.0.9\"\n",
            );
        expect_invalid(&nics, "guest[1].nic[0].ip");
        let macs = GOOD
            .replace(
                "size_mib = 8\n",
                "size_mib = 8\n[[guest.nic]]\nmac = \"02:00:00:00:00:09\"\n",
            )
            .replace(
                "domid = 3\n",
                "domid = 3\n[[guest.nic]]\nmac = \"02:00:00:00:00:09\"\n",
            );
        expect_invalid(&macs, "guest[1].nic[0].mac");
    }

    #[test]
    fn the_host_file_is_bounded_and_regular() {
        let started = std::time::Instant::now();
        let err = HostConfig::load(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_HOST_FILE as usize + 1]).unwrap();
        let err = HostConfig::load(&big).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn load_checks_images_and_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.toml");
        let without_size = GOOD.replace("size_mib = 8", "");
        std::fs::write(&file, &without_size).unwrap();
        let err = HostConfig::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("guest[0].disk[0].image") && err.contains("no such file"),
            "{err}"
        );
        std::fs::write(dir.path().join("a.img"), vec![0u8; 1000]).unwrap();
        let err = HostConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("truncate -s 1024"), "{err}");
        std::fs::write(dir.path().join("a.img"), vec![0u8; 1024]).unwrap();
        HostConfig::load(&file).unwrap();
        let kvm = without_size.replace(
            "domid = 3",
            "domid = 3\nkind = \"kvm\"\nkernel = \"/bin/ls\"",
        );
        std::fs::write(&file, kvm.replace("/bin/ls", "missing.elf")).unwrap();
        let err = HostConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("guest[1].kernel"), "{err}");
        std::fs::write(&file, &kvm).unwrap();
        let err = HostConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("/bin/ls is not a kernel"), "{err}");
        std::fs::write(dir.path().join("notes"), b"not a kernel").unwrap();
        std::fs::write(&file, kvm.replace("/bin/ls", "notes")).unwrap();
        let err = HostConfig::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("guest[1].kernel") && err.contains("ELF"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.toml");
        std::fs::write(&file, GOOD).unwrap();
        let config = HostConfig::load(&file).unwrap();
        assert_eq!(config.run_dir, dir.path().join("run"));
        assert_eq!(config.guests[0].disks[0].image, dir.path().join("a.img"));
    }
}
