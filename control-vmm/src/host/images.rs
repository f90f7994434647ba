//! The disk images the toolstack holds for guests' disks: opened and locked as QEMU locks
//! them ([`crate::image`]), in one registry for the host that names who holds an image when
//! another attach is refused, and says which images checks may write to.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::DiskConfig;
use crate::image::{self, OpenImage};

/// A disk image held for one guest's vbd, attached or about to be.
struct HeldImage {
    image: OpenImage,
    path: PathBuf,
    /// Disk checks may write to it (`scratch = true`, or the toolstack created it).
    scratch: bool,
}

/// Every image the host holds, by (guest, vbd).
#[derive(Default)]
pub(super) struct ImageRegistry {
    held: BTreeMap<(String, u32), HeldImage>,
    /// (st_dev, st_ino) of the images this toolstack created: scratch for as long as it runs.
    created: BTreeSet<(u64, u64)>,
}

impl ImageRegistry {
    /// Opens and locks `disk`'s image for `guest`, unless it already holds it.
    pub(super) fn hold(&mut self, guest: &str, disk: &DiskConfig) -> Result<()> {
        if disk.device.is_some() {
            // A device inside the driver VM: no host image to open or lock.
            return Ok(());
        }
        let key = (guest.to_owned(), disk.devid);
        if self.held.contains_key(&key) {
            return Ok(());
        }
        let holder_of = |id| {
            self.held
                .iter()
                .find(|(_, h)| h.image.info.id == id)
                .map(|((guest, devid), _)| format!("{guest}'s vbd {devid} on this host"))
        };
        let image = image::open_disk(disk, &holder_of)?;
        if image.created {
            self.created.insert(image.info.id);
        }
        let scratch = disk.scratch || self.created.contains(&image.info.id);
        self.held.insert(
            key,
            HeldImage {
                image,
                path: disk.image.clone(),
                scratch,
            },
        );
        Ok(())
    }

    /// A duplicate of the held descriptor (same open file description, so the same lock), to
    /// hand to the driver domain.
    pub(super) fn file(&self, guest: &str, devid: u32) -> Result<File> {
        self.held
            .get(&(guest.to_owned(), devid))
            .context("image not held")?
            .image
            .file
            .try_clone()
            .context("duplicating the image descriptor")
    }

    /// Drops the image of `guest`'s vbd `devid`, and its lock.
    pub(super) fn release(&mut self, guest: &str, devid: u32) {
        if let Some(held) = self.held.remove(&(guest.to_owned(), devid)) {
            held.image.release();
        }
    }

    /// Drops every image `guest` holds.
    pub(super) fn release_guest(&mut self, guest: &str) {
        let keys: Vec<(String, u32)> = self
            .held
            .keys()
            .filter(|(g, _)| g == guest)
            .cloned()
            .collect();
        for (guest, devid) in keys {
            self.release(&guest, devid);
        }
    }

    /// Whether checks may write to `guest`'s vbd `devid`.
    pub(super) fn is_scratch(&self, guest: &str, devid: u32) -> bool {
        self.held
            .get(&(guest.to_owned(), devid))
            .is_some_and(|h| h.scratch)
    }

    /// The image's path, for messages.
    pub(super) fn path(&self, guest: &str, devid: u32) -> Option<PathBuf> {
        self.held
            .get(&(guest.to_owned(), devid))
            .map(|h| h.path.clone())
    }
}
