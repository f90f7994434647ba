//! Drives the virtio-blk core directly (no vhost-user): a split ring laid out in a
//! GuestMemoryMmap, requests written as a driver would, then used ring, data and status checked.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use driver_domain::blk::{
    status, BlkBackendConfig, BlkBackendDevice, BlkBackendQueue, BlkDisk, InflightLog,
};
use driver_domain::vhost_user::vring::Vring;
use driver_domain::vhost_user::VhostUserDevice;
use driver_domain::virtio_core::ring_driver::{
    DriverRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use driver_domain::virtio_core::{serve_queues, CheckedMemory, SealPolicy, TransportQueue};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x7000;
const DISK_SECTORS: u64 = 256;

struct Rig {
    mem: GuestMemoryMmap,
    ring: DriverRing,
    queue: Queue,
    blk: BlkBackendQueue,
    file: std::fs::File,
    _log: InflightLog,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn rig(read_only: bool, event_idx: bool, budget: usize) -> Rig {
    rig_with(read_only, event_idx, budget, true)
}

/// A rig whose queue batches its I/O through io_uring or does it with preadv/pwritev.
fn rig_with(read_only: bool, event_idx: bool, budget: usize, io_uring: bool) -> Rig {
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

fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Three-descriptor request at descriptors base..base+2: header, data (at DATA), status.
fn request3(r: &mut Rig, base: u16, t: u32, sector: u64, data_len: u32, data_write: bool) {
    request_with(r, base, (t, sector), (DATA, data_len), data_write);
}

/// A request at descriptors base..base+2 with its data buffer `(address, length)` (one per
/// request, so a pass can hold several).
fn request_with(
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

fn status_of(r: &Rig, base: u16) -> u8 {
    r.mem
        .read_obj(GuestAddress(STATUS + u64::from(base)))
        .unwrap()
}

#[test]
fn read_write_flush_get_id() {
    let mut r = rig(false, false, 64);
    // IN: sectors 2..10 into DATA.
    request3(&mut r, 0, 0, 2, 4096, true);
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 1);
    assert!(p.notify);
    assert_eq!(status_of(&r, 0), status::OK);
    assert_eq!(r.ring.used_idx(&r.mem).unwrap(), 1);
    assert_eq!(r.ring.used_elem(&r.mem, 0).unwrap(), (0, 4097));
    let mut got = vec![0u8; 4096];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(
        got,
        pattern((DISK_SECTORS * 512) as usize, 0x5a)[1024..5120]
    );
    assert!(r.blk.inflight().unwrap().pending().unwrap().is_empty());
    assert_eq!(r.blk.inflight().unwrap().used_idx().unwrap(), 1);

    // OUT: a new pattern to sector 100.
    let p2 = pattern(1024, 0x33);
    r.mem.write_slice(&p2, GuestAddress(DATA)).unwrap();
    request3(&mut r, 3, 1, 100, 1024, false);
    r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(status_of(&r, 3), status::OK);
    assert_eq!(r.ring.used_elem(&r.mem, 1).unwrap(), (3, 1));
    let mut onfile = vec![0u8; 1024];
    r.file.read_exact_at(&mut onfile, 100 * 512).unwrap();
    assert_eq!(onfile, p2);

    // FLUSH: header + status only.
    header(&r.mem, HDR + 0x200, 4, 0);
    r.ring
        .write_desc(&r.mem, 6, HDR + 0x200, 16, DESC_F_NEXT, 7)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 7, STATUS + 6, 1, DESC_F_WRITE, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 6).unwrap();
    // GET_ID.
    request3(&mut r, 8, 8, 0, 20, true);
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 2);
    assert_eq!(status_of(&r, 6), status::OK);
    assert_eq!(status_of(&r, 8), status::OK);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"splitvmm-blk");
    assert_eq!(r.ring.used_elem(&r.mem, 3).unwrap(), (8, 21));
}

