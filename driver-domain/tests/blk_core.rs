//! Drives the virtio-blk core directly (no vhost-user): a split ring laid out in a
//! GuestMemoryMmap, requests written as a driver would, then used ring, data and status checked.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;

use driver_domain::blk::status;
use driver_domain::virtio_core::ring_driver::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use common::blk_rig::*;

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
