//! Loading a host file: a bounded read, the TOML parse, paths resolved against the file,
//! the images and kernels it names checked, and the rules that span keys and guests (unique
//! ids, names, MACs and addresses; owned functions; what each guest kind needs).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::*;

impl HostConfig {
    /// Reads and validates `file`, and checks that the images, kernels and files it names
    /// are what they claim (see [`crate::image`]), before anything is started.
    pub fn load(file: &Path) -> Result<HostConfig, ConfigError> {
        let text = read_bounded(file)?;
        let mut config = HostConfig::parse(file, &text)?;
        let base = file.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.check_files(file)?;
        Ok(config)
    }

    /// Checks that the images and kernels named are what they claim; also what `splitvmm
    /// create` checks a new guest with.
    pub(crate) fn check_files(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, expected: String| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            expected,
        };
        for (i, guest) in self.guests.iter().enumerate() {
            if let (GuestKind::Kvm, Some(kernel)) = (guest.kind, &guest.kernel) {
                match crate::image::kernel_format(kernel) {
                    Ok(crate::image::KernelFormat::Elf) => {}
                    Ok(crate::image::KernelFormat::BzImage) => {
                        return Err(invalid(
                            format!("guest[{i}].kernel"),
                            format!(
                                "{} is a Linux bzImage; a kind = \"kvm\" guest boots the tiny \
                                 ELF kernel (guest-frontend/tiny-kernel/build.sh)",
                                kernel.display()
                            ),
                        ))
                    }
                    Err(e) => {
                        let hint = if kernel.exists() {
                            ""
                        } else {
                            " (build the tiny kernel with guest-frontend/tiny-kernel/build.sh)"
                        };
                        return Err(invalid(format!("guest[{i}].kernel"), format!("{e}{hint}")));
                    }
                }
            }
            if let (GuestKind::Linux, Some(kernel)) = (guest.kind, &guest.kernel) {
                match crate::image::kernel_format(kernel) {
                    Ok(crate::image::KernelFormat::BzImage) => {}
                    Ok(crate::image::KernelFormat::Elf) => {
                        return Err(invalid(
                            format!("guest[{i}].kernel"),
                            format!(
                                "{} is an ELF kernel; a kind = \"linux\" guest boots a bzImage",
                                kernel.display()
                            ),
                        ))
                    }
                    Err(e) => return Err(invalid(format!("guest[{i}].kernel"), e.to_string())),
                }
            }
            if let Some(ramdisk) = &guest.ramdisk {
                let problem = match std::fs::metadata(ramdisk) {
                    Ok(m) if !m.is_file() => Some("not a regular file".to_string()),
                    Ok(m) if m.len() == 0 => Some("empty".to_string()),
                    Ok(_) => std::fs::File::open(ramdisk).err().map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = problem {
                    return Err(invalid(
                        format!("guest[{i}].ramdisk"),
                        format!(
                            "a readable, non-empty initramfs; {}: {why}",
                            ramdisk.display()
                        ),
                    ));
                }
            }
            for (j, disk) in guest.disks.iter().enumerate() {
                if disk.device.is_some() {
                    // Inside the driver VM: checked there when it is served.
                    continue;
                }
                crate::image::check_disk(disk)
                    .map_err(|e| invalid(format!("guest[{i}].disk[{j}].image"), e.to_string()))?;
            }
            for (j, n) in guest.nvme.iter().enumerate() {
                crate::image::check_disk(&n.as_disk())
                    .map_err(|e| invalid(format!("guest[{i}].nvme[{j}].image"), e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Parses and validates `text`; `file` is only used in messages.
    pub fn parse(file: &Path, text: &str) -> Result<HostConfig, ConfigError> {
        let config: HostConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.run_dir.is_relative() {
            self.run_dir = base.join(&self.run_dir);
        }
        if let Some(vm) = &mut self.driver_domain.vm {
            for path in [&mut vm.kernel, &mut vm.ramdisk] {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
        for guest in &mut self.guests {
            guest.resolve_paths(base);
        }
    }

    /// Checks the whole host: also what `splitvmm create` checks a new guest with, against
    /// the guests already running.
    pub(crate) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, expected: &str| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            expected: expected.to_owned(),
        };
        if let Some(expected) = self.confinement.invalid_uid_base() {
            return Err(invalid("confinement.uid_base".to_owned(), &expected));
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let domains = std::iter::once((
            "driver_domain".to_owned(),
            &self.driver_domain.name,
            self.driver_domain.domid,
        ))
        .chain(
            self.guests
                .iter()
                .enumerate()
                .map(|(i, g)| (format!("guest[{i}]"), &g.name, g.domid)),
        );
        for (key, name, domid) in domains {
            if !(FIRST_DOMID..DOMID_FIRST_RESERVED).contains(&domid) {
                return Err(invalid(
                    format!("{key}.domid"),
                    &format!("a domain id from {FIRST_DOMID} to {} (0 is the control domain), got {domid}", DOMID_FIRST_RESERVED - 1),
                ));
            }
            if !ids.insert(domid) {
                return Err(invalid(
                    format!("{key}.domid"),
                    &format!("a unique domain id, {domid} is used twice"),
                ));
            }
            if !is_valid_name(name) {
                return Err(invalid(
                    format!("{key}.name"),
                    &format!("a name of 1-64 characters from [A-Za-z0-9_-], got {name:?}"),
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    &format!("a unique name, {name:?} is used twice"),
                ));
            }
        }
        let mut owned = HashSet::new();
        for (i, bdf) in self.driver_domain.owns.iter().enumerate() {
            if !is_pci_address(bdf) {
                return Err(invalid(
                    format!("driver_domain.owns[{i}]"),
                    &format!("a PCI address DDDD:BB:DD.F (lower-case hex), got {bdf:?}"),
                ));
            }
            if !owned.insert(bdf) {
                return Err(invalid(
                    format!("driver_domain.owns[{i}]"),
                    &format!("each function once, {bdf} is listed twice"),
                ));
            }
        }
        if let Some(tap) = &self.driver_domain.uplink {
            let ok = (1..=15).contains(&tap.len())
                && tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(invalid(
                    "driver_domain.uplink".to_owned(),
                    &format!(
                        "an interface name of 1-15 characters from [A-Za-z0-9_.-], got {tap:?}"
                    ),
                ));
            }
        }
        self.validate_driver_vm(file)?;
        let mut macs = HashMap::new();
        let mut ips = HashMap::new();
        for (i, guest) in self.guests.iter().enumerate() {
            for (j, nic) in guest.nics.iter().enumerate() {
                let key = format!("guest[{i}].nic[{j}]");
                if let Some(mac) = nic.mac_of(guest.domid) {
                    if let Some(first) = macs.insert(mac, key.clone()) {
                        return Err(invalid(
                            format!("{key}.mac"),
                            &format!("a MAC address unique on the host, {first} has it too"),
                        ));
                    }
                }
                if let Some(ip) = nic.ip_of(guest.domid) {
                    if let Some(first) = ips.insert(ip, key.clone()) {
                        return Err(invalid(
                            format!("{key}.ip"),
                            &format!("an IPv4 address unique on the host, {first} has it too"),
                        ));
                    }
                }
            }
        }
        pci::validate(self).map_err(|(key, expected)| invalid(key, &expected))?;
        nvme::validate(self).map_err(|(key, expected)| invalid(key, &expected))?;
        for (i, guest) in self.guests.iter().enumerate() {
            linux::validate_keys(i, guest).map_err(|(key, expected)| invalid(key, &expected))?;
            match (guest.kind, &guest.kernel) {
                (GuestKind::Linux, _) => {}
                (GuestKind::Kvm, None) => {
                    return Err(invalid(
                        format!("guest[{i}].kernel"),
                        "the kernel a kvm guest boots (build it with guest-frontend/tiny-kernel/build.sh)",
                    ))
                }
                (GuestKind::Process, Some(_)) => {
                    return Err(invalid(
                        format!("guest[{i}].kernel"),
                        "no kernel for a process guest (kind = \"kvm\" boots one)",
                    ))
                }
                _ => {}
            }
            if guest.kind == GuestKind::Kvm && guest.disks.len() > 1 {
                return Err(invalid(
                    format!("guest[{i}].disk"),
                    "at most one disk for a kvm guest (its VMM has one virtio-mmio slot)",
                ));
            }
            if guest.kind == GuestKind::Kvm && !guest.nics.is_empty() {
                return Err(invalid(
                    format!("guest[{i}].nic"),
                    "no network interface on a kvm guest (the tiny kernel has no virtio-net yet)",
                ));
            }
            let mut nic_ids = HashSet::new();
            for (j, nic) in guest.nics.iter().enumerate() {
                if !nic_ids.insert(nic.devid) || nic.devid > 255 {
                    return Err(invalid(
                        format!("guest[{i}].nic[{j}].devid"),
                        "an interface number 0-255, unique within the guest",
                    ));
                }
                if nic.mac_of(guest.domid).is_none() {
                    return Err(invalid(
                        format!("guest[{i}].nic[{j}].mac"),
                        "a unicast MAC address xx:xx:xx:xx:xx:xx",
                    ));
                }
                if nic.ip_of(guest.domid).is_none() {
                    return Err(invalid(
                        format!("guest[{i}].nic[{j}].ip"),
                        "an IPv4 address (needed when the domain id is 255 or more)",
                    ));
                }
            }
            let mut devids = HashSet::new();
            for (j, disk) in guest.disks.iter().enumerate() {
                if !devids.insert(disk.devid) {
                    return Err(invalid(
                        format!("guest[{i}].disk[{j}].devid"),
                        &format!(
                            "a device number unique within the guest, {} is used twice",
                            disk.devid
                        ),
                    ));
                }
                let in_vm = self.driver_domain.kind == DriverDomainKind::Vm;
                match (disk.image.as_os_str().is_empty(), &disk.device, in_vm) {
                    (false, None, false) => {}
                    (true, Some(d), true) if d.starts_with("/dev/") && d.len() > 5 => {}
                    (_, _, false) => {
                        return Err(invalid(
                            format!("guest[{i}].disk[{j}].image"),
                            "a path to a disk image (`device` is for a driver VM's disks)",
                        ))
                    }
                    _ => {
                        return Err(invalid(
                            format!("guest[{i}].disk[{j}].device"),
                            "a block device inside the driver VM (/dev/...), and no `image`: \
                             a driver VM reaches no host file",
                        ))
                    }
                }
                if disk.size_mib == Some(0) {
                    return Err(invalid(
                        format!("guest[{i}].disk[{j}].size_mib"),
                        "a size of at least 1 MiB",
                    ));
                }
                if !(1..=super::MAX_DISK_QUEUES).contains(&disk.queues) {
                    return Err(invalid(
                        format!("guest[{i}].disk[{j}].queues"),
                        &format!(
                            "1 to {} queues, got {}",
                            super::MAX_DISK_QUEUES,
                            disk.queues
                        ),
                    ));
                }
                if disk.queues > 1 && guest.kind != GuestKind::Linux {
                    return Err(invalid(
                        format!("guest[{i}].disk[{j}].queues"),
                        "1: only a Linux guest's disk has several queues (its virtio-blk \
                         driver spreads them over its CPUs)",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Largest host file `load` reads: a description of a host is a few KiB; anything bigger is
/// the wrong file (`splitvmm up /dev/zero` must fail at once, not read until memory runs out).
pub const MAX_HOST_FILE: u64 = 1024 * 1024;

pub(super) fn read_bounded(file: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read_err = |source| ConfigError::Read {
        file: file.to_owned(),
        source,
    };
    let parse_err = |message: String| ConfigError::Parse {
        file: file.to_owned(),
        message,
    };
    let handle = std::fs::File::open(file).map_err(read_err)?;
    if !handle.metadata().map_err(read_err)?.is_file() {
        return Err(parse_err(
            "not a regular file (a host file is a TOML file)".to_owned(),
        ));
    }
    let mut bytes = Vec::new();
    handle
        .take(MAX_HOST_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_HOST_FILE {
        return Err(parse_err(format!(
            "larger than {MAX_HOST_FILE} bytes: not a host description"
        )));
    }
    String::from_utf8(bytes).map_err(|_| parse_err("not UTF-8 text".to_owned()))
}