#[test]
fn header_split_across_descriptors_and_indirect() {
    let mut r = rig(false, false, 64);
    // Header in two 8-byte pieces via an indirect table: [hdr0 8][hdr1 8][data W][status W].
    header(&r.mem, HDR, 0, 1);
    let table = 0x9000u64;
    let d = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        r.mem.write_slice(&b, GuestAddress(table + 16 * i)).unwrap();
    };
    d(0, HDR, 8, DESC_F_NEXT, 1);
    d(1, HDR + 8, 8, DESC_F_NEXT, 2);
    d(2, DATA, 512, DESC_F_NEXT | DESC_F_WRITE, 3);
    d(3, STATUS, 1, DESC_F_WRITE, 0);
    r.ring
        .write_desc(&r.mem, 0, table, 64, DESC_F_INDIRECT, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 0).unwrap();
    r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(status_of(&r, 0), status::OK);
    let mut got = vec![0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern((DISK_SECTORS * 512) as usize, 0x5a)[512..1024]);
}

#[test]
fn range_and_direction_errors() {
    let mut r = rig(false, false, 64);
    request3(&mut r, 0, 0, DISK_SECTORS - 1, 1024, true); // past end
    request3(&mut r, 3, 0, u64::MAX, 512, true); // sector overflow
    request3(&mut r, 6, 0, 0, 100, true); // not a multiple of 512
    request3(&mut r, 9, 0, 0, 512, false); // IN with a readable data buffer
    request3(&mut r, 12, 77, 0, 512, true); // unknown type
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 5);
    for b in [0, 3, 6, 9] {
        assert_eq!(status_of(&r, b), status::IOERR, "request at {b}");
    }
    assert_eq!(status_of(&r, 12), status::UNSUPP);
    // Failed requests wrote no data: used length is the status byte only.
    assert_eq!(r.ring.used_elem(&r.mem, 0).unwrap(), (0, 1));
}

#[test]
fn read_only_disk() {
    let mut r = rig(true, false, 64);
    request3(&mut r, 0, 1, 0, 512, false); // OUT
    request3(&mut r, 3, 11, 0, 16, false); // DISCARD
    r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(status_of(&r, 0), status::IOERR);
    assert_eq!(status_of(&r, 3), status::UNSUPP);
    let mut onfile = vec![0u8; 512];
    r.file.read_exact_at(&mut onfile, 0).unwrap();
    assert_eq!(onfile, pattern(512, 0x5a));
}

#[test]
fn discard_and_write_zeroes() {
    let mut r = rig(false, false, 64);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    request3(&mut r, 0, 13, 0, 16, false); // WRITE_ZEROES sectors 8..16
    r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(status_of(&r, 0), status::OK);
    let mut onfile = vec![0xffu8; 4096];
    r.file.read_exact_at(&mut onfile, 8 * 512).unwrap();
    assert!(onfile.iter().all(|b| *b == 0));
    // Past-end range fails; reserved flag bits are unsupported.
    seg[0..8].copy_from_slice(&(DISK_SECTORS - 1).to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    request3(&mut r, 3, 11, 0, 16, false);
    r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(status_of(&r, 3), status::IOERR);
}

#[test]
fn malformed_chains_fail_requests_not_queue() {
    let mut r = rig(false, false, 64);
    // Status descriptor not device-writable: completed with length 0, no status written.
    header(&r.mem, HDR, 0, 0);
    r.ring
        .write_desc(&r.mem, 0, HDR, 16, DESC_F_NEXT, 1)
        .unwrap();
    r.ring.write_desc(&r.mem, 1, STATUS, 1, 0, 0).unwrap();
    r.ring.push_avail(&r.mem, 0).unwrap();
    // Descriptor loop: 2 -> 3 -> 2 (all writable after a readable header).
    r.ring
        .write_desc(&r.mem, 2, HDR, 16, DESC_F_NEXT, 3)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 3, DATA, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        .unwrap();
    r.ring.push_avail(&r.mem, 2).unwrap();
    // Data address outside guest memory.
    header(&r.mem, HDR + 0x100, 0, 0);
    r.ring
        .write_desc(&r.mem, 4, HDR + 0x100, 16, DESC_F_NEXT, 5)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 5, 1 << 40, 512, DESC_F_NEXT | DESC_F_WRITE, 6)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 6, STATUS + 4, 1, DESC_F_WRITE, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 4).unwrap();
    // Length that wraps the address space (the chain walk stops at 2^32 bytes, so the
    // request has no status descriptor and is returned with length 0).
    r.mem.write_obj(0xffu8, GuestAddress(STATUS + 8)).unwrap();
    r.ring
        .write_desc(&r.mem, 8, HDR, 16, DESC_F_NEXT, 9)
        .unwrap();
    r.ring
        .write_desc(
            &r.mem,
            9,
            u64::MAX - 10,
            u32::MAX,
            DESC_F_NEXT | DESC_F_WRITE,
            10,
        )
        .unwrap();
    r.ring
        .write_desc(&r.mem, 10, STATUS + 8, 1, DESC_F_WRITE, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 8).unwrap();
    // Header too short (8 bytes), zero-length data buffer.
    r.ring
        .write_desc(&r.mem, 11, HDR, 8, DESC_F_NEXT, 12)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 12, DATA, 0, DESC_F_NEXT | DESC_F_WRITE, 13)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 13, STATUS + 11, 1, DESC_F_WRITE, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 11).unwrap();
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 5);
    assert_eq!(r.ring.used_elem(&r.mem, 0).unwrap(), (0, 0));
    assert_eq!(status_of(&r, 4), status::IOERR);
    assert_eq!(status_of(&r, 8), 0xff);
    assert_eq!(r.ring.used_elem(&r.mem, 3).unwrap(), (8, 0));
    assert_eq!(status_of(&r, 11), status::IOERR);
    assert!(r.blk.broken().is_none());
    // The queue still serves a good request.
    request3(&mut r, 0, 0, 0, 512, true);
    r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(status_of(&r, 0), status::OK);
}

