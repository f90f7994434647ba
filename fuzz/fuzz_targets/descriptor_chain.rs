//! Fuzz the whole queue path: an arbitrary split ring (descriptor table, avail ring, used ring,
//! indirect tables, buffers) in a small GuestMemoryMmap, processed by `BlkBackendQueue::process` with
//! the in-flight log, EVENT_IDX on or off, and a tiny budget. Nothing may panic; a rejected
//! ring must leave the queue failed, not the process.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

use driver_domain::blk::{BlkBackendConfig, BlkBackendQueue, BlkDisk, InflightLog};
use driver_domain::virtio_core::ring_driver::DriverRing;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 32 * 1024;
const QSIZE: u16 = 8;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let event_idx = data[0] & 1 != 0;
    let read_only = data[0] & 2 != 0;
    let budget = usize::from(data[1] % 8) + 1;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let body = &data[2..];
    mem.write_slice(&body[..body.len().min(MEM)], GuestAddress(0))
        .unwrap();
    let ring = DriverRing::new(GuestAddress(0x100), QSIZE);
    let mut queue = Queue::new(QSIZE).unwrap();
    ring.configure(&mut queue, event_idx);
    let cfg = BlkBackendConfig {
        queue_size: QSIZE,
        budget,
        ..BlkBackendConfig::default()
    };
    let log = InflightLog::new(1, QSIZE).unwrap();
    let disk = Arc::new(BlkDisk::null(128 * 512, read_only));
    let mut blk = BlkBackendQueue::new(0, disk, &cfg, log.queue(0));
    for _ in 0..4 {
        match blk.process(&mut queue, &mem) {
            Ok(p) => {
                if !p.more {
                    break;
                }
            }
            Err(_) => {
                assert!(blk.broken().is_some());
                break;
            }
        }
    }
});
