//! Interop with libblkio's Rust core (the `blkio` crate, driver `virtio-blk-vhost-user`) as a
//! host-process vhost-user-blk frontend against `driver-domain serve`.

#![allow(clippy::unwrap_used)]

mod common;

use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use common::{pattern, BackendProcess};

const IMG: u64 = 4 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(IMG).unwrap();
    f.write_all_at(&pattern(8192, 0x11), 0).unwrap();
    p
}

struct Client {
    b: Blkio,
    q: Blkioq,
    buf: blkio::MemoryRegion,
}

fn connect(sock: &std::path::Path, read_only: bool) -> Result<Client, blkio::Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", sock.to_str().unwrap())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    b.set_i32("num-queues", 1)?;
    let mut out = b.start()?;
    let buf = b.alloc_mem_region(1 << 20)?;
    b.map_mem_region(&buf)?;
    let q = out.queues.remove(0);
    Ok(Client { b, q, buf })
}

impl Client {
    fn wait_one(&mut self) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = Duration::from_secs(5);
        let n = self.q.do_io(&mut c, 1, Some(&mut t), None).unwrap();
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io initialised one completion.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live private mapping of `len` bytes owned by `self.b`, and
        // the tests never hold two of these slices at once.
        unsafe { std::slice::from_raw_parts_mut(self.buf.addr as *mut u8, self.buf.len) }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        self.q.write(
            off,
            self.buf.addr as *const u8,
            data.len(),
            0,
            ReqFlags::empty(),
        );
        self.wait_one()
    }

    fn read(&mut self, off: u64, len: usize) -> (i32, Vec<u8>) {
        self.buf()[..len].fill(0xee);
        self.q
            .read(off, self.buf.addr as *mut u8, len, 0, ReqFlags::empty());
        let r = self.wait_one();
        (r, self.buf()[..len].to_vec())
    }

    fn flush(&mut self) -> i32 {
        self.q.flush(0, ReqFlags::empty());
        self.wait_one()
    }
}

#[test]
fn write_read_flush_and_verify_on_host() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut be = BackendProcess::start(dir.path(), &["--blk", img.to_str().unwrap()]);
    let mut c = connect(&be.socket, false).unwrap();
    assert_eq!(c.b.get_u64("capacity").unwrap(), IMG);
    // What the host wrote is what the frontend reads.
    let (r, got) = c.read(0, 8192);
    assert_eq!(r, 0);
    assert_eq!(got, pattern(8192, 0x11));
    // A write at an odd place, multi-sector, then read back and flush.
    let p = pattern(192 * 1024, 0x77);
    assert_eq!(c.write(512 * 1000, &p), 0);
    let (r, got) = c.read(512 * 1000, p.len());
    assert_eq!(r, 0);
    assert_eq!(got, p);
    assert_eq!(c.flush(), 0);
    // Reads past the end fail with EIO from the device, not a hang or a crash.
    let (r, _) = c.read(IMG - 512, 1024);
    assert!(r < 0, "read past the end must fail, got {r}");
    // Write zeroes and discard reach the image.
    c.q.write_zeroes(512 * 1000, 4096, 0, ReqFlags::empty());
    assert_eq!(c.wait_one(), 0);
    drop(c);
    let f = std::fs::File::open(&img).unwrap();
    let mut on_disk = vec![0u8; p.len()];
    f.read_exact_at(&mut on_disk, 512 * 1000).unwrap();
    assert!(on_disk[..4096].iter().all(|b| *b == 0));
    assert_eq!(on_disk[4096..], p[4096..]);
    assert!(be.alive());
}

#[test]
fn reconnect_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut be = BackendProcess::start(dir.path(), &["--blk", img.to_str().unwrap()]);
    for round in 0..3u8 {
        let mut c = connect(&be.socket, false).unwrap();
        let p = pattern(4096, round);
        assert_eq!(c.write(4096 * u64::from(round + 4), &p), 0);
        let (r, got) = c.read(4096 * u64::from(round + 4), 4096);
        assert_eq!(r, 0);
        assert_eq!(got, p, "round {round}");
        drop(c);
    }
    assert!(be.alive());
}

