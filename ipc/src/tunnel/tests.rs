//! Unit tests of the tunnel framing and the vhost-user message walk.

use super::vhost_msg::{
    encode_message, frontend_fd_roles, mask_protocol_features_reply, mem_table_regions,
    relayable_protocol_features, rewrite_mmap_offsets, FdRole, MsgHeader, VhostMsgError,
};
use super::*;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserMemory, VhostUserMemoryRegion,
};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;

fn vhost_get_features() -> Vec<u8> {
    encode_message(FrontendReq::GET_FEATURES.into(), 0, &[])
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::hello(),
        Frame::open(3),
        Frame::vhost(
            3,
            vec![
                Ref::memory(0x20_0000),
                Ref::doorbell(49),
                Ref::polled(1),
                Ref::none(),
            ],
            vhost_get_features(),
        ),
        Frame::close(15),
    ]
}

fn decode_all(d: &mut FrameDecoder) -> Vec<Result<Frame, TunnelError>> {
    let mut out = Vec::new();
    loop {
        match d.next_frame() {
            Ok(None) => return out,
            Ok(Some(f)) => out.push(Ok(f)),
            Err(e) => out.push(Err(e)),
        }
    }
}

fn header(magic: u32, channel: u16, kind: u8, nrefs: u8, len: u32) -> Vec<u8> {
    let mut b = magic.to_le_bytes().to_vec();
    b.extend_from_slice(&channel.to_le_bytes());
    b.push(kind);
    b.push(nrefs);
    b.extend_from_slice(&len.to_le_bytes());
    b
}

#[test]
fn frames_round_trip_whole_and_byte_by_byte() {
    let frames = sample_frames();
    let mut stream = Vec::new();
    for f in &frames {
        f.encode_into(&mut stream).expect("encode");
    }
    let mut whole = FrameDecoder::new();
    whole.push(&stream);
    let got: Vec<Frame> = decode_all(&mut whole)
        .into_iter()
        .map(|r| r.expect("frame"))
        .collect();
    assert_eq!(got, frames);
    assert_eq!(whole.buffered(), 0);

    let mut bytewise = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &stream {
        bytewise.push(std::slice::from_ref(b));
        got.extend(
            decode_all(&mut bytewise)
                .into_iter()
                .map(|r| r.expect("frame")),
        );
    }
    assert_eq!(got, frames);
    assert_eq!(bytewise.discarded(), 0);
}

#[test]
fn encoding_is_the_documented_layout() {
    let f = Frame::vhost(0x0102, vec![Ref::doorbell(0x11)], vhost_get_features());
    let b = f.encode().expect("encode");
    assert_eq!(&b[..4], b"TUNL");
    assert_eq!(&b[4..6], &[0x02, 0x01]);
    assert_eq!(b[6], 4);
    assert_eq!(b[7], 1);
    assert_eq!(&b[8..12], &12u32.to_le_bytes());
    assert_eq!(&b[12..16], &[2, 0, 0, 0]);
    assert_eq!(&b[16..20], &0x11u32.to_le_bytes());
    assert_eq!(&b[20..28], &0u64.to_le_bytes());
    assert_eq!(&b[28..], &vhost_get_features()[..]);
    assert_eq!(b.len(), f.wire_len());
    assert_eq!(Frame::hello().hello_version(), Some(VERSION));
    assert_eq!(Frame::open(1).hello_version(), None);
}

#[test]
fn largest_frame_round_trips_and_larger_ones_do_not_encode() {
    let mut msg = vhost_get_features();
    msg.resize(PAYLOAD_MAX, 0xa5);
    let refs: Vec<Ref> = (0..REFS_MAX as u32).map(Ref::doorbell).collect();
    let f = Frame::vhost(1, refs.clone(), msg.clone());
    let b = f.encode().expect("largest frame");
    assert_eq!(b.len(), FRAME_MAX);
    let mut d = FrameDecoder::new();
    d.push(&b);
    assert_eq!(d.next_frame(), Ok(Some(f)));

    msg.push(0);
    assert_eq!(
        Frame::vhost(1, Vec::new(), msg).encode(),
        Err(TunnelError::PayloadTooLong(PAYLOAD_MAX as u32 + 1))
    );
    let mut more = refs;
    more.push(Ref::none());
    assert_eq!(
        Frame::vhost(1, more, vhost_get_features()).encode(),
        Err(TunnelError::TooManyRefs(REFS_MAX as u8 + 1))
    );
    assert!(matches!(
        Frame::vhost(1, Vec::new(), vec![0; 11]).encode(),
        Err(TunnelError::BadShape { .. })
    ));
}

