use super::*;

/// RFC 1071 section 3's example: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
#[test]
fn rfc1071_example() {
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(sum(&data, 0)), !0xddf2);
    assert_eq!(fold(sum(&data, 0)), 0x220d);
    // An odd trailing byte counts as the high byte of a word.
    assert_eq!(fold(sum(&[0x01], 0)), !0x0100);
}

/// The IPv4 header of Wikipedia's "Internet checksum" example (checksum b861).
#[test]
fn ipv4_header_known_answer() {
    let mut h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(fold(sum(&h, 0)), 0xb861);
    h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
    // A valid header sums to 0xffff.
    assert_eq!(fold(sum(&h, 0)), 0);
}

/// An independent check of a TCP segment's checksum: the one's-complement sum of the
/// pseudo-header and the segment, field included, is 0xffff.
fn tcp_checksum_ok(frame: &[u8], l3: usize, l4: usize, v6: bool) -> bool {
    let mut words: Vec<u8> = Vec::new();
    if v6 {
        words.extend_from_slice(&frame[l3 + 8..l3 + 40]);
        words.extend_from_slice(&((frame.len() - l4) as u32).to_be_bytes());
        words.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        words.extend_from_slice(&frame[l3 + 12..l3 + 20]);
        words.extend_from_slice(&[0, 6]);
        words.extend_from_slice(&((frame.len() - l4) as u16).to_be_bytes());
    }
    words.extend_from_slice(&frame[l4..]);
    let mut s: u64 = 0;
    for w in words.chunks(2) {
        s += u64::from(w[0]) << 8 | u64::from(*w.get(1).unwrap_or(&0));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

const MAC_HDR: [u8; 12] = [2, 0, 0, 0, 3, 0, 2, 0, 0, 0, 2, 0];

/// A TSO frame as Linux hands it to virtio-net: IPv4 (id 0x1c46, DF), TCP with timestamps
/// (32-byte header), seq 0x01020304, PSH|ACK|FIN|CWR set, checksum field holding the
/// pseudo-header sum; payload bytes `i % 251`.
fn tso4_frame(payload: usize, vlan: bool) -> Vec<u8> {
    let mut f = MAC_HDR.to_vec();
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    }
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + 32 + payload) as u16;
    f.extend_from_slice(&[0x45, 0x00]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 3]);
    f.extend_from_slice(&[0x9c, 0x40, 0x04, 0xd2]); // ports 40000 -> 1234
    f.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 9]); // seq, ack
    f.extend_from_slice(&[0x80, 0x80 | 0x10 | 0x08 | 0x01, 0x01, 0xf6, 0, 0, 0, 0]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]); // NOP NOP TS
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f
}

fn tso6_frame(payload: usize) -> Vec<u8> {
    let mut f = MAC_HDR.to_vec();
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[6, 64]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    f.extend_from_slice(&[0x9c, 0x40, 0x04, 0xd2, 0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 9]);
    f.extend_from_slice(&[0x50, 0x18, 0x01, 0xf6, 0, 0, 0, 0]);
    f.extend((0..payload).map(|i| (i % 7) as u8));
    f
}

fn cut(frame: &[u8], g: Gso) -> Vec<Vec<u8>> {
    let mut s = Segments::new(frame, g);
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_FRAME];
    while let Some(n) = s.write_next(frame, &mut buf) {
        out.push(buf[..n].to_vec());
    }
    assert_eq!(s.remaining(), 0);
    out
}

