//! A virtio-blk request: read out of a descriptor chain ([`Request::parse`]), then executed
//! against the disk and guest memory ([`execute`]).
//!
//! Parsing: the chain is walked once (virtio-queue bounds the walk by the queue or indirect-table
//! size, so loops end). Readable descriptors must precede writable ones; the last byte of the
//! last descriptor, which must be device-writable, is the status. The 16-byte header is copied
//! out of guest memory into a local array before any field is looked at (no double fetch); the
//! data segments are only recorded as guest addresses and lengths.
//! The spec requires no particular framing, so header, data and status may share or span
//! descriptors.
//!
//! Execution: every range is checked with checked arithmetic before the disk is touched: a
//! sector range past the end of the disk, a data length that is not a multiple of 512, or
//! buffers in the wrong direction yield VIRTIO_BLK_S_IOERR; unknown types and operations the
//! disk does not offer (DISCARD / WRITE_ZEROES on a read-only disk, which does not offer those
//! features) yield VIRTIO_BLK_S_UNSUPP; OUT on a read-only disk yields VIRTIO_BLK_S_IOERR
//! (virtio 1.2, 5.2.6.2).

use std::ops::Deref;

use log::debug;
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BS;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::disk::{BlkDisk, DiskError};
use super::{status, SECTOR_SHIFT, SECTOR_SIZE};

/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;

/// Why a chain is not a well-formed request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BlkRequestError {
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
    pub fn parse<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), BlkRequestError>
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
                .ok_or(BlkRequestError::TooLong)?;
            if desc.is_write_only() {
                seen_writable = true;
                if desc.len() > 0 {
                    self.writable.push((desc.addr(), desc.len()));
                }
            } else {
                if seen_writable {
                    return Err(BlkRequestError::ReadableAfterWritable);
                }
                if desc.len() > 0 {
                    self.readable.push((desc.addr(), desc.len()));
                }
            }
        }
        if !any {
            return Err(BlkRequestError::EmptyChain);
        }
        if total > u64::from(u32::MAX) {
            return Err(BlkRequestError::TooLong);
        }
        // Status: the last byte of the last writable buffer.
        let Some(last) = self.writable.last_mut() else {
            return Err(BlkRequestError::StatusNotWritable);
        };
        let status = last
            .0
            .checked_add(u64::from(last.1) - 1)
            .ok_or(BlkRequestError::StatusNotWritable)?;
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
                .map_err(|_| BlkRequestError::HeaderUnreadable)?;
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
            return Err(BlkRequestError::HeaderTooShort);
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

/// Length of the GET_ID reply.
pub const ID_LEN: usize = 20;

/// What happened to one request: the status byte and the number of bytes written into
/// guest memory (data plus the status byte), which goes into the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequestOutcome {
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// Bytes the device wrote, including the status byte.
    pub written: u32,
}

/// Logs why `req` fails; the status it completes with.
pub fn fail(why: &str, req: &Request) -> u8 {
    debug!("blk request head {} {:?}: {}", req.head, req.kind, why);
    status::IOERR
}

/// Byte offset of `[sector, sector + bytes)` if the range is whole sectors inside the disk.
fn checked_range(disk: &BlkDisk, sector: u64, bytes: u64) -> Option<u64> {
    if bytes & (SECTOR_SIZE - 1) != 0 {
        return None;
    }
    let end = sector.checked_add(bytes >> SECTOR_SHIFT)?;
    if end > disk.capacity_sectors() {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

fn slices<'m, M: GuestMemory>(
    mem: &'m M,
    segs: &[Segment],
    access: Permissions,
) -> Option<Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>> {
    let mut out = Vec::with_capacity(segs.len());
    for &(addr, len) in segs {
        for s in mem.get_slices(addr, len as usize, access).ok()? {
            out.push(s.ok()?);
        }
    }
    Some(out)
}

/// A validated read or write: the guest buffers, the disk offset and the direction.
pub struct Transfer<'m, B> {
    /// The guest buffers, in order.
    pub bufs: Vec<VolatileSlice<'m, B>>,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Whether the guest's data goes to the disk (OUT) rather than from it (IN).
    pub write: bool,
    /// Total bytes.
    pub len: u64,
}

impl<B> Transfer<'_, B> {
    /// The bytes the device writes into guest memory for this transfer (data only).
    pub fn written(&self) -> u32 {
        if self.write {
            0
        } else {
            // len <= total chain length, which the parser bounded by u32.
            u32::try_from(self.len).unwrap_or(u32::MAX)
        }
    }
}

/// Checks an IN or OUT request against the disk and guest memory and gives its transfer, or
/// the status it fails with (the same checks whether it is then done at once or batched).
pub fn prepare_transfer<'m, M: GuestMemory>(
    req: &Request,
    disk: &BlkDisk,
    mem: &'m M,
) -> Result<Transfer<'m, BS<'m, M::Bitmap>>, u8> {
    let write = match req.kind {
        RequestType::In => false,
        RequestType::Out => true,
        _ => return Err(fail("not a read or a write", req)),
    };
    let (len, segs, access) = if write {
        if disk.read_only() {
            return Err(fail("write to a read-only disk", req));
        }
        if !req.writable.is_empty() {
            return Err(fail("OUT request carries device-writable data", req));
        }
        (req.readable_len(), &req.readable, Permissions::Read)
    } else {
        if !req.readable.is_empty() {
            return Err(fail("IN request carries device-readable data", req));
        }
        (req.writable_len(), &req.writable, Permissions::Write)
    };
    let Some(offset) = checked_range(disk, req.sector, len) else {
        return Err(fail(
            "sector range past the disk end or unaligned length",
            req,
        ));
    };
    let Some(bufs) = slices(mem, segs, access) else {
        return Err(fail("data buffer outside guest memory", req));
    };
    Ok(Transfer {
        bufs,
        offset,
        write,
        len,
    })
}

