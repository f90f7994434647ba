//! Interop with DPDK: `dpdk-testpmd` virtio-user ports (a real, independently written virtio-net
//! driver) against `driver-domain serve --net`: txonly on one port, rxonly on another, frames
//! switched between them, and testpmd's counts matched against the backend's port counters.
//! Skipped (and the skip recorded) when `dpdk-testpmd` (Debian package `dpdk-dev`) is absent.

#![allow(clippy::unwrap_used)]

#[path = "../src/bin/net-bench/testpmd.rs"]
mod testpmd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use splitvmm_tests::workspace_bin;
use testpmd::{Spec, Testpmd};

struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(dir: &Path, sockets: &[PathBuf], queues: u16) -> Backend {
        let log = dir.join("driver-domain.log");
        let out = std::fs::File::create(&log).unwrap();
        let list: Vec<String> = sockets.iter().map(|p| p.display().to_string()).collect();
        let child = Command::new(workspace_bin("driver-domain"))
            .args(["serve", "--net", "--net-sockets", &list.join(",")])
            .arg(format!("--queues={queues}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sockets.iter().all(|s| s.exists()) {
            assert!(Instant::now() < deadline, "backend sockets never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Backend { child, log }
    }

    /// The last logged counters of each port that had a session.
    fn counters(&self, ports: usize) -> HashMap<usize, HashMap<String, u64>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap();
            let mut out = HashMap::new();
            for line in text.lines() {
                let Some(i) = line.find("net port ") else {
                    continue;
                };
                let rest = &line[i + 9..];
                let Some((id, tail)) = rest.split_once(": counters ") else {
                    continue;
                };
                let map = tail
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
                    .collect();
                out.insert(id.parse().unwrap(), map);
            }
            if out.len() >= ports {
                return out;
            }
            assert!(Instant::now() < deadline, "no counters logged:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long txonly sends: a load parameter, not a synchronisation. Nothing below waits for a
/// moment; every assertion is a count relation that holds however the threads interleave,
/// once frames flowed at all.
const TRAFFIC: Duration = Duration::from_secs(1);
/// Frames one ring holds (testpmd's default ring size; the backend's queue size too).
const RING: u64 = 256;
/// Frames one sender may have queued in a port's switch inbox (the switch's default
/// `queue_limit`).
const INBOX_SHARE: u64 = 256;

/// testpmd instances pin lcores 0 and 1 and each touches 512 MiB: one run at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(test: &str, len: usize, tag: &str, queues: u16) {
    if !test_support::require(test, test_support::peers::dpdk_testpmd()) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let backend = Backend::start(dir.path(), &[a.clone(), b.clone()], queues);
    let mq = [format!("--rxq={queues}"), format!("--txq={queues}")];
    // Each testpmd port takes the address its switch port is configured with (the backend's
    // default: 52:54:00:12:34:56 plus the port's index): the switch drops frames from any
    // other source address, and txonly sends from its port's address.
    let rx_vdev = [format!(
        "net_virtio_user0,path={},queues={queues},mac=52:54:00:12:34:57",
        b.display()
    )];
    let mut rx = Testpmd::spawn(
        dir.path(),
        &Spec {
            prefix: &format!("rx{tag}{}", std::process::id()),
            vdevs: &rx_vdev,
            mode: "rxonly",
            fwd_lcore: 1,
            extra: &mq,
        },
    )
    .unwrap();
    rx.wait_started(Duration::from_secs(15)).unwrap();
    let tx_vdev = [format!(
        "net_virtio_user0,path={},queues={queues},mac=52:54:00:12:34:56",
        a.display()
    )];
    let txpkts = [format!("--txpkts={len}"), mq[0].clone(), mq[1].clone()];
    let mut tx = Testpmd::spawn(
        dir.path(),
        &Spec {
            prefix: &format!("tx{tag}{}", std::process::id()),
            vdevs: &tx_vdev,
            mode: "txonly",
            fwd_lcore: 0,
            extra: &txpkts,
        },
    )
    .unwrap();
    tx.wait_started(Duration::from_secs(15)).unwrap();
    std::thread::sleep(TRAFFIC);
    let sent = tx.stop(Duration::from_secs(5)).unwrap();
    // No pause for frames in flight: those still in the switch or in testpmd's RX ring when
    // it stops are bounded below instead.
    let got = rx.stop(Duration::from_secs(5)).unwrap();
    let c = backend.counters(2);
    let (pa, pb) = (&c[&0], &c[&1]);
    eprintln!("{len} B: testpmd sent {sent:?}, received {got:?}; backend a {pa:?} b {pb:?}");
    assert!(sent.tx > 0 && got.rx > 0, "frames must flow");
    assert_eq!(pa["tx_invalid"], 0, "testpmd's frames are valid");
    assert_eq!(pa["tx_spoofed"], 0, "testpmd sends from its own address");
    // testpmd counts a frame as sent when it is in the ring; frames still in the ring when
    // testpmd stops the device (GET_VRING_BASE right after its last burst) are never consumed.
    let in_ring = sent.tx - pa["tx_frames"].min(sent.tx);
    assert!(
        pa["tx_frames"] <= sent.tx,
        "the switch saw no frame testpmd did not send"
    );
    let queues = u64::from(queues);
    assert!(
        in_ring <= RING * queues,
        "{in_ring} frames unaccounted for: more than the rings hold"
    );
    // Delivered into testpmd's RX ring but not read before it stopped polling: at most what
    // the rings hold.
    assert!(
        got.rx <= pb["rx_frames"],
        "testpmd received frames the switch never delivered"
    );
    assert!(
        pb["rx_frames"] - got.rx <= RING * queues,
        "{} delivered frames unread: more than the rings hold",
        pb["rx_frames"] - got.rx
    );
    assert_eq!(pb["rx_bytes"], pb["rx_frames"] * len as u64);
    // Each frame was delivered, dropped against the sender's share, or still queued for
    // delivery when the receiver went away (at most the sender's inbox share).
    let settled = pb["rx_frames"] + pa["tx_dropped"];
    assert!(
        settled <= pa["tx_frames"],
        "more frames delivered or dropped ({settled}) than sent ({})",
        pa["tx_frames"]
    );
    assert!(
        pa["tx_frames"] - settled <= INBOX_SHARE,
        "{} frames neither delivered nor dropped",
        pa["tx_frames"] - settled
    );
}

#[test]
fn testpmd_txonly_to_rxonly_64_bytes() {
    run("testpmd_txonly_to_rxonly_64_bytes", 64, "s", 1);
}

#[test]
fn testpmd_txonly_to_rxonly_1500_bytes() {
    run("testpmd_txonly_to_rxonly_1500_bytes", 1500, "l", 1);
}

#[test]
fn testpmd_two_queue_pairs() {
    run("testpmd_two_queue_pairs", 64, "m", 2);
}
