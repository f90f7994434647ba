//! The backing store of a block device: a raw image file, or a null device for benchmarks.
//!
//! Data moves between the store and guest memory with `preadv`/`pwritev` straight on the
//! mapped guest buffers (no bounce copy in this process). A kernel copy into a mapping whose
//! backing file was shrunk returns `EFAULT` instead of raising `SIGBUS`, so a hostile peer that
//! truncates its memfd makes the request fail, not the process.
//!
//! An image opened with `O_DIRECT` (`cache = none`) is served through aligned bounce buffers
//! instead ([`super::bounce`]), one per queue transferring at the time, kept in a pool and
//! reused.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::Mutex;

use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Bytes, VolatileSlice};

use super::bounce::{transfer_bounced, BounceBuffer};
use super::{SECTOR_SHIFT, SECTOR_SIZE};

/// Errors of the backing store.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The image could not be inspected.
    #[error("cannot size the disk image: {0}")]
    Stat(#[source] ipc::image::ProbeError),
    /// The image size is not a multiple of 512 bytes (the tail would be unreachable).
    #[error("disk image size {0} is not a multiple of 512 bytes")]
    UnalignedSize(u64),
    /// A read, write, flush or deallocation failed.
    #[error("disk I/O failed: {0}")]
    Io(#[source] io::Error),
    /// The backing file ended before the request did (it was shrunk under us).
    #[error("short transfer: the disk image ended at byte {0}")]
    ShortTransfer(u64),
    /// A transfer on an `O_DIRECT` image is not whole logical blocks.
    #[error(
        "transfer of {len} bytes at byte {offset} is not aligned to the image's {block}-byte blocks (cache = none)"
    )]
    Misaligned {
        /// Disk byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The image's logical block size.
        block: u64,
    },
    /// A guest buffer could not be filled.
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] vm_memory::VolatileMemoryError),
}

enum Store {
    File(File),
    Null,
}

/// A block device's backing store and its geometry.
pub struct BlkDisk {
    store: Store,
    capacity_sectors: u64,
    read_only: bool,
    /// With `O_DIRECT`: the image's logical block size.
    direct_block: Option<u64>,
    /// Bounce buffers of `O_DIRECT` transfers not in use (one per queue transferring at once).
    bounce_pool: Mutex<Vec<BounceBuffer>>,
}

impl std::fmt::Debug for BlkDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDisk")
            .field("null", &matches!(self.store, Store::Null))
            .field("capacity_sectors", &self.capacity_sectors)
            .field("read_only", &self.read_only)
            .field("direct_block", &self.direct_block)
            .finish_non_exhaustive()
    }
}

/// The largest number of iovecs one `preadv`/`pwritev` call takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Zeroes for reads of the null device and for WRITE_ZEROES where the file system cannot
/// zero a range; page aligned, so that an `O_DIRECT` image takes them as they are.
#[repr(align(4096))]
struct Zeroes([u8; 4096]);
static ZEROES_PAGE: Zeroes = Zeroes([0u8; 4096]);
static ZEROES: &[u8; 4096] = &ZEROES_PAGE.0;

