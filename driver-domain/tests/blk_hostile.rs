//! A hostile vhost-user frontend (built on the `vhost` crate's `Frontend`, plus raw socket
//! writes) against `driver-domain serve`. Every case must fail the request or the session
//! with a logged reason, and afterwards the same backend process must serve a NEW, good
//! frontend (libblkio) with verified data.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use common::{pattern, BackendProcess};
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const IMG: u64 = 1 << 20;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x7000;

fn setup(dir: &Path) -> (BackendProcess, std::path::PathBuf) {
    let img = dir.join("disk.img");
    let f = File::create(&img).unwrap();
    f.set_len(IMG).unwrap();
    f.write_all_at(&pattern(4096, 0x42), 0).unwrap();
    let be = BackendProcess::start(dir, &["--blk", img.to_str().unwrap()]);
    (be, img)
}

/// After any hostile session: the same process serves a new, well-behaved frontend (it
/// accepts the next connection only once the hostile one has ended).
fn assert_still_serving(be: &mut BackendProcess) {
    assert!(be.alive(), "backend process died");
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", be.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let buf = b.alloc_mem_region(4096).unwrap();
    b.map_mem_region(&buf).unwrap();
    let q = &mut out.queues[0];
    q.read(0, buf.addr as *mut u8, 4096, 0, ReqFlags::empty());
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut t = Duration::from_secs(5);
    assert_eq!(q.do_io(&mut c, 1, Some(&mut t), None).unwrap(), 1);
    // SAFETY: do_io initialised one completion.
    assert_eq!(unsafe { c[0].assume_init_read() }.ret, 0);
    // SAFETY: live mapping of 4096 bytes owned by `b`.
    let got = unsafe { std::slice::from_raw_parts(buf.addr as *const u8, 4096) };
    assert_eq!(got, &pattern(4096, 0x42)[..]);
    drop(out);
    drop(b);
    assert!(be.alive());
}

/// A frontend that negotiated features and shares one memfd of MEM bytes.
struct Evil {
    fe: Frontend,
    file: File,
    mem: GuestMemoryMmap,
}

fn negotiate(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

fn memfd(len: u64) -> File {
    let f = File::from(memfd_create(c"evil", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap());
    f.set_len(len).unwrap();
    f
}

fn region(file: &File, gpa: u64, size: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: VA.wrapping_add(gpa),
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    }
}

impl Evil {
    fn new(sock: &Path) -> Evil {
        let fe = negotiate(sock);
        let file = memfd(MEM);
        fe.set_mem_table(&[region(&file, 0, MEM, 0)]).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Evil { fe, file, mem }
    }

    /// Configure queue 0 on `ring`; returns (kick, call).
    fn start_queue(&mut self, ring: &DriverRing) -> (EventFd, EventFd) {
        let fe = &mut self.fe;
        fe.set_vring_num(0, ring.size).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: VA + ring.desc.0,
                used_ring_addr: VA + ring.used.0,
                avail_ring_addr: VA + ring.avail.0,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        (kick, call)
    }

    fn header(&self, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Header / data / status request in descriptors base..base+2 (data address and length
    /// as given, unchecked).
    fn request(&self, ring: &mut DriverRing, base: u16, sector: u64, data: u64, len: u32) {
        let hdr = HDR + 16 * u64::from(base);
        self.header(hdr, 0, sector);
        let st = STATUS + u64::from(base);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        ring.write_desc(&self.mem, base, hdr, 16, DESC_F_NEXT, base + 1)
            .unwrap();
        ring.write_desc(
            &self.mem,
            base + 1,
            data,
            len,
            DESC_F_NEXT | DESC_F_WRITE,
            base + 2,
        )
        .unwrap();
        ring.write_desc(&self.mem, base + 2, st, 1, DESC_F_WRITE, 0)
            .unwrap();
        ring.push_avail(&self.mem, base).unwrap();
    }

    fn status(&self, base: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(base)))
            .unwrap()
    }
}

/// Kicks queue 0 and returns once the backend has handled that kick, so that a negative check
/// after it means something: the backend consumed it (the eventfd counter, shared with the
/// backend, went back to zero), then consumed a second kick, which the queue's thread reads
/// only after it has handled the first.
fn kick_and_wait_handled(kick: &EventFd) {
    for _ in 0..2 {
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: `kick` owns the fd and outlives this borrow.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(kick.as_raw_fd()) };
        loop {
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).unwrap() == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the backend never took the kick");
            std::thread::yield_now();
        }
    }
}

