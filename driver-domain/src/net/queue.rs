//! The data path of one queue pair: transmitted frames from a TX ring into the switch, queued
//! frames from the switch into an RX ring.
//!
//! Each descriptor is translated once and copied once: TX chains are read straight into a
//! pooled [`FrameBuf`](super::frame::FrameBuf) (the header lands in its headroom), RX writes
//! header and frame from that buffer into the guest's buffers. Nothing is allocated per frame.
//!
//! Work a sender left to the device (a partial checksum, TCP segmentation) travels with the
//! frame ([`FrameBuf::offload`](super::frame::FrameBuf::offload)); the receiving queue hands it
//! on in the virtio-net header when its driver negotiated it, and otherwise finishes the
//! checksum or cuts the frame into segments ([`super::offload`]) as it delivers it.
//!
//! Errors split in two: a bad *frame* (malformed header, runt, oversized, a write-only TX
//! descriptor) is dropped, counted and logged (rate-limited), and the queue goes on; a bad
//! *ring* (unreadable ring, index jump, an RX chain with no room for a header) fails that queue
//! until the driver resets it. Neither touches any other port.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::warn;
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::config::Negotiated;
use super::frame::{FrameBox, FrameBuf};
use super::header::{HeaderError, TxHeader, HDR_LEN, MAX_FRAME, MAX_GSO_FRAME};
use super::offload::{complete_checksum, Offload, Segments};
use super::ring::{needs_call, publish_used};
use super::split_ring::{RegionCache, RingView};
use super::switch::SwitchPort;
use super::tx_gather::TxGather;
use crate::virtio_core::{QueueFailedEarlier, QueueFailure, QueueProgress};

/// Frames moved from the switch inbox per lock.
const RX_BATCH: usize = 32;
/// Frame buffers a TX queue takes from the pool per lock.
const TX_CACHE: usize = 32;
/// TX chains completed per used-index store.
const TX_BATCH: usize = 64;

/// Errors that fail a queue.
#[derive(Debug, Error)]
pub enum NetQueueError {
    /// The ring is invalid.
    #[error("net queue {0}: {1}")]
    Ring(u16, virtio_queue::Error),
    /// A receive chain cannot hold what the protocol requires.
    #[error("net queue {0}: receive chain at head {1}: {2}")]
    RxChain(u16, u16, &'static str),
    /// The queue failed earlier.
    #[error(transparent)]
    Broken(#[from] QueueFailedEarlier),
    /// The control queue failed.
    #[error(transparent)]
    Ctrl(#[from] super::ctrl::CtrlQueueError),
}

/// Why one frame was dropped (the queue continues).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The header or the frame length is invalid.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A TX chain holds a device-writable descriptor.
    #[error("write-only descriptor in a transmit chain")]
    WriteOnly,
    /// A descriptor points outside guest memory.
    #[error("descriptor at {0:#x}+{1} is outside guest memory")]
    Memory(u64, u32),
    /// No frame buffer was free.
    #[error("switch out of frame buffers")]
    NoBuffer,
    /// A TX chain has more non-empty descriptors than a frame may have.
    #[error("transmit chain of more than {0} descriptors")]
    Descriptors(usize),
}

fn log_sparse(count: &mut u64, what: &str, index: u16, e: &dyn std::fmt::Display) {
    *count += 1;
    if count.is_power_of_two() {
        warn!("net queue {index}: {what} #{count}: {e}");
    }
}

/// Where `num_buffers` of the first chain's header lives (its two bytes may be split).
#[derive(Default)]
struct NumBuffersAt([Option<GuestAddress>; 2]);

/// Write `bytes` into the writable descriptors of the chain at `head`; returns the bytes
/// written.
fn write_chain<M: GuestMemory>(
    view: &RingView,
    region: &mut RegionCache,
    mem: &M,
    head: u16,
    bytes: &[u8],
    mut mark: Option<&mut NumBuffersAt>,
) -> Result<usize, &'static str> {
    let mut off = 0usize;
    let mut err = None;
    view.walk(mem, head, |desc| {
        if !desc.is_write_only() {
            err = Some("device-readable descriptor in a receive chain");
            return ControlFlow::Break(());
        }
        if off == bytes.len() {
            return ControlFlow::Break(());
        }
        let n = (desc.len as usize).min(bytes.len() - off);
        if let Some(m) = mark.as_deref_mut() {
            for (k, slot) in m.0.iter_mut().enumerate() {
                let at = HDR_LEN - 2 + k;
                if (off..off + n).contains(&at) {
                    *slot = GuestAddress(desc.addr).checked_add((at - off) as u64);
                }
            }
        }
        let src = &bytes[off..off + n];
        match region.host(mem, desc.addr, n).filter(|_| n > 0) {
            // SAFETY: `h` is the start of `n` bytes of one mapped region of the memory
            // snapshot borrowed for this pass (`RegionCache::host`); `src` is the backend's
            // own buffer, distinct from guest memory.
            Some(h) => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), h as *mut u8, n) },
            // Spanning regions, behind an IOMMU, or outside memory.
            None => {
                if mem.write_slice(src, GuestAddress(desc.addr)).is_err() {
                    err = Some("descriptor outside guest memory");
                    return ControlFlow::Break(());
                }
            }
        }
        off += n;
        ControlFlow::Continue(())
    });
    match err {
        Some(e) => Err(e),
        None => Ok(off),
    }
}

