//! `driver-domain serve --confine-uid`: a backend run by hand confines itself once its image is
//! open and its socket bound (docs/security.md), and still serves a real frontend (libblkio)
//! with the image's data. Judged from outside through /proc.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use common::{pattern, BackendProcess};

const UID: u32 = 200_900;

fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn a_confined_standalone_backend_serves_libblkio() {
    if !nix::unistd::geteuid().is_root() {
        test_support::skip(
            "a_confined_standalone_backend_serves_libblkio",
            "confinement needs root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let f = File::create(&img).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&pattern(4096, 0x5a), 0).unwrap();
    let be = BackendProcess::start(
        dir.path(),
        &[
            "--blk",
            img.to_str().unwrap(),
            "--confine-uid",
            &UID.to_string(),
        ],
    );
    let pid = be.child.id();
    // Confinement ends with the seccomp filter: wait for it (the socket appears before).
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_field(pid, "Seccomp") != "2" {
        assert!(Instant::now() < deadline, "serve never confined itself");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(status_field(pid, "Uid"), UID.to_string());
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for ns in ["mnt", "net", "ipc"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    // Its root holds nothing of the host's: not the image's directory.
    assert!(!std::path::Path::new(&format!("/proc/{pid}/root"))
        .join(dir.path().strip_prefix("/").unwrap())
        .exists());

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
    assert_eq!(got, &pattern(4096, 0x5a)[..]);
}
