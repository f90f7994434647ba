//! The driver side of a split virtqueue, as plain writes into guest memory.
//!
//! Used by tests, fuzz targets and benchmarks that play the guest (including a hostile one):
//! it writes descriptors and avail entries anywhere it is told to, without validation.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

/// Descriptor flag: another descriptor follows (`next` is valid).
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// Addresses of one split ring laid out contiguously from a base address.
#[derive(Clone, Copy, Debug)]
pub struct DriverRing {
    /// Number of entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: GuestAddress,
    /// Available ring.
    pub avail: GuestAddress,
    /// Used ring.
    pub used: GuestAddress,
    /// Next avail index the driver will publish.
    pub avail_idx: u16,
}

impl DriverRing {
    /// Lay out a ring of `size` entries at `base` (16-byte aligned).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc.unchecked_add(16 * n);
        // avail: flags, idx, ring[n], used_event; used is 4-byte aligned.
        let used_off = (avail.raw_value() + 4 + 2 * n + 2 + 3) & !3;
        DriverRing {
            size,
            desc,
            avail,
            used: GuestAddress(used_off),
            avail_idx: 0,
        }
    }

    /// Bytes from `base` to the end of the used ring.
    pub fn footprint(&self) -> u64 {
        self.used.raw_value() + 4 + 8 * u64::from(self.size) + 2 - self.desc.raw_value()
    }

    /// Point a device-side `Queue` at this ring and mark it ready.
    pub fn configure(&self, queue: &mut Queue, event_idx: bool) {
        queue.set_size(self.size);
        let split = |a: GuestAddress| {
            (
                Some(a.raw_value() as u32),
                Some((a.raw_value() >> 32) as u32),
            )
        };
        let (l, h) = split(self.desc);
        queue.set_desc_table_address(l, h);
        let (l, h) = split(self.avail);
        queue.set_avail_ring_address(l, h);
        let (l, h) = split(self.used);
        queue.set_used_ring_address(l, h);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
    }

    /// Write descriptor `index` (no bounds check: hostile tests use this).
    pub fn write_desc<M: Bytes<GuestAddress>>(
        &self,
        mem: &M,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), M::E> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, self.desc.unchecked_add(16 * u64::from(index)))
    }

    /// Publish `head` in the avail ring and bump the avail index.
    pub fn push_avail<M: Bytes<GuestAddress>>(&mut self, mem: &M, head: u16) -> Result<(), M::E> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx,
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
    }

    /// Write the avail index directly (for index-jump tests).
    pub fn set_avail_idx<M: Bytes<GuestAddress>>(&mut self, mem: &M, idx: u16) -> Result<(), M::E> {
        self.avail_idx = idx;
        mem.store(idx, self.avail.unchecked_add(2), Ordering::Release)
    }

    /// Set `used_event` (the EVENT_IDX threshold for device notifications).
    pub fn set_used_event<M: Bytes<GuestAddress>>(&self, mem: &M, idx: u16) -> Result<(), M::E> {
        mem.write_obj(idx, self.avail.unchecked_add(4 + 2 * u64::from(self.size)))
    }

    /// The device's used index.
    pub fn used_idx<M: Bytes<GuestAddress>>(&self, mem: &M) -> Result<u16, M::E> {
        mem.load(self.used.unchecked_add(2), Ordering::Acquire)
    }

    /// Used element `i`: (id, len).
    pub fn used_elem<M: Bytes<GuestAddress>>(&self, mem: &M, i: u16) -> Result<(u32, u32), M::E> {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        Ok((mem.read_obj(at)?, mem.read_obj(at.unchecked_add(4))?))
    }
}
