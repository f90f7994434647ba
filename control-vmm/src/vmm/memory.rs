//! Guest memory: RAM and the I/O window, each a memfd mapped with vm-memory and registered as a
//! KVM memory slot.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Errors setting up guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("memory size {0:#x} is zero or not a multiple of 2 MiB")]
    BadSize(u64),
    #[error("memfd_create {name}: {source}")]
    Memfd {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("sizing or sealing the {name} memfd: {source}")]
    Resize {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("mapping {name}: {source}")]
    Map {
        name: &'static str,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory regions overlap")]
    Overlap,
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Slot(kvm_ioctls::Error),
}

/// One memfd-backed piece of guest-physical memory.
#[derive(Debug)]
pub struct MemfdRegion {
    /// The memfd (handed to the backend for the window).
    pub file: File,
    /// Guest-physical base.
    pub gpa: u64,
    /// Size in bytes.
    pub len: u64,
}

/// The guest's memory: RAM at GPA 0 and, for the tiny guest, the I/O window.
#[derive(Debug)]
pub struct GuestRam {
    /// vm-memory view of all regions (RAM and window).
    pub mem: GuestMemoryMmap,
    /// RAM (GPA 0).
    pub ram: MemfdRegion,
    /// The I/O window shared with the driver domain (none for a Linux guest, which shares
    /// all of its RAM).
    pub window: Option<MemfdRegion>,
}

pub(crate) fn memfd(name: &'static str, len: u64, seal: bool) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create takes a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            name,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let resize = |source| MemoryError::Resize { name, source };
    file.set_len(len).map_err(resize)?;
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd we own; no memory is involved.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(resize(std::io::Error::last_os_error()));
        }
    }
    Ok(file)
}

fn map(name: &'static str, r: &MemfdRegion) -> Result<GuestRegionMmap, MemoryError> {
    let file = r
        .file
        .try_clone()
        .map_err(|source| MemoryError::Memfd { name, source })?;
    let mapping = MmapRegion::from_file(FileOffset::new(file, 0), r.len as usize)
        .map_err(|source| MemoryError::Map { name, source })?;
    GuestRegionMmap::new(mapping, GuestAddress(r.gpa)).ok_or(MemoryError::Overlap)
}

impl GuestRam {
    /// Creates `ram_bytes` of RAM at GPA 0 and a sealed window of `window_bytes` at
    /// `window_gpa`, both multiples of 2 MiB / 4 KiB respectively.
    pub fn new(ram_bytes: u64, window_gpa: u64, window_bytes: u64) -> Result<Self, MemoryError> {
        if ram_bytes == 0 || !ram_bytes.is_multiple_of(2 << 20) || ram_bytes > window_gpa {
            return Err(MemoryError::BadSize(ram_bytes));
        }
        if window_bytes == 0 || !window_bytes.is_multiple_of(4096) {
            return Err(MemoryError::BadSize(window_bytes));
        }
        let ram = MemfdRegion {
            // Sealed too: RAM never changes size, and a driver domain that maps it (a
            // guest with share = "all-ram") refuses memory that could shrink under it.
            file: memfd("splitvmm-ram", ram_bytes, true)?,
            gpa: 0,
            len: ram_bytes,
        };
        let window = MemfdRegion {
            file: memfd("splitvmm-io-window", window_bytes, true)?,
            gpa: window_gpa,
            len: window_bytes,
        };
        let regions = vec![map("RAM", &ram)?, map("I/O window", &window)?];
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Overlap)?;
        Ok(Self {
            mem,
            ram,
            window: Some(window),
        })
    }

    /// RAM only: `ram_bytes` (a multiple of 2 MiB, at most `limit`) at GPA 0, in a memfd
    /// named `name` (what `/proc/<pid>/maps` shows: a guest's `splitvmm-ram`, a driver VM's
    /// own `splitvmm-driver-vm-ram` beside the guests' RAM mapped into its BAR2).
    pub fn ram_only(ram_bytes: u64, limit: u64, name: &'static str) -> Result<Self, MemoryError> {
        if ram_bytes == 0 || !ram_bytes.is_multiple_of(2 << 20) || ram_bytes > limit {
            return Err(MemoryError::BadSize(ram_bytes));
        }
        let ram = MemfdRegion {
            // Sealed too: RAM never changes size, and a driver domain that maps it (a
            // guest with share = "all-ram") refuses memory that could shrink under it.
            file: memfd(name, ram_bytes, true)?,
            gpa: 0,
            len: ram_bytes,
        };
        let mem = GuestMemoryMmap::from_regions(vec![map("RAM", &ram)?])
            .map_err(|_| MemoryError::Overlap)?;
        Ok(Self {
            mem,
            ram,
            window: None,
        })
    }

    /// Registers every region as a KVM memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| MemoryError::Overlap)?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.mem`, which outlives the
            // VM (the VM is dropped first by the machine that owns both).
            unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Slot)?;
        }
        Ok(())
    }
}
