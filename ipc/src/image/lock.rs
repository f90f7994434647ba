//! Image locking compatible with QEMU's `file-posix` driver, so a splitvmm backend, QEMU and
//! qemu-storage-daemon see each other's claims on an image.
//!
//! QEMU expresses a user's claim as permissions (block/block-common.h: consistent read 0x1,
//! write 0x2, write-unchanged 0x4, resize 0x8) and locks one byte per permission with
//! open-file-description locks (`F_OFD_SETLK`, shared `F_RDLCK`): byte `100 + i` when the
//! user *holds* permission bit `i`, byte `200 + i` when it does *not share* it with others. A
//! new user first takes its bytes, then tests (`F_OFD_GETLK` with `F_WRLCK`) byte `200 + i` for
//! each permission it wants (someone refuses to share it) and byte `100 + i` for each it will
//! not share (someone holds it). Byte 0 is libvirt's, untouched here.
//!
//! The locks belong to the open file description: every descriptor duplicated from it (also
//! across processes by `SCM_RIGHTS`) carries them, and they go when the last one closes or
//! when [`unlock`] is called on any of them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// First byte of the "holds permission" range (QEMU's `RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" range (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: i64 = 200;

/// QEMU's `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u8 = 0x01;
/// QEMU's `BLK_PERM_WRITE`.
pub const PERM_WRITE: u8 = 0x02;
/// QEMU's `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u8 = 0x04;
/// QEMU's `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u8 = 0x08;
/// QEMU's `BLK_PERM_ALL` (since QEMU 6.2; 0x10 was the removed graph-mod permission).
pub const PERM_ALL: u8 = 0x0f;

/// How a user means to use an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageAccess {
    /// Reads only; other readers are welcome, writers and resizers are not (as a read-only
    /// QEMU disk without `share-rw`).
    ReadOnly,
    /// Reads, writes and may grow it; nobody else may write or resize (as a writable QEMU disk
    /// without `share-rw`).
    ReadWrite,
}

impl ImageAccess {
    /// (held, shared) permissions, in QEMU's bits.
    pub fn permissions(self) -> (u8, u8) {
        let shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
        match self {
            ImageAccess::ReadOnly => (PERM_CONSISTENT_READ, shared),
            ImageAccess::ReadWrite => (PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared),
        }
    }
}

/// Errors of taking or dropping an image lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another user's claim conflicts with ours.
    #[error("{0}")]
    Conflict(Conflict),
    /// The file system refused the lock operation.
    #[error("lock byte {byte}: {source}")]
    Fcntl {
        byte: i64,
        #[source]
        source: io::Error,
    },
}

/// What another user claims that we cannot live with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Someone does not share a permission we want (they hold the image for writing or
    /// resizing while we want it, or they read it and will not let us write).
    NotShared(u8),
    /// Someone holds a permission we will not share (they write it and we read, or they
    /// read and we want it alone).
    Held(u8),
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::NotShared(p) => write!(
                f,
                "it does not share the \"{}\" permission we need",
                perm_name(*p)
            ),
            Conflict::Held(p) => write!(
                f,
                "it holds the \"{}\" permission, which we do not share",
                perm_name(*p)
            ),
        }
    }
}

