//! The few Ethernet frames a guest needs to prove its interface works: ARP requests and
//! answers, and IPv4/UDP datagrams (header checksum checked, UDP checksum 0: optional over
//! IPv4).
//!
//! Every received frame is parsed with bounds checks only (a peer's frame is untrusted): a
//! frame that is not what is looked for gives `None`, never a panic.

const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];
/// The Ethernet broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;

/// One endpoint of a UDP datagram: MAC, IPv4 address, port.
pub type UdpEndpoint = ([u8; 6], [u8; 4], u16);

/// An ARP frame (Ethernet, IPv4) sent to `dst`: sender `sha`/`spa`, target `tha`/`tpa`.
pub fn arp_frame(
    op: u16,
    (sha, spa): ([u8; 6], [u8; 4]),
    (tha, tpa): ([u8; 6], [u8; 4]),
    dst: [u8; 6],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&ETH_ARP);
    // Ethernet, IPv4, 6-byte and 4-byte addresses.
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

/// The Internet checksum of `header` (0 over a header whose checksum field is right).
pub fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame<'a> {
    pub src: UdpEndpoint,
    pub dst: UdpEndpoint,
    pub payload: &'a [u8],
}

impl UdpFrame<'_> {
    /// The frame on the wire.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(42 + self.payload.len());
        f.extend_from_slice(&self.dst.0);
        f.extend_from_slice(&self.src.0);
        f.extend_from_slice(&ETH_IPV4);
        let total = (20 + 8 + self.payload.len()) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64; // TTL
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&self.src.1);
        ip[16..20].copy_from_slice(&self.dst.1);
        let sum = ip_checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&self.src.2.to_be_bytes());
        f.extend_from_slice(&self.dst.2.to_be_bytes());
        f.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(self.payload);
        f
    }

    /// Parses a datagram addressed to `ip` with a correct IPv4 header checksum; None for
    /// anything else or anything malformed.
    pub fn parse(f: &[u8], ip: [u8; 4]) -> Option<UdpFrame<'_>> {
        if f.get(12..14)? != ETH_IPV4 || *f.get(14)? != 0x45 || *f.get(23)? != 17 {
            return None;
        }
        if ip_checksum(f.get(14..34)?) != 0 || f.get(30..34)? != ip {
            return None;
        }
        let port = |at: usize| Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]));
        let udp_len = usize::from(port(38)?);
        Some(UdpFrame {
            src: (
                f.get(6..12)?.try_into().ok()?,
                f.get(26..30)?.try_into().ok()?,
                port(34)?,
            ),
            dst: (f.get(0..6)?.try_into().ok()?, ip, port(36)?),
            payload: f.get(42..34usize.checked_add(udp_len)?)?,
        })
    }
}

/// If `f` asks who has `ip` (an ARP request), the answer from `mac`.
pub fn arp_answer(f: &[u8], mac: [u8; 6], ip: [u8; 4]) -> Option<Vec<u8>> {
    if f.get(12..14)? != ETH_ARP || f.get(20..22)? != ARP_REQUEST.to_be_bytes() {
        return None;
    }
    if f.get(38..42)? != ip {
        return None;
    }
    let sha: [u8; 6] = f.get(22..28)?.try_into().ok()?;
    let spa: [u8; 4] = f.get(28..32)?.try_into().ok()?;
    Some(arp_frame(ARP_REPLY, (mac, ip), (sha, spa), sha))
}

/// If `f` answers an ARP request for `peer`, the peer's MAC.
pub fn arp_reply_from(f: &[u8], peer: [u8; 4]) -> Option<[u8; 6]> {
    if f.get(12..14)? != ETH_ARP || f.get(20..22)? != ARP_REPLY.to_be_bytes() {
        return None;
    }
    if f.get(28..32)? != peer {
        return None;
    }
    f.get(22..28)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECHO_PORT: u16 = 7;

    #[test]
    fn udp_frames_round_trip_and_checksum() {
        let udp = UdpFrame {
            src: ([2, 0, 0, 0, 0, 2], [10, 0, 0, 2], 4000),
            dst: ([2, 0, 0, 0, 0, 3], [10, 0, 0, 3], ECHO_PORT),
            payload: b"hello",
        };
        let frame = udp.frame();
        let parsed = UdpFrame::parse(&frame, [10, 0, 0, 3]).unwrap();
        assert_eq!(parsed, udp);
        // Addressed to someone else, or corrupted: ignored.
        assert!(UdpFrame::parse(&frame, [10, 0, 0, 9]).is_none());
        let mut bad = frame.clone();
        bad[20] ^= 1;
        assert!(UdpFrame::parse(&bad, [10, 0, 0, 3]).is_none());
    }

    #[test]
    fn arp_request_gets_an_answer_only_for_our_address() {
        let me = ([2, 0, 0, 0, 0, 3], [10, 0, 0, 3]);
        let asker = ([2, 0, 0, 0, 0, 2], [10, 0, 0, 2]);
        let ask = arp_frame(ARP_REQUEST, asker, ([0; 6], me.1), BROADCAST);
        let answer = arp_answer(&ask, me.0, me.1).unwrap();
        assert_eq!(&answer[..6], &asker.0, "the answer is unicast to the asker");
        assert_eq!(arp_reply_from(&answer, me.1), Some(me.0));
        assert_eq!(arp_reply_from(&ask, me.1), None, "a request is no reply");
        let other = arp_frame(ARP_REQUEST, asker, ([0; 6], [10, 0, 0, 9]), BROADCAST);
        assert!(arp_answer(&other, me.0, me.1).is_none());
    }

    #[test]
    fn hostile_frames_are_ignored_not_panics() {
        for len in 0..80 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = UdpFrame::parse(&junk, [10, 0, 0, 3]);
            let _ = arp_answer(&junk, [2; 6], [10, 0, 0, 3]);
            let _ = arp_reply_from(&junk, [10, 0, 0, 3]);
        }
        // A UDP length pointing past the frame.
        let mut f = UdpFrame {
            src: ([2; 6], [10, 0, 0, 2], 1),
            dst: ([3; 6], [10, 0, 0, 3], ECHO_PORT),
            payload: b"x",
        }
        .frame();
        f[38] = 0xff;
        assert!(UdpFrame::parse(&f, [10, 0, 0, 3]).is_none());
    }
}
