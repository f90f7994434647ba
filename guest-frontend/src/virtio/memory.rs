//! Memory the driver shares with a device ("DMA memory").
//!
//! A virtio driver puts rings and buffers in memory the device can reach and hands the device
//! *device-visible addresses* (guest-physical addresses) to them. Two places run this driver:
//!
//! * a tiny freestanding guest kernel, where physical memory is identity-mapped: the address the
//!   device sees is the pointer value;
//! * a host process (a process domain), where the only shared memory is the **I/O window**, a
//!   memfd mapped at some host pointer and announced to the backend at a fixed guest-physical
//!   base: device address = window base GPA + offset.
//!
//! [`DmaRegion`] covers both: a contiguous local mapping plus the device address of its first
//! byte. [`DmaMemory`] is the translation the virtqueue driver needs, and [`BumpAllocator`] carves
//! rings and buffers out of a region at set-up time.

use core::fmt;
use core::ptr::NonNull;

/// Translation of device-visible addresses to local pointers.
///
/// # Safety
///
/// An implementation guarantees that a pointer returned by [`DmaMemory::translate`] is valid for
/// reads and writes of `len` bytes for as long as the implementing object lives, and that the
/// memory is *not* treated as exclusively owned by anyone: the device may read or write it at
/// any time, so users access it only with volatile or atomic operations.
pub unsafe trait DmaMemory {
    /// Device address of the first byte.
    fn device_base(&self) -> u64;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    /// Local pointer for `len` bytes at device address `addr`, or `None` if any byte of the range
    /// lies outside the memory.
    fn translate(&self, addr: u64, len: usize) -> Option<NonNull<u8>>;

    /// True if the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` into device memory at `addr` (volatile, byte-wise semantics preserved).
    fn write_bytes(&self, addr: u64, src: &[u8]) -> Result<(), FrontMemoryError> {
        let dst = self
            .translate(addr, src.len())
            .ok_or(FrontMemoryError::OutOfRange {
                addr,
                len: src.len(),
            })?;
        // SAFETY: `translate` guarantees `src.len()` bytes at `dst` are valid for writes; `src`
        // is a distinct Rust slice (it cannot alias shared DMA memory handed out as a slice, as
        // this module never creates references into DMA memory).
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), src.len()) };
        Ok(())
    }

    /// Copies device memory at `addr` into `dst`.
    fn read_bytes(&self, addr: u64, dst: &mut [u8]) -> Result<(), FrontMemoryError> {
        let src = self
            .translate(addr, dst.len())
            .ok_or(FrontMemoryError::OutOfRange {
                addr,
                len: dst.len(),
            })?;
        // SAFETY: `translate` guarantees `dst.len()` readable bytes at `src`; `dst` is an
        // exclusive Rust slice that does not overlap DMA memory.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Volatile read of one byte at `addr`.
    fn read_u8(&self, addr: u64) -> Result<u8, FrontMemoryError> {
        let p = self
            .translate(addr, 1)
            .ok_or(FrontMemoryError::OutOfRange { addr, len: 1 })?;
        // SAFETY: one byte at `p` is valid for reads (trait contract).
        Ok(unsafe { core::ptr::read_volatile(p.as_ptr()) })
    }

    /// Volatile write of one byte at `addr`.
    fn write_u8(&self, addr: u64, value: u8) -> Result<(), FrontMemoryError> {
        let p = self
            .translate(addr, 1)
            .ok_or(FrontMemoryError::OutOfRange { addr, len: 1 })?;
        // SAFETY: one byte at `p` is valid for writes (trait contract).
        unsafe { core::ptr::write_volatile(p.as_ptr(), value) };
        Ok(())
    }
}

/// Errors of DMA memory handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontMemoryError {
    /// A device address range is not inside the memory.
    OutOfRange {
        /// Device address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// The allocator has no room for the request.
    Exhausted {
        /// Requested size.
        size: usize,
    },
    /// A region description is unusable (null pointer, misaligned, or address overflow).
    InvalidRegion,
}

impl fmt::Display for FrontMemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { addr, len } => {
                write!(f, "device range {addr:#x}+{len:#x} is outside DMA memory")
            }
            Self::Exhausted { size } => write!(f, "DMA memory exhausted allocating {size} bytes"),
            Self::InvalidRegion => write!(f, "invalid DMA region"),
        }
    }
}

impl core::error::Error for FrontMemoryError {}

/// A contiguous piece of DMA memory: a local mapping plus the device address of its first byte.
#[derive(Debug, Clone, Copy)]
pub struct DmaRegion {
    ptr: NonNull<u8>,
    device_base: u64,
    len: usize,
}

