//! Reading a virtio-blk request out of a descriptor chain.
//!
//! The chain is walked once (virtio-queue bounds the walk by the queue or indirect-table
//! size, so loops end). Readable descriptors must precede writable ones; the last byte of the
//! last descriptor, which must be device-writable, is the status. The 16-byte header is copied
//! out of guest memory into a local array before any field is looked at (no double fetch); the
//! data segments are only recorded as guest addresses and lengths.
//! The spec requires no particular framing, so header, data and status may share or span
//! descriptors.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;

/// Why a chain is not a well-formed request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no descriptor at all (head index past the queue size, unreadable table).
    #[error("descriptor chain is empty or its head is invalid")]
    EmptyChain,
    /// The last descriptor is not device-writable, so there is nowhere to put the status.
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes.
    #[error("request header shorter than 16 bytes")]
    HeaderTooShort,
    /// The header could not be copied out of guest memory.
    #[error("request header is outside guest memory")]
    HeaderUnreadable,
    /// The data length does not fit the request (direction, size or alignment).
    #[error("bad data buffers for this request type: {0}")]
    BadData(&'static str),
    /// The chain describes more than 2^32 bytes.
    #[error("descriptor chain too long")]
    TooLong,
}

/// The request types this device knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read from the disk.
    In,
    /// VIRTIO_BLK_T_OUT: write to the disk.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the device serial.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Anything else (answered with VIRTIO_BLK_S_UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// One guest buffer: an address and a length, not yet dereferenced.
pub type Segment = (GuestAddress, u32);

/// A parsed request. Reused across requests by a queue to avoid allocations.
#[derive(Debug, Clone)]
pub struct Request {
    /// The head descriptor index (the id returned in the used ring).
    pub head: u16,
    /// Request type from the copied header.
    pub kind: RequestType,
    /// First sector from the copied header.
    pub sector: u64,
    /// Device-readable data after the header.
    pub readable: Vec<Segment>,
    /// Device-writable data before the status byte.
    pub writable: Vec<Segment>,
    /// Where the status byte goes, once the chain has shown one.
    pub status: Option<GuestAddress>,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            head: 0,
            kind: RequestType::Unsupported(u32::MAX),
            sector: 0,
            readable: Vec::new(),
            writable: Vec::new(),
            status: None,
        }
    }
}

impl Request {
    /// Total bytes of the device-readable data.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Total bytes of the device-writable data (without the status byte).
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Parse the chain into `self`. On error, `self.status` tells whether a status byte can
    /// still be written (to report VIRTIO_BLK_S_IOERR) or not (return the head with length 0).
    pub fn parse<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), RequestError>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        self.head = chain.head_index();
        self.kind = RequestType::Unsupported(u32::MAX);
        self.sector = 0;
        self.readable.clear();
        self.writable.clear();
        self.status = None;

        let mem = chain.memory();
        let mut seen_writable = false;
        let mut any = false;
        let mut total: u64 = 0;
        // Walk once; each descriptor was copied out of guest memory by virtio-queue.
        for desc in chain.clone() {
            any = true;
            total = total
                .checked_add(u64::from(desc.len()))
                .ok_or(RequestError::TooLong)?;
            if desc.is_write_only() {
                seen_writable = true;
                if desc.len() > 0 {
                    self.writable.push((desc.addr(), desc.len()));
                }
            } else {
                if seen_writable {
                    return Err(RequestError::ReadableAfterWritable);
                }
                if desc.len() > 0 {
                    self.readable.push((desc.addr(), desc.len()));
                }
            }
        }
        if !any {
            return Err(RequestError::EmptyChain);
        }
        if total > u64::from(u32::MAX) {
            return Err(RequestError::TooLong);
        }
        // Status: the last byte of the last writable buffer.
        let Some(last) = self.writable.last_mut() else {
            return Err(RequestError::StatusNotWritable);
        };
        let status = last
            .0
            .checked_add(u64::from(last.1) - 1)
            .ok_or(RequestError::StatusNotWritable)?;
        last.1 -= 1;
        if last.1 == 0 {
            self.writable.pop();
        }
        self.status = Some(status);

        // Header: the first 16 readable bytes, copied once.
        let mut hdr = [0u8; HEADER_LEN];
        let mut got = 0usize;
        let mut consumed_segments = 0usize;
        for seg in &mut self.readable {
            let want = (HEADER_LEN - got).min(seg.1 as usize);
            mem.read_slice(&mut hdr[got..got + want], seg.0)
                .map_err(|_| RequestError::HeaderUnreadable)?;
            got += want;
            // `want` <= seg.1 and <= 16, so neither the address nor the length can overflow
            // past what the segment already described.
            seg.0 = GuestAddress(seg.0 .0.wrapping_add(want as u64));
            seg.1 -= want as u32;
            if seg.1 == 0 {
                consumed_segments += 1;
            }
            if got == HEADER_LEN {
                break;
            }
        }
        if got < HEADER_LEN {
            return Err(RequestError::HeaderTooShort);
        }
        self.readable.drain(..consumed_segments);
        let (t, rest) = hdr.split_at(4);
        let mut t4 = [0u8; 4];
        t4.copy_from_slice(t);
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&rest[4..12]);
        self.kind = RequestType::from(u32::from_le_bytes(t4));
        self.sector = u64::from_le_bytes(s8);
        Ok(())
    }
}
