//! Drives the virtio-net core directly (no vhost-user): two or three guests' split rings laid
//! out in their own GuestMemoryMmap, frames written as a driver would, switched, and read back
//! from the receivers' used rings. Includes hostile drivers.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

mod net_guest;
use net_guest::*;

use driver_domain::net::header::{HDR_LEN, MAX_FRAME};
use driver_domain::net::{NetBackendConfig, NetBackendDevice, Switch, SwitchConfig};
use driver_domain::vhost_user::vring::Vring;
use driver_domain::vhost_user::VhostUserDevice;
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use driver_domain::virtio_core::BackendDevice;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

#[test]
fn frames_cross_the_switch_between_two_guests() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    a.refill(8, 2048);
    b.refill(8, 2048);
    // ARP-like broadcast from a, then unicast reply from b, then unicast from a.
    a.send(&bcast(1, 42));
    let got = b.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][HDR_LEN..], &bcast(1, 42)[..]);
    assert_eq!(num_buffers(&got[0]), 1);
    assert!(a.receive().is_empty(), "no hairpin");
    b.send(&frame(1, 2, 60, 0x22));
    assert_eq!(
        a.receive(),
        vec![[vec![0; 10], vec![1, 0], frame(1, 2, 60, 0x22)].concat()]
    );
    a.send(&frame(2, 1, MAX_FRAME, 0x33));
    let got = b.receive();
    assert_eq!(&got[0][HDR_LEN..], &frame(2, 1, MAX_FRAME, 0x33)[..]);
    assert_eq!(a.port.counters().tx_frames, 2);
    assert_eq!(b.port.counters().rx_frames, 2);
    assert_eq!(b.port.counters().rx_bytes, (42 + MAX_FRAME) as u64);
}

#[test]
fn mergeable_buffers_span_chains() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(8, 512);
    let f = bcast(1, 1400);
    a.send(&f);
    let got = b.receive();
    assert_eq!(got.len(), 3);
    assert_eq!(num_buffers(&got[0]), 3);
    let joined: Vec<u8> = got.concat();
    assert_eq!(&joined[HDR_LEN..], &f[..]);
}

#[test]
fn without_mrg_rxbuf_a_too_small_buffer_drops_the_frame_only() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", false);
    let mut b = guest(&sw, "b", false);
    b.refill(1, 512);
    a.send(&bcast(1, 1000));
    let got = b.receive();
    assert_eq!(got, vec![Vec::<u8>::new()], "returned with length 0");
    assert_eq!(b.port.counters().rx_dropped, 1);
    b.refill(1, 2048);
    a.send(&bcast(1, 100));
    let got = b.receive();
    assert_eq!(&got[0][HDR_LEN..], &bcast(1, 100)[..]);
    assert_eq!(num_buffers(&got[0]), 1, "VERSION_1 sets num_buffers to 1");
}

#[test]
fn bad_transmitted_frames_are_dropped_and_counted() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(16, 2048);
    // Chain shorter than the header.
    a.send_raw(&[0u8; 6]);
    // Runt frame.
    a.send(&[0xff; 10]);
    // Oversized frame.
    a.send(&bcast(1, MAX_FRAME + 1));
    // Checksum offload not negotiated.
    let mut h = vec![0u8; HDR_LEN];
    h[0] = 1;
    h.extend_from_slice(&bcast(1, 60));
    a.send_raw(&h);
    // GSO not negotiated.
    let mut h = vec![0u8; HDR_LEN];
    h[1] = 1;
    h.extend_from_slice(&bcast(1, 60));
    a.send_raw(&h);
    // Write-only descriptor on TX.
    a.send_desc(TX_BUF, 80, DESC_F_WRITE, 0);
    // Descriptor outside guest memory.
    a.send_desc((MEM as u64) - 8, 80, 0, 0);
    assert_eq!(a.port.counters().tx_invalid, 7);
    assert!(b.receive().is_empty());
    // Every chain was completed (the guest gets its buffers back).
    assert_eq!(a.tx_ring.used_idx(&a.mem).unwrap(), 7);
    // The port still works.
    a.send(&bcast(1, 60));
    assert_eq!(b.receive().len(), 1);
    assert!(a.tx.broken().is_none());
}

#[test]
fn header_split_over_descriptors_is_accepted() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(4, 2048);
    let f = bcast(1, 64);
    a.mem
        .write_slice(&[0u8; HDR_LEN], GuestAddress(TX_BUF))
        .unwrap();
    a.mem.write_slice(&f, GuestAddress(TX_BUF + 4096)).unwrap();
    a.tx_ring
        .write_desc(&a.mem, 0, TX_BUF, 5, DESC_F_NEXT, 1)
        .unwrap();
    a.tx_ring
        .write_desc(&a.mem, 1, TX_BUF + 5, (HDR_LEN - 5) as u32, DESC_F_NEXT, 2)
        .unwrap();
    a.tx_ring
        .write_desc(&a.mem, 2, TX_BUF + 4096, f.len() as u32, 0, 0)
        .unwrap();
    a.tx_ring.push_avail(&a.mem, 0).unwrap();
    a.tx.process(&mut a.txq, &a.mem).unwrap();
    assert_eq!(&b.receive()[0][HDR_LEN..], &f[..]);
}

