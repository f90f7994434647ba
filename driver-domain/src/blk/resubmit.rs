//! The replay queue: descriptor chains for requests a restarted backend resubmits.
//!
//! virtio-queue (0.18) builds a [`virtio_queue::DescriptorChain`] only while walking an avail
//! ring (its constructor is crate-private). The heads to resubmit are known from the in-flight
//! log, not from the guest's avail ring (whose slots the driver may have reused), so they are
//! written as an avail ring of their own into a scratch page placed just above the guest's
//! memory, and a second [`Queue`] on the guest's descriptor table walks it. The chains are
//! virtio-queue's own, with its bounds on chain length and indirect tables.

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

const PAGE: u64 = 4096;

/// Why the replay queue could not be set up.
#[derive(Debug, Error)]
pub enum ResubmitError {
    /// Guest memory reaches the top of the address space: no room for the scratch page.
    #[error("no guest address left above guest memory")]
    NoRoom,
    /// The scratch page could not be mapped or added.
    #[error("scratch page: {0}")]
    Scratch(String),
    /// virtio-queue refused the replay queue.
    #[error("replay queue: {0}")]
    Queue(virtio_queue::Error),
    /// Writing the replay ring failed.
    #[error("writing the replay ring: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Guest memory plus the scratch page, and a ready queue on `queue`'s descriptor table whose
/// avail ring (in the scratch page) offers `heads` in order.
pub fn replay_queue(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    heads: &[u16],
) -> Result<(GuestMemoryMmap, Queue), ResubmitError> {
    let size = queue.size();
    let base = mem
        .last_addr()
        .0
        .checked_add(1)
        .and_then(|a| a.checked_next_multiple_of(PAGE))
        .ok_or(ResubmitError::NoRoom)?;
    // flags, idx, ring[size], used_event
    let ring_len = (4 + 2 * u64::from(size) + 2).next_multiple_of(PAGE);
    base.checked_add(ring_len).ok_or(ResubmitError::NoRoom)?;
    let len = usize::try_from(ring_len).map_err(|e| ResubmitError::Scratch(e.to_string()))?;
    let page = GuestRegionMmap::from_range(GuestAddress(base), len, None)
        .map_err(|e| ResubmitError::Scratch(e.to_string()))?;
    let with_scratch = mem
        .insert_region(Arc::new(page))
        .map_err(|e| ResubmitError::Scratch(e.to_string()))?;
    let avail = GuestAddress(base);
    let count = u16::try_from(heads.len())
        .map_err(|_| ResubmitError::Queue(virtio_queue::Error::InvalidSize))?;
    with_scratch.write_obj(0u16, avail)?;
    with_scratch.write_obj(count, avail.unchecked_add(2))?;
    for (i, head) in heads.iter().enumerate() {
        with_scratch.write_obj(*head, avail.unchecked_add(4 + 2 * i as u64))?;
    }
    let mut replay = Queue::new(size).map_err(ResubmitError::Queue)?;
    replay
        .try_set_desc_table_address(GuestAddress(queue.desc_table()))
        .and_then(|()| replay.try_set_avail_ring_address(avail))
        .map_err(ResubmitError::Queue)?;
    replay.set_ready(true);
    Ok((with_scratch, replay))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::virtio_core::ring_driver::DriverRing;
    use virtio_queue::QueueOwnedT;

    #[test]
    fn the_replay_ring_offers_the_heads_in_the_order_given() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let ring = DriverRing::new(GuestAddress(0x1000), 8);
        let mut queue = Queue::new(8).unwrap();
        ring.configure(&mut queue, false);
        for d in 0..8 {
            ring.write_desc(&mem, d, 0x8000, 16, 0, 0).unwrap();
        }
        let (with, mut replay) = replay_queue(&queue, &mem, &[6, 3, 0]).unwrap();
        // The scratch page lies above guest memory, not in it.
        assert!(with.last_addr() > mem.last_addr());
        let heads: Vec<u16> = replay
            .iter(&with)
            .unwrap()
            .map(|c| c.head_index())
            .collect();
        assert_eq!(heads, vec![6, 3, 0]);
        // The guest's own queue is untouched.
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn guest_memory_at_the_top_of_the_address_space_leaves_no_room() {
        let top = GuestAddress(u64::MAX - 0x1fff);
        let mem = GuestMemoryMmap::from_ranges(&[(top, 0x1000)]).unwrap();
        let queue = Queue::new(8).unwrap();
        assert!(matches!(
            replay_queue(&queue, &mem, &[1]),
            Err(ResubmitError::NoRoom)
        ));
    }
}
