//! The virtio-net header (virtio 1.2, 5.1.6) and the checks a transmitted frame must pass.
//!
//! Every frame a driver transmits starts with this header. Its fields are guest-controlled, so
//! [`TxHeader::parse`] validates them against the features that were actually negotiated: a
//! device that did not offer checksum offload or segmentation must not act on a header that asks
//! for them, and one that did must check that the offsets lie inside the frame, and that a GSO
//! frame really is the TCP frame its header says ([`super::offload::parse_gso`]).

use thiserror::Error;

use super::offload::{parse_gso, Offload, OffloadError};

/// Length of the header with `num_buffers` (VERSION_1 or MRG_RXBUF negotiated).
pub const HDR_LEN: usize = 12;
/// Length of the legacy header without `num_buffers`.
pub const HDR_LEN_LEGACY: usize = 10;

/// `flags`: the driver left the checksum to the device (`csum_start`/`csum_offset` valid).
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum is known to be valid (RX only).
pub const HDR_F_DATA_VALID: u8 = 2;
/// `flags`: `csum_start`/`csum_offset` carry RSC information (RX only).
pub const HDR_F_RSC_INFO: u8 = 4;

/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload.
pub const GSO_UDP: u8 = 3;
/// `gso_type`: TCPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (L4).
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: TCP with ECN.
pub const GSO_ECN: u8 = 0x80;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// The shortest frame accepted (an Ethernet header; padding is the sender's business).
pub const MIN_FRAME: usize = ETH_HLEN;
/// The MTU the device advertises (VIRTIO_NET_F_MTU).
pub const MTU: u16 = 1500;
/// The longest frame accepted: Ethernet header + MTU + one 802.1Q tag.
pub const MAX_FRAME: usize = ETH_HLEN + MTU as usize + 4;
/// The longest GSO frame accepted: Ethernet header + one 802.1Q tag + a 64 KiB IP packet.
pub const MAX_GSO_FRAME: usize = ETH_HLEN + 4 + u16::MAX as usize;

/// Offloads the driver and device agreed on for transmitted frames (`CSUM`, `HOST_TSO4`,
/// `HOST_TSO6`, `HOST_ECN`), or for received frames (`GUEST_CSUM`, `GUEST_TSO4`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// The checksum may be left partial (`NEEDS_CSUM`).
    pub csum: bool,
    /// TCPv4 segmentation (`GSO_TCPV4`).
    pub tso4: bool,
    /// TCPv6 segmentation (`GSO_TCPV6`).
    pub tso6: bool,
    /// GSO frames may carry the ECN bit (`GSO_ECN`).
    pub ecn: bool,
}

impl TxOffloads {
    /// Every offload.
    pub const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    /// Some GSO type is allowed.
    pub fn gso(&self) -> bool {
        self.tso4 || self.tso6
    }

    /// Whether a frame with `offload` may go to a driver with these offloads as it is (its
    /// header handing the work on); otherwise the device does the work.
    pub fn accept(&self, offload: &Offload) -> bool {
        match offload.gso {
            Some(g) => {
                let tso = match g.ip {
                    super::offload::IpVersion::V4 => self.tso4,
                    super::offload::IpVersion::V6 => self.tso6,
                };
                self.csum && tso && (!g.ecn || self.ecn)
            }
            None => offload.csum.is_none() || self.csum,
        }
    }
}

/// Why a transmitted frame is refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The descriptor chain holds fewer bytes than the header.
    #[error("chain of {0} bytes is too short for the virtio-net header")]
    ShortHeader(usize),
    /// The frame is shorter than an Ethernet header.
    #[error("runt frame of {0} bytes")]
    Runt(usize),
    /// The frame is longer than the device accepts.
    #[error("oversized frame of {0} bytes (at most {MAX_FRAME})")]
    Oversized(usize),
    /// Flags the device does not understand or did not negotiate.
    #[error("header flags {0:#x} not allowed by the negotiated features")]
    Flags(u8),
    /// `csum_start + csum_offset + 2` lies outside the frame.
    #[error("checksum at {start}+{offset} lies outside a {len}-byte frame")]
    CsumRange {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// A GSO type that was not negotiated or does not exist.
    #[error("GSO type {0:#x} not allowed by the negotiated features")]
    GsoType(u8),
    /// A GSO frame whose headers do not match its virtio-net header.
    #[error(transparent)]
    Gso(#[from] OffloadError),
    /// A GSO frame with a zero segment size or a header length past the frame.
    #[error("GSO frame with gso_size {gso_size} and hdr_len {hdr_len} in a {len}-byte frame")]
    GsoSize {
        /// `gso_size`.
        gso_size: u16,
        /// `hdr_len`.
        hdr_len: u16,
        /// Frame length.
        len: usize,
    },
}

/// The decoded header of a transmitted frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxHeader {
    /// `flags`.
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
}

