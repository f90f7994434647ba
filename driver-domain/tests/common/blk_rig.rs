//! The virtio-blk test rig shared by the blk core tests: a split ring laid out in a
//! GuestMemoryMmap, one `BlkBackendQueue` on a temporary image, requests written as a driver
//! would.

use std::io::Write;
use std::sync::Arc;

use driver_domain::blk::{BlkBackendConfig, BlkBackendQueue, BlkDisk, InflightLog};
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM: usize = 1 << 20;
pub const QSIZE: u16 = 16;
pub const HDR: u64 = 0x8000;
pub const DATA: u64 = 0x10000;
pub const STATUS: u64 = 0x7000;
pub const DISK_SECTORS: u64 = 256;

pub struct Rig {
    pub mem: GuestMemoryMmap,
    pub ring: DriverRing,
    pub queue: Queue,
    pub blk: BlkBackendQueue,
    pub file: std::fs::File,
    pub _log: InflightLog,
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

pub fn rig(read_only: bool, event_idx: bool, budget: usize) -> Rig {
    rig_with(read_only, event_idx, budget, true)
}

/// A rig whose queue batches its I/O through io_uring or does it with preadv/pwritev.
pub fn rig_with(read_only: bool, event_idx: bool, budget: usize, io_uring: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&pattern((DISK_SECTORS * 512) as usize, 0x5a))
        .unwrap();
    let disk = Arc::new(BlkDisk::from_file(file.try_clone().unwrap(), read_only).unwrap());
    let cfg = BlkBackendConfig {
        budget,
        queue_size: QSIZE,
        io_uring,
        ..BlkBackendConfig::default()
    };
    let log = InflightLog::new(1, QSIZE).unwrap();
    let blk = BlkBackendQueue::new(0, disk, &cfg, log.queue(0));
    let ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let mut queue = Queue::new(QSIZE).unwrap();
    ring.configure(&mut queue, event_idx);
    Rig {
        mem,
        ring,
        queue,
        blk,
        file,
        _log: log,
    }
}

pub fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Three-descriptor request at descriptors base..base+2: header, data (at DATA), status.
pub fn request3(r: &mut Rig, base: u16, t: u32, sector: u64, data_len: u32, data_write: bool) {
    request_with(r, base, (t, sector), (DATA, data_len), data_write);
}

/// A request at descriptors base..base+2 with its data buffer `(address, length)` (one per
/// request, so a pass can hold several).
pub fn request_with(
    r: &mut Rig,
    base: u16,
    (t, sector): (u32, u64),
    (data, data_len): (u64, u32),
    device_writes: bool,
) {
    let hdr = HDR + u64::from(base) * 16;
    header(&r.mem, hdr, t, sector);
    let st = STATUS + u64::from(base);
    r.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
    let dflags = DESC_F_NEXT | if device_writes { DESC_F_WRITE } else { 0 };
    r.ring
        .write_desc(&r.mem, base, hdr, 16, DESC_F_NEXT, base + 1)
        .unwrap();
    r.ring
        .write_desc(&r.mem, base + 1, data, data_len, dflags, base + 2)
        .unwrap();
    r.ring
        .write_desc(&r.mem, base + 2, st, 1, DESC_F_WRITE, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, base).unwrap();
}

pub fn status_of(r: &Rig, base: u16) -> u8 {
    r.mem
        .read_obj(GuestAddress(STATUS + u64::from(base)))
        .unwrap()
}
