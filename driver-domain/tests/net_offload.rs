//! Checksum offload and TCP segmentation through the switch, with guests' rings driven directly:
//! a guest that negotiated the offloads sends a TSO frame or a frame with a partial checksum;
//! a receiver that negotiated the matching GUEST_* feature gets it whole, with the header that
//! hands the work on; one that did not gets finished frames (segments whose checksums an
//! independent check accepts). Hostile offload headers are dropped and counted, and the queue
//! goes on.

#![allow(clippy::unwrap_used)]

mod net_guest;

use driver_domain::net::config::{
    NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_ECN, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6,
    NET_F_HOST_ECN, NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_MRG_RXBUF,
};
use driver_domain::net::header::{GSO_TCPV4, GSO_TCPV6, GSO_UDP, HDR_F_NEEDS_CSUM, HDR_LEN};
use driver_domain::net::{Switch, SwitchConfig};
use net_guest::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

const BASE: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << NET_F_MRG_RXBUF;
const HOST: u64 =
    1 << NET_F_CSUM | 1 << NET_F_HOST_TSO4 | 1 << NET_F_HOST_TSO6 | 1 << NET_F_HOST_ECN;
const GUEST: u64 =
    1 << NET_F_GUEST_CSUM | 1 << NET_F_GUEST_TSO4 | 1 << NET_F_GUEST_TSO6 | 1 << NET_F_GUEST_ECN;

fn vhdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> Vec<u8> {
    let mut h = vec![0u8; HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

/// A TCPv4 frame from guest 1 (10.0.0.1) to unknown unicast 2:0:0:0:0:9 (flooded), as Linux
/// hands it to virtio-net: the TCP checksum field holds the pseudo-header sum (over the
/// whole TCP length, which is right for a single segment).
fn tcp4(payload: usize) -> Vec<u8> {
    let mut f = frame(9, 1, 14, 0);
    let tot = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 9]);
    f.extend_from_slice(&[0x9c, 0x40, 0x04, 0xd2, 0, 0, 0x10, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x50, 0x18, 0x01, 0xf6, 0, 0, 0, 0]);
    f.extend((0..payload).map(|i| (i * 7 % 256) as u8));
    let ip_sum = ones(&f[14..34], 0);
    f[24..26].copy_from_slice(&(!ip_sum).to_be_bytes());
    let pseudo = ones(&f[26..34], 6 + (20 + payload) as u32);
    f[50..52].copy_from_slice(&pseudo.to_be_bytes());
    f
}

/// One's-complement sum (independent of the backend's code), folded, not complemented.
fn ones(data: &[u8], start: u32) -> u16 {
    let mut s = u64::from(start);
    for w in data.chunks(2) {
        s += u64::from(w[0]) << 8 | u64::from(*w.get(1).unwrap_or(&0));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The IPv4 header and TCP checksums of `f` are valid.
fn checksums_ok(f: &[u8]) -> bool {
    let tcp_len = f.len() - 34;
    let pseudo = u32::from(ones(&f[26..34], 6 + tcp_len as u32));
    ones(&f[14..34], 0) == 0xffff && ones(&f[34..], pseudo) == 0xffff
}

#[test]
fn tso_frame_reaches_a_tso_guest_whole_and_others_in_segments() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest_with(&sw, "a", BASE | HOST | GUEST);
    let mut b = guest_with(&sw, "b", BASE | HOST | GUEST);
    let mut c = guest_with(&sw, "c", BASE);
    b.refill(40, 2048);
    c.refill(40, 2048);
    let f = tcp4(4000);
    let mut chain = vhdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
    chain.extend_from_slice(&f);
    a.send_large(&chain);
    assert_eq!(a.port.counters().tx_invalid, 0);
    assert!(
        sw.pool().allocated_large() >= 1,
        "the frame travels in a large buffer"
    );

    // b negotiated GUEST_TSO4: the frame as sent, the header handing the work on.
    let got = b.receive_frames();
    assert_eq!(got.len(), 1);
    let h = &got[0][..HDR_LEN];
    assert_eq!(h[0], HDR_F_NEEDS_CSUM);
    assert_eq!(h[1], GSO_TCPV4);
    assert_eq!(u16::from_le_bytes([h[2], h[3]]), 54, "hdr_len as found");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1448);
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34);
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16);
    assert_eq!(
        usize::from(num_buffers(h)),
        (HDR_LEN + f.len()).div_ceil(2048)
    );
    assert_eq!(&got[0][HDR_LEN..], &f[..]);

    // c did not: three segments, each finished.
    let segs = c.receive_frames();
    assert_eq!(segs.len(), 3);
    let mut payload = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(&s[..10], &[0u8; 10], "nothing left to do on segment {i}");
        let seg = &s[HDR_LEN..];
        assert!(seg.len() <= 1514);
        assert!(checksums_ok(seg), "segment {i} checksums");
        let seq = u32::from_be_bytes([seg[38], seg[39], seg[40], seg[41]]);
        assert_eq!(seq, 0x1000 + 1448 * i as u32);
        assert_eq!(seg[47] & 0x08 != 0, i == 2, "PSH on the last segment only");
        payload.extend_from_slice(&seg[54..]);
    }
    assert_eq!(payload, f[54..]);
    assert_eq!(c.port.counters().rx_frames, 3);
    // Every buffer is back in the pool.
    drop((a, b, c));
    assert_eq!(
        sw.pool().free(),
        sw.pool().allocated(),
        "all small buffers returned"
    );
}