impl TxHeader {
    /// Decode and validate the header at the start of `chain` (header then frame, `hdr_len`
    /// bytes of header) under `offloads`. Returns the header and the frame length.
    pub fn parse(
        chain: &[u8],
        hdr_len: usize,
        offloads: TxOffloads,
    ) -> Result<(TxHeader, usize), HeaderError> {
        if chain.len() < hdr_len || hdr_len < HDR_LEN_LEGACY {
            return Err(HeaderError::ShortHeader(chain.len()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([chain[i], chain[i + 1]]);
        let h = TxHeader {
            flags: chain[0],
            gso_type: chain[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        };
        let len = chain.len() - hdr_len;
        h.validate(len, offloads)?;
        Ok((h, len))
    }

    /// Check this header for a frame of `len` bytes under `offloads`.
    pub fn validate(&self, len: usize, offloads: TxOffloads) -> Result<(), HeaderError> {
        if len < MIN_FRAME {
            return Err(HeaderError::Runt(len));
        }
        let gso = self.gso_type & !GSO_ECN;
        let max = if offloads.gso() && gso != GSO_NONE {
            MAX_GSO_FRAME
        } else {
            MAX_FRAME
        };
        if len > max {
            return Err(HeaderError::Oversized(len));
        }
        // DATA_VALID and RSC_INFO are RX-only; a transmitting driver never sets them.
        if self.flags & !HDR_F_NEEDS_CSUM != 0 {
            return Err(HeaderError::Flags(self.flags));
        }
        if self.flags & HDR_F_NEEDS_CSUM != 0 {
            if !offloads.csum {
                return Err(HeaderError::Flags(self.flags));
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > len {
                return Err(HeaderError::CsumRange {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len,
                });
            }
        }
        if gso == GSO_NONE {
            if self.gso_type & GSO_ECN != 0 {
                return Err(HeaderError::GsoType(self.gso_type));
            }
            return Ok(());
        }
        // UDP fragmentation and segmentation (UFO, USO) are not offered.
        let allowed = match gso {
            GSO_TCPV4 => offloads.tso4,
            GSO_TCPV6 => offloads.tso6,
            _ => false,
        };
        if !allowed || (self.gso_type & GSO_ECN != 0 && !offloads.ecn) {
            return Err(HeaderError::GsoType(self.gso_type));
        }
        // GSO needs a checksum to fill in per segment, a segment size and headers in the frame.
        if self.flags & HDR_F_NEEDS_CSUM == 0
            || self.gso_size == 0
            || usize::from(self.hdr_len) > len
        {
            return Err(HeaderError::GsoSize {
                gso_size: self.gso_size,
                hdr_len: self.hdr_len,
                len,
            });
        }
        Ok(())
    }

    /// What is left to do on `frame` (this header's frame, validated by [`TxHeader::parse`]):
    /// a GSO frame's headers are checked here.
    pub fn offload(&self, frame: &[u8]) -> Result<Offload, HeaderError> {
        let csum =
            (self.flags & HDR_F_NEEDS_CSUM != 0).then_some((self.csum_start, self.csum_offset));
        let gso = match (self.gso_type & !GSO_ECN, csum) {
            (GSO_NONE, _) => None,
            (_, Some(c)) => Some(parse_gso(frame, self.gso_type, self.gso_size, c)?),
            (_, None) => {
                return Err(HeaderError::GsoSize {
                    gso_size: self.gso_size,
                    hdr_len: self.hdr_len,
                    len: frame.len(),
                })
            }
        };
        Ok(Offload { csum, gso })
    }
}

/// The header the device writes in front of a received frame: no offload information (the
/// device offers none), `num_buffers` as given.
pub fn rx_header(num_buffers: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = 0;
    h[1] = GSO_NONE;
    h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chain(hdr: [u8; HDR_LEN], frame_len: usize) -> Vec<u8> {
        let mut v = hdr.to_vec();
        v.resize(HDR_LEN + frame_len, 0xab);
        v
    }

    fn hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso;
        h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&gso_size.to_le_bytes());
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&off.to_le_bytes());
        h
    }

    const NONE: TxOffloads = TxOffloads {
        csum: false,
        tso4: false,
        tso6: false,
        ecn: false,
    };
    const ALL: TxOffloads = TxOffloads::ALL;

    #[test]
    fn plain_frame_passes() {
        let c = chain(hdr(0, 0, 0, 0, 0, 0), 60);
        let (h, len) = TxHeader::parse(&c, HDR_LEN, NONE).unwrap();
        assert_eq!(len, 60);
        assert_eq!(h, TxHeader::default());
        // num_buffers on TX is ignored.
        let mut c = c;
        c[10] = 7;
        assert!(TxHeader::parse(&c, HDR_LEN, NONE).is_ok());
    }

    #[test]
    fn lengths_are_checked() {
        assert_eq!(
            TxHeader::parse(&[0u8; 11], HDR_LEN, NONE),
            Err(HeaderError::ShortHeader(11))
        );
        let c = chain(hdr(0, 0, 0, 0, 0, 0), 13);
        assert_eq!(
            TxHeader::parse(&c, HDR_LEN, NONE),
            Err(HeaderError::Runt(13))
        );
        let c = chain(hdr(0, 0, 0, 0, 0, 0), MAX_FRAME + 1);
        assert_eq!(
            TxHeader::parse(&c, HDR_LEN, NONE),
            Err(HeaderError::Oversized(MAX_FRAME + 1))
        );
        let c = chain(hdr(0, 0, 0, 0, 0, 0), MAX_FRAME);
        assert!(TxHeader::parse(&c, HDR_LEN, NONE).is_ok());
        // Legacy 10-byte header.
        let c = chain(hdr(0, 0, 0, 0, 0, 0), 60);
        assert_eq!(TxHeader::parse(&c, HDR_LEN_LEGACY, NONE).unwrap().1, 62);
    }

    #[test]
    fn offload_requests_need_negotiation() {
        let c = chain(hdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16), 100);
        assert_eq!(
            TxHeader::parse(&c, HDR_LEN, NONE),
            Err(HeaderError::Flags(1))
        );
        assert!(TxHeader::parse(&c, HDR_LEN, ALL).is_ok());
        let c = chain(hdr(HDR_F_DATA_VALID, 0, 0, 0, 0, 0), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::Flags(_))
        ));
        let c = chain(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), 100);
        assert_eq!(
            TxHeader::parse(&c, HDR_LEN, NONE),
            Err(HeaderError::Flags(1))
        );
        let c = chain(hdr(0, GSO_TCPV4, 54, 1448, 0, 0), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, NONE),
            Err(HeaderError::GsoType(_))
        ));
        let c = chain(hdr(0, GSO_ECN, 0, 0, 0, 0), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::GsoType(_))
        ));
    }

    #[test]
    fn offsets_must_lie_in_the_frame() {
        let c = chain(hdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 90, 9), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::CsumRange { .. })
        ));
        let c = chain(hdr(HDR_F_NEEDS_CSUM, 0, 0, 0, u16::MAX, u16::MAX), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::CsumRange { .. })
        ));
        let c = chain(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::GsoSize { .. })
        ));
        let c = chain(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 200, 1400, 34, 16), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::GsoSize { .. })
        ));
        let c = chain(hdr(HDR_F_NEEDS_CSUM, 9, 54, 1400, 34, 16), 100);
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::GsoType(9))
        ));
    }

    #[test]
    fn gso_types_follow_each_negotiated_offload() {
        let tso4_only = TxOffloads {
            csum: true,
            tso4: true,
            ..NONE
        };
        let c = chain(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 74, 1400, 54, 16), 100);
        assert_eq!(
            TxHeader::parse(&c, HDR_LEN, tso4_only),
            Err(HeaderError::GsoType(GSO_TCPV6))
        );
        let c = chain(
            hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 54, 1400, 34, 16),
            100,
        );
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, tso4_only),
            Err(HeaderError::GsoType(_))
        ));
        assert!(TxHeader::parse(&c, HDR_LEN, ALL).is_ok());
        for udp in [GSO_UDP, GSO_UDP_L4] {
            let c = chain(hdr(HDR_F_NEEDS_CSUM, udp, 42, 1400, 34, 6), 100);
            assert_eq!(
                TxHeader::parse(&c, HDR_LEN, ALL),
                Err(HeaderError::GsoType(udp)),
                "UFO/USO are not offered"
            );
        }
        // A GSO frame up to 64 KiB passes the length check; its headers are checked by
        // `offload` (here: 0xab bytes are no IPv4 frame).
        let c = chain(
            hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1400, 34, 16),
            MAX_GSO_FRAME,
        );
        let (h, len) = TxHeader::parse(&c, HDR_LEN, ALL).unwrap();
        assert_eq!(len, MAX_GSO_FRAME);
        assert!(matches!(
            h.offload(&c[HDR_LEN..]),
            Err(HeaderError::Gso(OffloadError::EtherType(_)))
        ));
        let c = chain(
            hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1400, 34, 16),
            MAX_GSO_FRAME + 1,
        );
        assert!(matches!(
            TxHeader::parse(&c, HDR_LEN, ALL),
            Err(HeaderError::Oversized(_))
        ));
        // A partial checksum alone is recorded as such.
        let c = chain(hdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16), 100);
        let (h, _) = TxHeader::parse(&c, HDR_LEN, ALL).unwrap();
        assert_eq!(
            h.offload(&c[HDR_LEN..]),
            Ok(Offload {
                csum: Some((34, 16)),
                gso: None
            })
        );
    }

    #[test]
    fn rx_header_carries_num_buffers() {
        let h = rx_header(3);
        assert_eq!(&h[..10], &[0u8; 10]);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 3);
    }
}