/// Each bad header is reported once, then the decoder finds the valid frame behind it.
#[test]
fn every_malformed_header_is_rejected_and_the_stream_recovers() {
    let cases: Vec<(Vec<u8>, TunnelError)> = vec![
        (
            header(0x4c4e_5555, 0, 2, 0, 0),
            TunnelError::BadMagic(0x4c4e_5555),
        ),
        (
            header(MAGIC, 0, 4, 0, PAYLOAD_MAX as u32 + 1),
            TunnelError::PayloadTooLong(65537),
        ),
        (header(MAGIC, 0, 4, 33, 12), TunnelError::TooManyRefs(33)),
        (header(MAGIC, 0, 4, 255, 12), TunnelError::TooManyRefs(255)),
        (header(MAGIC, 0, 0, 0, 0), TunnelError::UnknownKind(0)),
        (header(MAGIC, 0, 7, 0, 0), TunnelError::UnknownKind(7)),
    ];
    let good = Frame::open(7);
    for (bad, want) in cases {
        let mut d = FrameDecoder::new();
        d.push(&bad);
        d.push(&good.encode().expect("encode"));
        let got = decode_all(&mut d);
        assert_eq!(got, vec![Err(want.clone()), Ok(good.clone())], "{want}");
        assert_eq!(d.discarded(), HEADER_LEN as u64, "{want}");
    }
}

/// A trusted header with a shape its kind forbids, or a bad reference: the frame is skipped
/// whole and the next one decodes without resynchronising.
#[test]
fn bad_shapes_and_references_skip_exactly_one_frame() {
    let mut bad_ref = header(MAGIC, 2, 4, 1, 12);
    bad_ref.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    bad_ref.extend_from_slice(&vhost_get_features());
    let mut reserved = header(MAGIC, 2, 4, 1, 12);
    reserved.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    reserved.extend_from_slice(&vhost_get_features());
    let mut hello_refs = header(MAGIC, 0, 1, 1, 4);
    hello_refs.extend_from_slice(
        &Frame::vhost(0, vec![Ref::none()], vec![0; 12])
            .encode()
            .expect("e")[12..28],
    );
    hello_refs.extend_from_slice(&1u32.to_le_bytes());
    let mut hello_short = header(MAGIC, 0, 1, 0, 3);
    hello_short.extend_from_slice(&[1, 0, 0]);
    let mut open_payload = header(MAGIC, 1, 2, 0, 1);
    open_payload.push(0);
    let mut vhost_short = header(MAGIC, 1, 4, 0, 11);
    vhost_short.extend_from_slice(&[0; 11]);
    type Check = fn(&TunnelError) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (bad_ref, |e| {
            *e == TunnelError::UnknownRefKind {
                channel: 2,
                kind: 9,
            }
        }),
        (reserved, |e| *e == TunnelError::RefReserved { channel: 2 }),
        (hello_refs, |e| {
            matches!(
                e,
                TunnelError::BadShape {
                    kind: FrameKind::Hello,
                    nrefs: 1,
                    ..
                }
            )
        }),
        (hello_short, |e| {
            matches!(
                e,
                TunnelError::BadShape {
                    kind: FrameKind::Hello,
                    len: 3,
                    ..
                }
            )
        }),
        (open_payload, |e| {
            matches!(
                e,
                TunnelError::BadShape {
                    kind: FrameKind::Open,
                    ..
                }
            )
        }),
        (
            header(MAGIC, 1, 3, 0, 0)
                .into_iter()
                .chain(header(MAGIC, 0, 0, 0, 0))
                .collect(),
            |_| false,
        ),
        (vhost_short, |e| {
            matches!(
                e,
                TunnelError::BadShape {
                    kind: FrameKind::Vhost,
                    len: 11,
                    ..
                }
            )
        }),
    ];
    for (i, (bad, want)) in cases.into_iter().enumerate() {
        if i == 5 {
            // A valid CLOSE followed by a bad kind: the CLOSE decodes, then the error.
            let mut d = FrameDecoder::new();
            d.push(&bad);
            let got = decode_all(&mut d);
            assert_eq!(
                got,
                vec![Ok(Frame::close(1)), Err(TunnelError::UnknownKind(0))]
            );
            continue;
        }
        let mut d = FrameDecoder::new();
        d.push(&bad);
        d.push(&Frame::close(4).encode().expect("encode"));
        let got = decode_all(&mut d);
        assert_eq!(got.len(), 2, "case {i}: {got:?}");
        assert!(got[0].as_ref().is_err_and(want), "case {i}: {got:?}");
        assert_eq!(got[1], Ok(Frame::close(4)), "case {i}");
        assert_eq!(d.discarded(), 0, "case {i}: skipped whole, no resync");
    }
}