#[test]
fn bad_ring_fails_the_queue_only() {
    let mut r = rig(false, false, 64);
    // Head index past the queue size.
    r.ring.push_avail(&r.mem, QSIZE + 3).unwrap();
    assert!(r.blk.process(&mut r.queue, &r.mem).is_err());
    assert!(r.blk.broken().is_some());
    assert!(r.blk.process(&mut r.queue, &r.mem).is_err());
    // A second device on the same memory is unaffected; avail index jumps fail it too.
    let mut r2 = rig(false, false, 64);
    request3(&mut r2, 0, 0, 0, 512, true);
    r2.blk.process(&mut r2.queue, &r2.mem).unwrap();
    assert_eq!(status_of(&r2, 0), status::OK);
    r2.ring.set_avail_idx(&r2.mem, 1 + QSIZE + 1).unwrap();
    assert!(r2.blk.process(&mut r2.queue, &r2.mem).is_err());
}

#[test]
fn budget_limits_one_wakeup() {
    let mut r = rig(false, false, 4);
    for i in 0..5u16 {
        request3(&mut r, i * 3, 0, u64::from(i), 512, true);
    }
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 4);
    assert!(p.more);
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 1);
    assert!(!p.more);
}

#[test]
fn event_idx_suppresses_notifications() {
    let mut r = rig(false, true, 64);
    // Driver asks to be notified only when used index passes 1 (i.e. after 2 completions).
    r.ring.set_used_event(&r.mem, 1).unwrap();
    request3(&mut r, 0, 0, 0, 512, true);
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 1);
    assert!(!p.notify);
    request3(&mut r, 3, 0, 0, 512, true);
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert!(p.notify);
}

/// With EVENT_IDX, a pass ends once it served half of what is in flight and the driver waits
/// for a completion: the caller signals it then and calls again for the other half, so that
/// the driver reaps and posts while the backend serves. A driver that does not wait gets the
/// whole ring in one pass and no signal; without EVENT_IDX the pass takes the whole ring and
/// signals at its end. On both engines.
#[test]
fn a_waiting_driver_is_signalled_once_half_of_what_is_in_flight_is_served() {
    for io_uring in [false, true] {
        let post4 = |r: &mut Rig| {
            for i in 0..4u16 {
                request_with(
                    r,
                    3 * i,
                    (0, u64::from(i)),
                    (DATA + 512 * u64::from(i), 512),
                    true,
                );
            }
        };
        // The driver waits for the first completion (used_event 0).
        let mut r = rig_with(false, true, 64, io_uring);
        r.ring.set_used_event(&r.mem, 0).unwrap();
        post4(&mut r);
        let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
        assert_eq!(
            (p.completed, p.notify, p.more),
            (2, true, true),
            "io_uring {io_uring}"
        );
        assert_eq!(r.ring.used_idx(&r.mem).unwrap(), 2);
        // The driver has not reaped yet: the other half without another signal.
        let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
        assert_eq!((p.completed, p.notify), (2, false), "io_uring {io_uring}");
        assert_eq!(r.ring.used_idx(&r.mem).unwrap(), 4);
        for i in 0..4u16 {
            assert_eq!(status_of(&r, 3 * i), 0);
        }

        // A driver busy elsewhere (used_event far ahead): one pass, no signal.
        let mut r = rig_with(false, true, 64, io_uring);
        r.ring.set_used_event(&r.mem, 100).unwrap();
        post4(&mut r);
        let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
        assert_eq!((p.completed, p.notify), (4, false), "io_uring {io_uring}");

        // No EVENT_IDX: one pass, signalled at its end.
        let mut r = rig_with(false, false, 64, io_uring);
        post4(&mut r);
        let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
        assert_eq!((p.completed, p.notify), (4, true), "io_uring {io_uring}");
    }
}

