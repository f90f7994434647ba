//! In-flight tracking across a backend restart (vhost-user INFLIGHT_SHMFD) against
//! `driver-domain serve`, with the `vhost` crate's `Frontend` as the peer, in the order QEMU's
//! vhost-user-blk sends the messages (SET_INFLIGHT_FD before the memory table and the rings).
//!
//! The in-flight logs the frontend hands back are written here byte by byte in the
//! libvhost-user layout, not with the backend's own code, and results are read from the host:
//! the image file, the used ring, the log.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use common::{pattern, BackendProcess};
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const IMG: u64 = 1 << 20;
const RING: u64 = 0x1000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x7000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// Bytes one queue of `size` entries takes in the log (vhost-user "Inflight I/O tracking").
fn log_len(size: u16) -> u64 {
    (16 + 16 * u64::from(size)).div_ceil(64) * 64
}

/// A log for one queue as a frontend holds it: version, entries, last batch head, used
/// index, and `(head, counter)` marked in flight.
fn write_log(
    file: &File,
    version: u16,
    desc_num: u16,
    last_batch: u16,
    used: u16,
    heads: &[(u16, u64)],
) {
    file.write_all_at(&version.to_le_bytes(), 8).unwrap();
    file.write_all_at(&desc_num.to_le_bytes(), 10).unwrap();
    file.write_all_at(&last_batch.to_le_bytes(), 12).unwrap();
    file.write_all_at(&used.to_le_bytes(), 14).unwrap();
    for (head, counter) in heads {
        let at = 16 + 16 * u64::from(*head);
        file.write_all_at(&[1], at).unwrap();
        file.write_all_at(&counter.to_le_bytes(), at + 8).unwrap();
    }
}

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    let f = File::from(memfd_create(name, MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap());
    f.set_len(len).unwrap();
    f
}

fn image(dir: &Path) -> (BackendProcess, std::path::PathBuf) {
    let img = dir.join("disk.img");
    let f = File::create(&img).unwrap();
    f.set_len(IMG).unwrap();
    f.write_all_at(&pattern(4096, 0x42), 0).unwrap();
    let be = BackendProcess::start(dir, &["--blk", img.to_str().unwrap()]);
    (be, img)
}

/// A frontend (QEMU's order of messages) with one memfd of guest memory and queue 0.
struct Peer {
    fe: Frontend,
    _file: File,
    mem: GuestMemoryMmap,
    ring: DriverRing,
    kick: EventFd,
    call: EventFd,
}

