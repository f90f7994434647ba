//! The VMM's side of in-flight tracking (vhost-user INFLIGHT_SHMFD), with no KVM: frontend-core's
//! `FrontendSession` as a VMM drives it (rings in memory the frontend does not post into itself),
//! against the driver domain's real backend (`driver-domain serve --blk`).
//!
//! The session asks for the log after the features (GET_INFLIGHT_FD) and keeps its memfd; the
//! backend is killed (SIGKILL) at a moment that log, read here from the session's own memfd,
//! marks requests in flight; a new backend on the same image gets the log back
//! (SET_INFLIGHT_FD) and each ring at the used index read from the used ring
//! (`FrontendSession::resume`), and it resubmits what was in flight. Judged from outside: the
//! used ring, the status bytes, the image file read from the host, the new backend's log.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use frontend_core::vhost_user::{
    connect_with_retry, ConfigSpace, DeviceSpec, FrontendSession, SharedRegion, VringSetup,
    VIRTIO_F_VERSION_1,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use splitvmm_tests::backends::Reaped;
use splitvmm_tests::workspace_bin;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 4 << 20;
const QSIZE: u16 = 16;
const RING: u64 = 0x1000;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x7000;
const DATA: u64 = 0x10_0000;
/// Requests per round and bytes each writes (large, so that one is often caught mid-write).
const REQUESTS: u16 = 4;
const CHUNK: u64 = 256 << 10;
const IMAGE: u64 = REQUESTS as u64 * CHUNK;
const T_OUT: u32 = 1;

fn spec() -> DeviceSpec {
    DeviceSpec {
        queues: 1,
        max_queues: 0,
        config: ConfigSpace::Required { bytes: 36 },
        reply_timeout: Some(Duration::from_secs(5)),
        inflight: true,
    }
}

/// The bytes request `i` of round `round` writes.
fn pattern(round: u32, i: u16) -> Vec<u8> {
    (0..CHUNK as usize)
        .map(|b| {
            (b as u8).wrapping_mul(7) ^ (round as u8).wrapping_mul(31) ^ (i as u8) ^ (b >> 9) as u8
        })
        .collect()
}

/// `driver-domain serve` on `image`, its log (stderr, info) in `log`.
fn serve(image: &Path, socket: &Path, log: &Path) -> Reaped {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(workspace_bin("driver-domain"))
        .arg("serve")
        .arg("--blk")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap();
    Reaped(child)
}

/// Guest memory the "guest" (this test) owns: a memfd, mapped here and shared with the backend.
fn guest_memory() -> (File, GuestMemoryMmap) {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (file, mem)
}

/// Posts one round of writes: request i (head 3i) writes `pattern(round, i)` at its chunk.
fn post_round(mem: &GuestMemoryMmap, ring: &mut DriverRing, round: u32) {
    for i in 0..REQUESTS {
        let head = 3 * i;
        let hdr = HDR + 16 * u64::from(i);
        let data = DATA + CHUNK * u64::from(i);
        let status = STATUS + u64::from(i);
        let sector = CHUNK * u64::from(i) / 512;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_slice(&pattern(round, i), GuestAddress(data))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        ring.write_desc(mem, head, hdr, 16, DESC_F_NEXT, head + 1)
            .unwrap();
        ring.write_desc(mem, head + 1, data, CHUNK as u32, DESC_F_NEXT, head + 2)
            .unwrap();
        ring.write_desc(mem, head + 2, status, 1, DESC_F_WRITE, 0)
            .unwrap();
        ring.push_avail(mem, head).unwrap();
    }
}

/// The heads the in-flight log (queue 0, vhost-user layout) marks in flight.
fn in_flight(log: &File) -> Vec<u16> {
    let len = usize::try_from(log.metadata().unwrap().len()).unwrap();
    let mut raw = vec![0u8; len.max(16 + 16 * usize::from(QSIZE))];
    log.read_at(&mut raw, 0).unwrap();
    let desc_num = u16::from_le_bytes([raw[10], raw[11]]);
    (0..desc_num)
        .filter(|h| raw[16 + 16 * usize::from(*h)] == 1)
        .collect()
}

/// The heads of the used ring's elements from `from` up to its used index.
fn used_since(mem: &GuestMemoryMmap, ring: &DriverRing, from: u16) -> Vec<u16> {
    let used = ring.used_idx(mem).unwrap();
    (0..used.wrapping_sub(from))
        .map(|k| {
            let (id, _) = ring.used_elem(mem, from.wrapping_add(k)).unwrap();
            u16::try_from(id).unwrap()
        })
        .collect()
}

/// Whether some open file description holds a lock that would conflict with a write lock
/// over the whole of `image` (QEMU's and this backend's locks are OFD locks on single bytes).
fn write_locked(image: &Path) -> bool {
    let probe = File::open(image).unwrap();
    // SAFETY: an all-zero flock is a valid value; the fields F_OFD_GETLK reads are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: an open descriptor and a valid flock the kernel fills in.
    let r = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as i16
}

