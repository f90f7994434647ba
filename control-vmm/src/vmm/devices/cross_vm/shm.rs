//! The memory a channel's frontend shares (a region of its vhost-user memory table), mapped
//! into this process so that a KVM memory slot can put it into BAR2. Only memory that cannot
//! shrink under the driver VM is taken: a memfd sealed against shrinking, at least as long as
//! the region says (the driver domain's own rule for shared memory).

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{FileOffset, MmapRegion};

use super::CrossVmError;

/// Page size of memory slots.
pub const PAGE: u64 = 4096;

/// A frontend's memory region, mapped shared.
#[derive(Debug)]
pub struct MappedRegion {
    map: MmapRegion<()>,
    len: u64,
}

impl MappedRegion {
    /// Maps `len` bytes of `file` from `offset` (both page multiples), after checking that
    /// the file is sealed against shrinking and holds them.
    pub fn map(file: File, offset: u64, len: u64) -> Result<Self, CrossVmError> {
        if len == 0 || !len.is_multiple_of(PAGE) || !offset.is_multiple_of(PAGE) {
            return Err(CrossVmError::RegionAlignment { offset, len });
        }
        // SAFETY: F_GET_SEALS only reads the file's seals; the result is checked.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(CrossVmError::Unsealed);
        }
        let size = file
            .metadata()
            .map_err(|source| CrossVmError::Io {
                op: "fstat",
                source,
            })?
            .len();
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > size) {
            return Err(CrossVmError::RegionBeyondFile { offset, len, size });
        }
        let bytes =
            usize::try_from(len).map_err(|_| CrossVmError::RegionAlignment { offset, len })?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), bytes)
            .map_err(|e| CrossVmError::Map(e.to_string()))?;
        Ok(Self { map, len })
    }

    /// Its bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a region has at least a page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it is mapped in this process.
    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// A copy of `buf.len()` bytes from `offset` (tests look through the mapping).
    #[cfg(test)]
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        assert!(offset + buf.len() as u64 <= self.len);
        // SAFETY: the range is inside the live mapping (asserted above).
        let src = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), buf.len())
        };
        buf.copy_from_slice(src);
    }
}