/// What one direction of a queue pair keeps and does besides what both directions share.
pub trait Direction: Default + std::fmt::Debug + Sized {
    /// The direction in logs.
    const NAME: &'static str;

    /// Give the frame buffers this direction holds back to `port`'s pool.
    fn release(&mut self, port: &SwitchPort);

    /// Move up to the budget of frames of `q` through `queue` (`notify` is left to the caller).
    fn run<M: GuestMemory>(
        q: &mut NetQueue<Self>,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, NetQueueError>;
}

/// One direction of a queue pair: [`TxQueue`] or [`RxQueue`].
#[derive(Debug)]
pub struct NetQueue<D: Direction> {
    index: u16,
    port: Arc<SwitchPort>,
    neg: Negotiated,
    budget: usize,
    idle_notify: bool,
    failure: QueueFailure,
    dir: D,
}

/// The transmit side of a queue pair: frames from a TX ring into the switch.
pub type TxQueue = NetQueue<Tx>;
/// The receive side of a queue pair: frames from the switch into an RX ring.
pub type RxQueue = NetQueue<Rx>;

impl<D: Direction> Drop for NetQueue<D> {
    fn drop(&mut self) {
        self.dir.release(&self.port);
    }
}

impl<D: Direction> NetQueue<D> {
    /// This direction of virtqueue `index`, on `port`.
    pub fn new(index: u16, port: Arc<SwitchPort>, budget: usize) -> Self {
        NetQueue {
            index,
            port,
            neg: Negotiated::default(),
            budget: budget.max(1),
            idle_notify: true,
            failure: QueueFailure::new(index),
            dir: D::default(),
        }
    }

    /// Apply the negotiated features (before the queue starts).
    pub fn set_negotiated(&mut self, neg: Negotiated) {
        self.neg = neg;
    }

    /// Why this queue failed, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.failure.why()
    }

    /// Forget an earlier failure (the driver reset the device).
    pub fn reset(&mut self) {
        self.failure.clear();
    }

    /// Whether an idle queue re-arms its notification (the default): TX re-enables guest
    /// kicks, RX arms the port's wake eventfd. A busy-polling caller turns this off while it
    /// polls and on again before it sleeps.
    pub fn set_idle_notify(&mut self, on: bool) {
        self.idle_notify = on;
    }

    /// Move up to `budget` frames through `queue` (TX: into the switch; RX: queued frames
    /// into the guest's buffers). An `Err` fails the queue until [`NetQueue::reset`]; the
    /// buffers it holds go back to the pool.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, NetQueueError> {
        self.failure.check()?;
        let old_used = queue.next_used();
        let r = D::run(self, queue, mem).and_then(|mut progress| {
            progress.notify =
                needs_call(queue, mem, old_used).map_err(|e| NetQueueError::Ring(self.index, e))?;
            Ok(progress)
        });
        let r = self.failure.latch(D::NAME, r);
        if r.is_err() {
            // Frames held by a failed queue can never move.
            self.dir.release(&self.port);
        }
        r
    }
}