impl Peer {
    /// Connects and negotiates; the protocol features the backend offered are returned.
    fn connect(sock: &Path) -> (Frontend, VhostUserProtocolFeatures) {
        let mut fe = Frontend::connect(sock, 1).unwrap();
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        let offered = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            offered
                & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        )
        .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        (fe, offered)
    }

    /// Shares guest memory; the ring is set up by [`Peer::start`].
    fn new(fe: Frontend, ring_size: u16) -> Peer {
        let file = memfd(c"guest", MEM);
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: VA,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Peer {
            fe,
            _file: file,
            mem,
            ring: DriverRing::new(GuestAddress(RING), ring_size),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Starts queue 0 as QEMU does after a reconnect: base = the used index it restored.
    fn start(&mut self, base: u16) -> Result<(), vhost::Error> {
        let r = &self.ring;
        self.fe.set_vring_num(0, r.size)?;
        self.fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: r.size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: VA + r.desc.0,
                used_ring_addr: VA + r.used.0,
                avail_ring_addr: VA + r.avail.0,
                log_addr: None,
            },
        )?;
        self.fe.set_vring_base(0, base)?;
        self.fe.set_vring_call(0, &self.call)?;
        self.fe.set_vring_kick(0, &self.kick)?;
        self.fe.set_vring_enable(0, true)
    }

    /// A header / data / status chain in descriptors 3*slot.. for sector 0 (not made
    /// available).
    fn chain(&self, slot: u16, kind: u32, data: &[u8]) -> u16 {
        let d = 3 * slot;
        let hdr = HDR + 16 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let buf = DATA + 512 * u64::from(slot);
        self.mem.write_slice(data, GuestAddress(buf)).unwrap();
        let st = STATUS + u64::from(slot);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let m = &self.mem;
        let flags = if kind == T_IN { DESC_F_WRITE } else { 0 };
        self.ring
            .write_desc(m, d, hdr, 16, DESC_F_NEXT, d + 1)
            .unwrap();
        self.ring
            .write_desc(m, d + 1, buf, 512, DESC_F_NEXT | flags, d + 2)
            .unwrap();
        self.ring
            .write_desc(m, d + 2, st, 1, DESC_F_WRITE, 0)
            .unwrap();
        d
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(slot)))
            .unwrap()
    }

    fn data(&self, slot: u16) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        self.mem
            .read_slice(&mut v, GuestAddress(DATA + 512 * u64::from(slot)))
            .unwrap();
        v
    }

    /// Waits (up to 10 s: a deadline on another process, not a timing check) for `n` used.
    fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ring.used_idx(&self.mem).unwrap() != n {
            assert!(Instant::now() < deadline, "used index never reached {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The same backend process serves a new, well-behaved frontend (libblkio) afterwards.
fn assert_still_serving(be: &mut BackendProcess, expect: &[u8]) {
    assert!(be.alive(), "backend process died");
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", be.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let buf = b.alloc_mem_region(4096).unwrap();
    b.map_mem_region(&buf).unwrap();
    let q = &mut out.queues[0];
    q.read(0, buf.addr as *mut u8, 512, 0, ReqFlags::empty());
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut t = Duration::from_secs(5);
    assert_eq!(q.do_io(&mut c, 1, Some(&mut t), None).unwrap(), 1);
    // SAFETY: do_io initialised one completion.
    assert_eq!(unsafe { c[0].assume_init_read() }.ret, 0);
    // SAFETY: live mapping of 4096 bytes owned by `b`.
    let got = unsafe { std::slice::from_raw_parts(buf.addr as *const u8, 512) };
    assert_eq!(got, expect);
    drop(out);
    drop(b);
    assert!(be.alive());
}

/// GET_INFLIGHT_FD hands out a log in the libvhost-user layout, SET_INFLIGHT_FD gives it
/// back, and the backend logs into it: after a completed write, nothing is in flight and
/// the log's used index follows the ring's.
#[test]
fn a_session_negotiates_inflight_shmfd_and_logs_into_the_region_it_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, img) = image(dir.path());
    let (mut fe, offered) = Peer::connect(&be.socket);
    assert!(offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    let ask = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    let (got, log) = fe.get_inflight_fd(&ask).unwrap();
    assert_eq!(got.mmap_size, log_len(QSIZE));
    assert_eq!((got.num_queues, got.queue_size), (1, QSIZE));
    assert!(log.metadata().unwrap().len() >= got.mmap_size);
    let mut hdr = [0u8; 16];
    log.read_exact_at(&mut hdr, 0).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 1, "version");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), QSIZE, "desc_num");
    fe.set_inflight_fd(&got, log.as_raw_fd()).unwrap();
    assert!(inflight_memfds(be.child.id()) >= 1, "the log handed out");
    let mut p = Peer::new(fe, QSIZE);
    p.start(0).unwrap();
    let head = p.chain(0, T_OUT, &pattern(512, 7));
    p.ring.push_avail(&p.mem, head).unwrap();
    p.kick.write(1).unwrap();
    p.wait_used(1);
    assert_eq!(p.status(0), 0);
    let mut used = [0u8; 2];
    log.read_exact_at(&mut used, 14).unwrap();
    assert_eq!(u16::from_le_bytes(used), 1, "the log's used index");
    let mut flag = [0u8; 1];
    log.read_exact_at(&mut flag, 16 + 16 * u64::from(head))
        .unwrap();
    assert_eq!(flag[0], 0, "a completed request is still marked in flight");
    let mut on_disk = vec![0u8; 512];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert_eq!(on_disk, pattern(512, 7));
    drop(p);
    assert_still_serving(&mut be, &pattern(512, 7));
}

/// The in-flight memfds `pid` holds (their /proc/<pid>/fd links name the memfd).
fn inflight_memfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("splitvmm-blk-inflight"))
        .count()
}

/// A frontend that never asks for a log (libblkio, Cloud Hypervisor) gets none: the backend
/// creates no in-flight memfd and logs nothing per request, and still serves.
#[test]
fn a_session_that_asks_for_no_log_gets_none_and_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, img) = image(dir.path());
    let (fe, offered) = Peer::connect(&be.socket);
    assert!(offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    let mut p = Peer::new(fe, QSIZE);
    p.start(0).unwrap();
    let head = p.chain(0, T_OUT, &pattern(512, 9));
    p.ring.push_avail(&p.mem, head).unwrap();
    p.kick.write(1).unwrap();
    p.wait_used(1);
    assert_eq!(p.status(0), 0);
    assert_eq!(inflight_memfds(be.child.id()), 0, "a log nobody asked for");
    let mut on_disk = vec![0u8; 512];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert_eq!(on_disk, pattern(512, 9));
    drop(p);
    assert_still_serving(&mut be, &pattern(512, 9));
}

