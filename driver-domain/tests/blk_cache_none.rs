//! `cache = none`: a disk on an image opened `O_DIRECT` serves reads and writes through an
//! aligned bounce buffer. Requests are executed against a real file on the build directory's
//! file system (tmpfs refuses `O_DIRECT`: the tests are then skipped), and the image is judged
//! from outside: read back with a descriptor of its own opened `O_DIRECT`.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use driver_domain::blk::bounce::{transfer_bounced, BounceBuffer, BOUNCE_ALIGN, BOUNCE_LEN};
use driver_domain::blk::{
    execute, status, BlkBackendConfig, BlkBackendDevice, BlkBackendError, BlkBackendQueue, BlkDisk,
    CacheMode, DiskError, Request, RequestType,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const MEM: usize = 4 << 20;
const DISK_BYTES: usize = 3 << 20;
const STATUS: u64 = 0x100;
const SERIAL: [u8; 20] = [b's'; 20];

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 9) as u8 ^ seed)
        .collect()
}

/// An image of `DISK_BYTES` filled with `pattern(.., 0x3c)` in the build directory (the
/// worktree's file system), or `None` (skipped) where that file system refuses `O_DIRECT`.
fn image(test: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, pattern(DISK_BYTES, 0x3c)).unwrap();
    match open_direct(&path) {
        Ok(_) => Some((dir, path)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            test_support::skip(
                test,
                &format!(
                    "the file system of {} refuses O_DIRECT",
                    env!("CARGO_TARGET_TMPDIR")
                ),
            );
            None
        }
        Err(e) => panic!("opening {}: {e}", path.display()),
    }
}

fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(CacheMode::None.open_flags())
        .open(path)
}

fn direct_disk(path: &Path) -> Arc<BlkDisk> {
    let disk = BlkDisk::from_file(open_direct(path).unwrap(), false).unwrap();
    assert_eq!(disk.direct_block_size(), Some(512));
    Arc::new(disk)
}

/// The image's bytes `[offset, offset + len)` read from outside the backend, `O_DIRECT` (so
/// from the disk, not from a page cache the backend might have filled).
fn read_outside(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = open_direct(path).unwrap();
    let start = offset & !(BOUNCE_ALIGN as u64 - 1);
    let span = ((offset + len as u64 - start) as usize).next_multiple_of(BOUNCE_ALIGN);
    let mut raw = vec![0u8; span + BOUNCE_ALIGN];
    let skew = raw.as_ptr().align_offset(BOUNCE_ALIGN);
    let buf = &mut raw[skew..skew + span];
    f.read_exact_at(buf, start).unwrap();
    let from = (offset - start) as usize;
    buf[from..from + len].to_vec()
}

