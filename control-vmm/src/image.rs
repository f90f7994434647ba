//! The toolstack's side of the files a host file names: disk images are checked before
//! anything starts ([`check_disk`]) and opened for a guest created or grown as asked and
//! locked as QEMU locks them ([`open_disk`]); kernels are checked to be what they claim
//! ([`kernel_format`]).
//!
//! Nothing here writes to an image the user owns: `open_disk` creates a missing image or grows
//! one only when `size_mib` asks for it, and never changes bytes already there.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipc::image::{lock, probe, ImageAccess, ImageInfo, ImageKind, LockError, SECTOR_SIZE};

use crate::config::DiskConfig;

/// Errors of checking or opening an image or a kernel. Each says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}: no such file (give size_mib to have the toolstack create a scratch image)")]
    Missing(PathBuf),
    #[error("{0}: no such file (a read-only disk is never created)")]
    MissingReadOnly(PathBuf),
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Probe {
        path: PathBuf,
        #[source]
        source: ipc::image::ProbeError,
    },
    #[error("{0}: the image is empty; a disk needs at least one 512-byte sector (give size_mib, or `truncate -s 1M {0}`)")]
    Empty(PathBuf),
    #[error("{path}: size {size} bytes is not a multiple of 512 (a disk is whole sectors); pad it with `truncate -s {padded} {path}`")]
    Unaligned {
        path: PathBuf,
        size: u64,
        padded: u64,
    },
    #[error("{path}: in use by {holder}: {conflict}; detach it there or stop that user first")]
    Locked {
        path: PathBuf,
        holder: String,
        conflict: ipc::image::lock::Conflict,
    },
    #[error("{path}: locking: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: LockError,
    },
    #[error("{path}: growing to {mib} MiB: {source}")]
    Grow {
        path: PathBuf,
        mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: an ELF file, but not a 64-bit x86 executable (a kernel is ET_EXEC; a program such as /bin/ls is not a kernel)")]
    NotAKernelElf(PathBuf),
    #[error("{0}: neither an ELF kernel nor a Linux bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    NotAKernel(PathBuf),
}

/// Formats of a kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF (the tiny guest kernel; a Linux vmlinux).
    Elf,
    /// A Linux bzImage (boot protocol header "HdrS" at 0x202).
    BzImage,
}

/// Checks that `path` is a kernel and says which kind.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, ImageError> {
    let open_err = |source| ImageError::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    if !file.metadata().map_err(open_err)?.is_file() {
        return Err(ImageError::NotAKernel(path.to_owned()));
    }
    let mut head = Vec::with_capacity(0x206);
    file.take(0x206).read_to_end(&mut head).map_err(open_err)?;
    if head.starts_with(b"\x7fELF") {
        // ELFCLASS64, little-endian, ET_EXEC, EM_X86_64: a kernel, not a program such as
        // /bin/ls (ET_DYN) or a 32-bit or foreign one.
        let half = |at: usize| {
            head.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        if head.get(4..6) == Some(&[2, 1]) && half(16) == Some(2) && half(18) == Some(62) {
            Ok(KernelFormat::Elf)
        } else {
            Err(ImageError::NotAKernelElf(path.to_owned()))
        }
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Ok(KernelFormat::BzImage)
    } else {
        Err(ImageError::NotAKernel(path.to_owned()))
    }
}

fn open_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Open {
        path: path.to_owned(),
        source,
    }
}

/// Size checks on an existing image: at least a sector, whole sectors.
fn check_size(path: &Path, info: &ImageInfo) -> Result<(), ImageError> {
    if info.size == 0 {
        return Err(ImageError::Empty(path.to_owned()));
    }
    if !info.size.is_multiple_of(SECTOR_SIZE) {
        return Err(ImageError::Unaligned {
            path: path.to_owned(),
            size: info.size,
            padded: info.size.next_multiple_of(SECTOR_SIZE),
        });
    }
    Ok(())
}

/// Whether `open_disk` would create or grow this image (never a block device).
fn will_size(disk: &DiskConfig, info: Option<&ImageInfo>) -> bool {
    match (disk.size_mib, disk.readonly, info) {
        (Some(_), false, None) => true,
        (Some(mib), false, Some(info)) => {
            info.kind == ImageKind::File && info.size < mib.saturating_mul(1 << 20)
        }
        _ => false,
    }
}

/// Opens without following into a FIFO's wait or a device's side effects: read-only,
/// non-blocking, only to look.
fn open_to_look(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(open_err(path))
}

/// Checks `disk` as `up` loads the host file: the image exists (or will be created), is a
/// regular file or a block device, and is whole sectors (or will be grown to them).
pub fn check_disk(disk: &DiskConfig) -> Result<(), ImageError> {
    let path = &disk.image;
    let file = match open_to_look(path) {
        Ok(file) => file,
        Err(ImageError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return if will_size(disk, None) {
                Ok(())
            } else if disk.readonly {
                Err(ImageError::MissingReadOnly(path.to_owned()))
            } else {
                Err(ImageError::Missing(path.to_owned()))
            };
        }
        Err(e) => return Err(e),
    };
    let info = probe(&file).map_err(|source| ImageError::Probe {
        path: path.to_owned(),
        source,
    })?;
    if will_size(disk, Some(&info)) {
        return Ok(());
    }
    check_size(path, &info)
}

/// A disk image the toolstack holds open (and locked) for a guest.
#[derive(Debug)]
pub struct OpenImage {
    /// The toolstack's own descriptor; the driver domain gets a duplicate of the same open
    /// file description, so the lock lives as long as either holds it.
    pub file: File,
    pub info: ImageInfo,
    /// The toolstack created this image (it did not exist).
    pub created: bool,
}