/// A vring set up on `ring` as the request handler sets one up from the frontend's messages.
fn vring_on(ring: &DriverRing) -> Vring {
    let vring = Vring::new(QSIZE).unwrap();
    vring.set_size(u32::from(QSIZE)).unwrap();
    vring
        .set_addresses(ring.desc.0, ring.avail.0, ring.used.0)
        .unwrap();
    vring.set_ready(true);
    vring.set_enabled(true);
    vring
}

/// Two queues served through the real path of a kick: the vhost-user device's `serve` on
/// each worker's vrings, which runs the shared scheduler (`virtio_core::serve_queues`) over
/// the blk device. No socket: the vrings are configured the way the request handler
/// configures them from the frontend's messages.
#[test]
fn scheduler_serves_two_queues_round_robin() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let disk = Arc::new(BlkDisk::null(1 << 20, false));
    let cfg = BlkBackendConfig {
        budget: 2,
        queue_size: QSIZE,
        num_queues: 2,
        ..BlkBackendConfig::default()
    };
    let device = VhostUserDevice::new(BlkBackendDevice::new(disk, cfg).unwrap()).unwrap();
    device.update_memory(atomic.clone()).unwrap();
    let mut rings = Vec::new();
    let mut vrings = Vec::new();
    let mut calls = Vec::new();
    for q in 0..2u16 {
        let ring = DriverRing::new(GuestAddress(0x1000 + 0x2000 * u64::from(q)), QSIZE);
        let vring = vring_on(&ring);
        let call = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        vring.set_call(Some(File::from(call.as_fd().try_clone_to_owned().unwrap())));
        calls.push(call);
        vrings.push(vring);
        rings.push(ring);
    }
    // Queue 0 gets 5 requests (more than the budget), queue 1 gets 1.
    for (q, ring) in rings.iter_mut().enumerate() {
        let n = if q == 0 { 5u16 } else { 1 };
        for i in 0..n {
            let hdr = 0x8000 + 0x1000 * q as u64 + 16 * u64::from(i);
            header(&mem, hdr, 0, 0);
            let data = 0x20000 + 0x10000 * q as u64 + 512 * u64::from(i);
            mem.write_slice(&[0xaa; 512], GuestAddress(data)).unwrap();
            let st = 0x30000 + 0x100 * q as u64 + u64::from(i);
            let b = i * 3;
            ring.write_desc(&mem, b, hdr, 16, DESC_F_NEXT, b + 1)
                .unwrap();
            ring.write_desc(&mem, b + 1, data, 512, DESC_F_NEXT | DESC_F_WRITE, b + 2)
                .unwrap();
            ring.write_desc(&mem, b + 2, st, 1, DESC_F_WRITE, 0)
                .unwrap();
            ring.push_avail(&mem, b).unwrap();
        }
    }
    // One kick per worker, on the worker's own vrings, as a worker thread serves it.
    let mut served: Vec<usize> = device.workers().concat();
    served.sort_unstable();
    assert_eq!(served, vec![0, 1], "every queue has a worker");
    let vrings: Vec<Arc<Vring>> = vrings.into_iter().map(Arc::new).collect();
    for queues in device.workers() {
        let mine: Vec<Arc<Vring>> = queues.iter().map(|q| vrings[*q].clone()).collect();
        device.serve(queues, &mine, true);
    }
    // The scheduler kept calling queue 0 past its budget of 2 until it was drained.
    assert_eq!(rings[0].used_idx(&mem).unwrap(), 5);
    assert_eq!(rings[1].used_idx(&mem).unwrap(), 1);
    assert!(calls[0].read().unwrap() >= 1);
    assert!(calls[1].read().unwrap() >= 1);
    // The null device returned zeroes.
    let mut got = [0xffu8; 512];
    mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert!(got.iter().all(|b| *b == 0));
}