/// A restarted backend is handed a log with three writes in flight, fetched in counter
/// order 6, 3, 0 (the avail ring offers them as 0, 3, 6, then a read). It resumes at the
/// used index plus three, resubmits the writes in counter order, then serves the read.
#[test]
fn requests_in_flight_in_a_handed_back_log_are_resubmitted_in_counter_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, img) = image(dir.path());
    let (mut fe, _) = Peer::connect(&be.socket);
    let log = memfd(c"inflight", log_len(QSIZE));
    // Slots 0, 1, 2 hold heads 0, 3, 6; counters make the fetch order 6, 3, 0.
    write_log(&log, 1, QSIZE, 0, 0, &[(6, 11), (3, 12), (0, 13)]);
    let inflight = VhostUserInflight {
        mmap_size: log_len(QSIZE),
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    fe.set_inflight_fd(&inflight, log.as_raw_fd()).unwrap();
    let mut p = Peer::new(fe, QSIZE);
    for (slot, seed) in [(0u16, 1u8), (1, 2), (2, 3)] {
        let head = p.chain(slot, T_OUT, &pattern(512, seed));
        p.ring.push_avail(&p.mem, head).unwrap();
    }
    let read = p.chain(3, T_IN, &[0u8; 512]);
    p.ring.push_avail(&p.mem, read).unwrap();
    // The frontend restored its avail index from the used index (0) as QEMU does; the
    // backend must skip what is in flight itself. No kick: the backend kicks the ring.
    p.start(0).unwrap();
    p.wait_used(4);
    let used: Vec<u32> = (0..4)
        .map(|i| p.ring.used_elem(&p.mem, i).unwrap().0)
        .collect();
    assert_eq!(used, vec![6, 3, 0, 9], "completion order");
    for slot in 0..4 {
        assert_eq!(p.status(slot), 0, "status of slot {slot}");
    }
    // The last write resubmitted was head 0 (pattern 1): what the read and the image hold.
    assert_eq!(p.data(3), pattern(512, 1));
    let mut on_disk = vec![0u8; 512];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert_eq!(on_disk, pattern(512, 1));
    // The log agrees with the ring again, with nothing in flight.
    let mut raw = vec![0u8; log_len(QSIZE) as usize];
    log.read_exact_at(&mut raw, 0).unwrap();
    assert_eq!(u16::from_le_bytes([raw[14], raw[15]]), 4);
    assert!((0..QSIZE).all(|h| raw[16 + 16 * usize::from(h)] == 0));
    drop(p);
    assert_still_serving(&mut be, &pattern(512, 1));
}

/// Logs a restarted backend must refuse: the session (that device) fails with an error the
/// frontend sees, and the same backend process serves the next frontend.
#[test]
fn a_malformed_inflight_log_fails_that_device_not_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (mut be, _img) = image(dir.path());
    let inflight = |size| VhostUserInflight {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    // Refused at SET_INFLIGHT_FD: a region too small for the queue it claims, a log of
    // another version, a log for another queue size.
    let too_small = memfd(c"small", 64);
    let bad_version = memfd(c"version", log_len(QSIZE));
    write_log(&bad_version, 2, QSIZE, 0, 0, &[]);
    let good = memfd(c"good", log_len(QSIZE));
    write_log(&good, 1, QSIZE, 0, 0, &[]);
    let other_size = memfd(c"size", log_len(QSIZE));
    write_log(&other_size, 1, 8, 0, 0, &[]);
    for (what, file, size) in [
        ("a region smaller than the log", &too_small, log_len(QSIZE)),
        ("a size field smaller than the log", &good, 64),
        ("version 2", &bad_version, log_len(QSIZE)),
        ("another queue size", &other_size, log_len(QSIZE)),
    ] {
        let (mut fe, _) = Peer::connect(&be.socket);
        assert!(
            fe.set_inflight_fd(&inflight(size), file.as_raw_fd())
                .is_err(),
            "{what} was taken over"
        );
        drop(fe);
        assert_still_serving(&mut be, &pattern(512, 0x42));
    }
    // Refused when the ring starts: a head in flight past the ring (the log is for 16
    // entries, the ring has 8), and a last batch head past the queue (the ring's used index
    // is ahead of the log's, so the backend would clear that head).
    let past_ring = memfd(c"past", log_len(QSIZE));
    write_log(&past_ring, 1, QSIZE, 0, 0, &[(12, 1)]);
    let torn = memfd(c"torn", log_len(QSIZE));
    write_log(&torn, 1, QSIZE, 99, 0, &[(2, 1)]);
    for (what, file, ring_size, used) in [
        ("a head past the ring", &past_ring, 8u16, 0u16),
        ("a last batch head past the queue", &torn, QSIZE, 1),
    ] {
        let (mut fe, _) = Peer::connect(&be.socket);
        fe.set_inflight_fd(&inflight(log_len(QSIZE)), file.as_raw_fd())
            .unwrap();
        let mut p = Peer::new(fe, ring_size);
        p.mem
            .write_obj(used, GuestAddress(p.ring.used.0 + 2))
            .unwrap();
        assert!(p.start(used).is_err(), "{what}: the ring started");
        drop(p);
        assert_still_serving(&mut be, &pattern(512, 0x42));
    }
}
