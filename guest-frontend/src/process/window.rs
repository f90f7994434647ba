//! The I/O window: the only memory a process domain shares with its backend.
//!
//! One memfd, created with `MFD_ALLOW_SEALING` and sealed `F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL` before its fd leaves the process, so a peer can neither truncate it under our
//! mapping (which would turn our accesses into SIGBUS) nor grow it, nor change the seals. It is
//! announced to the backend at a fixed guest-physical base ([`DEFAULT_WINDOW_GPA`]): every
//! address the backend sees is `base + offset`, never a host pointer.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

use thiserror::Error;

use crate::virtio::memory::{DmaRegion, FrontMemoryError};

/// Guest-physical base at which windows are announced by default (4 GiB).
pub const DEFAULT_WINDOW_GPA: u64 = ipc::control::messages::PROCESS_WINDOW_GPA;

/// The seals every window carries before it is shared.
pub const WINDOW_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Errors creating or inspecting an I/O window.
#[derive(Debug, Error)]
pub enum WindowError {
    /// Size zero, not page-rounded after rounding overflow, or GPA range overflow.
    #[error("invalid window size {size:#x} at GPA {gpa:#x}")]
    BadGeometry {
        /// Requested size.
        size: usize,
        /// Requested GPA base.
        gpa: u64,
    },
    /// memfd_create failed.
    #[error("memfd_create: {0}")]
    Create(#[source] io::Error),
    /// ftruncate failed.
    #[error("sizing the window memfd: {0}")]
    Resize(#[source] io::Error),
    /// Adding or reading seals failed.
    #[error("sealing the window memfd: {0}")]
    Seal(#[source] io::Error),
    /// mmap failed.
    #[error("mapping the window: {0}")]
    Map(#[source] io::Error),
    /// Region description error.
    #[error("window region: {0}")]
    Region(FrontMemoryError),
}

/// A sealed, mapped memfd with a guest-physical base.
#[derive(Debug)]
pub struct IoWindow {
    file: File,
    ptr: *mut u8,
    len: usize,
    gpa: u64,
    region: DmaRegion,
}

// SAFETY: the mapping is owned by the window and unmapped only in Drop; all accesses to it go
// through `DmaRegion`, whose users access memory volatilely/atomically (it is shared with a
// peer process anyway), so the raw pointer may move and be shared between threads.
unsafe impl Send for IoWindow {}
// SAFETY: see `Send`; `IoWindow` exposes no `&mut` access to the mapping.
unsafe impl Sync for IoWindow {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096).max(4096)
}

impl IoWindow {
    /// Creates a window of at least `size` bytes (rounded up to pages), announced at `gpa`.
    pub fn new(size: usize, gpa: u64) -> Result<Self, WindowError> {
        let page = page_size();
        let bad = WindowError::BadGeometry { size, gpa };
        let len = size
            .checked_add(page - 1)
            .map(|v| v & !(page - 1))
            .filter(|&v| v > 0)
            .ok_or(bad)?;
        if !gpa.is_multiple_of(page as u64) || gpa.checked_add(len as u64).is_none() {
            return Err(WindowError::BadGeometry { size, gpa });
        }
        let name = c"splitvmm-io-window";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(WindowError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(WindowError::Resize)?;
        // SAFETY: F_ADD_SEALS on a memfd we own; no pointers involved.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, WINDOW_SEALS) } < 0 {
            return Err(WindowError::Seal(io::Error::last_os_error()));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of our memfd at a kernel-chosen address;
        // it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(WindowError::Map(io::Error::last_os_error()));
        }
        let ptr = ptr.cast::<u8>();
        // SAFETY: `ptr..ptr+len` is our mapping, valid until Drop; `region` copies never outlive
        // the window because the window owns every user of them (see process::block).
        let region = match unsafe { DmaRegion::new(ptr, gpa, len) } {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: unmapping the mapping created above, which nothing references yet.
                unsafe { libc::munmap(ptr.cast(), len) };
                return Err(WindowError::Region(e));
            }
        };
        Ok(Self {
            file,
            ptr,
            len,
            gpa,
            region,
        })
    }

    /// The DMA view of the window (device addresses are GPAs).
    pub fn region(&self) -> DmaRegion {
        self.region
    }
    /// Guest-physical base.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Size in bytes (page-rounded).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: windows have at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The seals on the memfd (`F_GET_SEALS`).
    pub fn seals(&self) -> Result<i32, WindowError> {
        // SAFETY: F_GET_SEALS on a memfd we own.
        let v = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GET_SEALS) };
        if v < 0 {
            return Err(WindowError::Seal(io::Error::last_os_error()));
        }
        Ok(v)
    }
}

impl AsFd for IoWindow {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for IoWindow {
    fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl Drop for IoWindow {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and is unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::DmaMemory;

    #[test]
    fn window_is_sealed_against_resizing_and_reseal() {
        let w = IoWindow::new(10_000, DEFAULT_WINDOW_GPA).unwrap();
        assert_eq!(w.len() % 4096, 0);
        assert!(w.len() >= 10_000);
        assert_eq!(w.seals().unwrap() & WINDOW_SEALS, WINDOW_SEALS);
        // What a peer holding the fd would try.
        let f = w.file.try_clone().unwrap();
        assert!(f.set_len(0).is_err(), "shrink must be refused");
        assert!(
            f.set_len(w.len() as u64 * 2).is_err(),
            "grow must be refused"
        );
        // SAFETY: fcntl on an fd we own; no pointers.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1, "seals must be final");
    }

    #[test]
    fn window_addresses_are_gpas() {
        let w = IoWindow::new(8192, DEFAULT_WINDOW_GPA).unwrap();
        let r = w.region();
        assert_eq!(r.device_base(), DEFAULT_WINDOW_GPA);
        assert!(
            r.translate(0, 1).is_none(),
            "host-pointer-like addresses are not in the window"
        );
        r.write_bytes(DEFAULT_WINDOW_GPA + 8191, &[7]).unwrap();
        assert_eq!(r.read_u8(DEFAULT_WINDOW_GPA + 8191), Ok(7));
        assert!(r.translate(DEFAULT_WINDOW_GPA + 8192, 1).is_none());
        assert!(
            IoWindow::new(4096, DEFAULT_WINDOW_GPA + 1).is_err(),
            "unaligned GPA"
        );
        assert!(IoWindow::new(4096, u64::MAX - 100).is_err(), "GPA overflow");
    }
}
