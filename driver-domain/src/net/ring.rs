//! Ring accesses the net data path batches itself, on top of `virtio-queue`: publishing many
//! used elements with one used-index store, and deciding whether the driver wants a call
//! (EVENT_IDX `used_event`, or the `VRING_AVAIL_F_NO_INTERRUPT` hint without it).
//!
//! One index store per batch instead of one per frame matters: the driver polls that cache
//! line from another core.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use std::sync::atomic::AtomicU16;

use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::split_ring::host_range;

/// `VRING_AVAIL_F_NO_INTERRUPT`.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Write `(head, len)` for every entry of `used` into the used ring and publish them with a
/// single used-index store. The ring is translated once per call.
pub fn publish_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    used: impl ExactSizeIterator<Item = (u16, u32)>,
) -> Result<(), Error> {
    let n = used.len();
    if n == 0 {
        return Ok(());
    }
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    let ring_len = 6 + 8 * usize::from(size);
    // The used ring is 4-byte aligned (virtio-queue checks the address), so its index is
    // 2-byte aligned.
    if let Some(host) = host_range(mem, ring.raw_value(), ring_len).filter(|h| h % 4 == 0) {
        for (head, len) in used {
            if head >= size {
                return Err(Error::InvalidDescriptorIndex);
            }
            let mut elem = [0u8; 8];
            elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..8].copy_from_slice(&len.to_le_bytes());
            let at = host + 4 + 8 * usize::from(next.0 % size);
            // SAFETY: `at..at + 8` lies in the used ring, which `host_range` found mapped in
            // one region of `mem` (borrowed for this call).
            unsafe { std::ptr::write_volatile(at as *mut [u8; 8], elem) };
            next += Wrapping(1);
        }
        // SAFETY: `host + 2` is the used index, inside the mapped ring and 2-byte aligned
        // (checked above); other parties access it only atomically or with plain loads.
        let idx = unsafe { AtomicU16::from_ptr((host + 2) as *mut u16) };
        idx.store(next.0.to_le(), Ordering::Release);
        queue.set_next_used(next.0);
        return Ok(());
    }
    for (head, len) in used {
        if head >= size {
            return Err(Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(next.0 % size);
        let at = ring
            .checked_add(4 + 8 * slot)
            .ok_or(Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, at).map_err(Error::GuestMemory)?;
        next += Wrapping(1);
    }
    let idx = ring.checked_add(2).ok_or(Error::AddressOverflow)?;
    mem.store(next.0.to_le(), idx, Ordering::Release)
        .map_err(Error::GuestMemory)?;
    queue.set_next_used(next.0);
    Ok(())
}

/// Whether the driver must be called after the used index moved from `old` to the queue's
/// current `next_used`.
pub fn needs_call<M: GuestMemory>(queue: &Queue, mem: &M, old: u16) -> Result<bool, Error> {
    let new = Wrapping(queue.next_used());
    let old = Wrapping(old);
    if new == old {
        return Ok(false);
    }
    // The used-ring writes must be visible before the driver's suppression state is read.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let at = avail
            .checked_add(4 + 2 * u64::from(queue.size()))
            .ok_or(Error::AddressOverflow)?;
        let used_event: u16 = mem
            .load(at, Ordering::Relaxed)
            .map_err(Error::GuestMemory)?;
        let used_event = Wrapping(u16::from_le(used_event));
        return Ok(new - used_event - Wrapping(1) < new - old);
    }
    let flags: u16 = mem
        .load(avail, Ordering::Relaxed)
        .map_err(Error::GuestMemory)?;
    Ok(u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0)
}
