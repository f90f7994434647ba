//! Executing a parsed request against the disk and guest memory.
//!
//! Every range is checked with checked arithmetic before the disk is touched: a sector range
//! past the end of the disk, a data length that is not a multiple of 512, or buffers in the
//! wrong direction yield VIRTIO_BLK_S_IOERR; unknown types and operations the disk does not
//! offer (DISCARD / WRITE_ZEROES on a read-only disk, which does not offer those features)
//! yield VIRTIO_BLK_S_UNSUPP; OUT on a read-only disk yields VIRTIO_BLK_S_IOERR (virtio 1.2,
//! 5.2.6.2).

use log::debug;
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use super::disk::{BlkDisk, DiskError};
use super::request::{Request, RequestType, Segment};
use super::{status, SECTOR_SHIFT, SECTOR_SIZE};

/// Length of the GET_ID reply.
pub const ID_LEN: usize = 20;

/// What happened to one request: the status byte and the number of bytes written into
/// guest memory (data plus the status byte), which goes into the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// Bytes the device wrote, including the status byte.
    pub written: u32,
}

fn fail(why: &str, req: &Request) -> u8 {
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

/// Execute `req` (already parsed) and write its status byte. `serial` is the GET_ID reply.
pub fn execute<M: GuestMemory>(
    req: &Request,
    disk: &BlkDisk,
    mem: &M,
    serial: &[u8; ID_LEN],
) -> Completion {
    let mut written = 0u32;
    let st = match req.kind {
        RequestType::In => {
            let len = req.writable_len();
            if !req.readable.is_empty() {
                fail("IN request carries device-readable data", req)
            } else if let Some(off) = checked_range(disk, req.sector, len) {
                match slices(mem, &req.writable, Permissions::Write) {
                    None => fail("data buffer outside guest memory", req),
                    Some(bufs) => match disk.read_at(&bufs, off) {
                        Ok(()) => {
                            // len <= total chain length, which the parser bounded by u32.
                            written = u32::try_from(len).unwrap_or(u32::MAX);
                            status::OK
                        }
                        Err(e) => io_fail(e, req),
                    },
                }
            } else {
                fail("sector range past the disk end or unaligned length", req)
            }
        }
        RequestType::Out => {
            let len = req.readable_len();
            if disk.read_only() {
                fail("write to a read-only disk", req)
            } else if !req.writable.is_empty() {
                fail("OUT request carries device-writable data", req)
            } else if let Some(off) = checked_range(disk, req.sector, len) {
                match slices(mem, &req.readable, Permissions::Read) {
                    None => fail("data buffer outside guest memory", req),
                    Some(bufs) => match disk.write_at(&bufs, off) {
                        Ok(()) => status::OK,
                        Err(e) => io_fail(e, req),
                    },
                }
            } else {
                fail("sector range past the disk end or unaligned length", req)
            }
        }
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
    if let Some(addr) = req.status {
        if mem.write_obj(st, addr).is_ok() {
            written = written.saturating_add(1);
        }
    }
    Completion {
        status: st,
        written,
    }
}

fn io_fail(e: DiskError, req: &Request) -> u8 {
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