#[test]
fn hostile_rx_chain_fails_only_that_queue() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    let mut c = guest(&sw, "c", true);
    c.refill(8, 2048);
    // b posts an RX chain too short for a header.
    b.refill(1, 4);
    a.send(&bcast(1, 60));
    assert!(b.rx.process(&mut b.rxq, &b.mem).is_err());
    assert!(b.rx.broken().is_some());
    assert_eq!(c.receive().len(), 1);
    // Another port still gets frames.
    a.send(&bcast(1, 60));
    assert_eq!(c.receive().len(), 1);
    // b's TX still works too.
    b.send(&frame(3, 2, 60, 0));
    assert_eq!(c.receive().len(), 1);
}

#[test]
fn a_guest_that_never_refills_rx_does_not_stop_the_others() {
    let cfg = SwitchConfig {
        queue_limit: 16,
        ..SwitchConfig::default()
    };
    let sw = Switch::new(cfg);
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    let mut c = guest(&sw, "c", true);
    c.refill(60, 2048);
    // b learns its MAC but never posts RX buffers.
    b.send(&bcast(2, 60));
    c.receive();
    a.refill(4, 2048);
    a.receive();
    for i in 0..50u8 {
        a.send(&frame(2, 1, 60, i));
        b.rx.process(&mut b.rxq, &b.mem).unwrap();
    }
    // b holds at most its batch plus a's share; the rest was dropped and charged to a.
    assert!(b.rx.backlog() <= 16 + 32, "backlog {}", b.rx.backlog());
    assert!(a.port.counters().tx_dropped > 0);
    // a and c still talk.
    a.send(&frame(3, 1, 60, 0x77));
    let got = c.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0][HDR_LEN + 20], 0x77);
    assert_eq!(c.port.counters().tx_dropped, 0);
    // b refills and gets what was queued.
    b.refill(60, 2048);
    let got = b.receive();
    assert!(!got.is_empty());
    assert!(got.iter().all(|f| f[HDR_LEN + 5] == 2));
}

#[test]
fn too_few_mergeable_buffers_wait_for_more_without_spinning() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    // One 512-byte buffer for a frame that needs three: nothing may be used yet.
    b.refill(1, 512);
    let f = bcast(1, 1400);
    a.send(&f);
    assert!(b.receive().is_empty());
    assert_eq!(b.rx.backlog(), 1, "the frame waits for buffers");
    // The driver adds two more: now it fits.
    b.refill(2, 512);
    let got = b.receive();
    assert_eq!(got.len(), 3);
    assert_eq!(&got.concat()[HDR_LEN..], &f[..]);
}

#[test]
fn frames_held_by_a_dropped_device_return_to_the_pool() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(1, 2048);
    for _ in 0..5 {
        a.send(&bcast(1, 60));
    }
    assert_eq!(b.receive().len(), 1);
    assert!(b.rx.backlog() > 0);
    let allocated = sw.pool().allocated();
    drop(b);
    drop(a);
    assert_eq!(
        sw.pool().free(),
        allocated,
        "every buffer is back in the pool"
    );
}

#[test]
fn calls_follow_used_event_and_no_interrupt() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let _b = guest(&sw, "b", true);
    let post = |a: &mut Guest, n: u16| {
        for _ in 0..n {
            let d = a.tx_next % QSIZE;
            a.tx_next = a.tx_next.wrapping_add(1);
            let addr = TX_BUF + u64::from(d) * SLOT * 2;
            let mut b = vec![0u8; HDR_LEN];
            b.extend_from_slice(&bcast(1, 60));
            a.mem.write_slice(&b, GuestAddress(addr)).unwrap();
            a.tx_ring
                .write_desc(&a.mem, d, addr, b.len() as u32, 0, 0)
                .unwrap();
            a.tx_ring.push_avail(&a.mem, d).unwrap();
        }
    };
    // Without EVENT_IDX: call unless the driver sets VRING_AVAIL_F_NO_INTERRUPT.
    post(&mut a, 2);
    assert!(a.tx.process(&mut a.txq, &a.mem).unwrap().notify);
    a.mem.write_obj(1u16, a.tx_ring.avail).unwrap();
    post(&mut a, 2);
    let p = a.tx.process(&mut a.txq, &a.mem).unwrap();
    assert_eq!(p.completed, 2);
    assert!(!p.notify, "NO_INTERRUPT honoured");
    a.mem.write_obj(0u16, a.tx_ring.avail).unwrap();
    // With EVENT_IDX: call only when used_event was crossed (used index goes 4 -> 7).
    a.txq.set_event_idx(true);
    a.tx_ring.set_used_event(&a.mem, 9).unwrap();
    post(&mut a, 3);
    assert!(!a.tx.process(&mut a.txq, &a.mem).unwrap().notify);
    a.tx_ring.set_used_event(&a.mem, 8).unwrap();
    post(&mut a, 3);
    assert!(
        a.tx.process(&mut a.txq, &a.mem).unwrap().notify,
        "used 7 -> 10 crosses 8"
    );
    assert_eq!(a.tx_ring.used_idx(&a.mem).unwrap(), 10);
}