/// Wait until the used index reaches `n` (true) or 3 s pass (false).
fn wait_used(mem: &GuestMemoryMmap, ring: &DriverRing, call: &EventFd, n: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if ring.used_idx(mem).unwrap() >= n {
            return true;
        }
        // SAFETY: `call` owns the fd and outlives this poll.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(call.as_raw_fd()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(10u8));
        let _ = call.read();
    }
    ring.used_idx(mem).unwrap() >= n
}

#[test]
fn bad_descriptors_fail_requests_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = setup(dir.path());
    {
        let mut ev = Evil::new(&be.socket);
        let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
        let (kick, call) = ev.start_queue(&ring);
        // 0: data outside shared memory.
        ev.request(&mut ring, 0, 0, MEM + 0x1000, 512);
        // 3: data length running past the end of shared memory.
        ev.request(&mut ring, 3, 0, MEM - 256, 512);
        // 6: sector range past the disk end.
        ev.request(&mut ring, 6, IMG / 512, DATA, 512);
        // 9: descriptor loop 9 -> 10 -> 9.
        ring.write_desc(&ev.mem, 9, HDR, 16, DESC_F_NEXT, 10)
            .unwrap();
        ring.write_desc(&ev.mem, 10, DATA, 512, DESC_F_NEXT | DESC_F_WRITE, 9)
            .unwrap();
        ring.push_avail(&ev.mem, 9).unwrap();
        // 11: status descriptor not device-writable.
        ev.mem.write_obj(0xffu8, GuestAddress(STATUS + 11)).unwrap();
        ring.write_desc(&ev.mem, 11, HDR, 16, DESC_F_NEXT, 12)
            .unwrap();
        ring.write_desc(&ev.mem, 12, STATUS + 11, 1, 0, 0).unwrap();
        ring.push_avail(&ev.mem, 11).unwrap();
        // 13: a good one.
        ev.request(&mut ring, 13, 0, DATA, 4096);
        kick.write(1).unwrap();
        assert!(wait_used(&ev.mem, &ring, &call, 6));
        assert_eq!(ev.status(0), 1);
        assert_eq!(ev.status(3), 1);
        assert_eq!(ev.status(6), 1);
        assert_eq!(ev.status(11), 0xff);
        assert_eq!(ring.used_elem(&ev.mem, 4).unwrap(), (11, 0));
        assert_eq!(ev.status(13), 0);
        let mut got = vec![0u8; 4096];
        ev.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, pattern(4096, 0x42));
    }
    assert_still_serving(&mut be);
}

#[test]
fn bad_ring_indexes_fail_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = setup(dir.path());
    for case in 0..2 {
        let mut ev = Evil::new(&be.socket);
        let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
        let (kick, _call) = ev.start_queue(&ring);
        if case == 0 {
            ring.push_avail(&ev.mem, QSIZE + 5).unwrap(); // head index past the queue
        } else {
            ring.set_avail_idx(&ev.mem, QSIZE + 7).unwrap(); // avail index jump
        }
        kick_and_wait_handled(&kick);
        assert_eq!(
            ring.used_idx(&ev.mem).unwrap(),
            0,
            "a bad ring index was served"
        );
        // The failed queue ignores further (even good) requests in this session.
        ev.request(&mut ring, 0, 0, DATA, 512);
        kick_and_wait_handled(&kick);
        assert_eq!(ring.used_idx(&ev.mem).unwrap(), 0);
        drop(ev);
        assert_still_serving(&mut be);
    }
}