/// A kick before any memory table is ignored, and the queue is served once a table arrives.
#[test]
fn scheduler_waits_for_a_memory_table() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let cfg = BlkBackendConfig {
        queue_size: QSIZE,
        ..BlkBackendConfig::default()
    };
    let disk = Arc::new(BlkDisk::null(1 << 20, false));
    let device = VhostUserDevice::new(BlkBackendDevice::new(disk, cfg).unwrap()).unwrap();
    let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let vring = vring_on(&ring);
    header(&mem, HDR, 0, 0);
    ring.write_desc(&mem, 0, HDR, 16, DESC_F_NEXT, 1).unwrap();
    ring.write_desc(&mem, 1, STATUS, 1, DESC_F_WRITE, 0)
        .unwrap();
    ring.push_avail(&mem, 0).unwrap();
    let vrings = [vring];
    device.serve(&[0], &vrings, true);
    assert_eq!(
        ring.used_idx(&mem).unwrap(),
        0,
        "served without a memory table"
    );
    device.update_memory(atomic).unwrap();
    device.serve(&[0], &vrings, true);
    assert_eq!(ring.used_idx(&mem).unwrap(), 1);
}

/// A transport queue that adds a memory region while the worker waits for the queue, as
/// vhost-user-backend's handler can while a worker waits for the vring lock.
struct RegionAddedWhileWaiting {
    queue: std::sync::Mutex<Queue>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    region: std::sync::Mutex<Option<GuestRegionMmap>>,
}

impl TransportQueue for RegionAddedWhileWaiting {
    fn with_ready_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        if let Some(region) = self.region.lock().unwrap().take() {
            let grown = self.mem.memory().insert_region(Arc::new(region)).unwrap();
            self.mem.lock().unwrap().replace(grown);
        }
        Some(f(&mut self.queue.lock().unwrap()))
    }

    fn signal_driver(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Regression: the scheduler took its memory snapshot before waiting for the queue, so a
/// request naming a region added meanwhile failed with IOERR (seen with libblkio and two
/// queues under load).
#[test]
fn regression_snapshot_taken_after_waiting_for_the_queue() {
    const NEW: u64 = 0x10_0000;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let memory = CheckedMemory::default();
    memory
        .update(
            atomic.clone(),
            driver_domain::virtio_core::MemoryGrant::AllRam,
            SealPolicy::RequireSealed,
            "test",
        )
        .unwrap();
    let cfg = BlkBackendConfig {
        queue_size: QSIZE,
        ..BlkBackendConfig::default()
    };
    let device = BlkBackendDevice::new(Arc::new(BlkDisk::null(1 << 20, false)), cfg).unwrap();
    let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let mut queue = Queue::new(QSIZE).unwrap();
    ring.configure(&mut queue, false);
    // A read whose data buffer lies in the region the transport adds.
    header(&mem, HDR, 0, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    ring.write_desc(&mem, 0, HDR, 16, DESC_F_NEXT, 1).unwrap();
    ring.write_desc(&mem, 1, NEW, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        .unwrap();
    ring.write_desc(&mem, 2, STATUS, 1, DESC_F_WRITE, 0)
        .unwrap();
    ring.push_avail(&mem, 0).unwrap();
    let transport = RegionAddedWhileWaiting {
        queue: std::sync::Mutex::new(queue),
        mem: atomic,
        region: std::sync::Mutex::new(Some(
            GuestRegionMmap::from_range(GuestAddress(NEW), 0x1000, None).unwrap(),
        )),
    };
    serve_queues(&device, &memory, &[0], std::slice::from_ref(&transport));
    assert_eq!(ring.used_idx(&mem).unwrap(), 1);
    assert_eq!(ring.used_elem(&mem, 0).unwrap(), (0, 513));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::OK
    );
}

#[test]
fn malformed_indirect_tables() {
    let mut r = rig(false, false, 64);
    let table = 0x9000u64;
    let put = |mem: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(table + 16 * i)).unwrap();
    };
    header(&r.mem, HDR, 0, 0);
    // Nested indirect: the table's second entry points at another table.
    put(&r.mem, 0, HDR, 16, DESC_F_NEXT, 1);
    put(&r.mem, 1, table, 32, DESC_F_INDIRECT, 0);
    r.ring
        .write_desc(&r.mem, 0, table, 32, DESC_F_INDIRECT, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 0).unwrap();
    // Indirect table length not a multiple of 16.
    r.ring
        .write_desc(&r.mem, 1, table, 20, DESC_F_INDIRECT, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 1).unwrap();
    // Indirect table outside guest memory.
    r.ring
        .write_desc(&r.mem, 2, 1 << 40, 64, DESC_F_INDIRECT, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 2).unwrap();
    let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 3);
    for i in 0..3 {
        assert_eq!(r.ring.used_elem(&r.mem, i).unwrap(), (u32::from(i), 0));
    }
    assert!(r.blk.broken().is_none());
    assert!(r.blk.inflight().unwrap().pending().unwrap().is_empty());
}

