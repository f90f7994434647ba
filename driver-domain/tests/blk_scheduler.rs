//! The blk core served through the shared scheduler (`virtio_core::serve_queues`) and the
//! vhost-user device's vrings, without a socket.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use driver_domain::blk::{status, BlkBackendConfig, BlkBackendDevice, BlkDisk};
use driver_domain::vhost_user::vring::Vring;
use driver_domain::vhost_user::VhostUserDevice;
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use driver_domain::virtio_core::{serve_queues, CheckedMemory, SealPolicy, TransportQueue};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use common::blk_rig::*;

/// A vring set up on `ring` as the request handler sets one up from the frontend's messages.
fn vring_on(ring: &DriverRing) -> Vring {
    let vring = Vring::new(QSIZE).unwrap();
    vring.set_size(u32::from(QSIZE)).unwrap();
    vring
        .set_addresses(ring.desc.0, ring.avail.0, ring.used.0)
        .unwrap();
    vring.set_ready(true);
    vring.set_enabled(true);
    vring
}

/// Two queues served through the real path of a kick: the vhost-user device's `serve` on
/// each worker's vrings, which runs the shared scheduler (`virtio_core::serve_queues`) over
/// the blk device. No socket: the vrings are configured the way the request handler
/// configures them from the frontend's messages.
#[test]
fn scheduler_serves_two_queues_round_robin() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let disk = Arc::new(BlkDisk::null(1 << 20, false));
    let cfg = BlkBackendConfig {
        budget: 2,
        queue_size: QSIZE,
        num_queues: 2,
        ..BlkBackendConfig::default()
    };
    let device = VhostUserDevice::new(BlkBackendDevice::new(disk, cfg).unwrap()).unwrap();
    device.update_memory(atomic.clone()).unwrap();
    let mut rings = Vec::new();
    let mut vrings = Vec::new();
    let mut calls = Vec::new();
    for q in 0..2u16 {
        let ring = DriverRing::new(GuestAddress(0x1000 + 0x2000 * u64::from(q)), QSIZE);
        let vring = vring_on(&ring);
        let call = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        vring.set_call(Some(File::from(call.as_fd().try_clone_to_owned().unwrap())));
        calls.push(call);
        vrings.push(vring);
        rings.push(ring);
    }
    // Queue 0 gets 5 requests (more than the budget), queue 1 gets 1.
    for (q, ring) in rings.iter_mut().enumerate() {
        let n = if q == 0 { 5u16 } else { 1 };
        for i in 0..n {
            let hdr = 0x8000 + 0x1000 * q as u64 + 16 * u64::from(i);
            header(&mem, hdr, 0, 0);
            let data = 0x20000 + 0x10000 * q as u64 + 512 * u64::from(i);
            mem.write_slice(&[0xaa; 512], GuestAddress(data)).unwrap();
            let st = 0x30000 + 0x100 * q as u64 + u64::from(i);
            let b = i * 3;
            ring.write_desc(&mem, b, hdr, 16, DESC_F_NEXT, b + 1)
                .unwrap();
            ring.write_desc(&mem, b + 1, data, 512, DESC_F_NEXT | DESC_F_WRITE, b + 2)
                .unwrap();
            ring.write_desc(&mem, b + 2, st, 1, DESC_F_WRITE, 0)
                .unwrap();
            ring.push_avail(&mem, b).unwrap();
        }
    }
    // One kick per worker, on the worker's own vrings, as a worker thread serves it.
    let mut served: Vec<usize> = device.workers().concat();
    served.sort_unstable();
    assert_eq!(served, vec![0, 1], "every queue has a worker");
    let vrings: Vec<Arc<Vring>> = vrings.into_iter().map(Arc::new).collect();
    for queues in device.workers() {
        let mine: Vec<Arc<Vring>> = queues.iter().map(|q| vrings[*q].clone()).collect();
        device.serve(queues, &mine, true);
    }
    // The scheduler kept calling queue 0 past its budget of 2 until it was drained.
    assert_eq!(rings[0].used_idx(&mem).unwrap(), 5);
    assert_eq!(rings[1].used_idx(&mem).unwrap(), 1);
    assert!(calls[0].read().unwrap() >= 1);
    assert!(calls[1].read().unwrap() >= 1);
    // The null device returned zeroes.
    let mut got = [0xffu8; 512];
    mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert!(got.iter().all(|b| *b == 0));
}