#[test]
fn tcpv4_segments_carry_lengths_ids_seq_flags_and_checksums() {
    let f = tso4_frame(4000, false);
    let g = parse_gso(&f, GSO_TCPV4, 1448, (34, 16)).unwrap();
    assert_eq!(g.l3, 14);
    assert_eq!(g.l4, 34);
    assert_eq!(g.hdr_len, 66);
    let segs = cut(&f, g);
    assert_eq!(segs.len(), 3);
    let mut payload = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let data_len = if i < 2 { 1448 } else { 4000 - 2 * 1448 };
        assert_eq!(s.len(), 66 + data_len);
        assert_eq!(u16::from_be_bytes([s[16], s[17]]) as usize, s.len() - 14);
        assert_eq!(u16::from_be_bytes([s[18], s[19]]), 0x1c46 + i as u16);
        assert_eq!(
            fold(sum(&s[14..34], 0)),
            0,
            "IPv4 header checksum of segment {i}"
        );
        let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
        assert_eq!(seq, 0x01020304 + (i * 1448) as u32);
        let flags = s[47];
        assert_eq!(flags & 0x10, 0x10, "ACK on every segment");
        assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on the first");
        assert_eq!(flags & 0x09 != 0, i == 2, "FIN/PSH only on the last");
        assert!(
            tcp_checksum_ok(s, 14, 34, false),
            "TCP checksum of segment {i}"
        );
        assert_eq!(&s[..34 - 20], &f[..14]);
        payload.extend_from_slice(&s[66..]);
    }
    assert_eq!(payload, f[66..]);
}

#[test]
fn tcpv4_behind_a_vlan_tag_and_seq_wrapping_v6() {
    let f = tso4_frame(3000, true);
    let g = parse_gso(&f, GSO_TCPV4 | GSO_ECN, 1000, (38, 16)).unwrap();
    assert!(g.ecn);
    assert_eq!((g.l3, g.l4), (18, 38));
    let segs = cut(&f, g);
    assert_eq!(segs.len(), 3);
    for s in &segs {
        assert_eq!(&s[12..16], &[0x81, 0, 0, 5]);
        assert!(tcp_checksum_ok(s, 18, 38, false));
    }
    let f = tso6_frame(2500);
    let g = parse_gso(&f, GSO_TCPV6, 1440, (54, 16)).unwrap();
    assert_eq!(g.ip, IpVersion::V6);
    let segs = cut(&f, g);
    assert_eq!(segs.len(), 2);
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(
            usize::from(u16::from_be_bytes([s[18], s[19]])),
            s.len() - 54
        );
        let seq = u32::from_be_bytes([s[58], s[59], s[60], s[61]]);
        assert_eq!(seq, 0xffff_fff0u32.wrapping_add((i * 1440) as u32));
        assert!(
            tcp_checksum_ok(s, 14, 54, true),
            "TCPv6 checksum of segment {i}"
        );
        assert_eq!(s[67] & 0x08 != 0, i == 1, "PSH only on the last");
    }
}

#[test]
fn partial_checksum_is_completed_like_linux() {
    // A single TCP segment with the pseudo-header sum in its checksum field, as Linux leaves
    // it for CHECKSUM_PARTIAL.
    let mut f = tso4_frame(100, false);
    let g = parse_gso(&f, GSO_TCPV4, 1448, (34, 16)).unwrap();
    let segs = cut(&f, g);
    let full = segs[0].clone();
    let mut pseudo = sum(&f[26..34], 0) + 6 + (f.len() - 34) as u32;
    while pseudo > 0xffff {
        pseudo = (pseudo & 0xffff) + (pseudo >> 16);
    }
    f[50..52].copy_from_slice(&(pseudo as u16).to_be_bytes());
    complete_checksum(&mut f, 34, 16);
    assert_eq!(&f[50..52], &full[50..52]);
    assert!(tcp_checksum_ok(&f, 14, 34, false));
    // A range past the frame is left alone.
    let before = f.clone();
    complete_checksum(&mut f, 100, 200);
    assert_eq!(f, before);
}

