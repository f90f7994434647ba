//! Disk images as any domain opens them: what an image is and how big ([`probe`]), and the
//! QEMU-compatible locks that keep two users from writing one image ([`lock`]).

pub mod lock;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use lock::{ImageAccess, LockError};

/// Sector size every image is measured in.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of probing an image.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot stat: {0}")]
    Stat(#[source] io::Error),
    #[error("reading the size of the block device: {0}")]
    BlockSize(#[source] io::Error),
    #[error("not a regular file or a block device")]
    NotAnImage,
}

/// What backs an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    File,
    BlockDevice,
}

/// An image's kind, size and identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub kind: ImageKind,
    /// Size in bytes (`st_size`, or `BLKGETSIZE64` for a block device).
    pub size: u64,
    /// (st_dev, st_ino): the same image under any path.
    pub id: (u64, u64),
}

// linux/fs.h: _IOR(0x12, 114, size_t).
vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);

/// Kind, size and identity of an open image.
pub fn probe(file: &File) -> Result<ImageInfo, ProbeError> {
    let meta = file.metadata().map_err(ProbeError::Stat)?;
    let id = (meta.dev(), meta.ino());
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(ImageInfo {
            kind: ImageKind::File,
            size: meta.len(),
            id,
        });
    }
    if !kind.is_block_device() {
        return Err(ProbeError::NotAnImage);
    }
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at `size`; the
    // descriptor is an open block device.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) };
    if rc < 0 {
        return Err(ProbeError::BlockSize(io::Error::last_os_error()));
    }
    Ok(ImageInfo {
        kind: ImageKind::BlockDevice,
        size,
        id,
    })
}

/// A process holding locks on an image, found through `/proc/<pid>/fdinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
    /// The path its descriptor names.
    pub path: PathBuf,
}

/// Processes (of those whose `/proc` entries this one may read) with an open-file-description
/// lock on the image `id` in QEMU's lock range, except through `ours`. OFD locks do not
/// record an owner; `fdinfo` lists the locks each descriptor's description holds.
pub fn holders(id: (u64, u64), ours: Option<&File>) -> Vec<Holder> {
    let ours = ours.map(|f| f.as_raw_fd().to_string());
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(id.0),
        nix::sys::stat::minor(id.0),
        id.1
    );
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let in_range = info.lines().any(|line| holds_qemu_byte(line, &wanted));
            let is_ours = pid == me && ours.as_deref() == fd.file_name().to_str();
            if in_range && !is_ours {
                let command = command_name(&entry.path());
                let path = std::fs::read_link(entry.path().join("fd").join(fd.file_name()))
                    .unwrap_or_default();
                found.push(Holder { pid, command, path });
                break;
            }
        }
    }
    found
}

/// A process's program name: the file name of its argv[0] (`comm` is cut at 15 bytes).
fn command_name(proc_dir: &Path) -> String {
    let argv0 = std::fs::read(proc_dir.join("cmdline"))
        .ok()
        .and_then(|c| c.split(|b| *b == 0).next().map(<[u8]>::to_vec))
        .filter(|a| !a.is_empty());
    match argv0 {
        Some(a) => Path::new(std::ffi::OsStr::from_bytes(&a))
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        None => std::fs::read_to_string(proc_dir.join("comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default(),
    }
}

/// Who else holds locks on the image open as `ours`, for an error message: commands and pids
/// found by [`holders`], or a hint where to look.
pub fn describe_holders(ours: &File) -> String {
    let found = probe(ours)
        .map(|info| holders(info.id, Some(ours)))
        .unwrap_or_default();
    if found.is_empty() {
        return "another process (its lock does not name it; `lslocks` or `fuser` may)".to_owned();
    }
    found
        .iter()
        .map(|h| format!("{} (pid {})", h.command, h.pid))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `lock:\t1: OFDLCK  ADVISORY  READ -1 08:02:1234 100 100` on image `dev:ino`, in 100..=203.
fn holds_qemu_byte(line: &str, wanted: &str) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let Some(at) = fields.iter().position(|f| *f == wanted) else {
        return false;
    };
    let start = fields.get(at + 1).and_then(|s| s.parse::<i64>().ok());
    let end = fields.get(at + 2).and_then(|s| {
        if *s == "EOF" {
            Some(i64::MAX)
        } else {
            s.parse::<i64>().ok()
        }
    });
    matches!((start, end), (Some(s), Some(e)) if s <= lock::SHARED_BASE + 3 && e >= lock::PERM_BASE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn probe_reads_file_size_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        std::fs::write(&path, vec![0u8; 1536]).unwrap();
        let info = probe(&File::open(&path).unwrap()).unwrap();
        assert_eq!((info.kind, info.size), (ImageKind::File, 1536));
        assert!(matches!(
            probe(&File::open(dir.path()).unwrap()),
            Err(ProbeError::NotAnImage)
        ));
        assert!(matches!(
            probe(&File::open("/dev/null").unwrap()),
            Err(ProbeError::NotAnImage)
        ));
    }

    #[test]
    fn holders_name_the_process_holding_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        std::fs::write(&path, vec![0u8; 512]).unwrap();
        let held = File::open(&path).unwrap();
        let other = File::open(&path).unwrap();
        let info = probe(&held).unwrap();
        assert!(holders(info.id, Some(&other)).is_empty());
        lock::lock(&held, ImageAccess::ReadOnly).unwrap();
        let found = holders(info.id, Some(&other));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, std::process::id());
        assert_eq!(found[0].path, path);
        // Looking from the holding description itself finds nobody else.
        assert!(holders(info.id, Some(&held)).is_empty());
    }

    #[test]
    fn lock_lines_parse() {
        let w = "08:02:1234";
        assert!(holds_qemu_byte(
            "lock:\t1: OFDLCK  ADVISORY  READ -1 08:02:1234 100 100",
            w
        ));
        assert!(holds_qemu_byte(
            "lock:\t1: OFDLCK  ADVISORY  READ -1 08:02:1234 201 201",
            w
        ));
        assert!(!holds_qemu_byte(
            "lock:\t1: OFDLCK  ADVISORY  READ -1 08:02:1234 0 0",
            w
        ));
        assert!(!holds_qemu_byte(
            "lock:\t1: OFDLCK  ADVISORY  READ -1 08:02:12345 100 100",
            w
        ));
        assert!(holds_qemu_byte(
            "lock:\t1: POSIX  ADVISORY  WRITE 77 08:02:1234 0 EOF",
            w
        ));
    }
}
