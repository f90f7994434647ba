//! The tap uplink against the real kernel, inside a network namespace this test creates: a
//! switch port plays a guest and sends an ARP request out of the tap; the namespace's kernel
//! (address 10.77.0.1 on the tap) must answer through the tap and the switch.
//! Skipped (and the skip recorded) when not root, without /dev/net/tun, or without `ip`.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use driver_domain::net::{Switch, SwitchConfig, TapUplink};

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

#[test]
fn tap_uplink_exchanges_arp_with_the_kernel_in_a_namespace() {
    if !test_support::require(
        "tap_uplink_exchanges_arp_with_the_kernel_in_a_namespace",
        test_support::peers::netns_tap(),
    ) {
        return;
    }
    let ns = Netns(format!("svmm-net-{}", std::process::id()));
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
    let r = reply.unwrap();
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