/// A kick before any memory table is ignored, and the queue is served once a table arrives.
#[test]
fn scheduler_waits_for_a_memory_table() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let cfg = BlkBackendConfig {
        queue_size: QSIZE,
        ..BlkBackendConfig::default()
    };
    let disk = Arc::new(BlkDisk::null(1 << 20, false));
    let device = VhostUserDevice::new(BlkBackendDevice::new(disk, cfg).unwrap()).unwrap();
    let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let vring = vring_on(&ring);
    header(&mem, HDR, 0, 0);
    ring.write_desc(&mem, 0, HDR, 16, DESC_F_NEXT, 1).unwrap();
    ring.write_desc(&mem, 1, STATUS, 1, DESC_F_WRITE, 0)
        .unwrap();
    ring.push_avail(&mem, 0).unwrap();
    let vrings = [vring];
    device.serve(&[0], &vrings, true);
    assert_eq!(
        ring.used_idx(&mem).unwrap(),
        0,
        "served without a memory table"
    );
    device.update_memory(atomic).unwrap();
    device.serve(&[0], &vrings, true);
    assert_eq!(ring.used_idx(&mem).unwrap(), 1);
}

/// A transport queue that adds a memory region while the worker waits for the queue, as
/// vhost-user-backend's handler can while a worker waits for the vring lock.
struct RegionAddedWhileWaiting {
    queue: std::sync::Mutex<Queue>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    region: std::sync::Mutex<Option<GuestRegionMmap>>,
}

impl TransportQueue for RegionAddedWhileWaiting {
    fn with_ready_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        if let Some(region) = self.region.lock().unwrap().take() {
            let grown = self.mem.memory().insert_region(Arc::new(region)).unwrap();
            self.mem.lock().unwrap().replace(grown);
        }
        Some(f(&mut self.queue.lock().unwrap()))
    }

    fn signal_driver(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Regression: the scheduler took its memory snapshot before waiting for the queue, so a
/// request naming a region added meanwhile failed with IOERR (seen with libblkio and two
/// queues under load).
#[test]
fn regression_snapshot_taken_after_waiting_for_the_queue() {
    const NEW: u64 = 0x10_0000;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let memory = CheckedMemory::default();
    memory
        .update(
            atomic.clone(),
            driver_domain::virtio_core::MemoryGrant::AllRam,
            SealPolicy::RequireSealed,
            "test",
        )
        .unwrap();
    let cfg = BlkBackendConfig {
        queue_size: QSIZE,
        ..BlkBackendConfig::default()
    };
    let device = BlkBackendDevice::new(Arc::new(BlkDisk::null(1 << 20, false)), cfg).unwrap();
    let mut ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let mut queue = Queue::new(QSIZE).unwrap();
    ring.configure(&mut queue, false);
    // A read whose data buffer lies in the region the transport adds.
    header(&mem, HDR, 0, 0);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    ring.write_desc(&mem, 0, HDR, 16, DESC_F_NEXT, 1).unwrap();
    ring.write_desc(&mem, 1, NEW, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        .unwrap();
    ring.write_desc(&mem, 2, STATUS, 1, DESC_F_WRITE, 0)
        .unwrap();
    ring.push_avail(&mem, 0).unwrap();
    let transport = RegionAddedWhileWaiting {
        queue: std::sync::Mutex::new(queue),
        mem: atomic,
        region: std::sync::Mutex::new(Some(
            GuestRegionMmap::from_range(GuestAddress(NEW), 0x1000, None).unwrap(),
        )),
    };
    serve_queues(&device, &memory, &[0], std::slice::from_ref(&transport));
    assert_eq!(ring.used_idx(&mem).unwrap(), 1);
    assert_eq!(ring.used_elem(&mem, 0).unwrap(), (0, 513));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::OK
    );
}