/// Per-direction state of [`TxQueue`].
#[derive(Debug)]
pub struct Tx {
    cache: Vec<FrameBox>,
    pending: Vec<FrameBox>,
    gather: TxGather,
    invalid: u64,
}

impl Default for Tx {
    fn default() -> Self {
        Tx {
            cache: Vec::with_capacity(TX_CACHE + TX_BATCH),
            pending: Vec::with_capacity(TX_BATCH),
            gather: TxGather::default(),
            invalid: 0,
        }
    }
}

impl Direction for Tx {
    const NAME: &'static str = "net TX";

    fn run<M: GuestMemory>(
        q: &mut TxQueue,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, NetQueueError> {
        let index = q.index;
        let ring = |e| NetQueueError::Ring(index, e);
        let mut progress = QueueProgress::default();
        let mut heads = [0u16; TX_BATCH];
        // The longest chain worth reading: a GSO frame with a driver that may send one.
        let limit = q.neg.hdr_len
            + if q.neg.tx_offloads.gso() {
                MAX_GSO_FRAME
            } else {
                MAX_FRAME
            };
        loop {
            queue.disable_notification(mem).map_err(ring)?;
            // One avail-index read per batch; every chain walked and translated (and its
            // frame prefetched) before any frame is copied; one used-index store per batch.
            let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(ring)?;
            let first = queue.next_avail();
            let ready = avail.0.wrapping_sub(first);
            if ready > queue.size() {
                return Err(ring(virtio_queue::Error::InvalidAvailRingIndex));
            }
            let take = usize::from(ready)
                .min(TX_BATCH)
                .min(q.budget - progress.completed);
            q.dir.gather.begin(queue, mem);
            // The heads first, their descriptors prefetched, then the chains walked.
            for (k, h) in heads.iter_mut().enumerate().take(take) {
                *h = q
                    .dir
                    .gather
                    .avail_entry(mem, first.wrapping_add(k as u16))
                    .map_err(ring)?;
                q.dir.gather.prefetch_descriptor(*h);
            }
            let mut taken = 0u16;
            while usize::from(taken) < take && !q.dir.gather.full() {
                q.dir.gather.push(heads[usize::from(taken)], mem, limit);
                taken += 1;
            }
            queue.set_next_avail(first.wrapping_add(taken));
            let n = q.dir.gather.count();
            for i in 0..n {
                if let Err(e) = q.transmit(i) {
                    q.port.count_tx_invalid();
                    log_sparse(&mut q.dir.invalid, "dropped transmitted frame", index, &e);
                }
            }
            // Switch the batch under one lock; unused buffers come back into the cache.
            q.port.transmit_batch(&mut q.dir.pending, &mut q.dir.cache);
            if q.dir.cache.len() > TX_CACHE + TX_BATCH {
                let extra = q.dir.cache.len() - TX_CACHE;
                q.port.recycle_all(q.dir.cache.drain(extra..));
            }
            let gather = &q.dir.gather;
            let used = (0..n).map(|i| (gather.chain(i).head, 0));
            let published = publish_used(queue, mem, used).map_err(ring);
            q.dir.gather.clear();
            published?;
            progress.completed += n;
            if progress.completed >= q.budget {
                progress.more = true;
                break;
            }
            if n == TX_BATCH {
                continue;
            }
            if !q.idle_notify || !queue.enable_notification(mem).map_err(ring)? {
                break;
            }
        }
        Ok(progress)
    }

    fn release(&mut self, port: &SwitchPort) {
        port.recycle_all(self.cache.drain(..));
        port.recycle_all(self.pending.drain(..));
    }
}

impl TxQueue {
    /// Read gathered chain `i` into a pooled buffer and queue it for the switch.
    fn transmit(&mut self, i: usize) -> Result<(), FrameError> {
        if self.dir.cache.is_empty() {
            self.port.take_buffers(&mut self.dir.cache, TX_CACHE);
        }
        let mut buf = self.dir.cache.pop().ok_or(FrameError::NoBuffer)?;
        match self.read_frame(&mut buf, i) {
            Ok(()) => {
                self.dir.pending.push(buf);
                Ok(())
            }
            // A segmentation-offload frame does not fit a pooled buffer: read it into a large
            // one (only a driver that negotiated TSO may send one).
            Err(FrameError::Header(HeaderError::Oversized(total)))
                if self.neg.tx_offloads.gso() && total <= self.neg.hdr_len + MAX_GSO_FRAME =>
            {
                self.dir.cache.push(buf);
                let mut large = self.port.take_large_buffer().ok_or(FrameError::NoBuffer)?;
                match self.read_frame(&mut large, i) {
                    Ok(()) => {
                        self.dir.pending.push(large);
                        Ok(())
                    }
                    Err(e) => {
                        self.port.recycle(large);
                        Err(e)
                    }
                }
            }
            Err(e) => {
                self.dir.cache.push(buf);
                Err(e)
            }
        }
    }