/// QEMU's names for its permissions (`bdrv_perm_names`).
pub fn perm_name(perm: u8) -> &'static str {
    match perm {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

/// (bit index, bit) of each permission in `mask`.
fn bits(mask: u8) -> impl Iterator<Item = (i64, u8)> {
    (0..u8::BITS)
        .map(|i| (i64::from(i), 1u8 << i))
        .filter(move |(_, bit)| mask & PERM_ALL & bit != 0)
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (and l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn ofd(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> Result<(), LockError> {
    // SAFETY: `fl` is a valid flock the kernel reads (and for GETLK writes) during the call;
    // the descriptor is open for the duration of the borrow.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if rc == -1 {
        return Err(LockError::Fcntl {
            byte: fl.l_start,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether someone other than this open file description locks `byte`.
fn locked_by_other(file: &File, byte: i64) -> Result<bool, LockError> {
    let mut fl = flock(libc::F_WRLCK, byte);
    ofd(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Claims `file` for `access` as QEMU would; on a conflict nothing stays locked.
pub fn lock(file: &File, access: ImageAccess) -> Result<(), LockError> {
    let (held, shared) = access.permissions();
    let result = apply(file, held, shared);
    if result.is_err() {
        let _ = unlock(file);
    }
    result
}

fn apply(file: &File, held: u8, shared: u8) -> Result<(), LockError> {
    let unshared = PERM_ALL & !shared;
    for (i, _) in bits(held) {
        set_read_lock(file, PERM_BASE + i)?;
    }
    for (i, _) in bits(unshared) {
        set_read_lock(file, SHARED_BASE + i)?;
    }
    for (i, perm) in bits(held) {
        if locked_by_other(file, SHARED_BASE + i)? {
            return Err(LockError::Conflict(Conflict::NotShared(perm)));
        }
    }
    for (i, perm) in bits(unshared) {
        if locked_by_other(file, PERM_BASE + i)? {
            return Err(LockError::Conflict(Conflict::Held(perm)));
        }
    }
    Ok(())
}

fn set_read_lock(file: &File, byte: i64) -> Result<(), LockError> {
    match ofd(file, libc::F_OFD_SETLK, &mut flock(libc::F_RDLCK, byte)) {
        // Only a write lock on the byte stops a read lock: nobody following QEMU's scheme
        // takes one, but whoever does certainly claims the image.
        Err(LockError::Fcntl { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) =>
        {
            Err(LockError::Conflict(Conflict::Held(PERM_WRITE)))
        }
        other => other,
    }
}

/// Drops every lock byte this open file description holds (on every duplicate of it).
pub fn unlock(file: &File) -> Result<(), LockError> {
    for base in [PERM_BASE, SHARED_BASE] {
        let mut fl = flock(libc::F_UNLCK, base);
        fl.l_len = i64::from(u8::BITS - PERM_ALL.leading_zeros());
        ofd(file, libc::F_OFD_SETLK, &mut fl)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn readers_share_and_a_writer_is_refused_by_either() {
        let (_dir, path) = image();
        let (a, b, w) = (open(&path), open(&path), open(&path));
        lock(&a, ImageAccess::ReadOnly).unwrap();
        lock(&b, ImageAccess::ReadOnly).unwrap();
        match lock(&w, ImageAccess::ReadWrite) {
            Err(LockError::Conflict(Conflict::NotShared(PERM_WRITE))) => {}
            other => panic!("{other:?}"),
        }
        unlock(&a).unwrap();
        assert!(lock(&w, ImageAccess::ReadWrite).is_err(), "b still reads");
        drop(b);
        lock(&w, ImageAccess::ReadWrite).unwrap();
    }

    #[test]
    fn a_read_only_descriptor_takes_and_tests_locks() {
        let (_dir, path) = image();
        let ro = File::open(&path).unwrap();
        lock(&ro, ImageAccess::ReadOnly).unwrap();
        assert!(lock(&open(&path), ImageAccess::ReadWrite).is_err());
        let other_ro = File::open(&path).unwrap();
        lock(&other_ro, ImageAccess::ReadOnly).unwrap();
    }

    #[test]
    fn a_writer_excludes_readers_and_writers_and_a_dup_keeps_the_lock() {
        let (_dir, path) = image();
        let w = open(&path);
        lock(&w, ImageAccess::ReadWrite).unwrap();
        let copy = w.try_clone().unwrap();
        drop(w);
        let r = open(&path);
        match lock(&r, ImageAccess::ReadOnly) {
            Err(LockError::Conflict(Conflict::Held(PERM_WRITE))) => {}
            other => panic!("{other:?}"),
        }
        // The failed attempt left nothing behind: once the writer goes, r gets it.
        unlock(&copy).unwrap();
        lock(&r, ImageAccess::ReadWrite).unwrap();
        assert!(lock(&copy, ImageAccess::ReadOnly).is_err());
    }
}