#[test]
fn garbage_is_reported_once_and_a_split_magic_is_found() {
    let mut d = FrameDecoder::new();
    // Console noise before the first frame (a kernel message on the wrong port, say).
    d.push(b"[    0.000000] Linux version 6.1\r\n");
    assert!(matches!(d.next_frame(), Err(TunnelError::BadMagic(_))));
    assert_eq!(d.next_frame(), Ok(None));
    let frame = Frame::hello().encode().expect("encode");
    // The magic arrives split over two pushes, with more noise in between frames.
    d.push(&frame[..2]);
    assert_eq!(d.next_frame(), Ok(None));
    d.push(&frame[2..]);
    assert_eq!(d.next_frame(), Ok(Some(Frame::hello())));
    assert_eq!(d.discarded(), 34);
    // Noise between frames, split over pushes: one error, then the next frame.
    d.push(b"xyzTU");
    d.push(b"Npq\r\n");
    assert_eq!(
        d.next_frame(),
        Ok(None),
        "under a header's worth: nothing to say yet"
    );
    d.push(&Frame::open(2).encode().expect("encode"));
    let got = decode_all(&mut d);
    assert!(matches!(got[0], Err(TunnelError::BadMagic(_))), "{got:?}");
    assert_eq!(got[1..], [Ok(Frame::open(2))]);
    assert_eq!(d.discarded(), 34 + 10);
}

#[test]
fn a_partial_frame_waits_for_its_bytes() {
    let f = Frame::vhost(0, vec![Ref::polled(0)], vhost_get_features());
    let b = f.encode().expect("encode");
    let mut d = FrameDecoder::new();
    d.push(&b[..b.len() - 1]);
    assert_eq!(d.next_frame(), Ok(None));
    assert_eq!(d.buffered(), b.len() - 1);
    d.push(&b[b.len() - 1..]);
    assert_eq!(d.next_frame(), Ok(Some(f)));
}

fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut body = VhostUserMemory::new(regions.len() as u32)
        .as_slice()
        .to_vec();
    for &(gpa, size, ua, off) in regions {
        body.extend_from_slice(VhostUserMemoryRegion::new(gpa, size, ua, off).as_slice());
    }
    encode_message(FrontendReq::SET_MEM_TABLE.into(), 0, &body)
}

fn vring_fd_msg(req: FrontendReq, value: u64) -> Vec<u8> {
    encode_message(req.into(), 0, &value.to_ne_bytes())
}

