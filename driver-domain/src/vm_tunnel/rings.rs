//! What the in-VM side learns of a channel's rings from the frontend's messages as they pass:
//! the memory table (each region's frontend addresses and where dom0 put it in BAR2) and each
//! ring's avail address, so the ring poller can find a ring's avail index in BAR2.

use std::collections::HashMap;

use ipc::tunnel::vhost_msg::{mem_table_regions, read_pod, MsgHeader, VhostMsgError, HEADER_LEN};
use thiserror::Error;
use vhost::vhost_user::message::{FrontendReq, VhostUserVringAddr, VhostUserVringState};

/// Why a message or a ring's address is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RingsError {
    /// The message is malformed.
    #[error(transparent)]
    Message(#[from] VhostMsgError),
    /// A SET_VRING_ADDR or GET_VRING_BASE body of the wrong size.
    #[error("{0:?} with a body of {1} bytes")]
    Body(FrontendReq, usize),
    /// The ring's address was never set.
    #[error("queue {0}: no ring address before its kick")]
    NoAddress(u32),
    /// The avail ring lies in no region of the memory table.
    #[error("queue {0}: avail ring at {1:#x} is in no region of the memory table")]
    Unmapped(u32, u64),
}

/// One region of the memory table: the frontend's addresses and its BAR2 offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    user_addr: u64,
    size: u64,
    bar2_offset: u64,
}

/// What a message changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingEvent {
    /// Nothing the poller cares about.
    None,
    /// A new memory table (every ring's avail index may have moved in BAR2).
    MemTable,
    /// Queue n's addresses were set.
    RingAddress(u32),
    /// Queue n was stopped (GET_VRING_BASE).
    RingStopped(u32),
}

/// One channel's memory table and ring addresses.
#[derive(Debug, Default)]
pub struct RingTable {
    regions: Vec<Region>,
    avail: HashMap<u32, u64>,
}

impl RingTable {
    /// Takes note of a frontend's message (header + body) on its way to the backend.
    pub fn observe(&mut self, msg: &[u8]) -> Result<RingEvent, RingsError> {
        let header = MsgHeader::parse(msg)?;
        if header.is_reply() {
            return Ok(RingEvent::None);
        }
        let body = &msg[HEADER_LEN..];
        let Ok(request) = header.frontend_request() else {
            // Not ours to judge: the backend refuses what it does not know.
            return Ok(RingEvent::None);
        };
        match request {
            FrontendReq::SET_MEM_TABLE => {
                self.regions = mem_table_regions(body)?
                    .iter()
                    .map(|r| Region {
                        user_addr: r.user_addr,
                        size: r.memory_size,
                        bar2_offset: r.mmap_offset,
                    })
                    .collect();
                Ok(RingEvent::MemTable)
            }
            FrontendReq::SET_VRING_ADDR => {
                let addr = read_pod::<VhostUserVringAddr>(body)
                    .ok_or(RingsError::Body(request, body.len()))?;
                let (index, available) = (addr.index, addr.available);
                self.avail.insert(index, available);
                Ok(RingEvent::RingAddress(index))
            }
            FrontendReq::GET_VRING_BASE => {
                let state = read_pod::<VhostUserVringState>(body)
                    .ok_or(RingsError::Body(request, body.len()))?;
                Ok(RingEvent::RingStopped(state.index))
            }
            _ => Ok(RingEvent::None),
        }
    }

    /// BAR2 offset of queue `queue`'s avail index (the u16 two bytes into the avail ring).
    pub fn avail_idx_offset(&self, queue: u32) -> Result<u64, RingsError> {
        let avail = *self.avail.get(&queue).ok_or(RingsError::NoAddress(queue))?;
        let idx = avail
            .checked_add(2)
            .ok_or(RingsError::Unmapped(queue, avail))?;
        self.regions
            .iter()
            .find(|r| idx >= r.user_addr && idx - r.user_addr + 2 <= r.size)
            .and_then(|r| r.bar2_offset.checked_add(idx - r.user_addr))
            .ok_or(RingsError::Unmapped(queue, avail))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ipc::tunnel::vhost_msg::encode_message;
    use vhost::vhost_user::message::{VhostUserMemory, VhostUserMemoryRegion};
    use vm_memory::ByteValued;

    /// A SET_MEM_TABLE message of `(guest address, size, frontend address, BAR2 offset)`.
    pub(crate) fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
        let mut body = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        for &(gpa, size, ua, off) in regions {
            body.extend_from_slice(VhostUserMemoryRegion::new(gpa, size, ua, off).as_slice());
        }
        encode_message(FrontendReq::SET_MEM_TABLE.into(), 0, &body)
    }

    /// A SET_VRING_ADDR message for `queue` with its avail ring at frontend address `avail`.
    pub(crate) fn vring_addr(queue: u32, avail: u64) -> Vec<u8> {
        let addr = VhostUserVringAddr {
            index: queue,
            flags: 0,
            descriptor: avail - 0x1000,
            used: avail + 0x1000,
            available: avail,
            log: 0,
        };
        encode_message(FrontendReq::SET_VRING_ADDR.into(), 0, addr.as_slice())
    }

    #[test]
    fn the_avail_index_is_found_in_bar2_through_the_memory_table() {
        let mut t = RingTable::default();
        assert_eq!(
            t.observe(&mem_table(&[
                (0, 0x10_0000, 0x7f00_0000_0000, 0x20_0000),
                (0x1_0000_0000, 0x10_0000, 0x7f00_1000_0000, 0x40_0000),
            ]))
            .unwrap(),
            RingEvent::MemTable
        );
        assert_eq!(
            t.observe(&vring_addr(1, 0x7f00_1000_3000)).unwrap(),
            RingEvent::RingAddress(1)
        );
        assert_eq!(t.avail_idx_offset(1).unwrap(), 0x40_3002);
        assert_eq!(t.avail_idx_offset(0), Err(RingsError::NoAddress(0)));
        // Outside every region: refused.
        t.observe(&vring_addr(2, 0x7f00_2000_0000)).unwrap();
        assert!(matches!(
            t.avail_idx_offset(2),
            Err(RingsError::Unmapped(2, _))
        ));
        // The index's two bytes must fit in the region.
        t.observe(&vring_addr(3, 0x7f00_0000_0000 + 0x10_0000 - 3))
            .unwrap();
        assert!(t.avail_idx_offset(3).is_err());
        let stop = encode_message(
            FrontendReq::GET_VRING_BASE.into(),
            0,
            VhostUserVringState::new(1, 0).as_slice(),
        );
        assert_eq!(t.observe(&stop).unwrap(), RingEvent::RingStopped(1));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut t = RingTable::default();
        assert!(t.observe(&[1, 2, 3]).is_err());
        let short = encode_message(FrontendReq::SET_VRING_ADDR.into(), 0, &[0u8; 7]);
        assert!(matches!(
            t.observe(&short),
            Err(RingsError::Body(FrontendReq::SET_VRING_ADDR, 7))
        ));
        let bad_table = encode_message(FrontendReq::SET_MEM_TABLE.into(), 0, &[0u8; 8]);
        assert!(t.observe(&bad_table).is_err());
        // Requests the table does not track pass untouched.
        let other = encode_message(FrontendReq::GET_FEATURES.into(), 0, &[]);
        assert_eq!(t.observe(&other).unwrap(), RingEvent::None);
    }
}