fn stopped(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .split(") ")
        .nth(1)
        .is_some_and(|s| s.starts_with('T'))
}

#[test]
fn a_killed_backend_resumes_the_guests_rings_from_the_in_flight_log_the_session_kept() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(IMAGE).unwrap();
    let socket = dir.path().join("blk.sock");
    let (first_log, second_log) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let mut backend = serve(&image, &socket, &first_log);

    let (memfd, mem) = guest_memory();
    let stream = connect_with_retry(&socket, Duration::from_secs(10)).unwrap();
    let mut session = FrontendSession::connect(stream, spec()).unwrap();
    assert!(
        session.inflight_negotiated(),
        "the driver domain offers INFLIGHT_SHMFD"
    );
    session
        .set_features(session.device_features() & VIRTIO_F_VERSION_1)
        .unwrap();
    assert!(session.prepare_inflight(QSIZE).unwrap());
    assert!(session.holds_inflight_log());
    session
        .set_mem_table(&[SharedRegion {
            gpa: 0,
            len: MEM,
            fd: memfd.as_raw_fd(),
        }])
        .unwrap();
    let mut ring = DriverRing::new(GuestAddress(RING), QSIZE);
    let setup = VringSetup {
        size: QSIZE,
        desc: ring.desc.0,
        avail: ring.avail.0,
        used: ring.used.0,
    };
    session.start_vring(0, setup).unwrap();

    // Rounds of writes until one SIGSTOP finds the log marking a request in flight that has
    // not reached the used ring (a marked one may be published already, its mark not yet
    // cleared); then SIGKILL there.
    let pid = Pid::from_raw(i32::try_from(backend.0.id()).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0u32;
    let caught = loop {
        assert!(
            Instant::now() < deadline,
            "no try found a request in flight"
        );
        if ring.used_idx(&mem).unwrap() == ring.avail_idx {
            round += 1;
            post_round(&mem, &mut ring, round);
            session.kick(0).unwrap().write(1).unwrap();
        }
        kill(pid, Signal::SIGSTOP).unwrap();
        while !stopped(pid) {
            std::thread::yield_now();
        }
        let done = used_since(&mem, &ring, ring.avail_idx.wrapping_sub(REQUESTS));
        let pending: Vec<u16> = in_flight(session.inflight_log().unwrap())
            .into_iter()
            .filter(|h| !done.contains(h))
            .collect();
        if !pending.is_empty() {
            backend.0.kill().unwrap();
            backend.0.wait().unwrap();
            break pending.len();
        }
        kill(pid, Signal::SIGCONT).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    };
    let used_at_kill = ring.used_idx(&mem).unwrap();
    let round_start = ring.avail_idx.wrapping_sub(REQUESTS);
    eprintln!(
        "round {round}: {caught} in flight and not used at the kill, used index {used_at_kill}"
    );
    assert_ne!(
        used_at_kill, ring.avail_idx,
        "the round was not complete at the kill"
    );

    // The killed backend's image lock went with it: with ring transfers handed to io-wq
    // workers, the lock outlived the reaped process by up to 20 ms (the ring's deferred
    // teardown), and a restart in that window found the image in use.
    assert!(
        !write_locked(&image),
        "the image is still locked after the killed backend was reaped"
    );
    // A new backend on the same image; the session resumes the ring where the guest's used
    // ring says, with the log handed back.
    let _backend = serve(&image, &socket, &second_log);
    let stream = connect_with_retry(&socket, Duration::from_secs(10)).unwrap();
    let mut bases = Vec::new();
    let handed_back = session
        .resume(stream, spec(), &mut |q, r: VringSetup| {
            let used = mem
                .read_obj::<u16>(GuestAddress(r.used + 2))
                .map_err(|e| e.to_string())?;
            bases.push((q, used));
            Ok(used)
        })
        .unwrap();
    assert!(handed_back, "the log went back to the new backend");
    assert_eq!(bases, [(0, used_at_kill)]);

    let deadline = Instant::now() + Duration::from_secs(5);
    while ring.used_idx(&mem).unwrap() != ring.avail_idx {
        assert!(
            Instant::now() < deadline,
            "used index {} of {} 5 s after the resume; backend log:\n{}",
            ring.used_idx(&mem).unwrap(),
            ring.avail_idx,
            std::fs::read_to_string(&second_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Every request of the round completed exactly once, successfully.
    let mut heads: Vec<u32> = (0..REQUESTS)
        .map(|k| ring.used_elem(&mem, round_start.wrapping_add(k)).unwrap().0)
        .collect();
    heads.sort_unstable();
    assert_eq!(heads, [0, 3, 6, 9], "each head used once");
    for i in 0..REQUESTS {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
        assert_eq!(status, 0, "request {i} status");
    }
    // What the image holds, read from the host: the last round, whole.
    let img = File::open(&image).unwrap();
    for i in 0..REQUESTS {
        let mut got = vec![0u8; CHUNK as usize];
        img.read_exact_at(&mut got, CHUNK * u64::from(i)).unwrap();
        assert!(got == pattern(round, i), "request {i}'s chunk on the image");
    }
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(log.contains("in-flight log taken over"), "{log}");
    assert!(
        log.contains(&format!("resubmitting {caught} request(s)")),
        "the {caught} request(s) in flight and not used at the kill were resubmitted from the \
         log:\n{log}"
    );

    // Stopping the ring ends what the log tracks: the next start asks for a fresh one.
    session.stop_vring(0).unwrap();
    assert!(!session.holds_inflight_log());
}

/// Waits up to 5 s for the used index to reach the avail index.
fn wait_all_used(mem: &GuestMemoryMmap, ring: &DriverRing, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ring.used_idx(mem).unwrap() != ring.avail_idx {
        assert!(
            Instant::now() < deadline,
            "used index {} of {} after 5 s; backend log:\n{}",
            ring.used_idx(mem).unwrap(),
            ring.avail_idx,
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A session without a log (what the VMM's network interfaces get, and what process guests
/// have): it never negotiates INFLIGHT_SHMFD and holds no log; `resume` hands nothing back,
/// starts the ring at the used index the caller read and kicks it, so the requests the guest
/// added while the backend was gone (never fetched) are served by the new backend, once each.
#[test]
fn a_session_without_a_log_resumes_its_ring_at_the_used_index_and_kicks_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(IMAGE).unwrap();
    let socket = dir.path().join("blk.sock");
    let first_log = dir.path().join("first.log");
    let mut backend = serve(&image, &socket, &first_log);
    let plain = DeviceSpec {
        inflight: false,
        ..spec()
    };
    let (memfd, mem) = guest_memory();
    let stream = connect_with_retry(&socket, Duration::from_secs(10)).unwrap();
    let mut session = FrontendSession::connect(stream, plain).unwrap();
    assert!(!session.inflight_negotiated());
    session
        .set_features(session.device_features() & VIRTIO_F_VERSION_1)
        .unwrap();
    assert!(!session.prepare_inflight(QSIZE).unwrap());
    assert!(session.inflight_log().is_none());
    session
        .set_mem_table(&[SharedRegion {
            gpa: 0,
            len: MEM,
            fd: memfd.as_raw_fd(),
        }])
        .unwrap();
    let mut ring = DriverRing::new(GuestAddress(RING), QSIZE);
    let setup = VringSetup {
        size: QSIZE,
        desc: ring.desc.0,
        avail: ring.avail.0,
        used: ring.used.0,
    };
    session.start_vring(0, setup).unwrap();
    post_round(&mem, &mut ring, 1);
    session.kick(0).unwrap().write(1).unwrap();
    wait_all_used(&mem, &ring, &first_log);

    // The backend stops before the next round is fetched and dies; the guest adds it anyway.
    let pid = Pid::from_raw(i32::try_from(backend.0.id()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    while !stopped(pid) {
        std::thread::yield_now();
    }
    post_round(&mem, &mut ring, 2);
    session.kick(0).unwrap().write(1).unwrap();
    backend.0.kill().unwrap();
    backend.0.wait().unwrap();
    assert_eq!(
        ring.used_idx(&mem).unwrap(),
        REQUESTS,
        "round 2 was not fetched"
    );

    let second_log = dir.path().join("second.log");
    let _again = serve(&image, &socket, &second_log);
    let stream: UnixStream = connect_with_retry(&socket, Duration::from_secs(10)).unwrap();
    let mut bases = Vec::new();
    let handed_back = session
        .resume(stream, plain, &mut |q, r: VringSetup| {
            let used = mem
                .read_obj::<u16>(GuestAddress(r.used + 2))
                .map_err(|e| e.to_string())?;
            bases.push((q, used));
            Ok(used)
        })
        .unwrap();
    assert!(!handed_back, "no log to hand back");
    assert_eq!(bases, [(0, REQUESTS)]);
    wait_all_used(&mem, &ring, &second_log);
    let mut heads: Vec<u16> = used_since(&mem, &ring, REQUESTS);
    heads.sort_unstable();
    assert_eq!(heads, [0, 3, 6, 9], "each of round 2's heads used once");
    let img = File::open(&image).unwrap();
    for i in 0..REQUESTS {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
        assert_eq!(status, 0, "request {i} status");
        let mut got = vec![0u8; CHUNK as usize];
        img.read_exact_at(&mut got, CHUNK * u64::from(i)).unwrap();
        assert!(got == pattern(2, i), "request {i}'s chunk on the image");
    }
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(!log.contains("in-flight log taken over"), "{log}");
}