/// Execute `req` (already parsed) and write its status byte. `serial` is the GET_ID reply.
pub fn execute<M: GuestMemory>(
    req: &Request,
    disk: &BlkDisk,
    mem: &M,
    serial: &[u8; ID_LEN],
) -> BlkRequestOutcome {
    let mut written = 0u32;
    let st = match req.kind {
        RequestType::In | RequestType::Out => match prepare_transfer(req, disk, mem) {
            Ok(t) => {
                let done = if t.write {
                    disk.write_at(&t.bufs, t.offset)
                } else {
                    disk.read_at(&t.bufs, t.offset)
                };
                match done {
                    Ok(()) => {
                        written = t.written();
                        status::OK
                    }
                    Err(e) => io_fail(e, req),
                }
            }
            Err(st) => st,
        },
        RequestType::Flush => match disk.flush() {
            Ok(()) => status::OK,
            Err(e) => io_fail(e, req),
        },
        RequestType::GetId => {
            let mut done = 0usize;
            let mut ok = true;
            for &(addr, len) in &req.writable {
                if done == ID_LEN {
                    break;
                }
                let n = (len as usize).min(ID_LEN - done);
                if mem.write_slice(&serial[done..done + n], addr).is_err() {
                    ok = false;
                    break;
                }
                done += n;
            }
            if ok && done > 0 {
                written = done as u32;
                status::OK
            } else {
                fail("GET_ID buffer missing or outside guest memory", req)
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if disk.read_only() {
                status::UNSUPP
            } else {
                discard_like(req, disk, mem)
            }
        }
        RequestType::Unsupported(_) => status::UNSUPP,
    };
    complete(req, mem, st, written)
}

/// Writes `req`'s status byte `st`; the outcome, with `data_written` bytes of data before it.
pub fn complete<M: GuestMemory>(
    req: &Request,
    mem: &M,
    st: u8,
    data_written: u32,
) -> BlkRequestOutcome {
    let mut written = data_written;
    if let Some(addr) = req.status {
        if mem.write_obj(st, addr).is_ok() {
            written = written.saturating_add(1);
        }
    }
    BlkRequestOutcome {
        status: st,
        written,
    }
}

/// Logs a failed disk operation of `req`; the status it completes with.
pub fn io_fail(e: DiskError, req: &Request) -> u8 {
    log::warn!(
        "blk request head {} {:?} sector {}: {}",
        req.head,
        req.kind,
        req.sector,
        e
    );
    status::IOERR
}

/// DISCARD and WRITE_ZEROES: the readable data is an array of 16-byte ranges
/// `{sector: u64, num_sectors: u32, flags: u32}`, copied out once and then validated.
fn discard_like<M: GuestMemory>(req: &Request, disk: &BlkDisk, mem: &M) -> u8 {
    let len = req.readable_len();
    if !req.writable.is_empty() || len == 0 || len & 15 != 0 {
        return fail("range array length is not a positive multiple of 16", req);
    }
    if len / 16 > u64::from(MAX_DISCARD_SEGMENTS) {
        return fail("more ranges than max_discard_seg", req);
    }
    let mut buf = vec![0u8; len as usize];
    let mut at = 0usize;
    for &(addr, l) in &req.readable {
        if mem.read_slice(&mut buf[at..at + l as usize], addr).is_err() {
            return fail("range array outside guest memory", req);
        }
        at += l as usize;
    }
    let write_zeroes = req.kind == RequestType::WriteZeroes;
    for r in buf.chunks_exact(16) {
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&r[0..8]);
        let mut n4 = [0u8; 4];
        n4.copy_from_slice(&r[8..12]);
        let mut f4 = [0u8; 4];
        f4.copy_from_slice(&r[12..16]);
        let sector = u64::from_le_bytes(s8);
        let num = u32::from_le_bytes(n4);
        let flags = u32::from_le_bytes(f4);
        // Bit 0 is "unmap"; it is only meaningful for WRITE_ZEROES. Other bits are reserved.
        if flags & !1 != 0 || (!write_zeroes && flags != 0) {
            return status::UNSUPP;
        }
        if num > MAX_DISCARD_SECTORS {
            return fail("range longer than max_discard_sectors", req);
        }
        let bytes = u64::from(num) << SECTOR_SHIFT;
        let Some(off) = checked_range(disk, sector, bytes) else {
            return fail("discard range past the disk end", req);
        };
        let r = if write_zeroes {
            disk.write_zeroes(off, bytes, flags & 1 != 0)
        } else {
            disk.discard(off, bytes)
        };
        if let Err(e) = r {
            return io_fail(e, req);
        }
    }
    status::OK
}
