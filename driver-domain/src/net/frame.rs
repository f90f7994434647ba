//! Frame buffers and the pool they are recycled through.
//!
//! A frame is copied once out of the sender's TX descriptors into a [`FrameBuf`] and once out
//! of it into the receiver's RX descriptors. Buffers come from a [`FramePool`] and go back to
//! it after delivery, so the data path allocates nothing once the pool has warmed up. Each
//! buffer keeps [`HEADROOM`] bytes in front of the frame where the receive path builds the
//! virtio-net header, so header and frame usually reach the guest in one copy.
//!
//! A buffer also carries what is left to do on its frame ([`Offload`]: a partial checksum, TCP
//! segmentation). Segmentation-offload frames (up to [`MAX_GSO_FRAME`] bytes) live in large
//! buffers, a separate, smaller share of the pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::header::{HDR_LEN, MAX_FRAME, MAX_GSO_FRAME};
use super::offload::Offload;
use crate::virtio_core::sync;

/// Bytes kept in front of the frame for the receive header.
pub const HEADROOM: usize = HDR_LEN;
/// Size of the data area of a [`FrameBuf`].
pub const BUF_LEN: usize = HEADROOM + MAX_FRAME;
/// Size of the data area of a large [`FrameBuf`] (for segmentation-offload frames).
pub const LARGE_BUF_LEN: usize = HEADROOM + MAX_GSO_FRAME;

/// A MAC address.
pub type Mac = [u8; 6];

/// The broadcast address.
pub const BROADCAST: Mac = [0xff; 6];

/// The address is a group (multicast or broadcast) address.
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// Format a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    let p: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    p.join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// One frame with headroom. The frame lives at `data[HEADROOM..HEADROOM + len]`.
#[derive(Clone)]
pub struct FrameBuf {
    data: Box<[u8]>,
    len: usize,
    offload: Offload,
}

impl std::fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBuf")
            .field("len", &self.len)
            .field("large", &self.is_large())
            .field("offload", &self.offload)
            .finish()
    }
}

/// A heap frame buffer, moved (never copied) between ports and the pool.
pub type FrameBox = Box<FrameBuf>;

impl FrameBuf {
    /// An empty buffer on the heap.
    pub fn new_boxed() -> FrameBox {
        Self::with_capacity(BUF_LEN)
    }

    /// An empty large buffer (for a frame of up to [`MAX_GSO_FRAME`] bytes) on the heap.
    pub fn new_large() -> FrameBox {
        Self::with_capacity(LARGE_BUF_LEN)
    }

    fn with_capacity(n: usize) -> FrameBox {
        Box::new(FrameBuf {
            data: vec![0; n].into_boxed_slice(),
            len: 0,
            offload: Offload::NONE,
        })
    }

    /// A large buffer.
    pub fn is_large(&self) -> bool {
        self.data.len() > BUF_LEN
    }

    /// The longest frame this buffer holds.
    pub fn capacity(&self) -> usize {
        self.data.len() - HEADROOM
    }

    /// The frame.
    pub fn frame(&self) -> &[u8] {
        &self.data[HEADROOM..HEADROOM + self.len]
    }

    /// The frame, to finish work left on it (a checksum).
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[HEADROOM..HEADROOM + self.len]
    }

    /// What is left to do on the frame.
    pub fn offload(&self) -> Offload {
        self.offload
    }

    /// Record what is left to do on the frame (validated by the caller).
    pub fn set_offload(&mut self, offload: Offload) {
        self.offload = offload;
    }

    /// Frame length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No frame is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole writable area a chain of `hdr_len` header bytes plus a frame of up to
    /// [`MAX_FRAME`] bytes is read into, so the frame lands at [`HEADROOM`].
    pub fn chain_area(&mut self, hdr_len: usize) -> &mut [u8] {
        let start = HEADROOM.saturating_sub(hdr_len);
        &mut self.data[start..]
    }

    /// Set the frame length after filling [`FrameBuf::chain_area`] (clamped to the buffer).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// Copy `frame` in (truncated to the capacity), with nothing left to do on it.
    pub fn fill(&mut self, frame: &[u8]) {
        let n = frame.len().min(self.capacity());
        self.data[HEADROOM..HEADROOM + n].copy_from_slice(&frame[..n]);
        self.len = n;
        self.offload = Offload::NONE;
    }

    /// Copy `other`'s frame and offload state in (the frame truncated to the capacity).
    pub fn copy_from(&mut self, other: &FrameBuf) {
        self.fill(other.frame());
        self.offload = other.offload;
    }

    /// Header followed by the frame, for the receive path: writes `hdr` into the headroom.
    pub fn with_header(&mut self, hdr: &[u8; HDR_LEN]) -> &[u8] {
        self.data[HEADROOM - HDR_LEN..HEADROOM].copy_from_slice(hdr);
        &self.data[HEADROOM - HDR_LEN..HEADROOM + self.len]
    }

    /// Destination MAC (zero if the frame is shorter than an Ethernet header).
    pub fn dst(&self) -> Mac {
        let mut m = [0u8; 6];
        if self.len >= 12 {
            m.copy_from_slice(&self.data[HEADROOM..HEADROOM + 6]);
        }
        m
    }

    /// Source MAC (zero if the frame is shorter than an Ethernet header).
    pub fn src(&self) -> Mac {
        let mut m = [0u8; 6];
        if self.len >= 12 {
            m.copy_from_slice(&self.data[HEADROOM + 6..HEADROOM + 12]);
        }
        m
    }
}

