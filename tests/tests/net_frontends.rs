//! Two process-domain guests (guest-frontend's `NetFrontend`, driving the `no_std` virtio-net
//! driver) on two ports of one `driver-domain serve --net` switch: ARP resolution, then a UDP
//! ping-pong, every byte checked. A third port whose guest never refills its RX ring and then
//! vanishes does not disturb them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4], dst: [u8; 6]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[allow(clippy::too_many_arguments)]
fn udp(
    src: [u8; 6],
    dst: [u8; 6],
    sip: [u8; 4],
    dip: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A parsed UDP/IPv4 frame: (src MAC, src IP, src port, dst port, payload).
type Udp = ([u8; 6], [u8; 4], u16, u16, Vec<u8>);

fn parse_udp(f: &[u8]) -> Option<Udp> {
    if f.len() < 42 || f[12..14] != [0x08, 0x00] || f[23] != 17 {
        return None;
    }
    assert_eq!(
        ip_checksum(&f[14..34]),
        0,
        "IPv4 header checksum survives the switch"
    );
    let sport = u16::from_be_bytes([f[34], f[35]]);
    let dport = u16::from_be_bytes([f[36], f[37]]);
    let len = usize::from(u16::from_be_bytes([f[38], f[39]]));
    Some((
        f[6..12].try_into().ok()?,
        f[26..30].try_into().ok()?,
        sport,
        dport,
        f.get(42..34 + len)?.to_vec(),
    ))
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
        if f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == IP_B {
            let sha: [u8; 6] = f[22..28].try_into().unwrap();
            let spa: [u8; 4] = f[28..32].try_into().unwrap();
            b.send(&arp(2, mac, IP_B, sha, spa, sha)).unwrap();
        } else if let Some((smac, sip, sport, dport, payload)) = parse_udp(f) {
            if dport == PORT {
                b.send(&udp(mac, smac, IP_B, sip, PORT, sport, &payload))
                    .unwrap();
                echoed += 1;
            }
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
        a.send(&arp(1, mac_a, IP_A, [0; 6], IP_B, [0xff; 6]))
            .unwrap();
        let mut got = None;
        while let Some(len) = a.recv(&mut buf, Duration::from_millis(200)).unwrap() {
            let f = &buf[..len];
            if f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == IP_B {
                assert_eq!(&f[0..6], &mac_a, "the reply is unicast to A");
                got = Some(<[u8; 6]>::try_from(&f[22..28]).unwrap());
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
        a.send(&udp(
            mac_a,
            mac_b,
            IP_A,
            IP_B,
            40000 + i as u16,
            PORT,
            &payload,
        ))
        .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no pong {i}");
            let Some(len) = a.recv(&mut buf, Duration::from_millis(200)).unwrap() else {
                continue;
            };
            if let Some((smac, sip, sport, dport, p)) = parse_udp(&buf[..len]) {
                assert_eq!(
                    (smac, sip, sport, dport),
                    (mac_b, IP_B, PORT, 40000 + i as u16)
                );
                assert_eq!(p, payload, "pong {i} carries the ping's payload");
                break;
            }
        }
    }
    let b = responder.join().unwrap();
    // The stuck guest leaves; the others are unaffected.
    drop(c);
    a.send(&udp(mac_a, mac_b, IP_A, IP_B, 1, 9, b"after"))
        .unwrap();
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
    let f = arp(1, [0x02, 0, 0, 0, 0, 0], IP_A, [0; 6], IP_B, [0xff; 6]);
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