    /// Copy gathered chain `i` into `buf`, validate its header and record the work left on
    /// the frame.
    fn read_frame(&self, buf: &mut FrameBuf, i: usize) -> Result<(), FrameError> {
        let hdr_len = self.neg.hdr_len;
        let area = buf.chain_area(hdr_len);
        let total = self.dir.gather.copy_chain(i, area)?;
        let (h, len) = TxHeader::parse(&area[..total], hdr_len, self.neg.tx_offloads)?;
        let offload = h.offload(&area[hdr_len..total])?;
        buf.set_len(len);
        buf.set_offload(offload);
        Ok(())
    }
}

enum Delivery {
    Delivered,
    Dropped,
    NoBuffers,
}

/// A segmentation-offload frame being delivered segment by segment to a driver that did not
/// negotiate it.
#[derive(Debug)]
struct Segmenting {
    frame: FrameBox,
    segments: Segments,
}

/// Per-direction state of [`RxQueue`].
#[derive(Debug)]
pub struct Rx {
    batch: VecDeque<FrameBox>,
    used: Vec<(u16, u32)>,
    completed: Vec<(u16, u32)>,
    done: Vec<FrameBox>,
    dropped: u64,
    segmenting: Option<Segmenting>,
    /// The segment being delivered (not from the pool: it is the queue's own; `None` only
    /// while it is being written into the ring).
    segment: Option<FrameBox>,
    segment_ready: bool,
    /// The ring for this pass, its buffers' last region, and the available index last read.
    view: RingView,
    region: RegionCache,
    avail_seen: u16,
}

impl Default for Rx {
    fn default() -> Self {
        Rx {
            batch: VecDeque::with_capacity(RX_BATCH),
            used: Vec::with_capacity(64),
            completed: Vec::with_capacity(256),
            done: Vec::with_capacity(64),
            dropped: 0,
            segmenting: None,
            segment: Some(FrameBuf::new_boxed()),
            segment_ready: false,
            view: RingView::default(),
            region: RegionCache::default(),
            avail_seen: 0,
        }
    }
}

impl Direction for Rx {
    const NAME: &'static str = "net RX";

    fn release(&mut self, port: &SwitchPort) {
        // Frames taken from the inbox but not delivered go back to the pool.
        port.recycle_all(self.batch.drain(..));
        if let Some(s) = self.segmenting.take() {
            port.recycle(s.frame);
        }
        self.segment_ready = false;
    }