impl BlkDisk {
    /// A disk backed by an already-open raw image (a regular file or a block device). Its size
    /// must be a multiple of 512. An image opened with `O_DIRECT` (`cache = none`) is served
    /// through bounce buffers, in whole logical blocks (see [`BlkDisk::direct_block_size`]).
    pub fn from_file(file: File, read_only: bool) -> Result<Self, DiskError> {
        let len = ipc::image::probe(&file).map_err(DiskError::Stat)?.size;
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(DiskError::UnalignedSize(len));
        }
        let direct_block = if opened_direct(&file).map_err(DiskError::Io)? {
            Some(logical_block_size(&file).map_err(DiskError::Io)?)
        } else {
            None
        };
        Ok(BlkDisk {
            store: Store::File(file),
            capacity_sectors: len >> SECTOR_SHIFT,
            read_only,
            direct_block,
            bounce_pool: Mutex::new(Vec::new()),
        })
    }

    /// A null device of `size_bytes` (rounded down to sectors): reads return zeroes, writes
    /// are dropped. For benchmarks.
    pub fn null(size_bytes: u64, read_only: bool) -> Self {
        BlkDisk {
            store: Store::Null,
            capacity_sectors: size_bytes >> SECTOR_SHIFT,
            read_only,
            direct_block: None,
            bounce_pool: Mutex::new(Vec::new()),
        }
    }

    /// With an image opened `O_DIRECT` (`cache = none`), the logical block size transfers must
    /// be multiples of (`BLKSSZGET` for a block device, 512 for a file); `None` otherwise.
    pub fn direct_block_size(&self) -> Option<u64> {
        self.direct_block
    }

    /// Moves `bufs` through a bounce buffer from the pool (a new one if all are in use).
    fn bounced<B: BitmapSlice>(
        &self,
        f: &File,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
        write: bool,
        block: u64,
    ) -> Result<(), DiskError> {
        let taken = self
            .bounce_pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut bounce = taken.unwrap_or_default();
        let r = transfer_bounced(f, bufs, offset, write, block, &mut bounce);
        self.bounce_pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(bounce);
        r
    }

    /// The image file (none for a null device).
    pub fn file(&self) -> Option<&File> {
        match &self.store {
            Store::File(f) => Some(f),
            Store::Null => None,
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fill `bufs` from the disk starting at byte `offset`.
    pub fn read_at<B: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> Result<(), DiskError> {
        match &self.store {
            Store::Null => {
                for b in bufs {
                    let mut done = 0;
                    while done < b.len() {
                        let n = (b.len() - done).min(ZEROES.len());
                        b.write_slice(&ZEROES[..n], done)?;
                        done += n;
                    }
                }
                Ok(())
            }
            Store::File(f) => match self.direct_block {
                Some(block) => self.bounced(f, bufs, offset, false, block),
                None => transfer(f, bufs, offset, Direction::Read),
            },
        }
    }

    /// Write `bufs` to the disk starting at byte `offset`.
    pub fn write_at<B: BitmapSlice>(
        &self,
        bufs: &[VolatileSlice<'_, B>],
        offset: u64,
    ) -> Result<(), DiskError> {
        match &self.store {
            Store::Null => Ok(()),
            Store::File(f) => match self.direct_block {
                Some(block) => self.bounced(f, bufs, offset, true, block),
                None => transfer(f, bufs, offset, Direction::Write),
            },
        }
    }

    /// Make completed writes durable (with `O_DIRECT` too: the device's volatile cache).
    pub fn flush(&self) -> Result<(), DiskError> {
        match &self.store {
            Store::Null => Ok(()),
            Store::File(f) => f.sync_data().map_err(DiskError::Io),
        }
    }

    /// Deallocate `[offset, offset + len)`; reads of it return zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zero `[offset, offset + len)`, deallocating it when `may_unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(DiskError::Io(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len)
            }
            other => other,
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let Store::File(f) = &self.store else {
            return Ok(());
        };
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(ZEROES.len());
            let pos = offset + done;
            std::os::unix::fs::FileExt::write_all_at(f, &ZEROES[..n], pos)
                .map_err(DiskError::Io)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), DiskError> {
        let Store::File(f) = &self.store else {
            return Ok(());
        };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| DiskError::Io(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let l = libc::off_t::try_from(len)
            .map_err(|_| DiskError::Io(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: fallocate on an owned, open fd with plain integer arguments; it touches no
        // memory of this process.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, l) };
        if r < 0 {
            return Err(DiskError::Io(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Whether `file` was opened with `O_DIRECT`.
fn opened_direct(file: &File) -> io::Result<bool> {
    // SAFETY: F_GETFL on an owned, open fd reads its status flags; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_DIRECT != 0)
}

/// The logical block size direct transfers on `file` must be multiples of: the block
/// device's (`BLKSSZGET`), or 512 for a regular file (the sector size of the devices file
/// systems usually sit on; where it is larger, the kernel refuses the transfer and that
/// request fails).
fn logical_block_size(file: &File) -> io::Result<u64> {
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(SECTOR_SIZE);
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int into `size`, which lives for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    match u64::try_from(size) {
        Ok(s) if s.is_power_of_two() && s >= SECTOR_SIZE => Ok(s),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("logical block size {size}"),
        )),
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Move all of `bufs` between the file and guest memory at `offset`, retrying short
/// transfers and `EINTR`.
fn transfer<B: BitmapSlice>(
    f: &File,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
    dir: Direction,
) -> Result<(), DiskError> {
    let mut pos = offset;
    for chunk in bufs.chunks(IOV_MAX) {
        // The guards keep the pointers valid for the duration of the system call.
        let guards: Vec<PtrGuardMut> = chunk.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .zip(chunk)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let mut first = 0usize;
        while first < iovs.len() {
            let off = libc::off_t::try_from(pos)
                .map_err(|_| DiskError::Io(io::Error::from_raw_os_error(libc::EINVAL)))?;
            let cnt = libc::c_int::try_from(iovs.len() - first).unwrap_or(libc::c_int::MAX);
            let rest = &mut iovs[first..];
            // SAFETY: every iovec points into a live guest-memory mapping covered by a
            // `PtrGuardMut` held in `guards` until after the call, with the slice's length; the
            // kernel validates the addresses itself (EFAULT, not a signal, on a hole).
            let n = unsafe {
                match dir {
                    Direction::Read => libc::preadv(f.as_raw_fd(), rest.as_ptr(), cnt, off),
                    Direction::Write => libc::pwritev(f.as_raw_fd(), rest.as_ptr(), cnt, off),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiskError::Io(e));
            }
            let mut n = n as usize;
            if n == 0 {
                return Err(DiskError::ShortTransfer(pos));
            }
            pos += n as u64;
            // Advance past fully transferred iovecs, then into a partial one.
            while first < iovs.len() && n >= iovs[first].iov_len {
                n -= iovs[first].iov_len;
                first += 1;
            }
            if n > 0 {
                let v = &mut iovs[first];
                // SAFETY: n < v.iov_len, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
            }
        }
        if matches!(dir, Direction::Read) {
            mark_dirty(chunk);
        }
        drop(guards);
    }
    Ok(())
}

/// Records guest buffers the device has written into (the dirty log of a migration).
pub fn mark_dirty<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>]) {
    for s in bufs {
        s.bitmap().mark_dirty(0, s.len());
    }
}
