//! Fuzz the offload work the switch does on a guest's behalf: a GSO frame's headers checked
//! against a guest-controlled virtio-net header (`parse_gso`), then cut into segments, and a
//! partial checksum completed at guest-controlled offsets.
//!
//! Input layout: bytes 0..8 are `gso_type`, `gso_size` (2), `csum_start` (2), `csum_offset`
//! (2), a spare byte; the rest is the frame.

#![no_main]

use driver_domain::net::header::MAX_FRAME;
use driver_domain::net::offload::{complete_checksum, parse_gso, Segments};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (h, frame) = data.split_at(8);
    let gso_type = h[0];
    let gso_size = u16::from_le_bytes([h[1], h[2]]);
    let csum = (
        u16::from_le_bytes([h[3], h[4]]),
        u16::from_le_bytes([h[5], h[6]]),
    );
    let mut copy = frame.to_vec();
    complete_checksum(&mut copy, csum.0, csum.1);
    assert_eq!(copy.len(), frame.len());
    if let Ok(g) = parse_gso(frame, gso_type, gso_size, csum) {
        let hdr = usize::from(g.hdr_len);
        assert!(hdr < frame.len());
        let mut segs = Segments::new(frame, g);
        let mut out = vec![0u8; MAX_FRAME];
        let mut payload = 0usize;
        let mut n = 0usize;
        while let Some(len) = segs.write_next(frame, &mut out) {
            assert!(len <= MAX_FRAME && len > hdr);
            payload += len - hdr;
            n += 1;
        }
        assert_eq!(n, segs.count());
        assert_eq!(payload, frame.len() - hdr, "every payload byte once");
    }
});