    /// When the inbox is empty the port is armed (its wake eventfd fires on the next frame);
    /// when the ring has no buffers, guest notifications are enabled so the refill kicks the
    /// device.
    fn run<M: GuestMemory>(
        q: &mut RxQueue,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, NetQueueError> {
        q.dir.completed.clear();
        let index = q.index;
        let ring = |e| NetQueueError::Ring(index, e);
        queue.disable_notification(mem).map_err(ring)?;
        // The rings are translated once per pass; the available index is read when the
        // entries seen so far run out.
        q.dir.view = RingView::new(queue, mem);
        q.dir.region = RegionCache::default();
        q.dir.avail_seen = queue.next_avail();
        let mut progress = QueueProgress::default();
        let r = q.deliver_all(queue, mem, &mut progress);
        // Delivered and dropped buffers go back to the pool under one lock.
        q.port.recycle_all(q.dir.done.drain(..));
        // Completed chains are published with one used-index store, even if a later frame
        // failed the queue (the driver gets back what the device finished).
        let published = publish_used(queue, mem, q.dir.completed.drain(..)).map_err(ring);
        r?;
        published?;
        Ok(progress)
    }
}

impl RxQueue {
    fn deliver_all<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        progress: &mut QueueProgress,
    ) -> Result<(), NetQueueError> {
        loop {
            if progress.completed == self.budget {
                progress.more = true;
                break;
            }
            if self.dir.segmenting.is_some() {
                if !self.deliver_segment(queue, mem, progress)? {
                    break;
                }
                continue;
            }
            if self.dir.batch.is_empty() && self.port.receive(&mut self.dir.batch, RX_BATCH) == 0 {
                if self.idle_notify && self.port.arm() {
                    continue;
                }
                break;
            }
            let Some(mut buf) = self.dir.batch.pop_front() else {
                break;
            };
            let offload = buf.offload();
            if !self.neg.rx_offloads.accept(&offload) {
                // The driver cannot take the work left on this frame: the device does it.
                if let Some(gso) = offload.gso {
                    let segments = Segments::new(buf.frame(), gso);
                    self.dir.segmenting = Some(Segmenting {
                        frame: buf,
                        segments,
                    });
                    continue;
                }
                if let Some((start, off)) = offload.csum {
                    complete_checksum(buf.frame_mut(), start, off);
                }
                buf.set_offload(Offload::NONE);
            }
            match self.deliver(queue, mem, &mut buf)? {
                Delivery::Delivered => {
                    self.port.count_rx(buf.len());
                    self.dir.done.push(buf);
                    progress.completed += 1;
                }
                Delivery::Dropped => {
                    self.port.count_rx_dropped();
                    self.dir.done.push(buf);
                    progress.completed += 1;
                }
                Delivery::NoBuffers => {
                    self.dir.batch.push_front(buf);
                    if self.wait_for_buffers(queue, mem)? {
                        continue;
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// The head of the next available chain (consumed), or `None` when the driver has posted
    /// no more.
    fn next_chain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Option<u16>, NetQueueError> {
        let q = self.index;
        let ring = |e| NetQueueError::Ring(q, e);
        let next = queue.next_avail();
        if next == self.dir.avail_seen {
            let idx = queue.avail_idx(mem, Ordering::Acquire).map_err(ring)?.0;
            if idx.wrapping_sub(next) > queue.size() {
                return Err(ring(virtio_queue::Error::InvalidAvailRingIndex));
            }
            self.dir.avail_seen = idx;
            if idx == next {
                return Ok(None);
            }
        }
        let head = self.dir.view.avail_entry(mem, next).map_err(ring)?;
        queue.set_next_avail(next.wrapping_add(1));
        Ok(Some(head))
    }

    /// The chains seen so far (possibly rolled back, with MRG_RXBUF) are not enough for the
    /// next frame: ask for a kick when the driver adds past them, not before. Returns true if
    /// buffers arrived meanwhile.
    fn wait_for_buffers<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, NetQueueError> {
        let q = self.index;
        let ring = |e| NetQueueError::Ring(q, e);
        let seen = queue.avail_idx(mem, Ordering::Acquire).map_err(ring)?;
        let resume = queue.next_avail();
        queue.set_next_avail(seen.0);
        let added = queue.enable_notification(mem);
        queue.set_next_avail(resume);
        if added.map_err(ring)? {
            queue.disable_notification(mem).map_err(ring)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Deliver the next segment of the frame being segmented; returns false when the queue
    /// has to wait for buffers.
    fn deliver_segment<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        progress: &mut QueueProgress,
    ) -> Result<bool, NetQueueError> {
        let Some(s) = self.dir.segmenting.as_mut() else {
            return Ok(true);
        };
        let Some(mut seg) = self.dir.segment.take() else {
            return Ok(true);
        };
        if !self.dir.segment_ready {
            let area = seg.chain_area(0);
            match s.segments.write_next(s.frame.frame(), area) {
                Some(n) => {
                    seg.set_len(n);
                    self.dir.segment_ready = true;
                }
                None => {
                    // Every segment went out.
                    self.dir.segment = Some(seg);
                    if let Some(done) = self.dir.segmenting.take() {
                        self.dir.done.push(done.frame);
                    }
                    return Ok(true);
                }
            }
        }
        let r = self.deliver(queue, mem, &mut seg);
        let len = seg.len();
        self.dir.segment = Some(seg);
        match r? {
            Delivery::Delivered => {
                self.port.count_rx(len);
                progress.completed += 1;
            }
            Delivery::Dropped => {
                self.port.count_rx_dropped();
                progress.completed += 1;
            }
            Delivery::NoBuffers => return self.wait_for_buffers(queue, mem),
        }
        self.dir.segment_ready = false;
        Ok(true)
    }

    fn deliver<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        buf: &mut FrameBuf,
    ) -> Result<Delivery, NetQueueError> {
        let q = self.index;
        let hdr_len = self.neg.hdr_len;
        let mrg = self.neg.mrg_rxbuf;
        // Legacy 10-byte headers carry no num_buffers; the 12-byte header is all zeros but it
        // and the work handed on to the driver.
        let hdr = buf
            .offload()
            .rx_header(if hdr_len == HDR_LEN { 1 } else { 0 });
        let with_hdr = buf.with_header(&hdr);
        let bytes = &with_hdr[HDR_LEN - hdr_len..];
        let saved = queue.next_avail();
        self.dir.used.clear();
        let mut mark = NumBuffersAt::default();
        let mut off = 0usize;
        while off < bytes.len() {
            let Some(head) = self.next_chain(queue, mem)? else {
                queue.set_next_avail(saved);
                return Ok(Delivery::NoBuffers);
            };
            let first = self.dir.used.is_empty();
            let Rx { view, region, .. } = &mut self.dir;
            let written = write_chain(
                view,
                region,
                mem,
                head,
                &bytes[off..],
                first.then_some(&mut mark),
            )
            .map_err(|why| NetQueueError::RxChain(q, head, why))?;
            if first && written < hdr_len {
                return Err(NetQueueError::RxChain(q, head, "too short for a header"));
            }
            off += written;
            if !mrg && off < bytes.len() {
                // One chain per frame without MRG_RXBUF: the frame does not fit, drop it.
                log_sparse(
                    &mut self.dir.dropped,
                    "receive buffer too small, frame dropped",
                    q,
                    &bytes.len(),
                );
                self.dir.completed.push((head, 0));
                return Ok(Delivery::Dropped);
            }
            if self.dir.used.len() >= usize::from(queue.size()) {
                queue.set_next_avail(saved);
                return Err(NetQueueError::RxChain(
                    q,
                    head,
                    "buffers too small for a frame",
                ));
            }
            self.dir.used.push((head, written as u32));
        }
        if mrg && self.dir.used.len() > 1 {
            let n = (self.dir.used.len() as u16).to_le_bytes();
            for (addr, byte) in mark.0.iter().zip(n) {
                if let Some(a) = addr {
                    mem.write_obj(byte, *a).map_err(|_| {
                        NetQueueError::RxChain(q, self.dir.used[0].0, "header outside guest memory")
                    })?;
                }
            }
        }
        self.dir.completed.extend_from_slice(&self.dir.used);
        Ok(Delivery::Delivered)
    }

    /// Frames taken from the switch but not yet delivered.
    pub fn backlog(&self) -> usize {
        self.dir.batch.len() + self.port.pending()
    }
}
