//! Work a sender left to the device: completing a partial checksum (`NEEDS_CSUM`) and cutting a
//! TCP segmentation-offload frame (`GSO_TCPV4`/`GSO_TCPV6`) into frames that fit the MTU.
//!
//! The switch hands such a frame on unchanged to a port whose driver negotiated the matching
//! receive offload (its virtio-net header says what is left to do, [`Offload::rx_header`]);
//! for any other port (a driver without `GUEST_CSUM`/`GUEST_TSO*`, the tap uplink) it does the
//! work here, as Linux's `skb_checksum_help` and `skb_gso_segment` (or QEMU's `net_tx_pkt`)
//! do: per segment the IPv4 total length, identification (+1 per segment) and header
//! checksum, or the IPv6 payload length; the TCP sequence number, FIN and PSH on the last
//! segment only, CWR on the first only, and the TCP checksum over the pseudo-header.
//!
//! Everything comes from the guest, so [`parse_gso`] checks the frame's own headers
//! (Ethernet with at most one VLAN tag, IPv4 without options past the frame and not a
//! fragment, or IPv6 whose next header is TCP, then TCP) before any of it is trusted, and
//! [`Segments`] writes only within the buffers it is given.

use thiserror::Error;

use super::header::{
    ETH_HLEN, GSO_ECN, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM, HDR_LEN, MAX_FRAME,
};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// Offset of the checksum in the TCP header (what `csum_offset` must say for a GSO frame).
pub const TCP_CSUM_OFFSET: u16 = 16;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a frame's offload request cannot be honoured (the frame is dropped).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum OffloadError {
    /// The Ethernet type does not match the GSO type.
    #[error("GSO frame with ethertype {0:#06x} that does not match its GSO type")]
    EtherType(u16),
    /// The IP header is malformed or runs past the frame.
    #[error("GSO frame with a malformed IP header")]
    IpHeader,
    /// A GSO frame whose IP payload is not TCP.
    #[error("GSO frame carrying IP protocol {0}, not TCP")]
    NotTcp(u8),
    /// A GSO frame that is an IP fragment.
    #[error("GSO frame that is an IPv4 fragment")]
    Fragment,
    /// The TCP header is malformed or runs past the frame.
    #[error("GSO frame with a malformed TCP header")]
    TcpHeader,
    /// The checksum to fill in is not the TCP checksum.
    #[error("GSO frame with csum_start {start}/csum_offset {offset}, not the TCP checksum")]
    CsumPosition {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
    },
    /// Headers plus one segment do not fit the MTU, or the segment size is zero.
    #[error("GSO segment size {0} does not fit the MTU")]
    SegmentSize(u16),
    /// A GSO frame without payload.
    #[error("GSO frame without payload")]
    NoPayload,
}

/// The IP version of a TCP segmentation-offload frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpVersion {
    /// IPv4 (`GSO_TCPV4`).
    V4,
    /// IPv6 (`GSO_TCPV6`).
    V6,
}

/// A checked TCP segmentation-offload frame: where its headers are, how to cut it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// IPv4 or IPv6.
    pub ip: IpVersion,
    /// `GSO_ECN`: the sender's TCP uses ECN (CWR on the first segment only).
    pub ecn: bool,
    /// Payload bytes per segment (the MSS).
    pub size: u16,
    /// Offset of the IP header.
    pub l3: u16,
    /// Offset of the TCP header.
    pub l4: u16,
    /// Length of all headers (Ethernet, IP, TCP with options).
    pub hdr_len: u16,
}

impl Gso {
    /// The `gso_type` of the virtio-net header.
    pub fn gso_type(&self) -> u8 {
        let t = match self.ip {
            IpVersion::V4 => GSO_TCPV4,
            IpVersion::V6 => GSO_TCPV6,
        };
        if self.ecn {
            t | GSO_ECN
        } else {
            t
        }
    }
}

/// What is left to do on a frame: nothing, a checksum, or segmentation (which includes the
/// checksums of every segment).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    /// `NEEDS_CSUM`: `(csum_start, csum_offset)`, checked to lie inside the frame.
    pub csum: Option<(u16, u16)>,
    /// A checked TCP segmentation-offload frame.
    pub gso: Option<Gso>,
}

