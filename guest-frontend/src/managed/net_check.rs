//! Just enough IPv4 for a guest to prove its interface works: it answers ARP for its address
//! and echoes UDP to port 7, and it can resolve a peer and ping-pong UDP with it.
//!
//! Every received frame is parsed with bounds checks only (a peer's frame is untrusted): a
//! frame that is not what we look for is ignored, never a panic.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::process::{NetFrontend, ProcessFrontendError};

/// Why a ping or an answer failed.
#[derive(Debug, Error)]
pub enum PingError {
    #[error("send")]
    Send(#[source] ProcessFrontendError),
    #[error("receive")]
    Receive(#[source] ProcessFrontendError),
    #[error("no ARP answer for {}", dotted(*.0))]
    NoArpAnswer([u8; 4]),
    #[error("round {round}: no echo from {}", dotted(*peer))]
    NoEcho { round: u32, peer: [u8; 4] },
}

/// The UDP echo port.
pub const ECHO_PORT: u16 = 7;
const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];
const BROADCAST: [u8; 6] = [0xff; 6];
/// How long a ping waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected interface with its address.
pub struct NetNic {
    pub frontend: NetFrontend,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    /// Frames sent and received, for the counters.
    pub frames: u64,
}

fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4], dst: [u8; 6]) -> Vec<u8> {
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

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame (UDP checksum 0: optional over IPv4).
struct Udp<'a> {
    src: ([u8; 6], [u8; 4], u16),
    dst: ([u8; 6], [u8; 4], u16),
    payload: &'a [u8],
}