#[test]
fn header_rewritten_while_parsed_and_kick_storm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = setup(dir.path());
    {
        let mut ev = Evil::new(&be.socket);
        let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
        let (kick, call) = ev.start_queue(&ring);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A thread flips the type and sector of every header as fast as it can, another
        // writes the kick eventfd in a storm.
        let flipper = {
            let mem = ev.mem.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for b in 0..5u64 {
                        let mut h = [0u8; 16];
                        h[0..4].copy_from_slice(&((i % 3) as u32).to_le_bytes());
                        h[8..16].copy_from_slice(
                            &(i.wrapping_mul(0x9e37_79b9) >> (i % 64)).to_le_bytes(),
                        );
                        mem.write_slice(&h, GuestAddress(HDR + 48 * b)).unwrap();
                    }
                    i += 1;
                }
            })
        };
        let storm = {
            let kick = kick.try_clone().unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = kick.write(1);
                }
            })
        };
        let mut done = 0u16;
        for round in 0..40u16 {
            for b in 0..5u16 {
                ev.request(&mut ring, b * 3, 0, DATA + 4096 * u64::from(b), 512);
            }
            kick.write(1).unwrap();
            done += 5;
            assert!(wait_used(&ev.mem, &ring, &call, done), "round {round}");
            for b in 0..5u16 {
                // Whatever the header said when it was copied, the status is a valid one.
                assert!(ev.status(b * 3) <= 2);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        storm.join().unwrap();
    }
    assert_still_serving(&mut be);
}

#[test]
fn bad_memory_tables_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = setup(dir.path());
    // Offset + size past the memfd's real size.
    {
        let fe = negotiate(&be.socket);
        let f = memfd(MEM);
        assert!(fe.set_mem_table(&[region(&f, 0, MEM, 4096)]).is_err());
    }
    assert_still_serving(&mut be);
    // Overlapping regions.
    {
        let fe = negotiate(&be.socket);
        let (a, b) = (memfd(MEM), memfd(MEM));
        assert!(fe
            .set_mem_table(&[region(&a, 0, MEM, 0), region(&b, MEM / 2, MEM, 0)])
            .is_err());
    }
    assert_still_serving(&mut be);
    // A region wrapping the guest physical address space.
    {
        let fe = negotiate(&be.socket);
        let f = memfd(MEM);
        let mut r = region(&f, u64::MAX - 4095, MEM, 0);
        r.userspace_addr = VA;
        assert!(fe.set_mem_table(&[r]).is_err());
    }
    assert_still_serving(&mut be);
    // Shrinking a region after it was accepted: the backend sealed it, so the peer cannot.
    {
        let fe = negotiate(&be.socket);
        let f = memfd(MEM);
        fe.set_mem_table(&[region(&f, 0, MEM, 0)]).unwrap();
        assert!(
            f.set_len(4096).is_err(),
            "backend must have sealed the memfd"
        );
    }
    assert_still_serving(&mut be);
}

#[test]
fn bad_queue_indexes_and_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = setup(dir.path());
    {
        let ev = Evil::new(&be.socket);
        assert!(
            ev.fe.set_vring_num(7, 16).is_err(),
            "queue index out of range"
        );
        assert!(
            ev.fe.set_vring_num(0, 1024).is_err(),
            "queue size above max"
        );
        assert!(ev.fe.set_vring_num(0, 0).is_err(), "queue size zero");
        let _ = &ev.file;
    }
    assert_still_serving(&mut be);
}

#[test]
fn malformed_messages_end_the_session_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = setup(dir.path());
    let raw = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&be.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(bytes);
        let mut buf = [0u8; 64];
        // The backend either replies with an error or closes; it must not hang or die.
        let _ = std::io::Read::read(&mut s, &mut buf);
    };
    let hdr = |req: u32, size: u32| {
        let mut h = Vec::new();
        h.extend_from_slice(&req.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h
    };
    raw(&hdr(3, 0xffff_ff00)); // oversized message
    raw(&hdr(5, 8)); // SET_MEM_TABLE without its fds or body
    raw(&hdr(9999, 0)); // unknown request
    let mut m = hdr(5, 8 + 32);
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&[0u8; 32]);
    raw(&m); // SET_MEM_TABLE with one region and no fd
    assert_still_serving(&mut be);
}