/// One port served as a transport serves it: a `NetBackendDevice` behind the vhost-user
/// adapter, with vrings on the guest's rings (no socket).
struct ServedPort {
    mem: GuestMemoryMmap,
    dev: VhostUserDevice<NetBackendDevice>,
    /// RX queue 0, TX queue 1.
    vrings: Vec<Vring>,
    rx_ring: DriverRing,
    tx_ring: DriverRing,
}

fn served_port(sw: &Arc<Switch>, name: &str, poll_us: u64) -> ServedPort {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let port = Arc::new(sw.attach(name).unwrap());
    let cfg = NetBackendConfig {
        queue_size: QSIZE,
        poll_us,
        ..NetBackendConfig::default()
    };
    let dev = VhostUserDevice::new(NetBackendDevice::new(port, cfg).unwrap()).unwrap();
    dev.acked_features(1 << VIRTIO_F_VERSION_1);
    dev.update_memory(atomic.clone()).unwrap();
    let rx_ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let tx_ring = DriverRing::new(GuestAddress(0x4000), QSIZE);
    let vrings = [&rx_ring, &tx_ring]
        .iter()
        .map(|ring| {
            let v = Vring::new(QSIZE).unwrap();
            v.set_size(u32::from(QSIZE)).unwrap();
            v.set_addresses(ring.desc.0, ring.avail.0, ring.used.0)
                .unwrap();
            v.set_ready(true);
            v.set_enabled(true);
            v
        })
        .collect();
    ServedPort {
        mem,
        dev,
        vrings,
        rx_ring,
        tx_ring,
    }
}

/// RX is driven by the switch as well as by kicks: a frame for an idle port writes the port's
/// wake event, and that wake-up alone, through the adapter and the shared scheduler, delivers
/// it. With and without scheduler-level polling.
#[test]
fn switch_wake_ups_drive_rx_through_the_scheduler() {
    for poll_us in [0, 200] {
        let sw = Switch::new(SwitchConfig::default());
        let mut a = served_port(&sw, "a", poll_us);
        let mut b = served_port(&sw, "b", poll_us);
        // B posts receive buffers and kicks: nothing is queued, so RX arms the port.
        for d in 0..4u16 {
            let addr = RX_BUF + u64::from(d) * SLOT;
            b.rx_ring
                .write_desc(&b.mem, d, addr, SLOT as u32, DESC_F_WRITE, 0)
                .unwrap();
            b.rx_ring.push_avail(&b.mem, d).unwrap();
        }
        b.dev.serve(&[0, 1], &b.vrings, true);
        assert_eq!(b.rx_ring.used_idx(&b.mem).unwrap(), 0);
        // A transmits a broadcast and kicks TX.
        let mut bytes = vec![0u8; HDR_LEN];
        bytes.extend_from_slice(&bcast(1, 60));
        a.mem.write_slice(&bytes, GuestAddress(TX_BUF)).unwrap();
        a.tx_ring
            .write_desc(&a.mem, 0, TX_BUF, bytes.len() as u32, 0, 0)
            .unwrap();
        a.tx_ring.push_avail(&a.mem, 0).unwrap();
        a.dev.serve(&[0, 1], &a.vrings, true);
        assert_eq!(a.tx_ring.used_idx(&a.mem).unwrap(), 1, "poll_us {poll_us}");
        assert_eq!(b.rx_ring.used_idx(&b.mem).unwrap(), 0, "no kick reached B");
        // The switch raised B's wake event; the wake-up (as B's worker serves it, the event
        // consumed) delivers the frame.
        let wake = b.dev.device().wake_event().unwrap().try_clone().unwrap();
        assert!(wake.read().is_ok(), "the switch did not wake B");
        b.dev.serve(&[0, 1], &b.vrings, false);
        assert_eq!(b.rx_ring.used_idx(&b.mem).unwrap(), 1, "poll_us {poll_us}");
        let (id, len) = b.rx_ring.used_elem(&b.mem, 0).unwrap();
        assert_eq!((id, len as usize), (0, HDR_LEN + 60));
    }
}

/// A net port keeps no in-flight log (frames in flight are lost on a restart, as on a wire):
/// its sessions do not offer INFLIGHT_SHMFD, while a blk device's do.
#[test]
fn only_blk_offers_inflight_tracking() {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    let sw = Switch::new(SwitchConfig::default());
    let port = served_port(&sw, "p", 0);
    assert!(port.dev.device().inflight().is_none());
    assert!(!port.dev.protocol_features().contains(P::INFLIGHT_SHMFD));
    let disk = Arc::new(driver_domain::blk::BlkDisk::null(1 << 20, false));
    let blk = driver_domain::blk::BlkBackendDevice::new(disk, Default::default()).unwrap();
    let blk = VhostUserDevice::new(blk).unwrap();
    assert!(blk.protocol_features().contains(P::INFLIGHT_SHMFD));
}