#[test]
fn writes_flush_reads_in_one_pass_keep_fetch_order() {
    // Five 4 KiB writes, a flush, five reads of the same sectors, all in one queue pass.
    const Q: u16 = 64;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let file = tempfile::tempfile().unwrap();
    file.set_len(DISK_SECTORS * 512).unwrap();
    let disk = Arc::new(BlkDisk::from_file(file.try_clone().unwrap(), false).unwrap());
    let cfg = BlkBackendConfig {
        queue_size: Q,
        ..BlkBackendConfig::default()
    };
    let log = InflightLog::new(1, Q).unwrap();
    let mut blk = BlkBackendQueue::new(0, disk, &cfg, log.queue(0));
    let mut ring = DriverRing::new(GuestAddress(0x1000), Q);
    let mut queue = Queue::new(Q).unwrap();
    ring.configure(&mut queue, false);
    let req =
        |ring: &mut DriverRing, t: u32, sector: u64, data: u64, write_data: bool, base: u16| {
            let hdr = HDR + 16 * u64::from(base);
            header(&mem, hdr, t, sector);
            let st = STATUS + u64::from(base);
            mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
            ring.write_desc(&mem, base, hdr, 16, DESC_F_NEXT, base + 1)
                .unwrap();
            let f = DESC_F_NEXT | if write_data { DESC_F_WRITE } else { 0 };
            ring.write_desc(&mem, base + 1, data, 4096, f, base + 2)
                .unwrap();
            ring.write_desc(&mem, base + 2, st, 1, DESC_F_WRITE, 0)
                .unwrap();
            ring.push_avail(&mem, base).unwrap();
        };
    for i in 0..5u16 {
        let data = DATA + 4096 * u64::from(i);
        mem.write_slice(&pattern(4096, 0x10 + i as u8), GuestAddress(data))
            .unwrap();
        req(&mut ring, 1, 8 * u64::from(i), data, false, 3 * i);
    }
    // FLUSH: header + status.
    header(&mem, HDR + 0x300, 4, 0);
    ring.write_desc(&mem, 15, HDR + 0x300, 16, DESC_F_NEXT, 16)
        .unwrap();
    ring.write_desc(&mem, 16, STATUS + 15, 1, DESC_F_WRITE, 0)
        .unwrap();
    ring.push_avail(&mem, 15).unwrap();
    for i in 0..5u16 {
        let data = DATA + 0x10000 + 4096 * u64::from(i);
        req(&mut ring, 0, 8 * u64::from(i), data, true, 18 + 3 * i);
    }
    let p = blk.process(&mut queue, &mem).unwrap();
    assert_eq!(p.completed, 11);
    assert_eq!(ring.used_idx(&mem).unwrap(), 11);
    // Writes, then the flush, then the reads: fetch order is kept around a flush.
    let order: Vec<u32> = (0..11)
        .map(|i| ring.used_elem(&mem, i).unwrap().0)
        .collect();
    assert_eq!(order, vec![0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]);
    for i in 0..5u16 {
        let st: u8 = mem
            .read_obj(GuestAddress(STATUS + u64::from(3 * i)))
            .unwrap();
        assert_eq!(st, 0);
        let st: u8 = mem
            .read_obj(GuestAddress(STATUS + u64::from(18 + 3 * i)))
            .unwrap();
        assert_eq!(st, 0);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA + 0x10000 + 4096 * u64::from(i)))
            .unwrap();
        assert_eq!(got, pattern(4096, 0x10 + i as u8), "read {i}");
        let mut on_file = vec![0u8; 4096];
        file.read_exact_at(&mut on_file, 4096 * u64::from(i))
            .unwrap();
        assert_eq!(on_file, pattern(4096, 0x10 + i as u8), "file {i}");
    }
    assert_eq!(ring.used_elem(&mem, 6).unwrap(), (18, 4097));
    assert!(blk.inflight().unwrap().pending().unwrap().is_empty());
}

