//! Issue 18's attacks on `driver-domain serve`: a frontend that connects and never speaks,
//! connect/disconnect cycles counting the backend's descriptors, and queue sizes virtio
//! cannot use. After each, the same backend process serves a new frontend.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::BackendProcess;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

const MEM: u64 = 1 << 20;
const VA: u64 = 0x7f00_0000_0000;

fn start(dir: &Path) -> BackendProcess {
    let img = dir.join("disk.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let img = img.to_str().unwrap().to_owned();
    BackendProcess::start(dir, &["--blk", &img, "--greeting-timeout-ms", "300"])
}

/// Runs `f` on a thread; fails the test if it takes longer than `limit` (a hung backend
/// must fail the test, not hang it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("the backend did not answer in time")
}

/// A frontend that negotiated features (REPLY_ACK on), as every real frontend starts.
fn negotiate(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// A new frontend gets its features answered.
fn assert_serves(sock: &Path) {
    let sock = sock.to_owned();
    within(Duration::from_secs(20), move || {
        let fe = Frontend::connect(&sock, 1).unwrap();
        fe.set_owner().unwrap();
        assert_ne!(fe.get_features().unwrap(), 0);
    });
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn a_silent_frontend_times_out_and_the_next_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = start(dir.path());
    let mut silent = UnixStream::connect(&be.socket).unwrap();
    let t = Instant::now();
    assert_serves(&be.socket);
    // The silent one was disconnected by the backend.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(silent.read(&mut [0u8; 16]).unwrap(), 0);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(be.alive());
}

#[test]
fn sessions_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = start(dir.path());
    let pid = be.child.id();
    let cycle = |n: usize| {
        for _ in 0..n {
            drop(UnixStream::connect(&be.socket).unwrap());
        }
        // Served in order: once a new frontend is answered, every earlier session ended.
        assert_serves(&be.socket);
    };
    cycle(100);
    let before = fd_count(pid);
    cycle(10_000);
    // The session just served may still hold its socket and eventfds while it ends: wait for
    // the count to settle (a leak of one per session would be thousands, and never settles).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut after = fd_count(pid);
    while after > before + 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = fd_count(pid);
    }
    assert!(
        after <= before + 4,
        "descriptors grew from {before} to {after}"
    );
    assert!(be.alive());
}

#[test]
fn queue_sizes_virtio_cannot_use_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = start(dir.path());
    let file = File::from(memfd_create(c"mem", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap());
    file.set_len(MEM).unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: VA,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    let sock = be.socket.clone();
    let setup = |size: u16| -> bool {
        let fe = negotiate(&sock);
        fe.set_mem_table(&[region]).unwrap();
        let num = fe.set_vring_num(0, size);
        let addr = fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: VA,
                used_ring_addr: VA + 0x8000,
                avail_ring_addr: VA + 0x4000,
                log_addr: None,
            },
        );
        num.is_ok() && addr.is_ok()
    };
    assert!(setup(16), "a valid size is accepted");
    for bad in [3u16, 100, 255, 4096] {
        assert!(!setup(bad), "queue size {bad} was accepted");
        assert!(be.alive());
    }
    assert!(setup(16), "still serving");
}
