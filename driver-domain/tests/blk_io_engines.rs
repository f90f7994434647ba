//! The blk core's two I/O engines (io_uring batches and preadv/pwritev): a pass of mixed
//! requests served alike, in fetch order, and a failing read failing only its request.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use driver_domain::blk::{status, BlkBackendConfig, BlkBackendQueue, BlkDisk, InflightLog};
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use common::blk_rig::*;

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