#[test]
fn fd_roles_of_each_request() {
    let m = mem_table(&[
        (0, 0x1000, 0x7f00_0000, 0),
        (0x10_0000, 0x2000, 0x7f10_0000, 0x1000),
    ]);
    assert_eq!(
        frontend_fd_roles(&m, 2),
        Ok(vec![
            FdRole::MemoryRegion { region: 0 },
            FdRole::MemoryRegion { region: 1 }
        ])
    );
    assert!(matches!(
        frontend_fd_roles(&m, 1),
        Err(VhostMsgError::FdCount {
            expected: 2,
            got: 1,
            ..
        })
    ));
    assert_eq!(
        frontend_fd_roles(&vring_fd_msg(FrontendReq::SET_VRING_KICK, 3), 1),
        Ok(vec![FdRole::Kick { queue: 3 }])
    );
    assert_eq!(
        frontend_fd_roles(&vring_fd_msg(FrontendReq::SET_VRING_CALL, 1), 1),
        Ok(vec![FdRole::Call { queue: 1 }])
    );
    assert_eq!(
        frontend_fd_roles(&vring_fd_msg(FrontendReq::SET_VRING_ERR, 0), 1),
        Ok(vec![FdRole::Err { queue: 0 }])
    );
    assert_eq!(
        frontend_fd_roles(&vring_fd_msg(FrontendReq::SET_VRING_CALL, 0x101), 0),
        Ok(vec![])
    );
    assert!(frontend_fd_roles(&vring_fd_msg(FrontendReq::SET_VRING_CALL, 0x101), 1).is_err());
    assert!(matches!(
        frontend_fd_roles(&vring_fd_msg(FrontendReq::SET_VRING_CALL, 0x200), 1),
        Err(VhostMsgError::BadBody { .. })
    ));
    let inflight = encode_message(FrontendReq::SET_INFLIGHT_FD.into(), 0, &[0; 24]);
    assert_eq!(frontend_fd_roles(&inflight, 1), Ok(vec![FdRole::Inflight]));
    assert!(frontend_fd_roles(&inflight, 0).is_err());
    let short = encode_message(FrontendReq::SET_INFLIGHT_FD.into(), 0, &[0; 16]);
    assert!(matches!(
        frontend_fd_roles(&short, 1),
        Err(VhostMsgError::BadBody { .. })
    ));
    let backend = encode_message(FrontendReq::SET_BACKEND_REQ_FD.into(), 0, &[]);
    assert_eq!(
        frontend_fd_roles(&backend, 1),
        Ok(vec![FdRole::Unrelayable])
    );
    // An fd on a request that carries none.
    assert!(matches!(
        frontend_fd_roles(&vhost_get_features(), 1),
        Err(VhostMsgError::FdCount {
            expected: 0,
            got: 1,
            ..
        })
    ));
    assert_eq!(frontend_fd_roles(&vhost_get_features(), 0), Ok(vec![]));
}

#[test]
fn malformed_messages_are_errors() {
    assert_eq!(MsgHeader::parse(&[0; 11]), Err(VhostMsgError::Short(11)));
    let mut m = vhost_get_features();
    m[8] = 4;
    assert_eq!(
        MsgHeader::parse(&m),
        Err(VhostMsgError::SizeMismatch { said: 4, got: 0 })
    );
    let mut m = vhost_get_features();
    m[4] = 2;
    assert_eq!(MsgHeader::parse(&m), Err(VhostMsgError::BadFlags(2)));
    let mut m = vhost_get_features();
    m[5] = 1;
    assert!(matches!(
        MsgHeader::parse(&m),
        Err(VhostMsgError::BadFlags(_))
    ));
    let m = encode_message(999, 0, &[]);
    assert_eq!(
        frontend_fd_roles(&m, 0),
        Err(VhostMsgError::UnknownRequest(999))
    );
    let big = encode_message(FrontendReq::SET_CONFIG.into(), 0, &vec![0; 0x1001]);
    assert_eq!(MsgHeader::parse(&big), Err(VhostMsgError::TooLong(0x1001)));
    // A memory table whose count disagrees with its length, or with no region.
    let mut m = mem_table(&[(0, 0x1000, 0, 0)]);
    m[12] = 2;
    assert!(matches!(
        frontend_fd_roles(&m, 2),
        Err(VhostMsgError::BadBody { .. })
    ));
    let m = mem_table(&[]);
    assert_eq!(frontend_fd_roles(&m, 0), Err(VhostMsgError::RegionCount(0)));
    let m = vring_fd_msg(FrontendReq::SET_VRING_KICK, 0);
    assert!(frontend_fd_roles(&m[..16], 1).is_err());
}