#[test]
fn hostile_gso_headers_are_refused() {
    let f = tso4_frame(3000, false);
    let ok = |t, size, c| parse_gso(&f, t, size, c);
    assert!(ok(GSO_TCPV4, 1448, (34, 16)).is_ok());
    assert_eq!(
        ok(GSO_TCPV4, 0, (34, 16)),
        Err(OffloadError::SegmentSize(0))
    );
    assert_eq!(
        ok(GSO_TCPV4, 1453, (34, 16)),
        Err(OffloadError::SegmentSize(1453))
    );
    assert_eq!(
        ok(GSO_TCPV4, u16::MAX, (34, 16)),
        Err(OffloadError::SegmentSize(u16::MAX))
    );
    assert!(matches!(
        ok(GSO_TCPV4, 1448, (14, 16)),
        Err(OffloadError::CsumPosition { .. })
    ));
    assert!(matches!(
        ok(GSO_TCPV4, 1448, (34, 6)),
        Err(OffloadError::CsumPosition { .. })
    ));
    assert_eq!(
        ok(GSO_TCPV6, 1448, (34, 16)),
        Err(OffloadError::EtherType(0x0800))
    );
    assert_eq!(ok(3, 1448, (34, 16)), Err(OffloadError::EtherType(0x0800)));
    // UDP in an IPv4 header.
    let mut u = f.clone();
    u[23] = 17;
    assert_eq!(
        parse_gso(&u, GSO_TCPV4, 1448, (34, 16)),
        Err(OffloadError::NotTcp(17))
    );
    // A fragment, a bad IHL, a TCP data offset past the frame, headers only.
    let mut fr = f.clone();
    fr[20] = 0x20;
    assert_eq!(
        parse_gso(&fr, GSO_TCPV4, 1448, (34, 16)),
        Err(OffloadError::Fragment)
    );
    let mut ihl = f.clone();
    ihl[14] = 0x44;
    assert_eq!(
        parse_gso(&ihl, GSO_TCPV4, 1448, (34, 16)),
        Err(OffloadError::IpHeader)
    );
    let short = &f[..60];
    assert_eq!(
        parse_gso(short, GSO_TCPV4, 1448, (34, 16)),
        Err(OffloadError::TcpHeader)
    );
    assert_eq!(
        parse_gso(&f[..66], GSO_TCPV4, 1448, (34, 16)),
        Err(OffloadError::NoPayload)
    );
    for n in 0..66 {
        assert!(parse_gso(&f[..n], GSO_TCPV4, 1448, (34, 16)).is_err());
    }
    // IPv6 with an extension header next.
    let mut v6 = tso6_frame(100);
    v6[20] = 0;
    assert_eq!(
        parse_gso(&v6, GSO_TCPV6, 1000, (54, 16)),
        Err(OffloadError::NotTcp(0))
    );
}

#[test]
fn tiny_segments_stay_in_bounds() {
    let f = tso4_frame(300, false);
    let g = parse_gso(&f, GSO_TCPV4, 1, (34, 16)).unwrap();
    let segs = cut(&f, g);
    assert_eq!(segs.len(), 300);
    assert!(segs.iter().all(|s| s.len() == 67));
    // A buffer too small for a segment gets nothing written and ends the iteration.
    let mut s = Segments::new(&f, parse_gso(&f, GSO_TCPV4, 1448, (34, 16)).unwrap());
    let mut small = [0u8; 100];
    assert_eq!(s.write_next(&f, &mut small), None);
}

#[test]
fn rx_header_hands_the_work_on() {
    let f = tso4_frame(3000, false);
    let g = parse_gso(&f, GSO_TCPV4 | GSO_ECN, 1448, (34, 16)).unwrap();
    let o = Offload {
        csum: Some((34, 16)),
        gso: Some(g),
    };
    let h = o.rx_header(2);
    assert_eq!(h[0], HDR_F_NEEDS_CSUM);
    assert_eq!(h[1], GSO_TCPV4 | GSO_ECN);
    assert_eq!(u16::from_le_bytes([h[2], h[3]]), 66);
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1448);
    assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34);
    assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16);
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 2);
    assert_eq!(
        Offload::NONE.rx_header(1),
        super::super::header::rx_header(1)
    );
}
