//! The tap uplink against the real kernel, inside a network namespace this test creates: a
//! switch port plays a guest and sends an ARP request out of the tap; the namespace's kernel
//! (address 10.77.0.1 on the tap) must answer through the tap and the switch.
//! Then segmentation and checksum offload towards the host: the port sends a TCP
//! segmentation-offload frame and a frame with a partial checksum to a closed port of the
//! kernel, which answers each segment whose IP and TCP checksums it accepts with a reset.
//! Skipped (and the skip recorded) when not root, without /dev/net/tun, or without `ip`.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use driver_domain::net::header::{TxHeader, TxOffloads, GSO_TCPV4, HDR_F_NEEDS_CSUM, HDR_LEN};
use driver_domain::net::{Switch, SwitchConfig, SwitchPort, TapUplink};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?} failed");
}

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x02];

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[10, 77, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 77, 0, 1]);
    f.resize(60, 0);
    f
}

/// A switch with a guest-like port and a tap uplink `svtap0` in a fresh namespace whose kernel
/// has 10.77.0.1/24 on it.
fn tap_in_netns(tag: &str) -> (Netns, std::sync::Arc<Switch>, SwitchPort, TapUplink) {
    let ns = Netns(format!("svmm-{tag}-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    let sw = Switch::new(SwitchConfig::default());
    let guest = sw.attach("guest").unwrap();
    let uplink_port = sw.attach("tap").unwrap();
    let nspath = format!("/var/run/netns/{}", ns.0);
    // The tap is created in the namespace of the thread that opens it.
    let uplink = std::thread::spawn(move || {
        let f = std::fs::File::open(&nspath).unwrap();
        // SAFETY: setns on an open namespace file affects only this (fresh) thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        TapUplink::open("svtap0", uplink_port).unwrap()
    })
    .join()
    .unwrap();
    ip(&["-n", &ns.0, "link", "set", "svtap0", "up"]);
    ip(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", "svtap0"]);
    (ns, sw, guest, uplink)
}

/// Ask the kernel for 10.77.0.1's MAC until it answers; returns its ARP reply.
fn arp_exchange(guest: &SwitchPort) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut inbox = VecDeque::new();
    let mut reply = None;
    let mut last_sent = Instant::now() - Duration::from_secs(1);
    while reply.is_none() {
        assert!(Instant::now() < deadline, "no ARP reply from the kernel");
        if last_sent.elapsed() > Duration::from_millis(300) {
            let mut b = guest.take_buffer().unwrap();
            b.fill(&arp_request());
            guest.transmit(b);
            last_sent = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
        guest.receive(&mut inbox, 64);
        for b in inbox.drain(..) {
            let f = b.frame();
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                reply = Some(f.to_vec());
            }
            guest.recycle(b);
        }
    }
    reply.unwrap()
}

/// A TCPv4 frame from the guest (10.77.0.2:40000) to 10.77.0.1:9 (closed) with `flags`,
/// sequence number `seq` and `payload` bytes, its IP header checksum set; its TCP checksum field holds the pseudo-header
/// sum (as Linux leaves it for the device).
fn tcp_to_kernel(dst: &[u8], seq: u32, flags: u8, payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((40 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0x43, 0x21, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1]);
    f.extend_from_slice(&[0x9c, 0x40, 0, 9]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0x01, 0xf6, 0, 0, 0, 0]);
    f.extend((0..payload).map(|i| (i % 253) as u8));
    // The IP header checksum is always the sender's.
    let mut ip: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(w[0]) << 8 | u32::from(w[1]))
        .sum();
    while ip > 0xffff {
        ip = (ip & 0xffff) + (ip >> 16);
    }
    f[24..26].copy_from_slice(&(!(ip as u16)).to_be_bytes());
    let mut s: u32 = 0x0a4d + 0x0002 + 0x0a4d + 0x0001 + 6 + (20 + payload) as u32;
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    f[50..52].copy_from_slice(&(s as u16).to_be_bytes());
    f
}

/// Send `frame` with the virtio-net header `hdr` as a guest that negotiated every offload would.
fn send_offloaded(guest: &SwitchPort, hdr: &[u8], frame: &[u8]) {
    let mut chain = hdr.to_vec();
    chain.extend_from_slice(frame);
    let (h, _) = TxHeader::parse(&chain, HDR_LEN, TxOffloads::ALL).unwrap();
    let offload = h.offload(frame).unwrap();
    let mut b = guest.take_large_buffer().unwrap();
    b.fill(frame);
    b.set_offload(offload);
    guest.transmit(b);
}

#[test]
fn the_kernel_accepts_segments_and_checksums_finished_for_the_tap() {
    if !test_support::require(
        "the_kernel_accepts_segments_and_checksums_finished_for_the_tap",
        test_support::peers::netns_tap(),
    ) {
        return;
    }
    let (ns, _sw, guest, uplink) = tap_in_netns("tso");
    let kernel_mac = arp_exchange(&guest)[6..12].to_vec();
    // A 4000-byte TSO frame, MSS 1448: three segments, PSH on the last; then one segment
    // with a partial checksum.
    let gso = tcp_to_kernel(&kernel_mac, 1_000_000, 0x08, 4000);
    let mut hdr = vec![
        HDR_F_NEEDS_CSUM,
        GSO_TCPV4,
        54,
        0,
        0xa8,
        0x05,
        34,
        0,
        16,
        0,
        0,
        0,
    ];
    send_offloaded(&guest, &hdr, &gso);
    let single = tcp_to_kernel(&kernel_mac, 2_000_000, 0x08, 100);
    hdr[1] = 0;
    send_offloaded(&guest, &hdr, &single);
    // The kernel resets each segment it accepted: ACK = the segment's SEQ + its length.
    let mut want = vec![1_001_448u32, 1_002_896, 1_004_000, 2_000_100];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut inbox = VecDeque::new();
    while !want.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no reset from the kernel for the segments ending at {want:?} (checksums refused?)"
        );
        std::thread::sleep(Duration::from_millis(20));
        guest.receive(&mut inbox, 64);
        for b in inbox.drain(..) {
            let f = b.frame();
            if f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 && f[47] & 0x04 != 0 {
                let ack = u32::from_be_bytes([f[42], f[43], f[44], f[45]]);
                want.retain(|&w| w != ack);
            }
            guest.recycle(b);
        }
    }
    drop(uplink);
    drop(ns);
}

#[test]
fn tap_uplink_exchanges_arp_with_the_kernel_in_a_namespace() {
    if !test_support::require(
        "tap_uplink_exchanges_arp_with_the_kernel_in_a_namespace",
        test_support::peers::netns_tap(),
    ) {
        return;
    }
    let (ns, sw, guest, uplink) = tap_in_netns("arp");
    let r = arp_exchange(&guest);
    drop(ns);
    assert_eq!(&r[0..6], &GUEST_MAC, "unicast back to the guest");
    assert_eq!(&r[28..32], &[10, 77, 0, 1], "the kernel's address");
    assert_eq!(&r[32..38], &GUEST_MAC);
    let tap_mac: [u8; 6] = r[6..12].try_into().unwrap();
    assert_eq!(
        sw.lookup(&tap_mac),
        Some(1),
        "the kernel's MAC was learned on the uplink"
    );
    assert!(
        guest.counters().rx_frames == 0,
        "counted by the device queue, not here"
    );
    let c = sw.ports();
    assert!(c
        .iter()
        .any(|(_, n, s)| n == "tap" && s.rx_frames > 0 && s.tx_frames > 0));
    drop(uplink);
    assert_eq!(sw.ports().len(), 1, "stopping the uplink detaches its port");
}
