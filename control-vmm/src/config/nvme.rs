//! `[[guest.nvme]]`: an NVMe controller emulated by a `kind = "linux"` guest's VMM (full
//! emulation: every register and doorbell access of the guest's driver traps to the VMM),
//! whose namespace is a file of the host:
//!
//! ```toml
//! [[guest.nvme]]
//! image = "data.img"   # relative to the host file; it must exist, in whole 512-byte blocks
//! writable = true      # default false: the guest sees a write-protected namespace
//! ```
//!
//! The toolstack opens and locks the image (shared when read-only, exclusive when writable,
//! as for `[[guest.disk]]`) and hands the descriptor to the VMM, which opens nothing itself.

use std::path::PathBuf;

use serde::Deserialize;

use super::{DiskConfig, GuestKind, HostConfig};

/// Emulated NVMe controllers per guest at most.
pub const MAX_NVME_PER_GUEST: usize = 4;

/// One emulated NVMe controller and its namespace's image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeConfig {
    pub image: PathBuf,
    #[serde(default)]
    pub writable: bool,
}

impl NvmeConfig {
    /// The image as a disk the toolstack checks, opens and locks.
    pub fn as_disk(&self) -> DiskConfig {
        DiskConfig {
            image: self.image.clone(),
            device: None,
            size_mib: None,
            devid: 0,
            readonly: !self.writable,
            scratch: false,
            queues: 1,
        }
    }
}

/// Checks every guest's `nvme` entries: (key, what was expected).
pub(super) fn validate(host: &HostConfig) -> Result<(), (String, String)> {
    for (i, g) in host.guests.iter().enumerate() {
        if g.nvme.is_empty() {
            continue;
        }
        if g.kind != GuestKind::Linux {
            return Err((
                format!("guest[{i}].nvme"),
                "nothing: only a kind = \"linux\" guest has emulated NVMe controllers".into(),
            ));
        }
        if g.nvme.len() > MAX_NVME_PER_GUEST {
            return Err((
                format!("guest[{i}].nvme"),
                format!("at most {MAX_NVME_PER_GUEST} emulated NVMe controllers"),
            ));
        }
        for (j, n) in g.nvme.iter().enumerate() {
            if n.image.as_os_str().is_empty() {
                return Err((
                    format!("guest[{i}].nvme[{j}].image"),
                    "the namespace's image file".into(),
                ));
            }
        }
    }
    Ok(())
}