impl Udp<'_> {
    fn frame(&self) -> Vec<u8> {
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

    /// Parses a frame addressed to `ip`; None for anything else or anything malformed.
    fn parse(f: &[u8], ip: [u8; 4]) -> Option<Udp<'_>> {
        if f.get(12..14)? != ETH_IPV4 || *f.get(14)? != 0x45 || *f.get(23)? != 17 {
            return None;
        }
        if ip_checksum(f.get(14..34)?) != 0 || f.get(30..34)? != ip {
            return None;
        }
        let port = |at: usize| Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]));
        let udp_len = usize::from(port(38)?);
        Some(Udp {
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

/// If `f` asks for `ip` (an ARP request), the answer.
fn arp_answer(f: &[u8], mac: [u8; 6], ip: [u8; 4]) -> Option<Vec<u8>> {
    if f.get(12..14)? != ETH_ARP || f.get(20..22)? != [0, 1] || f.get(38..42)? != ip {
        return None;
    }
    let sha: [u8; 6] = f.get(22..28)?.try_into().ok()?;
    let spa: [u8; 4] = f.get(28..32)?.try_into().ok()?;
    Some(arp(2, mac, ip, sha, spa, sha))
}

/// If `f` answers an ARP request for `peer`, the peer's MAC.
fn arp_reply_from(f: &[u8], peer: [u8; 4]) -> Option<[u8; 6]> {
    if f.get(12..14)? != ETH_ARP || f.get(20..22)? != [0, 2] || f.get(28..32)? != peer {
        return None;
    }
    f.get(22..28)?.try_into().ok()
}

impl NetNic {
    fn send(&mut self, frame: &[u8]) -> Result<(), PingError> {
        self.frames += 1;
        self.frontend.send(frame).map_err(PingError::Send)
    }

    /// Answers one received frame if it is for us; true if a frame was received at all.
    fn answer_one(&mut self, buf: &mut [u8], wait: Duration) -> Result<bool, PingError> {
        let Some(len) = self.frontend.recv(buf, wait).map_err(PingError::Receive)? else {
            return Ok(false);
        };
        self.frames += 1;
        let frame = buf.get(..len).unwrap_or_default();
        if let Some(reply) = arp_answer(frame, self.mac, self.ip) {
            self.send(&reply)?;
        } else if let Some(udp) = Udp::parse(frame, self.ip).filter(|u| u.dst.2 == ECHO_PORT) {
            let echo = Udp {
                src: (self.mac, self.ip, ECHO_PORT),
                dst: udp.src,
                payload: udp.payload,
            }
            .frame();
            self.send(&echo)?;
        }
        Ok(true)
    }

    /// Answers everything already received, without waiting.
    pub fn answer_pending(&mut self) -> Result<(), PingError> {
        let mut buf = vec![0u8; 2048];
        while self.answer_one(&mut buf, Duration::ZERO)? {}
        Ok(())
    }

    /// Resolves `peer`, then exchanges `rounds` UDP echoes with it; a summary on success.
    pub fn ping(&mut self, peer: [u8; 4], rounds: u32) -> Result<String, PingError> {
        let mut buf = vec![0u8; 2048];
        let started = Instant::now();
        self.send(&arp(1, self.mac, self.ip, [0; 6], peer, BROADCAST))?;
        let peer_mac = loop {
            if started.elapsed() > ANSWER_TIMEOUT {
                return Err(PingError::NoArpAnswer(peer));
            }
            let Some(len) = self
                .frontend
                .recv(&mut buf, Duration::from_millis(50))
                .map_err(PingError::Receive)?
            else {
                continue;
            };
            self.frames += 1;
            let frame = buf.get(..len).unwrap_or_default();
            if let Some(mac) = arp_reply_from(frame, peer) {
                break mac;
            }
            if let Some(reply) = arp_answer(frame, self.mac, self.ip) {
                self.send(&reply)?;
            }
        };
        let arp_time = started.elapsed();
        let mut rtts = Vec::with_capacity(rounds as usize);
        for round in 0..rounds {
            let payload = format!("splitvmm ping {round}");
            let sent = Instant::now();
            let frame = Udp {
                src: (self.mac, self.ip, 40000 + (round % 1000) as u16),
                dst: (peer_mac, peer, ECHO_PORT),
                payload: payload.as_bytes(),
            }
            .frame();
            self.send(&frame)?;
            loop {
                if sent.elapsed() > ANSWER_TIMEOUT {
                    return Err(PingError::NoEcho { round, peer });
                }
                let Some(len) = self
                    .frontend
                    .recv(&mut buf, Duration::from_millis(50))
                    .map_err(PingError::Receive)?
                else {
                    continue;
                };
                self.frames += 1;
                let frame = buf.get(..len).unwrap_or_default();
                if let Some(udp) = Udp::parse(frame, self.ip) {
                    if udp.src == (peer_mac, peer, ECHO_PORT) && udp.payload == payload.as_bytes() {
                        rtts.push(sent.elapsed());
                        break;
                    }
                }
            }
        }
        rtts.sort();
        let median = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
        Ok(format!(
            "{} is at {}, ARP in {:.1} ms; {rounds} UDP echoes, median round trip {:.0} µs",
            dotted(peer),
            mac_text(peer_mac),
            arp_time.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e6
        ))
    }
}

fn dotted(ip: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frames_round_trip_and_checksum() {
        let udp = Udp {
            src: ([2, 0, 0, 0, 0, 2], [10, 0, 0, 2], 4000),
            dst: ([2, 0, 0, 0, 0, 3], [10, 0, 0, 3], ECHO_PORT),
            payload: b"hello",
        };
        let frame = udp.frame();
        let parsed = Udp::parse(&frame, [10, 0, 0, 3]).unwrap();
        assert_eq!(parsed.src, udp.src);
        assert_eq!(parsed.payload, b"hello");
        // Addressed to someone else, or corrupted: ignored.
        assert!(Udp::parse(&frame, [10, 0, 0, 9]).is_none());
        let mut bad = frame.clone();
        bad[20] ^= 1;
        assert!(Udp::parse(&bad, [10, 0, 0, 3]).is_none());
    }

    #[test]
    fn arp_request_gets_an_answer_only_for_our_address() {
        let me = ([2, 0, 0, 0, 0, 3], [10, 0, 0, 3]);
        let ask = arp(
            1,
            [2, 0, 0, 0, 0, 2],
            [10, 0, 0, 2],
            [0; 6],
            me.1,
            BROADCAST,
        );
        let answer = arp_answer(&ask, me.0, me.1).unwrap();
        assert_eq!(arp_reply_from(&answer, me.1), Some(me.0));
        let other = arp(
            1,
            [2, 0, 0, 0, 0, 2],
            [10, 0, 0, 2],
            [0; 6],
            [10, 0, 0, 9],
            BROADCAST,
        );
        assert!(arp_answer(&other, me.0, me.1).is_none());
    }

    #[test]
    fn hostile_frames_are_ignored_not_panics() {
        for len in 0..80 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = Udp::parse(&junk, [10, 0, 0, 3]);
            let _ = arp_answer(&junk, [2; 6], [10, 0, 0, 3]);
            let _ = arp_reply_from(&junk, [10, 0, 0, 3]);
        }
        // A UDP length pointing past the frame.
        let mut f = Udp {
            src: ([2; 6], [10, 0, 0, 2], 1),
            dst: ([3; 6], [10, 0, 0, 3], ECHO_PORT),
            payload: b"x",
        }
        .frame();
        f[38] = 0xff;
        assert!(Udp::parse(&f, [10, 0, 0, 3]).is_none());
    }
}
