//! A shared mapping of part of a file (a BAR's sysfs `resource` file in the driver VM, a
//! regular file or memfd in tests) with bounds-checked volatile 16- and 32-bit access: the
//! doorbell registers of BAR0 and the rings' avail indexes in BAR2 are read and written this
//! way only, never through references (the other side changes them at any time).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use thiserror::Error;

/// Why a mapping could not be made or an access was refused.
#[derive(Debug, Error)]
pub enum MappingError {
    /// `mmap` failed.
    #[error("cannot map {len:#x} bytes at {offset:#x}: {source}")]
    Map {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    /// The offset is not page aligned, or the range is empty or past the file's end.
    #[error(
        "range [{offset:#x}, +{len:#x}) is not page aligned or not within {file_len:#x} bytes"
    )]
    Range {
        offset: u64,
        len: usize,
        file_len: u64,
    },
    /// An access outside the mapping or misaligned.
    #[error("access of {size} bytes at {at:#x} outside a mapping of {len:#x} bytes or misaligned")]
    Access { at: usize, size: usize, len: usize },
}

/// The system's page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096).max(4096)
}

/// `len` bytes of a file from `offset` (page aligned), mapped shared.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// volatile reads and writes of naturally aligned words within its bounds, which are sound from
// any thread (the peer writes the same memory concurrently anyway).
unsafe impl Send for Mapping {}
// SAFETY: as above; no access hands out a reference into the mapping.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from `offset`, readable and, with `write`, writable. The
    /// range must lie within the file's size (a sysfs `resource` file's size is its BAR's).
    pub fn new(file: &File, offset: u64, len: usize, write: bool) -> Result<Self, MappingError> {
        let file_len = file
            .metadata()
            .map_err(|source| MappingError::Map {
                offset,
                len,
                source,
            })?
            .len();
        let in_file = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= file_len);
        if len == 0 || !offset.is_multiple_of(page_size()) || !in_file {
            return Err(MappingError::Range {
                offset,
                len,
                file_len,
            });
        }
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        let off = libc::off_t::try_from(offset).map_err(|_| MappingError::Range {
            offset,
            len,
            file_len,
        })?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no MAP_FIXED), of a range
        // checked to lie within the file; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MappingError::Map {
                offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| MappingError::Map {
            offset,
            len,
            source: io::Error::other("mmap returned null"),
        })?;
        Ok(Mapping { ptr, len })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never: a mapping has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, at: usize, size: usize) -> Result<(), MappingError> {
        if !at.is_multiple_of(size) || at.checked_add(size).is_none_or(|end| end > self.len) {
            return Err(MappingError::Access {
                at,
                size,
                len: self.len,
            });
        }
        Ok(())
    }

    /// The 16-bit word at `at` (aligned).
    pub fn read_u16(&self, at: usize) -> Result<u16, MappingError> {
        self.check(at, 2)?;
        // SAFETY: `at` is 2-aligned and `at + 2 <= len` (checked), within the live mapping.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(at).cast::<u16>()) })
    }

    /// The 32-bit word at `at` (aligned).
    pub fn read_u32(&self, at: usize) -> Result<u32, MappingError> {
        self.check(at, 4)?;
        // SAFETY: `at` is 4-aligned and `at + 4 <= len` (checked), within the live mapping.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(at).cast::<u32>()) })
    }

    /// The 64-bit word at `at` (aligned).
    pub fn read_u64(&self, at: usize) -> Result<u64, MappingError> {
        self.check(at, 8)?;
        // SAFETY: `at` is 8-aligned and `at + 8 <= len` (checked), within the live mapping.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(at).cast::<u64>()) })
    }

    /// Copies `buf.len()` bytes from `at` (both multiples of 8) with one volatile 64-bit load
    /// per word: plain moves, which KVM can emulate should a page turn out not to be backed
    /// (a wide vector copy it may not).
    pub fn read_words(&self, at: usize, buf: &mut [u8]) -> Result<(), MappingError> {
        self.check(at, 8)?;
        let fits = at.checked_add(buf.len()).is_some_and(|end| end <= self.len);
        if !buf.len().is_multiple_of(8) || !fits {
            return Err(MappingError::Access {
                at,
                size: buf.len(),
                len: self.len,
            });
        }
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            // SAFETY: `at` is 8-aligned and `at + buf.len() <= len` (checked), so each word
            // lies within the live mapping, aligned.
            let v =
                unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(at + 8 * i).cast::<u64>()) };
            word.copy_from_slice(&v.to_ne_bytes());
        }
        Ok(())
    }

    /// Writes the 32-bit word at `at` (aligned; the mapping must be writable).
    pub fn write_u32(&self, at: usize, value: u32) -> Result<(), MappingError> {
        self.check(at, 4)?;
        // SAFETY: `at` is 4-aligned and `at + 4 <= len` (checked), within the live mapping,
        // which the caller mapped writable.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(at).cast::<u32>(), value) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value made; nothing refers into it (every
        // access copies).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn reads_and_writes_reach_the_file_at_the_mapped_offset() {
        let f = file(3 * 4096);
        f.write_all_at(&0xbeefu16.to_le_bytes(), 4096 + 6).unwrap();
        let m = Mapping::new(&f, 4096, 4096, true).unwrap();
        assert_eq!(m.read_u16(6).unwrap(), 0xbeef);
        m.write_u32(0x10c, 0x1234_5678).unwrap();
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 4096 + 0x10c).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
    }

    #[test]
    fn out_of_range_and_misaligned_accesses_are_refused() {
        let f = file(4096);
        let m = Mapping::new(&f, 0, 4096, false).unwrap();
        assert!(m.read_u32(4092).is_ok());
        assert!(matches!(m.read_u32(4096), Err(MappingError::Access { .. })));
        assert!(matches!(m.read_u16(3), Err(MappingError::Access { .. })));
        assert!(matches!(
            m.read_u32(usize::MAX - 3),
            Err(MappingError::Access { .. })
        ));
    }

    #[test]
    fn words_are_copied_within_the_mapping_only() {
        let f = file(8192);
        f.write_all_at(b"0123456789abcdef", 4096 - 8).unwrap();
        let m = Mapping::new(&f, 0, 8192, false).unwrap();
        let mut buf = [0u8; 16];
        m.read_words(4096 - 8, &mut buf).unwrap();
        assert_eq!(&buf, b"0123456789abcdef");
        assert_eq!(m.read_u64(4096).unwrap(), u64::from_ne_bytes(*b"89abcdef"));
        assert!(m.read_words(8192 - 8, &mut buf).is_err(), "past the end");
        assert!(m.read_words(4, &mut buf).is_err(), "misaligned");
        assert!(m.read_words(0, &mut [0u8; 12]).is_err(), "not whole words");
        assert!(m.read_u64(8192).is_err());
    }

    #[test]
    fn a_range_past_the_file_or_unaligned_is_refused() {
        let f = file(8192);
        assert!(matches!(
            Mapping::new(&f, 4096, 8192, false),
            Err(MappingError::Range { .. })
        ));
        assert!(matches!(
            Mapping::new(&f, 100, 4096, false),
            Err(MappingError::Range { .. })
        ));
        assert!(matches!(
            Mapping::new(&f, u64::MAX - 4095, 4096, false),
            Err(MappingError::Range { .. })
        ));
    }
}
