//! `cache = none`: transfers on an image opened with `O_DIRECT`, through an aligned bounce
//! buffer.
//!
//! Direct I/O needs a memory buffer aligned to the device's logical block size and pinnable by
//! the kernel. Guest buffers are neither in general (a guest's 512-byte segment; the driver
//! VM's guest memory is BAR2 of the cross-VM device, a PFN mapping `get_user_pages` cannot
//! pin), so every transfer is copied between guest memory and a 4096-aligned buffer of this
//! process, `BOUNCE_LEN` bytes at a time. The disk offset and length must be multiples of the
//! image's logical block size ([`super::BlkDisk::direct_block_size`]); a request that is not
//! fails alone (`IOERR`).
//!
//! The copies are userspace accesses to guest memory, like the ring reads: with memory that
//! is not sealed against shrinking (`SealPolicy::AllowUnsealedChecked`), a peer that
//! truncates its memfd can make one raise `SIGBUS` (`preadv`/`pwritev` on guest buffers, the
//! `writeback` path, get `EFAULT` instead).

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, VolatileSlice};

use super::disk::DiskError;

/// Alignment of a bounce buffer (the largest logical block size of common devices).
pub const BOUNCE_ALIGN: usize = 4096;
/// Bytes one bounce buffer holds; longer transfers go through it in pieces.
pub const BOUNCE_LEN: usize = 1 << 20;

/// A zeroed, `BOUNCE_ALIGN`-aligned buffer of `BOUNCE_LEN` bytes, owned by one transfer at a
/// time.
pub struct BounceBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

impl std::fmt::Debug for BounceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BounceBuffer")
            .field("len", &self.layout.size())
            .finish()
    }
}

// SAFETY: the buffer is plain heap memory owned by this value alone (no aliasing pointer is
// kept anywhere else), so moving it to another thread is moving a `Box<[u8]>`.
unsafe impl Send for BounceBuffer {}

impl BounceBuffer {
    /// A new buffer (aborts on allocation failure, as `Vec` does).
    pub fn new() -> Self {
        // BOUNCE_LEN is non-zero and BOUNCE_ALIGN a power of two: the layout is valid.
        let layout = Layout::from_size_align(BOUNCE_LEN, BOUNCE_ALIGN)
            .unwrap_or_else(|_| unreachable!("constant layout is valid"));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        BounceBuffer { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by `self`,
        // borrowed mutably here for the lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Default for BounceBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Copies `bufs` (guest memory) to `f` at `offset` (`write`) or fills them from it, through
/// `bounce`. `block` is the image's logical block size: `offset` and the total length must be
/// multiples of it.
pub fn transfer_bounced<B: BitmapSlice>(
    f: &File,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
    write: bool,
    block: u64,
    bounce: &mut BounceBuffer,
) -> Result<(), DiskError> {
    let total: u64 = bufs.iter().map(|s| s.len() as u64).sum();
    if block == 0 || !offset.is_multiple_of(block) || !total.is_multiple_of(block) {
        return Err(DiskError::Misaligned {
            offset,
            len: total,
            block,
        });
    }
    let buf = bounce.as_mut_slice();
    // Position in the guest buffers: segment index and offset inside it.
    let mut seg = 0usize;
    let mut seg_off = 0usize;
    let mut pos = offset;
    let mut left = total;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(BOUNCE_LEN);
        let chunk = &mut buf[..n];
        // The guest side of this chunk, as (segment, offset in it, bytes, offset in chunk).
        let mut pieces = Vec::new();
        let mut at = 0usize;
        while at < n {
            let Some(s) = bufs.get(seg) else {
                return Err(DiskError::ShortTransfer(pos));
            };
            let m = (s.len() - seg_off).min(n - at);
            pieces.push((seg, seg_off, m, at));
            at += m;
            seg_off += m;
            if seg_off == s.len() {
                seg += 1;
                seg_off = 0;
            }
        }
        if write {
            for &(i, from, m, to) in &pieces {
                bufs[i].read_slice(&mut chunk[to..to + m], from)?;
            }
            retry_eintr(|| f.write_all_at(chunk, pos))?;
        } else {
            read_full(f, chunk, pos)?;
            for &(i, to, m, from) in &pieces {
                bufs[i].write_slice(&chunk[from..from + m], to)?;
                bufs[i].bitmap().mark_dirty(to, m);
            }
        }
        pos += n as u64;
        left -= n as u64;
    }
    Ok(())
}

fn retry_eintr(mut op: impl FnMut() -> io::Result<()>) -> Result<(), DiskError> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map_err(DiskError::Io),
        }
    }
}

/// Fills `buf` from `f` at `pos`; the image ending first is a short transfer.
fn read_full(f: &File, buf: &mut [u8], pos: u64) -> Result<(), DiskError> {
    let mut done = 0usize;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => return Err(DiskError::ShortTransfer(pos + done as u64)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DiskError::Io(e)),
        }
    }
    Ok(())
}
