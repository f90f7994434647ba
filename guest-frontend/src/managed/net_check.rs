//! Just enough IPv4 for a guest to prove its interface works: it answers ARP for its address
//! and echoes UDP to port 7, and it can resolve a peer and ping-pong UDP with it. The frames
//! themselves are [`super::frames`]'; a frame that is not what we look for is ignored.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::frames::{arp_answer, arp_frame, arp_reply_from, UdpFrame, ARP_REQUEST, BROADCAST};
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
/// How long a ping waits for a frame before it checks its deadline again.
const POLL: Duration = Duration::from_millis(50);
/// How long a ping waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a ping waits for an ARP answer before asking again.
const ARP_RETRY: Duration = Duration::from_millis(250);

/// A connected interface with its address.
pub struct NetNic {
    pub frontend: NetFrontend,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    /// Frames sent and received, for the counters.
    pub frames: u64,
}

impl NetNic {
    fn send(&mut self, frame: &[u8]) -> Result<(), PingError> {
        self.frames += 1;
        self.frontend.send(frame).map_err(PingError::Send)
    }

    /// The next received frame, waiting up to `wait`; None if none came.
    fn recv<'b>(
        &mut self,
        buf: &'b mut [u8],
        wait: Duration,
    ) -> Result<Option<&'b [u8]>, PingError> {
        let Some(len) = self.frontend.recv(buf, wait).map_err(PingError::Receive)? else {
            return Ok(None);
        };
        self.frames += 1;
        Ok(Some(buf.get(..len).unwrap_or_default()))
    }

    /// Answers one received frame if it is for us; true if a frame was received at all.
    fn answer_one(&mut self, buf: &mut [u8], wait: Duration) -> Result<bool, PingError> {
        let Some(frame) = self.recv(buf, wait)? else {
            return Ok(false);
        };
        if let Some(reply) = arp_answer(frame, self.mac, self.ip) {
            self.send(&reply)?;
        } else if let Some(udp) = UdpFrame::parse(frame, self.ip).filter(|u| u.dst.2 == ECHO_PORT) {
            let echo = UdpFrame {
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
        let request = arp_frame(ARP_REQUEST, (self.mac, self.ip), ([0; 6], peer), BROADCAST);
        self.send(&request)?;
        let mut asked = Instant::now();
        let peer_mac = loop {
            if started.elapsed() > ANSWER_TIMEOUT {
                return Err(PingError::NoArpAnswer(peer));
            }
            // As an ARP cache does: a request can be lost (the peer's interface not up yet,
            // its port's queue full), so it is asked again.
            if asked.elapsed() > ARP_RETRY {
                self.send(&request)?;
                asked = Instant::now();
            }
            let Some(frame) = self.recv(&mut buf, POLL)? else {
                continue;
            };
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
            let frame = UdpFrame {
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
                let Some(frame) = self.recv(&mut buf, POLL)? else {
                    continue;
                };
                if let Some(udp) = UdpFrame::parse(frame, self.ip) {
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