#[test]
fn mmap_offsets_are_rewritten_in_table_order() {
    let mut m = mem_table(&[
        (0, 0x1000, 0x7f00_0000, 0x40),
        (0x10_0000, 0x2000, 0x7f10_0000, 0x80),
    ]);
    let before = mem_table_regions(&m[12..]).expect("table");
    rewrite_mmap_offsets(&mut m, &[0x20_0000, 0x40_0000]).expect("rewrite");
    let after = mem_table_regions(&m[12..]).expect("table");
    assert_eq!(after.len(), 2);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!({ a.guest_phys_addr }, { b.guest_phys_addr });
        assert_eq!({ a.memory_size }, { b.memory_size });
        assert_eq!({ a.user_addr }, { b.user_addr });
    }
    assert_eq!({ after[0].mmap_offset }, 0x20_0000);
    assert_eq!({ after[1].mmap_offset }, 0x40_0000);
    assert!(rewrite_mmap_offsets(&mut m, &[0]).is_err());
    let mut other = vhost_get_features();
    assert!(rewrite_mmap_offsets(&mut other, &[]).is_err());
}

#[test]
fn protocol_features_replies_are_masked() {
    let all = VhostUserProtocolFeatures::all().bits();
    let reply_flags = VhostUserHeaderFlag::REPLY.bits();
    let mut m = encode_message(
        FrontendReq::GET_PROTOCOL_FEATURES.into(),
        reply_flags,
        &all.to_ne_bytes(),
    );
    assert_eq!(mask_protocol_features_reply(&mut m), Ok(true));
    let got = u64::from_ne_bytes(m[12..20].try_into().expect("8 bytes"));
    assert_eq!(got, relayable_protocol_features().bits());
    let kept = VhostUserProtocolFeatures::from_bits_truncate(got);
    assert!(kept.contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK));
    // The in-flight log crosses: the relay maps it into BAR2.
    assert!(kept.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    assert!(!kept.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert!(!kept.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    assert!(!kept.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    // The request itself, and other replies, pass untouched.
    let mut req = encode_message(FrontendReq::GET_PROTOCOL_FEATURES.into(), 0, &[]);
    let before = req.clone();
    assert_eq!(mask_protocol_features_reply(&mut req), Ok(false));
    assert_eq!(req, before);
    let mut feats = encode_message(
        FrontendReq::GET_FEATURES.into(),
        reply_flags,
        &u64::MAX.to_ne_bytes(),
    );
    assert_eq!(mask_protocol_features_reply(&mut feats), Ok(false));
    let mut short = encode_message(
        FrontendReq::GET_PROTOCOL_FEATURES.into(),
        reply_flags,
        &[0; 4],
    );
    assert!(mask_protocol_features_reply(&mut short).is_err());
}

#[test]
fn inflight_bodies_are_read_and_rewritten() {
    use super::vhost_msg::{inflight_body, rewrite_inflight};
    use vhost::vhost_user::message::VhostUserInflight;
    let shape = VhostUserInflight::new(8192, 0, 2, 256);
    let reply_flags = VhostUserHeaderFlag::REPLY.bits();
    let mut m = encode_message(
        FrontendReq::GET_INFLIGHT_FD.into(),
        reply_flags,
        shape.as_slice(),
    );
    let moved = VhostUserInflight::new(8192, 0x40_0000, 2, 256);
    rewrite_inflight(&mut m, &moved).expect("an in-flight reply");
    let got = inflight_body(FrontendReq::GET_INFLIGHT_FD, &m[12..]).expect("24 bytes");
    assert_eq!(
        (
            got.mmap_size,
            got.mmap_offset,
            got.num_queues,
            got.queue_size
        ),
        (8192, 0x40_0000, 2, 256)
    );
    // Not an in-flight message, or a body of the wrong size: refused, left alone.
    let mut other = encode_message(FrontendReq::SET_FEATURES.into(), 0, &[0; 24]);
    assert!(rewrite_inflight(&mut other, &moved).is_err());
    let mut short = encode_message(FrontendReq::SET_INFLIGHT_FD.into(), 0, &[0; 8]);
    assert!(rewrite_inflight(&mut short, &moved).is_err());
    assert!(inflight_body(FrontendReq::SET_INFLIGHT_FD, &[0; 8]).is_err());
}
