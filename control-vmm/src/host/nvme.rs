//! The images of a Linux guest's emulated NVMe controllers (`[[guest.nvme]]`): opened and
//! locked here as disk images are (shared when read-only, exclusive when writable; opened
//! without write access unless `writable`), and handed to the guest's VMM as descriptors
//! 5, 6, ... (`--nvme-fd N[,rw]`). The VMM holds the only descriptor once it runs: the lock
//! lives as long as it does.

use std::os::fd::OwnedFd;
use std::process::Command;

use anyhow::{Context, Result};

use super::Host;
use crate::config::GuestConfig;
use crate::supervisor::FIRST_HANDED_FD;

impl Host {
    /// The command that runs guest `config` and the descriptors it is handed (after the
    /// store connection and the control channel).
    pub(super) fn guest_launch(&self, config: &GuestConfig) -> Result<(Command, Vec<OwnedFd>)> {
        let mut command = self.guest_command(config)?;
        let mut handed = Vec::new();
        for (i, n) in config.nvme.iter().enumerate() {
            let image = crate::image::open_disk(&n.as_disk(), &|_| None).with_context(|| {
                format!("{}: emulated NVMe image {}", config.name, n.image.display())
            })?;
            // Descriptors 3 and 4 are the store connection and the control channel.
            let fd = FIRST_HANDED_FD + 2 + i as i32;
            let spec = if n.writable {
                format!("{fd},rw")
            } else {
                fd.to_string()
            };
            command.arg("--nvme-fd").arg(spec);
            handed.push(OwnedFd::from(image.file));
        }
        Ok((command, handed))
    }
}
