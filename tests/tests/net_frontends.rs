//! Two process-domain guests (guest-frontend's `NetFrontend`, driving the `no_std` virtio-net
//! driver) on two ports of one `driver-domain serve --net` switch: ARP resolution, then a UDP
//! ping-pong, every byte checked. A third port whose guest never refills its RX ring and then
//! vanishes does not disturb them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest_frontend::managed::frames::{
    arp_answer, arp_frame, arp_reply_from, UdpFrame, ARP_REQUEST, BROADCAST,
};
use guest_frontend::process::{NetFrontend, NetFrontendConfig};
use splitvmm_tests::workspace_bin;

const IP_A: [u8; 4] = [10, 0, 0, 1];
const IP_B: [u8; 4] = [10, 0, 0, 2];
const PORT: u16 = 7777;
const WAIT: Duration = Duration::from_secs(5);

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend(dir: &Path, sockets: &[PathBuf]) -> Backend {
    let list: Vec<String> = sockets.iter().map(|p| p.display().to_string()).collect();
    let child = Command::new(workspace_bin("driver-domain"))
        .args(["serve", "--net", "--net-sockets", &list.join(",")])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("dd.log")).unwrap())
        .spawn()
        .unwrap();
    Backend(child)
}

/// Guest B: answers ARP for IP_B and echoes UDP to PORT, `n` times, then returns.
fn responder(mut b: NetFrontend, n: usize) -> NetFrontend {
    let mac = b.mac().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut echoed = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while echoed < n {
        assert!(Instant::now() < deadline, "responder timed out");
        let Some(len) = b.recv(&mut buf, Duration::from_millis(200)).unwrap() else {
            continue;
        };
        let f = &buf[..len];
        if let Some(answer) = arp_answer(f, mac, IP_B) {
            b.send(&answer).unwrap();
        } else if let Some(ping) = UdpFrame::parse(f, IP_B).filter(|u| u.dst.2 == PORT) {
            let pong = UdpFrame {
                src: (mac, IP_B, PORT),
                dst: ping.src,
                payload: ping.payload,
            };
            b.send(&pong.frame()).unwrap();
            echoed += 1;
        }
    }
    b
}

