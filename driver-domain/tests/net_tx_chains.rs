//! Transmit chains as the batched TX path walks them (descriptor table and available ring read
//! through host addresses, every chain gathered before any frame is copied): indirect tables,
//! links that loop, nested indirect tables, the descriptor limit per chain, buffers spanning
//! two memory regions, and a batch mixing good and bad chains.

#![allow(clippy::unwrap_used)]

mod net_guest;
use net_guest::*;

use driver_domain::net::header::HDR_LEN;
use driver_domain::net::{Switch, SwitchConfig};
use driver_domain::virtio_core::ring_driver::{DESC_F_INDIRECT, DESC_F_NEXT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the tests put indirect tables (inside the TX buffer area, past the slots used here).
const TABLE: u64 = 0x30000;

fn with_header(f: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HDR_LEN];
    b.extend_from_slice(f);
    b
}

/// Write `bytes` at `addr` and an indirect table at `TABLE` with one descriptor per `piece`
/// bytes of it; post a chain of one indirect descriptor pointing at the table.
fn send_indirect(a: &mut Guest, bytes: &[u8], piece: usize, addr: u64) {
    a.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    let pieces: Vec<&[u8]> = bytes.chunks(piece).collect();
    for (i, p) in pieces.iter().enumerate() {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&(addr + (i * piece) as u64).to_le_bytes());
        d[8..12].copy_from_slice(&(p.len() as u32).to_le_bytes());
        let last = i + 1 == pieces.len();
        let flags = if last { 0 } else { DESC_F_NEXT };
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
        a.mem
            .write_slice(&d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let head = a.tx_next % QSIZE;
    a.tx_next += 1;
    a.tx_ring
        .write_desc(
            &a.mem,
            head,
            TABLE,
            16 * pieces.len() as u32,
            DESC_F_INDIRECT,
            0,
        )
        .unwrap();
    a.tx_ring.push_avail(&a.mem, head).unwrap();
    a.tx.process(&mut a.txq, &a.mem).unwrap();
}

#[test]
fn an_indirect_chain_is_read_whole() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(4, 2048);
    let f = bcast(1, 300);
    send_indirect(&mut a, &with_header(&f), 100, TX_BUF);
    let got = b.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][HDR_LEN..], &f[..]);
    assert_eq!(a.port.counters().tx_invalid, 0);
}

#[test]
fn a_chain_of_1024_descriptors_is_read_and_one_more_is_refused() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(4, 2048);
    // 1024 one-byte descriptors: header and a 1012-byte frame.
    let f = bcast(1, 1024 - HDR_LEN);
    send_indirect(&mut a, &with_header(&f), 1, TX_BUF);
    let got = b.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][HDR_LEN..], &f[..]);
    // 1025: refused and counted, completed all the same.
    send_indirect(&mut a, &with_header(&bcast(1, 1025 - HDR_LEN)), 1, TX_BUF);
    assert!(b.receive().is_empty());
    assert_eq!(a.port.counters().tx_invalid, 1);
    assert_eq!(a.tx_ring.used_idx(&a.mem).unwrap(), 2);
    a.send(&bcast(1, 60));
    assert_eq!(b.receive().len(), 1);
}

#[test]
fn looping_and_nested_chains_end_and_are_refused() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(8, 2048);
    // A descriptor linked to itself: read QSIZE times (6400 bytes), too long for a frame.
    a.mem
        .write_slice(&with_header(&bcast(1, 88)), GuestAddress(TX_BUF))
        .unwrap();
    let d = a.tx_next % QSIZE;
    a.tx_next += 1;
    a.tx_ring
        .write_desc(&a.mem, d, TX_BUF, 100, DESC_F_NEXT, d)
        .unwrap();
    a.tx_ring.push_avail(&a.mem, d).unwrap();
    a.tx.process(&mut a.txq, &a.mem).unwrap();
    // A link past the table's end: the chain ends there (a header alone: a runt).
    a.send_desc(TX_BUF, HDR_LEN as u32, DESC_F_NEXT, QSIZE + 5);
    // An indirect table naming another indirect table: the chain ends (nothing read).
    let mut nested = [0u8; 16];
    nested[0..8].copy_from_slice(&TX_BUF.to_le_bytes());
    nested[8..12].copy_from_slice(&16u32.to_le_bytes());
    nested[12..14].copy_from_slice(&DESC_F_INDIRECT.to_le_bytes());
    a.mem.write_slice(&nested, GuestAddress(TABLE)).unwrap();
    a.send_desc(TABLE, 16, DESC_F_INDIRECT, 0);
    // An indirect table whose length is not a multiple of 16: the chain ends.
    a.send_desc(TABLE, 24, DESC_F_INDIRECT, 0);
    assert_eq!(a.port.counters().tx_invalid, 4);
    assert!(b.receive().is_empty());
    assert_eq!(a.tx_ring.used_idx(&a.mem).unwrap(), 4);
    assert!(a.tx.broken().is_none());
    a.send(&bcast(1, 60));
    assert_eq!(b.receive().len(), 1);
}

#[test]
fn a_buffer_spanning_two_regions_is_read_whole() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    // The same guest-physical layout, in two regions split at 0x20000.
    a.mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x20000),
        (GuestAddress(0x20000), MEM - 0x20000),
    ])
    .unwrap();
    b.refill(4, 2048);
    let bytes = with_header(&bcast(1, 500));
    let addr = 0x20000 - 200;
    a.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    a.send_desc(addr, bytes.len() as u32, 0, 0);
    let got = b.receive();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][HDR_LEN..], &bytes[HDR_LEN..]);
}

#[test]
fn one_batch_mixes_good_and_bad_chains_in_order() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest(&sw, "a", true);
    let mut b = guest(&sw, "b", true);
    b.refill(32, 2048);
    // Twelve chains posted before one TX pass: every third one points outside memory.
    for i in 0..12u16 {
        let d = a.tx_next % QSIZE;
        a.tx_next += 1;
        let addr = TX_BUF + u64::from(d) * SLOT;
        let mut f = bcast(1, 60 + usize::from(i));
        f[20] = i as u8;
        a.mem
            .write_slice(&with_header(&f), GuestAddress(addr))
            .unwrap();
        let at = if i % 3 == 2 { MEM as u64 - 8 } else { addr };
        a.tx_ring
            .write_desc(&a.mem, d, at, (HDR_LEN + f.len()) as u32, 0, 0)
            .unwrap();
        a.tx_ring.push_avail(&a.mem, d).unwrap();
    }
    a.tx.process(&mut a.txq, &a.mem).unwrap();
    assert_eq!(a.port.counters().tx_invalid, 4);
    assert_eq!(a.tx_ring.used_idx(&a.mem).unwrap(), 12);
    for i in 0..12u16 {
        let (id, len) = a.tx_ring.used_elem(&a.mem, i).unwrap();
        assert_eq!((id, len), (u32::from(i), 0), "used element {i}");
    }
    let got = b.receive();
    let seen: Vec<u8> = got.iter().map(|g| g[HDR_LEN + 20]).collect();
    assert_eq!(seen, vec![0, 1, 3, 4, 6, 7, 9, 10]);
}