fn request(kind: RequestType, sector: u64, data: &[(u64, u32)]) -> Request {
    let segs: Vec<_> = data.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let (readable, writable) = match kind {
        RequestType::Out => (segs, Vec::new()),
        _ => (Vec::new(), segs),
    };
    Request {
        head: 0,
        kind,
        sector,
        readable,
        writable,
        status: Some(GuestAddress(STATUS)),
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

#[test]
fn cache_none_reads_and_writes_round_trip_through_the_image() {
    let Some((_dir, path)) = image("cache_none_reads_and_writes_round_trip_through_the_image")
    else {
        return;
    };
    let disk = direct_disk(&path);
    let mem = memory();
    // A read of 8 KiB at sector 8 into a page-aligned guest buffer.
    let done = execute(
        &request(RequestType::In, 8, &[(0x10000, 8192)]),
        &disk,
        &mem,
        &SERIAL,
    );
    assert_eq!(done.status, status::OK);
    assert_eq!(done.written, 8193);
    let mut got = vec![0u8; 8192];
    mem.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
    assert_eq!(got, pattern(DISK_BYTES, 0x3c)[4096..12288]);

    // A write of 16 KiB at sector 40, then a FLUSH; the image holds it (read from outside).
    let data = pattern(16384, 0xa5);
    mem.write_slice(&data, GuestAddress(0x20000)).unwrap();
    let done = execute(
        &request(RequestType::Out, 40, &[(0x20000, 16384)]),
        &disk,
        &mem,
        &SERIAL,
    );
    assert_eq!(done.status, status::OK);
    let done = execute(&request(RequestType::Flush, 0, &[]), &disk, &mem, &SERIAL);
    assert_eq!(done.status, status::OK);
    assert_eq!(read_outside(&path, 40 * 512, 16384), data);
    // The bytes around it are untouched.
    assert_eq!(
        read_outside(&path, 0, 40 * 512),
        pattern(DISK_BYTES, 0x3c)[..40 * 512]
    );
}

#[test]
fn cache_none_bounces_unaligned_and_long_guest_buffers() {
    let Some((_dir, path)) = image("cache_none_bounces_unaligned_and_long_guest_buffers") else {
        return;
    };
    let disk = direct_disk(&path);
    let mem = memory();
    // Three segments at odd guest addresses (1536 + 1000 + 2584 bytes: 5120, ten sectors),
    // written at sector 3 (not page aligned on the disk either).
    let segs = [(0x30001u64, 1536u32), (0x40007, 1000), (0x50003, 2584)];
    let data = pattern(5120, 0x77);
    let mut at = 0usize;
    for &(a, l) in &segs {
        mem.write_slice(&data[at..at + l as usize], GuestAddress(a))
            .unwrap();
        at += l as usize;
    }
    let done = execute(&request(RequestType::Out, 3, &segs), &disk, &mem, &SERIAL);
    assert_eq!(done.status, status::OK);
    // Judged after the backend dropped its disk, from outside.
    drop(disk);
    assert_eq!(read_outside(&path, 3 * 512, 5120), data);

    // A read longer than one bounce buffer, into an odd guest address: it goes in pieces.
    let disk = direct_disk(&path);
    let len = BOUNCE_LEN + 4096 + 512;
    let done = execute(
        &request(RequestType::In, 0, &[(0x100005, len as u32)]),
        &disk,
        &mem,
        &SERIAL,
    );
    assert_eq!(done.status, status::OK);
    let mut got = vec![0u8; len];
    mem.read_slice(&mut got, GuestAddress(0x100005)).unwrap();
    let mut want = pattern(DISK_BYTES, 0x3c)[..len].to_vec();
    want[3 * 512..3 * 512 + 5120].copy_from_slice(&data);
    assert_eq!(got, want);
}

#[test]
fn cache_none_misaligned_transfer_fails_that_request_only() {
    let Some((_dir, path)) = image("cache_none_misaligned_transfer_fails_that_request_only") else {
        return;
    };
    // A file's logical block is 512 bytes, the sector size: a request that is not whole
    // sectors fails alone.
    let disk = direct_disk(&path);
    let mem = memory();
    mem.write_slice(&[0xeeu8; 700], GuestAddress(0x20000))
        .unwrap();
    let done = execute(
        &request(RequestType::Out, 1, &[(0x20000, 700)]),
        &disk,
        &mem,
        &SERIAL,
    );
    assert_eq!(done.status, status::IOERR);
    assert_eq!(
        read_outside(&path, 0, 4096),
        pattern(DISK_BYTES, 0x3c)[..4096]
    );
    // The backend goes on: a good request right after succeeds.
    let done = execute(
        &request(RequestType::In, 1, &[(0x20000, 512)]),
        &disk,
        &mem,
        &SERIAL,
    );
    assert_eq!(done.status, status::OK);

    // A device with 4096-byte logical blocks (BLKSSZGET) refuses a transfer at sector 1 or
    // of one sector: the bounced transfer fails before touching the image.
    let f = open_direct(&path).unwrap();
    let mut bounce = BounceBuffer::new();
    let slice = mem
        .get_slices(GuestAddress(0x20000), 4096, Permissions::Write)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    for (offset, len) in [(512u64, 4096usize), (4096, 512)] {
        let slice = slice.subslice(0, len).unwrap();
        let r = transfer_bounced(&f, &[slice], offset, true, 4096, &mut bounce);
        assert!(
            matches!(r, Err(DiskError::Misaligned { block: 4096, .. })),
            "{r:?}"
        );
    }
    assert_eq!(
        read_outside(&path, 0, 8192),
        pattern(DISK_BYTES, 0x3c)[..8192]
    );
}

#[test]
fn cache_none_refuses_a_buffered_image_and_uses_no_ring() {
    let Some((_dir, path)) = image("cache_none_refuses_a_buffered_image_and_uses_no_ring") else {
        return;
    };
    let cfg = BlkBackendConfig {
        cache: CacheMode::None,
        ..BlkBackendConfig::default()
    };
    let buffered = File::options().read(true).write(true).open(&path).unwrap();
    let disk = Arc::new(BlkDisk::from_file(buffered, false).unwrap());
    assert_eq!(disk.direct_block_size(), None);
    assert!(matches!(
        BlkBackendDevice::new(disk, cfg.clone()),
        Err(BlkBackendError::Config(_))
    ));
    let disk = direct_disk(&path);
    let device = BlkBackendDevice::new(disk.clone(), cfg.clone()).unwrap();
    // blk_size is the image's logical block (a file's: 512).
    use driver_domain::virtio_core::BackendDevice;
    assert_eq!(device.read_config(20, 4), 512u32.to_le_bytes());
    // io_uring asked for (the default), but the O_DIRECT image is served with preadv/pwritev.
    assert!(cfg.io_uring);
    let queue = BlkBackendQueue::new(0, disk, &cfg, None);
    assert!(!queue.batched_io());
}

/// The `flags:` of the descriptor of process `pid` open on `path` (from `/proc/<pid>/fdinfo`).
fn open_flags_of(pid: u32, path: &Path) -> Option<i32> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_str()?
        ))
        .ok()?;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
        return i32::from_str_radix(flags.trim(), 8).ok();
    }
    None
}

#[test]
fn serve_cache_none_opens_the_image_o_direct() {
    let Some((dir, path)) = image("serve_cache_none_opens_the_image_o_direct") else {
        return;
    };
    let img = path.to_str().unwrap();
    for (cache, direct) in [("none", true), ("writeback", false)] {
        let serve = common::BackendProcess::start(dir.path(), &["--blk", img, "--cache", cache]);
        let flags = open_flags_of(serve.child.id(), &path).expect("serve holds the image open");
        assert_eq!(
            flags & libc::O_DIRECT != 0,
            direct,
            "--cache {cache}: flags {flags:o}"
        );
        drop(serve);
        let _ = std::fs::remove_file(dir.path().join("blk.sock"));
    }
}