// SAFETY: a DmaRegion is a description of memory (pointer + addresses); all accesses through it
// are volatile/atomic and the memory is designed to be shared with a concurrently running
// device, so sharing the description between threads adds no new hazard.
unsafe impl Send for DmaRegion {}
// SAFETY: see `Send` above; `DmaRegion` has no interior mutability of its own.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Describes `len` bytes at local pointer `ptr`, which the device sees at `device_base`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be valid for reads and writes for the lifetime of the returned value
    /// (and of every copy of it), and must be accessed by nobody else except through volatile or
    /// atomic operations (the device included).
    pub unsafe fn new(
        ptr: *mut u8,
        device_base: u64,
        len: usize,
    ) -> Result<Self, FrontMemoryError> {
        let ptr = NonNull::new(ptr).ok_or(FrontMemoryError::InvalidRegion)?;
        device_base
            .checked_add(len as u64)
            .ok_or(FrontMemoryError::InvalidRegion)?;
        Ok(Self {
            ptr,
            device_base,
            len,
        })
    }

    /// Identity-mapped memory (a guest kernel with paging off or 1:1 page tables): the device
    /// address of each byte is its pointer value.
    ///
    /// # Safety
    ///
    /// As for [`DmaRegion::new`].
    pub unsafe fn identity(ptr: *mut u8, len: usize) -> Result<Self, FrontMemoryError> {
        // SAFETY: forwarded caller contract.
        unsafe { Self::new(ptr, ptr as usize as u64, len) }
    }

    /// Local pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

// SAFETY: `translate` only returns pointers inside `ptr..ptr+len`, which the constructor's
// contract makes valid for the region's lifetime.
unsafe impl DmaMemory for DmaRegion {
    fn device_base(&self) -> u64 {
        self.device_base
    }

    fn len(&self) -> usize {
        self.len
    }

    fn translate(&self, addr: u64, len: usize) -> Option<NonNull<u8>> {
        let offset = addr.checked_sub(self.device_base)?;
        let end = offset.checked_add(len as u64)?;
        if end > self.len as u64 {
            return None;
        }
        // offset < len <= isize::MAX (the region is a real allocation), so the cast is exact.
        let offset = usize::try_from(offset).ok()?;
        // SAFETY: `offset + len <= self.len`, so the result stays inside the region.
        let p = unsafe { self.ptr.as_ptr().add(offset) };
        NonNull::new(p)
    }
}

/// A buffer in DMA memory, by device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaBuf {
    /// Device-visible address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Set-up time allocator: hands out aligned, never-freed pieces of a region.
#[derive(Debug)]
pub struct BumpAllocator {
    base: u64,
    end: u64,
    next: u64,
}

impl BumpAllocator {
    /// An allocator over all of `mem`.
    pub fn new(mem: &impl DmaMemory) -> Self {
        let base = mem.device_base();
        let end = base + mem.len() as u64;
        Self {
            base,
            end,
            next: base,
        }
    }

    /// Allocates `size` bytes aligned to `align` (a power of two); returns the device address.
    pub fn alloc(&mut self, size: usize, align: usize) -> Result<u64, FrontMemoryError> {
        if !align.is_power_of_two() {
            return Err(FrontMemoryError::InvalidRegion);
        }
        let mask = align as u64 - 1;
        let start = self
            .next
            .checked_add(mask)
            .map(|v| v & !mask)
            .ok_or(FrontMemoryError::Exhausted { size })?;
        let end = start
            .checked_add(size as u64)
            .ok_or(FrontMemoryError::Exhausted { size })?;
        if end > self.end {
            return Err(FrontMemoryError::Exhausted { size });
        }
        self.next = end;
        Ok(start)
    }

    /// Bytes handed out so far (including alignment padding).
    pub fn used(&self) -> u64 {
        self.next - self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_checks_bounds_and_offsets() {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` outlives `r` and is used only through it in this test.
        let r = unsafe { DmaRegion::new(buf.as_mut_ptr(), 0x1000, 64) }.unwrap();
        assert_eq!(
            r.translate(0x1000, 64).map(|p| p.as_ptr()),
            Some(buf.as_mut_ptr())
        );
        assert!(r.translate(0x1001, 64).is_none());
        assert!(r.translate(0xfff, 1).is_none());
        assert!(r.translate(0x1040, 0).is_some());
        assert!(r.translate(0x1040, 1).is_none());
        assert!(r.translate(u64::MAX, 2).is_none());
        r.write_bytes(0x1010, &[1, 2, 3]).unwrap();
        assert_eq!(r.read_u8(0x1011), Ok(2));
        assert_eq!(
            r.write_bytes(0x103f, &[0, 0]),
            Err(FrontMemoryError::OutOfRange {
                addr: 0x103f,
                len: 2
            })
        );
    }

    #[test]
    fn bump_allocator_aligns_and_runs_out() {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` outlives `r`.
        let r = unsafe { DmaRegion::new(buf.as_mut_ptr(), 0x10_0000, 256) }.unwrap();
        let mut a = BumpAllocator::new(&r);
        assert_eq!(a.alloc(3, 1), Ok(0x10_0000));
        assert_eq!(a.alloc(16, 16), Ok(0x10_0010));
        assert_eq!(a.alloc(1, 3), Err(FrontMemoryError::InvalidRegion));
        assert_eq!(
            a.alloc(256, 1),
            Err(FrontMemoryError::Exhausted { size: 256 })
        );
        assert_eq!(a.used(), 0x20);
    }
}