#[test]
fn two_guests_resolve_arp_and_ping_pong_udp_through_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let socks: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.sock")))
        .collect();
    let _backend = backend(dir.path(), &socks);
    let cfg = NetFrontendConfig::default();
    let mut a = NetFrontend::connect_path(&socks[0], cfg.clone()).unwrap();
    let b = NetFrontend::connect_path(&socks[1], cfg.clone()).unwrap();
    // A third guest that never takes its frames: tiny RX ring, never polled.
    let c = NetFrontend::connect_path(
        &socks[2],
        NetFrontendConfig {
            queue_size: 2,
            ..cfg
        },
    )
    .unwrap();
    let mac_a = a.mac().unwrap();
    let mac_b = b.mac().unwrap();
    assert_ne!(mac_a, mac_b, "each port has its own MAC");
    const N: usize = 50;
    let responder = std::thread::spawn(move || responder(b, N));

    // ARP: who has IP_B?
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + WAIT;
    let resolved = loop {
        assert!(Instant::now() < deadline, "no ARP reply");
        a.send(&arp_frame(
            ARP_REQUEST,
            (mac_a, IP_A),
            ([0; 6], IP_B),
            BROADCAST,
        ))
        .unwrap();
        let mut got = None;
        while let Some(len) = a.recv(&mut buf, Duration::from_millis(200)).unwrap() {
            let f = &buf[..len];
            if let Some(mac) = arp_reply_from(f, IP_B) {
                assert_eq!(&f[0..6], &mac_a, "the reply is unicast to A");
                got = Some(mac);
                break;
            }
        }
        if let Some(m) = got {
            break m;
        }
    };
    assert_eq!(resolved, mac_b);

    // UDP ping-pong, payload sizes up to a full MTU.
    for i in 0..N {
        let payload: Vec<u8> = (0..(i * 29) % 1473)
            .map(|k| (k as u8) ^ (i as u8))
            .collect();
        let ping = UdpFrame {
            src: (mac_a, IP_A, 40000 + i as u16),
            dst: (mac_b, IP_B, PORT),
            payload: &payload,
        };
        a.send(&ping.frame()).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no pong {i}");
            let Some(len) = a.recv(&mut buf, Duration::from_millis(200)).unwrap() else {
                continue;
            };
            // Parsing checks the IPv4 header checksum: a frame the switch damaged is no pong.
            if let Some(pong) = UdpFrame::parse(&buf[..len], IP_A) {
                assert_eq!((pong.src, pong.dst), (ping.dst, ping.src));
                assert_eq!(pong.payload, payload, "pong {i} carries the ping's payload");
                break;
            }
        }
    }
    let b = responder.join().unwrap();
    // The stuck guest leaves; the others are unaffected.
    drop(c);
    let after = UdpFrame {
        src: (mac_a, IP_A, 1),
        dst: (mac_b, IP_B, 9),
        payload: b"after",
    };
    a.send(&after.frame()).unwrap();
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// Managed mode as the toolstack will use it: listeners bound privately and handed to
/// `serve_listener`, ports attached to one switch, sessions ended with their shutdown
/// handles, ports detached when dropped.
#[test]
fn managed_ports_on_handed_over_listeners() {
    use driver_domain::net::{NetBackendConfig, NetBackendDevice, Switch, SwitchConfig};
    use driver_domain::vhost_user::serve_listener;
    use std::os::unix::net::UnixListener;
    use std::sync::{mpsc, Arc};

    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let mut frontends = Vec::new();
    let mut servers = Vec::new();
    let mut ports = Vec::new();
    let (tx, rx) = mpsc::channel();
    for i in 0..2u8 {
        let path = dir.path().join(format!("vif{i}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        frontends.push(std::thread::spawn(move || {
            NetFrontend::connect_path(&path, NetFrontendConfig::default()).unwrap()
        }));
        let port = Arc::new(sw.attach(&format!("vif{i}.0")).unwrap());
        ports.push(port.clone());
        let cfg = NetBackendConfig {
            mac: [0x02, 0, 0, 0, i, 0],
            ..NetBackendConfig::default()
        };
        let tx = tx.clone();
        servers.push(std::thread::spawn(move || {
            let device = NetBackendDevice::new(port, cfg).unwrap();
            serve_listener(listener, device, move |h| tx.send(h).unwrap())
        }));
    }
    let mut fe: Vec<NetFrontend> = frontends.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(fe[0].mac(), Some([0x02, 0, 0, 0, 0, 0]));
    assert_eq!(fe[1].mac(), Some([0x02, 0, 0, 0, 1, 0]));
    let f = arp_frame(
        ARP_REQUEST,
        ([0x02, 0, 0, 0, 0, 0], IP_A),
        ([0; 6], IP_B),
        BROADCAST,
    );
    fe[0].send(&f).unwrap();
    let mut buf = vec![0u8; 2048];
    let n = fe[1]
        .recv(&mut buf, WAIT)
        .unwrap()
        .expect("frame through the switch");
    assert_eq!(&buf[..n], &f[..]);
    // The switch counts a batch after delivering it: the frame can arrive a moment before
    // its counters do.
    let deadline = Instant::now() + WAIT;
    while (ports[0].counters().tx_frames, ports[1].counters().rx_frames) != (1, 1)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ports[0].counters().tx_frames, 1);
    assert_eq!(ports[1].counters().rx_frames, 1);
    for _ in 0..2 {
        rx.recv_timeout(WAIT).unwrap().shutdown();
    }
    for s in servers {
        s.join().unwrap().unwrap();
    }
    drop(fe);
    drop(ports);
    assert!(
        sw.ports().is_empty(),
        "dropping the last handles detaches the ports"
    );
}