impl OpenImage {
    /// Drops the lock (on every duplicate of the description, the driver domain's too).
    pub fn release(self) {
        if let Err(e) = lock::unlock(&self.file) {
            log::warn!("unlocking an image: {e}");
        }
    }
}

/// Opens `disk` for a guest: checks it as [`check_disk`] does, locks it (shared when read-only,
/// exclusive when writable), then creates or grows it if `size_mib` asks. `holder_of` names a
/// user of the image that this toolstack knows of; any other holder is looked up in `/proc`.
pub fn open_disk(
    disk: &DiskConfig,
    holder_of: &dyn Fn((u64, u64)) -> Option<String>,
) -> Result<OpenImage, ImageError> {
    check_disk(disk)?;
    let path = &disk.image;
    let create = disk.size_mib.is_some() && !disk.readonly;
    if create {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err(dir))?;
        }
    }
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(!disk.readonly)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(open_err(path))?;
    let probe_err = |source| ImageError::Probe {
        path: path.to_owned(),
        source,
    };
    let info = probe(&file).map_err(probe_err)?;
    let access = if disk.readonly {
        ImageAccess::ReadOnly
    } else {
        ImageAccess::ReadWrite
    };
    match lock::lock(&file, access) {
        Ok(()) => {}
        Err(LockError::Conflict(conflict)) => {
            let holder = holder_of(info.id).unwrap_or_else(|| ipc::image::describe_holders(&file));
            return Err(ImageError::Locked {
                path: path.to_owned(),
                holder,
                conflict,
            });
        }
        Err(source) => {
            return Err(ImageError::Lock {
                path: path.to_owned(),
                source,
            })
        }
    }
    let mut info = info;
    if will_size(disk, Some(&info)) {
        let mib = disk.size_mib.unwrap_or_default();
        file.set_len(mib << 20).map_err(|source| ImageError::Grow {
            path: path.to_owned(),
            mib,
            source,
        })?;
        info = probe(&file).map_err(probe_err)?;
    }
    // The lock went on first: whatever the file was before, only now is it ours to judge.
    if let Err(e) = check_size(path, &info) {
        let _ = lock::unlock(&file);
        return Err(e);
    }
    Ok(OpenImage {
        file,
        info,
        created: !existed,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn disk(image: PathBuf) -> DiskConfig {
        DiskConfig {
            device: None,
            image,
            size_mib: None,
            devid: 51712,
            readonly: false,
            scratch: false,
            queues: 1,
        }
    }

    #[test]
    fn images_must_exist_be_files_and_whole_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let mut d = disk(path.clone());
        assert!(matches!(check_disk(&d), Err(ImageError::Missing(_))));
        d.size_mib = Some(1);
        check_disk(&d).unwrap();
        std::fs::write(&path, b"").unwrap();
        d.size_mib = None;
        assert!(matches!(check_disk(&d), Err(ImageError::Empty(_))));
        std::fs::write(&path, vec![1u8; 1000]).unwrap();
        let err = check_disk(&d).unwrap_err().to_string();
        assert!(err.contains("truncate -s 1024"), "{err}");
        // Growing it to size_mib makes it whole sectors; read-only it cannot be grown.
        d.size_mib = Some(1);
        check_disk(&d).unwrap();
        d.readonly = true;
        assert!(check_disk(&d).is_err());
        let dir_disk = disk(dir.path().to_owned());
        assert!(matches!(
            check_disk(&dir_disk),
            Err(ImageError::Probe { .. })
        ));
        assert!(check_disk(&disk("/dev/zero".into())).is_err());
    }

    #[test]
    fn open_creates_locks_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = disk(dir.path().join("new/a.img"));
        d.size_mib = Some(2);
        let first = open_disk(&d, &|_| None).unwrap();
        assert!(first.created);
        assert_eq!(first.info.size, 2 << 20);
        let id = first.info.id;
        let named = |i| (i == id).then(|| "guest-a vbd 51712".to_owned());
        match open_disk(&d, &named) {
            Err(e @ ImageError::Locked { .. }) => {
                assert!(e.to_string().contains("guest-a vbd 51712"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // Unknown to the registry: found through /proc, as this very process.
        let err = open_disk(&d, &|_| None).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        first.release();
        let again = open_disk(&d, &|_| None).unwrap();
        assert!(!again.created);
    }

    #[test]
    fn kernels_are_what_they_claim() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("k.elf");
        let mut header = vec![0u8; 64];
        header[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        header[16] = 2; // ET_EXEC
        header[18] = 62; // EM_X86_64
        std::fs::write(&elf, &header).unwrap();
        assert_eq!(kernel_format(&elf).unwrap(), KernelFormat::Elf);
        header[16] = 3; // ET_DYN, as /bin/ls
        std::fs::write(&elf, &header).unwrap();
        assert!(matches!(
            kernel_format(&elf),
            Err(ImageError::NotAKernelElf(_))
        ));
        let bz = dir.path().join("bzImage");
        let mut bytes = vec![0u8; 0x400];
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, bytes).unwrap();
        assert_eq!(kernel_format(&bz).unwrap(), KernelFormat::BzImage);
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"hello").unwrap();
        assert!(matches!(
            kernel_format(&text),
            Err(ImageError::NotAKernel(_))
        ));
        assert!(kernel_format(&dir.path().join("missing")).is_err());
        assert!(kernel_format(dir.path()).is_err());
    }
}
