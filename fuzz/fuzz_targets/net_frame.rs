//! Fuzz the virtio-net header and frame parser, and the TX -> switch -> RX data path with a
//! guest-controlled descriptor chain.
//!
//! Input layout: byte 0 selects offloads and header length; the rest is either parsed directly
//! as header + frame, or (bit 7 of byte 0) laid out as a TX chain of up to 4 descriptors whose
//! lengths and flags come from the input, and switched to a second port whose RX chain is
//! also taken from the input (bits 4 and 5 of byte 0: the sender negotiated checksum offload
//! and TSO, the receiver their GUEST_* counterparts, so GSO frames are segmented or handed on).

#![no_main]

use std::sync::Arc;

use driver_domain::net::header::{HDR_LEN, HDR_LEN_LEGACY};
use driver_domain::net::{
    Negotiated, RxQueue, Switch, SwitchConfig, TxHeader, TxOffloads, TxQueue,
};
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const DATA: u64 = 0x4000;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let offloads = TxOffloads {
        csum: sel & 1 != 0,
        tso4: sel & 2 != 0,
        tso6: sel & 2 != 0,
        ecn: sel & 0x40 != 0,
    };
    let hdr_len = if sel & 4 != 0 {
        HDR_LEN_LEGACY
    } else {
        HDR_LEN
    };
    if let Ok((h, len)) = TxHeader::parse(rest, hdr_len, offloads) {
        assert_eq!(len, rest.len() - hdr_len);
        assert!(h.validate(len, offloads).is_ok());
        let _ = h.offload(&rest[hdr_len..]);
    }
    if sel & 0x80 != 0 {
        ring_path(sel, rest);
    }
});

fn ring_path(sel: u8, rest: &[u8]) {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let sw = Switch::new(SwitchConfig {
        queue_limit: 4,
        ..SwitchConfig::default()
    });
    let a = Arc::new(sw.attach("a").expect("port"));
    let b = Arc::new(sw.attach("b").expect("port"));
    // Bit 4: the sender negotiated CSUM and TSO; bit 5: the receiver GUEST_CSUM and TSO.
    let base = if sel & 8 != 0 { 1 << 15 } else { 0 } | 1 << 32;
    let host = 1 << 0 | 1 << 11 | 1 << 12 | 1 << 13;
    let guest = 1 << 1 | 1 << 7 | 1 << 8 | 1 << 9;
    let neg_tx = Negotiated::from_features(base | if sel & 0x10 != 0 { host } else { 0 });
    let neg_rx = Negotiated::from_features(base | if sel & 0x20 != 0 { guest } else { 0 });
    let tx_ring = DriverRing::new(GuestAddress(0x100), 8);
    let rx_ring = DriverRing::new(GuestAddress(0x1000), 8);
    let mut txq = Queue::new(8).expect("queue");
    let mut rxq = Queue::new(8).expect("queue");
    tx_ring.configure(&mut txq, false);
    rx_ring.configure(&mut rxq, false);
    let mut tx_ring = tx_ring;
    let mut rx_ring = rx_ring;
    let mut tx = TxQueue::new(1, a.clone(), 16);
    let mut rx = RxQueue::new(0, b.clone(), 16);
    tx.set_negotiated(neg_tx);
    rx.set_negotiated(neg_rx);
    // Descriptor table: 4 TX descriptors, 4 RX descriptors, lengths and flags from the input.
    let (ctl, payload) = rest.split_at(rest.len().min(16));
    let _ = mem.write_slice(payload, GuestAddress(DATA));
    for i in 0..4u16 {
        let c = ctl.get(usize::from(i) * 2).copied().unwrap_or(0);
        let l = ctl.get(usize::from(i) * 2 + 1).copied().unwrap_or(0);
        let len = u32::from(l) * 8;
        let flags = if c & 1 != 0 && i < 3 { DESC_F_NEXT } else { 0 }
            | if c & 2 != 0 { DESC_F_WRITE } else { 0 };
        let addr = DATA + u64::from(c >> 2) * 16;
        let _ = tx_ring.write_desc(&mem, i, addr, len, flags, i + 1);
        let rc = ctl.get(8 + usize::from(i) * 2).copied().unwrap_or(0xff);
        let rl = ctl.get(9 + usize::from(i) * 2).copied().unwrap_or(0xff);
        let rflags = if rc & 2 != 0 { 0 } else { DESC_F_WRITE }
            | if rc & 1 != 0 && i < 3 { DESC_F_NEXT } else { 0 };
        let _ = rx_ring.write_desc(
            &mem,
            i,
            0x8000 + u64::from(i) * 0x1000,
            u32::from(rl) * 16,
            rflags,
            i + 1,
        );
    }
    let _ = tx_ring.push_avail(&mem, 0);
    let _ = rx_ring.push_avail(&mem, 0);
    let _ = rx_ring.push_avail(&mem, 2);
    let _ = tx.process(&mut txq, &mem);
    let _ = rx.process(&mut rxq, &mem);
    let _ = rx.process(&mut rxq, &mem);
    let c = a.counters();
    assert_eq!(
        c.tx_frames + c.tx_invalid,
        1,
        "the one chain was counted once"
    );
}
