//! The keys of a `kind = "linux"` guest (after xl.cfg: `kernel`, `ramdisk`, `extra`, `memory`,
//! `vcpus`, `share`), and their absence on other kinds.

use super::{GuestConfig, GuestKind};

/// Largest `memory` (MiB) of a `linux` guest: RAM ends below the PCI hole.
pub const LINUX_MAX_MEMORY_MIB: u64 = crate::vmm::arch::RAM_LIMIT >> 20;
/// Largest `vcpus` of a `linux` guest.
pub const LINUX_MAX_VCPUS: u8 = crate::vmm::linux::MAX_VCPUS;

/// The keys of a `linux` guest (and their absence elsewhere): (key, what was expected).
pub(super) fn validate_keys(i: usize, g: &GuestConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("guest[{i}].{k}");
    if g.kind != GuestKind::Linux {
        let linux_only = [
            ("ramdisk", g.ramdisk.is_some()),
            ("extra", g.extra.is_some()),
            ("memory", g.memory.is_some()),
            ("vcpus", g.vcpus.is_some()),
            ("share", g.share.is_some()),
        ];
        return match linux_only.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err((
                key(k),
                "nothing: only a kind = \"linux\" guest has it".into(),
            )),
            None => Ok(()),
        };
    }
    if g.kernel.is_none() {
        return Err((key("kernel"), "the bzImage a linux guest boots".into()));
    }
    if let Some(m) = g
        .memory
        .filter(|m| *m < 16 || *m > LINUX_MAX_MEMORY_MIB || m % 2 != 0)
    {
        return Err((
            key("memory"),
            format!("an even number of MiB from 16 to {LINUX_MAX_MEMORY_MIB}, got {m}"),
        ));
    }
    if let Some(v) = g.vcpus.filter(|v| *v == 0 || *v > LINUX_MAX_VCPUS) {
        return Err((
            key("vcpus"),
            format!("1 to {LINUX_MAX_VCPUS} vCPUs, got {v}"),
        ));
    }
    if g.extra.as_ref().is_some_and(|e| e.len() >= 2048) {
        return Err((
            key("extra"),
            "a command line shorter than 2048 bytes".into(),
        ));
    }
    match (g.disks.is_empty(), g.share.as_deref()) {
        (false, Some("all-ram")) | (true, None) => {}
        (false, _) => {
            return Err((
                key("share"),
                "\"all-ram\": Linux puts disk buffers anywhere in its RAM, so the driver \
                 domain maps all of it, and the host file must say so"
                    .into(),
            ))
        }
        (true, Some(_)) => {
            return Err((
                key("share"),
                "nothing: a guest without a disk shares no memory".into(),
            ))
        }
    }
    if g.disks.len() > 1 {
        return Err((key("disk"), "at most one disk for a linux guest".into()));
    }
    if !g.nics.is_empty() {
        return Err((
            key("nic"),
            "no network interface on a linux guest yet".into(),
        ));
    }
    Ok(())
}