impl Offload {
    /// Nothing left to do.
    pub const NONE: Offload = Offload {
        csum: None,
        gso: None,
    };

    /// The virtio-net header that hands this work on to a driver that negotiated it
    /// (`num_buffers` as given).
    pub fn rx_header(&self, num_buffers: u16) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        if let Some((start, offset)) = self.csum {
            h[0] = HDR_F_NEEDS_CSUM;
            h[6..8].copy_from_slice(&start.to_le_bytes());
            h[8..10].copy_from_slice(&offset.to_le_bytes());
        }
        if let Some(g) = self.gso {
            h[1] = g.gso_type();
            h[2..4].copy_from_slice(&g.hdr_len.to_le_bytes());
            h[4..6].copy_from_slice(&g.size.to_le_bytes());
        }
        h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        h
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Check a GSO frame's headers against its virtio-net header (`gso_type` without the ECN bit,
/// `gso_size`, `csum_start`, `csum_offset`) and locate them. The sender's `hdr_len` is only a
/// hint in virtio and is not used: the header length is the one found here.
pub fn parse_gso(
    frame: &[u8],
    gso_type: u8,
    gso_size: u16,
    csum: (u16, u16),
) -> Result<Gso, OffloadError> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(frame, 12).ok_or(OffloadError::EtherType(0))?;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16).ok_or(OffloadError::EtherType(ETHERTYPE_VLAN))?;
        l3 += 4;
    }
    let (ip, l4) = match (gso_type & !GSO_ECN, ethertype) {
        (GSO_TCPV4, ETHERTYPE_IPV4) => {
            let vihl = *frame.get(l3).ok_or(OffloadError::IpHeader)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 || l3 + ihl > frame.len() {
                return Err(OffloadError::IpHeader);
            }
            let frag = be16(frame, l3 + 6).ok_or(OffloadError::IpHeader)?;
            if frag & 0x3fff != 0 {
                return Err(OffloadError::Fragment);
            }
            if frame[l3 + 9] != IPPROTO_TCP {
                return Err(OffloadError::NotTcp(frame[l3 + 9]));
            }
            (IpVersion::V4, l3 + ihl)
        }
        (GSO_TCPV6, ETHERTYPE_IPV6) => {
            if l3 + IPV6_HLEN > frame.len() || frame[l3] >> 4 != 6 {
                return Err(OffloadError::IpHeader);
            }
            // Extension headers are not followed: a TSO frame from Linux has none.
            if frame[l3 + 6] != IPPROTO_TCP {
                return Err(OffloadError::NotTcp(frame[l3 + 6]));
            }
            (IpVersion::V6, l3 + IPV6_HLEN)
        }
        (_, other) => return Err(OffloadError::EtherType(other)),
    };
    let doff = usize::from(*frame.get(l4 + 12).ok_or(OffloadError::TcpHeader)? >> 4) * 4;
    let hdr_len = l4 + doff;
    if doff < 20 || hdr_len > frame.len() {
        return Err(OffloadError::TcpHeader);
    }
    if usize::from(csum.0) != l4 || csum.1 != TCP_CSUM_OFFSET {
        return Err(OffloadError::CsumPosition {
            start: csum.0,
            offset: csum.1,
        });
    }
    if gso_size == 0 || hdr_len + usize::from(gso_size) > MAX_FRAME {
        return Err(OffloadError::SegmentSize(gso_size));
    }
    if hdr_len == frame.len() {
        return Err(OffloadError::NoPayload);
    }
    // Every offset is below the frame length, which fits in u16 for a GSO frame.
    let to16 = |v: usize| u16::try_from(v).map_err(|_| OffloadError::IpHeader);
    Ok(Gso {
        ip,
        ecn: gso_type & GSO_ECN != 0,
        size: gso_size,
        l3: to16(l3)?,
        l4: to16(l4)?,
        hdr_len: to16(hdr_len)?,
    })
}

