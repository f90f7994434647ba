//! Fuzz a whole pass of the virtio-blk queue on a file-backed disk: arbitrary bytes become
//! guest memory holding a descriptor table, buffers and several available heads (count and
//! heads from the input), served by `BlkBackendQueue::process` with its io_uring batches, so
//! batches mixing good, malformed and failing requests (ranges past the disk, buffers past
//! guest memory) are built, submitted and completed. Nothing may panic; every head the pass
//! consumed is completed, unless the ring itself is invalid, which fails the queue.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

use driver_domain::blk::{BlkBackendConfig, BlkBackendQueue, BlkDisk, InflightLog};
use driver_domain::virtio_core::ring_driver::DriverRing;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
const QSIZE: u16 = 64;

/// One small image for every input (a file, so the ring is used); reads and writes go to it.
fn disk() -> Arc<BlkDisk> {
    static DISK: OnceLock<Arc<BlkDisk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let file = tempfile_in_tmp();
        Arc::new(BlkDisk::from_file(file, false).unwrap())
    })
    .clone()
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("splitvmm-fuzz-blk-queue-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    file.set_len(64 * 512).unwrap();
    file
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let count = usize::from(data[0] % 16) + 1;
    let heads_len = 2 * count;
    if data.len() < 1 + heads_len {
        return;
    }
    let heads: Vec<u16> = data[1..1 + heads_len]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) % QSIZE)
        .collect();
    let body = &data[1 + heads_len..];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // The descriptor table (at 0) and the buffers come from the input; the rings sit above.
    mem.write_slice(&body[..body.len().min(MEM / 2)], GuestAddress(0))
        .unwrap();
    let mut ring = DriverRing::new(GuestAddress(0), QSIZE);
    ring.avail = GuestAddress(MEM as u64 / 2);
    ring.used = GuestAddress(MEM as u64 / 2 + 0x1000);
    for h in &heads {
        ring.push_avail(&mem, *h).unwrap();
    }
    let mut queue = Queue::new(QSIZE).unwrap();
    ring.configure(&mut queue, false);
    let cfg = BlkBackendConfig {
        queue_size: QSIZE,
        io_uring: true,
        ..BlkBackendConfig::default()
    };
    let log = InflightLog::new(1, QSIZE).unwrap();
    let mut blk = BlkBackendQueue::new(0, disk(), &cfg, log.queue(0));
    match blk.process(&mut queue, &mem) {
        Ok(progress) => {
            assert_eq!(progress.completed, heads.len());
            assert_eq!(usize::from(ring.used_idx(&mem).unwrap()), heads.len());
        }
        Err(_) => assert!(blk.broken().is_some()),
    }
});