/// A 4 KiB request at descriptors base..base+2 with its data at `data`.
fn request_at(r: &mut Rig, base: u16, t: u32, sector: u64, data: u64, device_writes: bool) {
    request_with(r, base, (t, sector), (data, 4096), device_writes);
}

#[test]
fn both_io_engines_serve_a_pass_of_reads_and_writes_alike() {
    for io_uring in [false, true] {
        let mut r = rig_with(false, false, 64, io_uring);
        // This host's kernel gives rings: the batched path is the one under test.
        assert_eq!(r.blk.batched_io(), io_uring);
        let original = pattern((DISK_SECTORS * 512) as usize, 0x5a);
        // Two writes and two reads of other sectors, one pass.
        for i in 0..2u16 {
            let data = DATA + 0x1000 * u64::from(i);
            r.mem
                .write_slice(&pattern(4096, 0x40 + i as u8), GuestAddress(data))
                .unwrap();
            request_at(&mut r, 3 * i, 1, 16 * u64::from(i), data, false);
        }
        for i in 2..4u16 {
            let data = DATA + 0x1000 * u64::from(i);
            request_at(&mut r, 3 * i, 0, 64 + 8 * u64::from(i), data, true);
        }
        let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
        assert_eq!(p.completed, 4, "io_uring {io_uring}");
        assert!(r.blk.broken().is_none());
        let used: Vec<(u32, u32)> = (0..4)
            .map(|i| r.ring.used_elem(&r.mem, i).unwrap())
            .collect();
        assert_eq!(
            used,
            vec![(0, 1), (3, 1), (6, 4097), (9, 4097)],
            "io_uring {io_uring}"
        );
        for i in 0..2u16 {
            assert_eq!(status_of(&r, 3 * i), status::OK);
            let mut on_file = vec![0u8; 4096];
            r.file
                .read_exact_at(&mut on_file, 16 * 512 * u64::from(i))
                .unwrap();
            assert_eq!(
                on_file,
                pattern(4096, 0x40 + i as u8),
                "io_uring {io_uring}"
            );
        }
        for i in 2..4u16 {
            assert_eq!(status_of(&r, 3 * i), status::OK);
            let mut got = vec![0u8; 4096];
            r.mem
                .read_slice(&mut got, GuestAddress(DATA + 0x1000 * u64::from(i)))
                .unwrap();
            let at = (64 + 8 * usize::from(i)) * 512;
            assert_eq!(got, original[at..at + 4096], "io_uring {io_uring}");
        }
        assert!(r.blk.inflight().unwrap().pending().unwrap().is_empty());
    }
}

#[test]
fn a_read_past_a_shrunk_image_fails_that_request_only_on_both_io_engines() {
    for io_uring in [false, true] {
        let mut r = rig_with(false, false, 64, io_uring);
        // The image loses its second half under the backend (its capacity stays 256).
        r.file.set_len(128 * 512).unwrap();
        request_at(&mut r, 0, 0, 200, DATA, true);
        request_at(&mut r, 3, 0, 8, DATA + 0x1000, true);
        let p = r.blk.process(&mut r.queue, &r.mem).unwrap();
        assert_eq!(p.completed, 2);
        assert!(r.blk.broken().is_none(), "io_uring {io_uring}");
        assert_eq!(status_of(&r, 0), status::IOERR, "io_uring {io_uring}");
        assert_eq!(status_of(&r, 3), status::OK, "io_uring {io_uring}");
        assert_eq!(r.ring.used_elem(&r.mem, 0).unwrap(), (0, 1));
        assert_eq!(r.ring.used_elem(&r.mem, 1).unwrap(), (3, 4097));
    }
}
