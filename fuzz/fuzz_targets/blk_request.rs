//! Fuzz the virtio-blk request parser and executor: arbitrary bytes become guest memory
//! holding a descriptor table and buffers; one chain (head chosen by the input) is parsed and,
//! if well-formed, executed against a small null disk. Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

use driver_domain::blk::request::execute;
use driver_domain::blk::{BlkDisk, Request};
use driver_domain::virtio_core::ring_driver::DriverRing;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let head = u16::from_le_bytes([data[0], data[1]]);
    let qsize = 1u16 << (data[2] % 9);
    let read_only = data[3] & 1 != 0;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let body = &data[4..];
    mem.write_slice(&body[..body.len().min(MEM)], GuestAddress(0))
        .unwrap();
    // The descriptor table starts at 0 and comes from the input; publish `head` as the
    // only available entry and pop it the way the queue worker does.
    let mut ring = DriverRing::new(GuestAddress(0), qsize);
    ring.push_avail(&mem, head).unwrap();
    let mut queue = Queue::new(256).unwrap();
    ring.configure(&mut queue, false);
    let Some(chain) = queue.iter(&mem).ok().and_then(|mut it| it.next()) else {
        return;
    };
    let mut req = Request::default();
    let disk = BlkDisk::null(64 * 512, read_only);
    match req.parse(chain) {
        Ok(()) => {
            let c = execute(&req, &disk, &mem, &[b'x'; 20]);
            assert!(c.status <= 2);
        }
        Err(_) => {}
    }
});