#[test]
fn partial_checksum_is_handed_on_or_completed() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest_with(&sw, "a", BASE | HOST);
    let mut b = guest_with(&sw, "b", BASE | 1 << NET_F_GUEST_CSUM);
    let mut c = guest_with(&sw, "c", BASE);
    b.refill(4, 2048);
    c.refill(4, 2048);
    let f = tcp4(300);
    assert!(!checksums_ok(&f), "the TCP checksum is partial");
    let mut chain = vhdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16);
    chain.extend_from_slice(&f);
    a.send_raw(&chain);
    let got = b.receive_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][..10], &chain[..10], "the header is handed on");
    assert_eq!(&got[0][HDR_LEN..], &f[..]);
    let got = c.receive_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][..10], &[0u8; 10]);
    assert!(checksums_ok(&got[0][HDR_LEN..]), "completed by the switch");
    assert_eq!(
        &got[0][HDR_LEN..HDR_LEN + 50],
        &f[..50],
        "only the checksum changed"
    );
}

#[test]
fn a_tso_guest_without_guest_ecn_gets_ecn_frames_in_segments() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest_with(&sw, "a", BASE | HOST);
    let mut b = guest_with(&sw, "b", BASE | (GUEST & !(1 << NET_F_GUEST_ECN)));
    b.refill(8, 2048);
    let mut f = tcp4(2000);
    f[47] |= 0x80; // CWR
    let mut chain = vhdr(HDR_F_NEEDS_CSUM, GSO_TCPV4 | 0x80, 54, 1000, 34, 16);
    chain.extend_from_slice(&f);
    a.send_large(&chain);
    let segs = b.receive_frames();
    assert_eq!(segs.len(), 2);
    assert_ne!(segs[0][HDR_LEN + 47] & 0x80, 0, "CWR on the first segment");
    assert_eq!(segs[1][HDR_LEN + 47] & 0x80, 0, "and not on the next");
    assert!(segs.iter().all(|s| checksums_ok(&s[HDR_LEN..])));
}

#[test]
fn hostile_offload_headers_are_dropped_and_counted() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest_with(&sw, "a", BASE | HOST);
    let mut plain = guest_with(&sw, "p", BASE);
    let mut b = guest_with(&sw, "b", BASE | GUEST);
    b.refill(60, 2048);
    let f = tcp4(4000);
    let mut udp = f.clone();
    udp[23] = 17;
    let huge = vec![0u8; 70_000];
    let cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
        ("gso_size 0", vhdr(1, GSO_TCPV4, 54, 0, 34, 16), &f),
        ("gso_size huge", vhdr(1, GSO_TCPV4, 54, 60000, 34, 16), &f),
        (
            "hdr_len past the frame",
            vhdr(1, GSO_TCPV4, 5000, 1448, 34, 16),
            &f,
        ),
        (
            "csum_start past the frame",
            vhdr(1, 0, 0, 0, 4100, 16),
            &f[..1000],
        ),
        (
            "csum not at TCP's",
            vhdr(1, GSO_TCPV4, 54, 1448, 14, 16),
            &f,
        ),
        (
            "GSO without NEEDS_CSUM",
            vhdr(0, GSO_TCPV4, 54, 1448, 34, 16),
            &f,
        ),
        ("UDP GSO type", vhdr(1, GSO_UDP, 54, 1448, 34, 16), &f),
        (
            "TCPv6 type on IPv4",
            vhdr(1, GSO_TCPV6, 54, 1448, 34, 16),
            &f,
        ),
        ("not TCP", vhdr(1, GSO_TCPV4, 54, 1448, 34, 16), &udp),
        (
            "headers only",
            vhdr(1, GSO_TCPV4, 54, 1448, 34, 16),
            &f[..54],
        ),
        ("non-GSO past the MTU", vhdr(1, 0, 0, 0, 34, 16), &f),
        ("past 64 KiB", vhdr(1, GSO_TCPV4, 54, 1448, 34, 16), &huge),
    ];
    for (i, (what, mut chain, frame)) in cases.into_iter().enumerate() {
        chain.extend_from_slice(frame);
        a.send_large(&chain);
        assert_eq!(a.port.counters().tx_invalid, i as u64 + 1, "{what}");
    }
    // A guest that did not negotiate TSO cannot send a GSO frame.
    let mut chain = vhdr(1, GSO_TCPV4, 54, 1448, 34, 16);
    chain.extend_from_slice(&f);
    plain.send_large(&chain);
    assert_eq!(plain.port.counters().tx_invalid, 1);
    assert!(b.receive_frames().is_empty(), "nothing hostile got through");
    // The queue goes on.
    let mut chain = vhdr(1, GSO_TCPV4, 54, 1448, 34, 16);
    chain.extend_from_slice(&f);
    a.send_large(&chain);
    assert_eq!(b.receive_frames().len(), 1);
}

#[test]
fn segmentation_waits_for_receive_buffers_and_resumes() {
    let sw = Switch::new(SwitchConfig::default());
    let mut a = guest_with(&sw, "a", BASE | HOST);
    let mut c = guest_with(&sw, "c", BASE);
    let f = tcp4(5000);
    let mut chain = vhdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1000, 34, 16);
    chain.extend_from_slice(&f);
    a.send_large(&chain);
    c.refill(2, 2048);
    let first = c.receive_frames();
    assert_eq!(first.len(), 2, "as many segments as buffers");
    assert!(c.receive_frames().is_empty(), "no buffers, nothing more");
    c.refill(8, 2048);
    let rest = c.receive_frames();
    assert_eq!(rest.len(), 3);
    let payload: Vec<u8> = first
        .iter()
        .chain(&rest)
        .flat_map(|s| s[HDR_LEN + 54..].to_vec())
        .collect();
    assert_eq!(payload, f[54..], "every byte once, in order");
    assert!(first
        .iter()
        .chain(&rest)
        .all(|s| checksums_ok(&s[HDR_LEN..])));
    assert_eq!(c.port.counters().rx_frames, 5);
}
