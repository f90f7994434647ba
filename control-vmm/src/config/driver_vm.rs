//! `[driver_domain] kind = "vm"`: the driver domain as a VM, its `[driver_domain.vm]` table
//! and the rules that go with it (docs/driver-vm.md, "Managed driver VM").

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, HostConfig};

/// How the driver domain runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverDomainKind {
    /// `driver-domain managed`, a confined host process.
    #[default]
    Process,
    /// A Linux VM under `splitvmm-vmm` whose initramfs runs `driver-domain vm-serve
    /// --managed`: it owns a VF of `owns[0]` by VFIO (dom0 keeps the PF), and the guests'
    /// memory and doorbells reach it through the cross-VM device (docs/driver-vm.md).
    Vm,
}

/// The driver VM (`[driver_domain.vm]`), keys after xl.cfg where they exist.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverVmSettings {
    /// Its kernel (bzImage). Relative to the config file's directory.
    pub kernel: PathBuf,
    /// Its initramfs, which runs `driver-domain vm-serve --tunnel /dev/ttyS1 --managed
    /// --domid <domid>` (tests/lab/driver-init does, given `dvm.managed=<domid>`).
    pub ramdisk: PathBuf,
    /// Appended to the kernel command line (after `console=ttyS0 dvm.managed=<domid>`).
    #[serde(default)]
    pub extra: Option<String>,
    /// RAM in MiB.
    #[serde(default = "default_driver_vm_memory")]
    pub memory: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The VF of `owns[0]` it gets (1-based); dom0's hardware helper enables SR-IOV if
    /// needed and binds the VF to vfio-pci.
    #[serde(default = "default_vf")]
    pub vf: u16,
    /// The cross-VM device's shared-memory BAR in MiB (a power of two): room for every
    /// guest region mapped into the driver VM at once.
    #[serde(default = "default_shm_mib")]
    pub shm_mib: u64,
}

fn default_driver_vm_memory() -> u64 {
    160
}

fn default_vcpus() -> u8 {
    1
}

fn default_vf() -> u16 {
    1
}

fn default_shm_mib() -> u64 {
    1024
}

impl HostConfig {
    /// `[driver_domain] kind = "vm"`: its `[driver_domain.vm]` table, the PF it takes a VF
    /// of, its BAR's size; and none of what only a process driver domain does.
    pub(super) fn validate_driver_vm(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, expected: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            expected,
        };
        let dd = &self.driver_domain;
        match (dd.kind, &dd.vm) {
            (DriverDomainKind::Process, None) => return Ok(()),
            (DriverDomainKind::Process, Some(_)) => {
                return Err(invalid(
                    "driver_domain.kind",
                    "\"vm\" with a [driver_domain.vm] table".into(),
                ))
            }
            (DriverDomainKind::Vm, None) => {
                return Err(invalid(
                    "driver_domain.vm",
                    "a [driver_domain.vm] table (kernel, ramdisk) for kind = \"vm\"".into(),
                ))
            }
            (DriverDomainKind::Vm, Some(vm)) => {
                if dd.owns.len() != 1 {
                    return Err(invalid(
                        "driver_domain.owns",
                        "exactly one PF, of which the driver VM gets a VF".into(),
                    ));
                }
                if dd.uplink.is_some() {
                    return Err(invalid(
                        "driver_domain.uplink",
                        "no uplink: a driver VM's switch has no tap yet".into(),
                    ));
                }
                if vm.vf == 0 {
                    return Err(invalid("driver_domain.vm.vf", "a VF number from 1".into()));
                }
                if !vm.shm_mib.is_power_of_two() || !(2..=32 << 10).contains(&vm.shm_mib) {
                    return Err(invalid(
                        "driver_domain.vm.shm_mib",
                        format!("a power of two from 2 to 32768, got {}", vm.shm_mib),
                    ));
                }
                if vm.memory < 64 || vm.memory % 2 != 0 || vm.vcpus == 0 {
                    return Err(invalid(
                        "driver_domain.vm.memory",
                        "an even number of MiB from 64, and 1 or more vcpus".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM_HOST: &str = r#"
        [driver_domain]
        name = "driver"
        domid = 1
        kind = "vm"
        owns = ["0000:00:02.0"]
        [driver_domain.vm]
        kernel = "bzImage"
        ramdisk = "driver.cpio.gz"
        shm_mib = 256

        [[guest]]
        name = "g"
        domid = 2
        kind = "linux"
        kernel = "bzImage"
        share = "all-ram"
        [[guest.disk]]
        device = "/dev/nvme0n1"
    "#;

    fn parse(text: &str) -> Result<HostConfig, ConfigError> {
        HostConfig::parse(Path::new("host.toml"), text)
    }

    fn invalid_key(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn a_driver_vm_host_parses_with_defaults() {
        let config = parse(VM_HOST).unwrap();
        let dd = &config.driver_domain;
        assert_eq!(dd.kind, DriverDomainKind::Vm);
        let vm = dd.vm.as_ref().unwrap();
        assert_eq!((vm.memory, vm.vcpus, vm.vf, vm.shm_mib), (160, 1, 1, 256));
        let disk = &config.guests[0].disks[0];
        assert_eq!(disk.device.as_deref(), Some("/dev/nvme0n1"));
        assert!(disk.image.as_os_str().is_empty());
    }

    #[test]
    fn driver_vm_rules_name_the_key_at_fault() {
        let host_image = VM_HOST.replace(r#"device = "/dev/nvme0n1""#, r#"image = "a.img""#);
        assert_eq!(invalid_key(&host_image), "guest[0].disk[0].device");
        let both = VM_HOST.replace(
            r#"device = "/dev/nvme0n1""#,
            "device = \"/dev/nvme0n1\"\nimage = \"a.img\"",
        );
        assert_eq!(invalid_key(&both), "guest[0].disk[0].device");
        let not_dev = VM_HOST.replace("/dev/nvme0n1", "nvme0n1");
        assert_eq!(invalid_key(&not_dev), "guest[0].disk[0].device");
        let process = VM_HOST.replace(r#"kind = "vm""#, "");
        assert_eq!(invalid_key(&process), "driver_domain.kind");
        let no_table = VM_HOST
            .split("[driver_domain.vm]")
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(invalid_key(&no_table), "driver_domain.vm");
        let two_pfs = VM_HOST.replace(r#"["0000:00:02.0"]"#, r#"["0000:00:02.0", "0000:00:03.0"]"#);
        assert_eq!(invalid_key(&two_pfs), "driver_domain.owns");
        let odd_bar = VM_HOST.replace("shm_mib = 256", "shm_mib = 300");
        assert_eq!(invalid_key(&odd_bar), "driver_domain.vm.shm_mib");
        let vf0 = VM_HOST.replace("shm_mib = 256", "shm_mib = 256\nvf = 0");
        assert_eq!(invalid_key(&vf0), "driver_domain.vm.vf");
        let uplink = VM_HOST.replace("domid = 1\n", "domid = 1\nuplink = \"tap0\"\n");
        assert_eq!(invalid_key(&uplink), "driver_domain.uplink");
    }

    #[test]
    fn a_process_driver_domain_refuses_a_device_disk() {
        let process = r#"
            [driver_domain]
            name = "driver"
            domid = 1
            [[guest]]
            name = "g"
            domid = 2
            [[guest.disk]]
            device = "/dev/nvme0n1"
        "#;
        assert_eq!(invalid_key(process), "guest[0].disk[0].image");
    }
}