#[test]
fn read_only_disk_is_published_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut be = BackendProcess::start(dir.path(), &["--blk", img.to_str().unwrap(), "--readonly"]);
    // The device offers VIRTIO_BLK_F_RO, so a read-write frontend is refused by libblkio.
    let e = connect(&be.socket, false)
        .err()
        .expect("read-write open must fail");
    assert_eq!(e.errno(), blkio::Errno::ROFS);
    let mut c = connect(&be.socket, true).unwrap();
    let (r, got) = c.read(0, 8192);
    assert_eq!(r, 0);
    assert_eq!(got, pattern(8192, 0x11));
    drop(c);
    assert!(be.alive());
}

#[test]
fn multi_queue_and_null_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = BackendProcess::start(dir.path(), &["--null", "1048576", "--queues", "2"]);
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", be.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    assert_eq!(b.get_i32("max-queues").unwrap(), 2);
    b.set_i32("num-queues", 2).unwrap();
    let out = b.start().unwrap();
    let buf = b.alloc_mem_region(8192).unwrap();
    b.map_mem_region(&buf).unwrap();
    // SAFETY: live mapping of 8192 bytes.
    let s = unsafe { std::slice::from_raw_parts_mut(buf.addr as *mut u8, 8192) };
    s.fill(0xab);
    for (i, mut q) in out.queues.into_iter().enumerate() {
        let at = (buf.addr + 4096 * i) as *mut u8;
        q.read(0, at, 4096, i, ReqFlags::empty());
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = Duration::from_secs(5);
        assert_eq!(q.do_io(&mut c, 1, Some(&mut t), None).unwrap(), 1);
        // SAFETY: do_io initialised one completion.
        assert_eq!(unsafe { c[0].assume_init_read() }.ret, 0);
    }
    assert!(s.iter().all(|b| *b == 0), "null device reads zeroes");
    assert!(be.alive());
}

#[test]
fn handed_over_listener_is_served() {
    use driver_domain::blk::{BlkBackendConfig, BlkBackendDevice, BlkDisk};
    use driver_domain::vhost_user::serve_listener;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("toolstack.sock");
    // The "toolstack" binds the listener and hands it to the backend (managed mode).
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let disk = Arc::new(BlkDisk::from_file(file, false).unwrap());
    let server = std::thread::spawn(move || {
        let device = BlkBackendDevice::new(disk, BlkBackendConfig::default()).unwrap();
        serve_listener(listener, device, |_| {})
    });
    let mut c = connect(&sock, false).unwrap();
    let p = pattern(8192, 0x99);
    assert_eq!(c.write(65536, &p), 0);
    assert_eq!(c.flush(), 0);
    let (r, got) = c.read(65536, 8192);
    assert_eq!(r, 0);
    assert_eq!(got, p);
    drop(c);
    // The session ends when the frontend goes away.
    server.join().unwrap().unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let mut on_disk = vec![0u8; 8192];
    f.read_exact_at(&mut on_disk, 65536).unwrap();
    assert_eq!(on_disk, p);
}

/// Regression: a backend busy-polling a queue kept the guest-memory snapshot taken before the
/// poll, so a buffer in a region the frontend added during the polling window was reported as
/// "outside guest memory" (EIO).
#[test]
fn regression_polling_sees_regions_added_while_polling() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut be = BackendProcess::start(
        dir.path(),
        &["--blk", img.to_str().unwrap(), "--poll-us", "300000"],
    );
    let mut c = connect(&be.socket, false).unwrap();
    // The first read starts the backend's polling window.
    let (r, _) = c.read(0, 4096);
    assert_eq!(r, 0);
    // Add a region while the backend polls, and read into it at once.
    let region = c.b.alloc_mem_region(4096).unwrap();
    c.b.map_mem_region(&region).unwrap();
    c.q.read(0, region.addr as *mut u8, 4096, 0, ReqFlags::empty());
    assert_eq!(c.wait_one(), 0);
    // SAFETY: live mapping of 4096 bytes owned by `c.b`.
    let got = unsafe { std::slice::from_raw_parts(region.addr as *const u8, 4096) };
    assert_eq!(got, &pattern(8192, 0x11)[..4096]);
    drop(c);
    assert!(be.alive());
}
