//! Gathering a batch of transmit chains before any frame is copied.
//!
//! The TX queue first walks every chain of a batch: each descriptor is checked (device-readable,
//! inside guest memory, in one mapped region) and translated to a host address once, and the
//! first bytes of each frame are prefetched. Only then are the frames copied out, one after
//! another. The frames were written by the driver on another CPU, so their first read misses
//! the cache; gathering first lets those misses overlap instead of serialising one frame's
//! descriptor read, translation and copy behind the previous frame's.
//!
//! The host addresses stay valid while the memory snapshot the batch was gathered from is
//! borrowed: a [`TxGather`] is filled and drained within one pass over the ring, and cleared
//! before the next one.

use std::ops::ControlFlow;

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::header::HeaderError;
use super::queue::FrameError;
use super::split_ring::{RegionCache, RingView};

/// Non-empty descriptors one transmit chain may have (as QEMU's `VIRTQUEUE_MAX_SIZE`; Linux
/// sends at most `MAX_SKB_FRAGS` + 2). A chain with more is refused.
pub const MAX_CHAIN_SEGMENTS: usize = 1024;
/// Segments one batch gathers before it stops taking chains (the last chain may add up to
/// [`MAX_CHAIN_SEGMENTS`] more).
const MAX_BATCH_SEGMENTS: usize = 4096;

/// One gathered chain.
#[derive(Debug)]
pub struct GatheredChain {
    /// The chain's head index (for the used ring).
    pub head: u16,
    /// `[start, end)` of its segments in the batch, or why it cannot be sent.
    segments: Result<(usize, usize), FrameError>,
    /// Bytes in the chain (header included), or so far when it was found too long.
    total: usize,
}

/// A batch of gathered transmit chains.
#[derive(Debug, Default)]
pub struct TxGather {
    /// Host address and length of every non-empty descriptor of the batch.
    segments: Vec<(usize, usize)>,
    chains: Vec<GatheredChain>,
    region: RegionCache,
    ring: RingView,
}

/// Hint the CPU to fetch the cache line at `addr`.
#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever the
    // address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Push the host addresses of `len` bytes of guest memory at `addr` to `out`, one per region
/// they span, through the memory's own translation; false if any byte is not in memory.
fn push_translated<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<(usize, usize)>,
) -> bool {
    let Ok(slices) = mem.get_slices(addr, len, Permissions::Read) else {
        return false;
    };
    let mut got = 0;
    for slice in slices {
        let Ok(slice) = slice else { return false };
        out.push((slice.ptr_guard().as_ptr() as usize, slice.len()));
        got += slice.len();
    }
    got == len
}

impl TxGather {
    /// Chains gathered.
    pub fn count(&self) -> usize {
        self.chains.len()
    }

    /// Whether the batch holds as many segments as it should before it is drained.
    pub fn full(&self) -> bool {
        self.segments.len() >= MAX_BATCH_SEGMENTS
    }

    /// Forget the batch (its host addresses must not outlive the memory snapshot).
    pub fn clear(&mut self) {
        self.segments.clear();
        self.chains.clear();
        self.region = RegionCache::default();
    }

    /// The gathered chain `i`.
    pub fn chain(&self, i: usize) -> &GatheredChain {
        &self.chains[i]
    }

    /// Start a batch on `queue`'s rings: the descriptor table and available ring are
    /// translated once.
    pub fn begin<M: GuestMemory>(&mut self, queue: &Queue, mem: &M) {
        self.clear();
        self.ring = RingView::new(queue, mem);
    }

    /// Hint the CPU to fetch descriptor `head` of the batch's table (the driver wrote it on
    /// another CPU).
    pub fn prefetch_descriptor(&self, head: u16) {
        if let Some(addr) = self.ring.descriptor_address(head) {
            prefetch(addr);
        }
    }

    /// The head index in slot `slot` of the batch's available ring.
    pub fn avail_entry<M: GuestMemory>(
        &self,
        mem: &M,
        slot: u16,
    ) -> Result<u16, virtio_queue::Error> {
        self.ring.avail_entry(mem, slot)
    }

    /// Walk the chain at `head` of the batch's descriptor table (as virtio-queue's
    /// `DescriptorChain` does: at most the table's size of descriptors, one level of indirect
    /// table, a malformed link ends the chain), translating each descriptor once and
    /// prefetching the frame's start. A chain of more than `limit` bytes is recorded as
    /// oversized without its segments.
    pub fn push<M: GuestMemory>(&mut self, head: u16, mem: &M, limit: usize) {
        let start = self.segments.len();
        let mut total = 0usize;
        let mut result = Ok(());
        let ring = self.ring;
        ring.walk(mem, head, |desc| {
            if desc.is_write_only() {
                result = Err(FrameError::WriteOnly);
                return ControlFlow::Break(());
            }
            let len = desc.len as usize;
            if len == 0 {
                return ControlFlow::Continue(());
            }
            total = total.saturating_add(len);
            if total > limit {
                result = Err(FrameError::Header(HeaderError::Oversized(total)));
                return ControlFlow::Break(());
            }
            if self.segments.len() - start == MAX_CHAIN_SEGMENTS {
                result = Err(FrameError::Descriptors(MAX_CHAIN_SEGMENTS));
                return ControlFlow::Break(());
            }
            let first = start == self.segments.len();
            match self.region.host(mem, desc.addr, len) {
                Some(host) => self.segments.push((host, len)),
                // Spanning regions, or memory behind an IOMMU.
                None if push_translated(mem, GuestAddress(desc.addr), len, &mut self.segments) => {}
                None => {
                    result = Err(FrameError::Memory(desc.addr, desc.len));
                    return ControlFlow::Break(());
                }
            }
            if first {
                let host = self.segments[start].0;
                prefetch(host);
                if len > 64 {
                    prefetch(host + 64);
                }
            }
            ControlFlow::Continue(())
        });
        let segments = match result {
            Ok(()) => Ok((start, self.segments.len())),
            Err(e) => {
                self.segments.truncate(start);
                Err(e)
            }
        };
        self.chains.push(GatheredChain {
            head,
            segments,
            total,
        });
    }

    /// Copy gathered chain `i` into `area`; returns its length. A chain longer than `area`
    /// is [`HeaderError::Oversized`] with its length (the caller may retry with a larger
    /// area).
    pub fn copy_chain(&self, i: usize, area: &mut [u8]) -> Result<usize, FrameError> {
        let c = &self.chains[i];
        let (start, end) = c.segments?;
        if c.total > area.len() {
            return Err(FrameError::Header(HeaderError::Oversized(c.total)));
        }
        let mut off = 0usize;
        for &(host, len) in &self.segments[start..end] {
            let dst = &mut area[off..off + len];
            // SAFETY: `host` is the start of `len` bytes of one mapped region of the memory
            // snapshot this batch was gathered from (`host_address`), which the caller still
            // borrows (the batch is cleared before the pass over the ring ends); `dst` is a
            // distinct host buffer of `len` bytes. The driver may write the bytes meanwhile:
            // the copy is then torn, as any read of shared memory, and validated afterwards.
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, dst.as_mut_ptr(), len) };
            off += len;
        }
        Ok(off)
    }
}