/// The one's-complement sum of `data` (RFC 1071) added to `sum`, not folded.
pub fn sum(data: &[u8], mut sum: u32) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
        // Keep headroom for the next add: fold whenever the top bit is set.
        if sum & 0x8000_0000 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = words.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Fold a sum to 16 bits and complement it: the checksum to store.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    !(sum as u16)
}

/// Complete a partial checksum as Linux's `skb_checksum_help` does: the sum of
/// `frame[start..]` (the checksum field holds the pseudo-header's sum) is stored at
/// `start + offset`. The caller checked that the field lies inside the frame; a range that does
/// not is left alone.
pub fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) {
    let (start, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if at + 2 > frame.len() {
        return;
    }
    let mut c = fold(sum(&frame[start..], 0));
    if c == 0 {
        // What Linux stores for a zero result (UDP reads 0 as "no checksum").
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The segments of a checked GSO frame, written one at a time into the caller's buffers.
#[derive(Clone, Copy, Debug)]
pub struct Segments {
    gso: Gso,
    next: usize,
    count: usize,
}

impl Segments {
    /// Segments of `frame`, whose headers `gso` describes ([`parse_gso`] on the same frame).
    pub fn new(frame: &[u8], gso: Gso) -> Segments {
        let payload = frame.len().saturating_sub(usize::from(gso.hdr_len));
        let size = usize::from(gso.size).max(1);
        Segments {
            gso,
            next: 0,
            count: payload.div_ceil(size),
        }
    }

    /// How many segments the frame makes.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Segments not yet written.
    pub fn remaining(&self) -> usize {
        self.count - self.next
    }

    /// Write the next segment of `frame` (the frame [`Segments::new`] saw) into `out`; returns
    /// its length, or `None` when every segment was written (or `out` is too small, which a
    /// buffer of [`MAX_FRAME`] bytes never is).
    pub fn write_next(&mut self, frame: &[u8], out: &mut [u8]) -> Option<usize> {
        if self.next >= self.count {
            return None;
        }
        let g = self.gso;
        let (hl, l3, l4) = (usize::from(g.hdr_len), usize::from(g.l3), usize::from(g.l4));
        let size = usize::from(g.size);
        let from = hl + self.next * size;
        let to = (from + size).min(frame.len());
        let len = hl + (to - from);
        if from > to || hl > frame.len() || len > out.len() {
            return None;
        }
        let first = self.next == 0;
        let last = self.next + 1 == self.count;
        let index = self.next;
        self.next += 1;
        let seg = &mut out[..len];
        seg[..hl].copy_from_slice(&frame[..hl]);
        seg[hl..].copy_from_slice(&frame[from..to]);
        let tcp_len = len - l4;
        let mut pseudo = 0u32;
        match g.ip {
            IpVersion::V4 => {
                let ip = &mut seg[l3..l4];
                let tot = (len - l3) as u16;
                ip[2..4].copy_from_slice(&tot.to_be_bytes());
                let id = u16::from_be_bytes([ip[4], ip[5]]).wrapping_add(index as u16);
                ip[4..6].copy_from_slice(&id.to_be_bytes());
                ip[10..12].fill(0);
                let c = fold(sum(ip, 0));
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                pseudo = sum(&ip[12..20], pseudo);
                pseudo += u32::from(IPPROTO_TCP) + tcp_len as u32;
            }
            IpVersion::V6 => {
                let ip = &mut seg[l3..l3 + IPV6_HLEN];
                let plen = (len - l3 - IPV6_HLEN) as u16;
                ip[4..6].copy_from_slice(&plen.to_be_bytes());
                pseudo = sum(&ip[8..40], pseudo);
                pseudo += u32::from(IPPROTO_TCP) + tcp_len as u32;
            }
        }
        let tcp = &mut seg[l4..];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]])
            .wrapping_add((index * size) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        if !last {
            tcp[13] &= !(TCP_FIN | TCP_PSH);
        }
        if !first {
            tcp[13] &= !TCP_CWR;
        }
        tcp[16..18].fill(0);
        let c = fold(sum(tcp, pseudo));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        Some(len)
    }
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