/// A pool of frame buffers shared by every port of a switch. It grows on demand up to `max`
/// buffers (the switch's queue limits keep the number in flight far below that), and up to
/// `max_large` large ones, and never shrinks while the switch lives.
#[derive(Debug)]
pub struct FramePool {
    free: Mutex<Vec<FrameBox>>,
    allocated: AtomicUsize,
    max: usize,
    free_large: Mutex<Vec<FrameBox>>,
    allocated_large: AtomicUsize,
    max_large: usize,
}

/// Large buffers a pool holds at most by default (64 KiB each).
pub const DEFAULT_MAX_LARGE: usize = 512;

impl FramePool {
    /// A pool that holds at most `max` buffers, `prealloc` of them allocated now.
    pub fn new(max: usize, prealloc: usize) -> Self {
        let n = prealloc.min(max);
        let mut free = Vec::with_capacity(max.min(1 << 16));
        for _ in 0..n {
            free.push(FrameBuf::new_boxed());
        }
        FramePool {
            free: Mutex::new(free),
            allocated: AtomicUsize::new(n),
            max,
            free_large: Mutex::new(Vec::new()),
            allocated_large: AtomicUsize::new(0),
            max_large: DEFAULT_MAX_LARGE.min(max),
        }
    }

    /// A free large buffer, or `None` when all of them are in flight.
    pub fn take_large(&self) -> Option<FrameBox> {
        if let Some(b) = sync::lock(&self.free_large).pop() {
            return Some(b);
        }
        let prev = self.allocated_large.fetch_add(1, Ordering::Relaxed);
        if prev >= self.max_large {
            self.allocated_large.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(FrameBuf::new_large())
    }

    /// A free buffer that holds a frame of `len` bytes.
    pub fn take_for(&self, len: usize) -> Option<FrameBox> {
        if len > MAX_FRAME {
            self.take_large()
        } else {
            self.take()
        }
    }

    /// Large buffers allocated so far.
    pub fn allocated_large(&self) -> usize {
        self.allocated_large.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<FrameBox>> {
        sync::lock(&self.free)
    }

    /// A free buffer, or `None` when all `max` buffers are in flight.
    pub fn take(&self) -> Option<FrameBox> {
        if let Some(b) = self.lock().pop() {
            return Some(b);
        }
        let prev = self.allocated.fetch_add(1, Ordering::Relaxed);
        if prev >= self.max {
            self.allocated.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(FrameBuf::new_boxed())
    }

    /// Move up to `n` free buffers into `out` (allocating while under `max`); returns how
    /// many were added.
    pub fn take_many(&self, out: &mut Vec<FrameBox>, n: usize) -> usize {
        let mut got = {
            let mut free = self.lock();
            let k = n.min(free.len());
            let start = free.len() - k;
            out.extend(free.drain(start..));
            k
        };
        while got < n {
            match self.take() {
                Some(b) => out.push(b),
                None => break,
            }
            got += 1;
        }
        got
    }

    /// Give a buffer back.
    pub fn put(&self, mut buf: FrameBox) {
        buf.len = 0;
        buf.offload = Offload::NONE;
        if buf.is_large() {
            sync::lock(&self.free_large).push(buf);
        } else {
            self.lock().push(buf);
        }
    }

    /// Give several buffers back at once.
    pub fn put_all(&self, bufs: impl Iterator<Item = FrameBox>) {
        let mut free = self.lock();
        for mut b in bufs {
            if b.is_large() {
                self.put(b);
                continue;
            }
            b.len = 0;
            b.offload = Offload::NONE;
            free.push(b);
        }
    }

    /// Buffers allocated so far.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Buffers currently free.
    pub fn free(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("02:00:00:aa:bb:0c").unwrap();
        assert_eq!(m, [2, 0, 0, 0xaa, 0xbb, 0x0c]);
        assert_eq!(format_mac(&m), "02:00:00:aa:bb:0c");
        assert!(parse_mac("02:00:00:aa:bb").is_none());
        assert!(parse_mac("02:00:00:aa:bb:0c:0d").is_none());
        assert!(parse_mac("zz:00:00:aa:bb:0c").is_none());
        assert!(is_multicast(&BROADCAST));
        assert!(!is_multicast(&m));
    }

    #[test]
    fn frame_lands_after_headroom() {
        let mut b = FrameBuf::new_boxed();
        let area = b.chain_area(HDR_LEN);
        area[..HDR_LEN].fill(0xee);
        area[HDR_LEN..HDR_LEN + 14].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 8, 0]);
        b.set_len(14);
        assert_eq!(b.dst(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(b.src(), [7, 8, 9, 10, 11, 12]);
        let with = b.with_header(&[0; HDR_LEN]).to_vec();
        assert_eq!(with.len(), HDR_LEN + 14);
        assert_eq!(&with[HDR_LEN..], b.frame());
    }

    #[test]
    fn pool_is_bounded_and_recycles() {
        let p = FramePool::new(2, 1);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert!(p.take().is_none());
        assert_eq!(p.allocated(), 2);
        p.put(a);
        p.put_all([b].into_iter());
        assert_eq!(p.free(), 2);
        assert!(p.take().is_some());
    }

    #[test]
    fn large_buffers_are_a_bounded_share() {
        let p = FramePool::new(2, 0);
        let big = p.take_for(MAX_FRAME + 1).unwrap();
        assert!(big.is_large());
        assert_eq!(big.capacity(), MAX_GSO_FRAME);
        let small = p.take_for(MAX_FRAME).unwrap();
        assert!(!small.is_large());
        let _second = p.take_large().unwrap();
        assert!(p.take_large().is_none(), "max_large is at most max");
        p.put_all([big, small].into_iter());
        assert_eq!(p.free(), 1, "the large buffer goes to its own list");
        assert!(p.take_large().unwrap().is_large());
        assert_eq!(p.allocated_large(), 2);
    }
}
