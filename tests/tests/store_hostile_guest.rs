//! Issue 18 replayed against the store `splitvmm up --stay` hosts: a guest attacks through its
//! own store socket (`<store>.d/<domid>`), and everything is judged from outside the
//! toolstack: its resident memory (`/proc/<pid>/status`) grows by at most 64 MiB under each
//! attack, its descriptors stay bounded, dom0's `splitvmm list` and `xenstore-read` keep
//! working while the attack holds, and a reading dom0 watcher is never dropped.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::domain_socket_path;
use ipc::xenstore::wire::{Decoder, Message, MsgType};
use splitvmm_tests::running::{run, RunningHost};

/// How much the toolstack may grow under one attack.
const BOUND: u64 = 64 << 20;
/// The guest attacking.
const GUEST: u32 = 2;
/// The store's default connection limit per unprivileged domain (docs/store.md).
const CONNECTIONS_PER_DOMAIN: usize = 32;

/// A `splitvmm up --stay` host with a driver domain and one guest, `guest-a` (domain 2).
struct Host {
    _dir: tempfile::TempDir,
    host: RunningHost,
    /// dom0's store socket.
    store: PathBuf,
    /// The guest's store socket.
    guest: PathBuf,
}

fn start() -> Host {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"run\"\n[driver_domain]\nname = \"driver\"\ndomid = 1\n\
             [[guest]]\nname = \"guest-a\"\ndomid = {GUEST}\n"
        ),
    )
    .unwrap();
    let store = dir.path().join("run/xenstored.sock");
    let host = RunningHost::start(&config, &store, &[]);
    let guest = domain_socket_path(&store, GUEST);
    assert!(guest.exists(), "no store socket for the guest");
    let h = Host {
        _dir: dir,
        host,
        store,
        guest,
    };
    h.assert_dom0_served();
    h
}

/// Raises this process's descriptor limit (the attacker holds more than 1,024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(8192);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

impl Host {
    /// The toolstack's resident set, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.host.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// The toolstack's open descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.host.pid()))
            .unwrap()
            .count()
    }

    /// dom0's commands work: `splitvmm list` shows the guest, `xenstore-read` reads its name.
    fn assert_dom0_served(&self) {
        let out = self.host.cli_ok(&["list"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("guest-a"),
            "`splitvmm list` does not show the guest"
        );
        if let Err(why) = test_support::peers::xenstore_utils() {
            test_support::skip("xenstore_read", &why);
            return;
        }
        let out = run(Command::new("xenstore-read")
            .arg(format!("/local/domain/{GUEST}/name"))
            .env("XENSTORED_PATH", &self.store));
        assert!(out.status.success(), "xenstore-read failed");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "guest-a");
    }

    /// Runs `attack` and, while what it returns is held (its connections, transactions),
    /// checks the toolstack's growth and dom0's service; returns it for further checks.
    fn replay<T>(&self, what: &str, attack: impl FnOnce(&Path) -> T) -> T {
        let before = self.rss();
        let started = Instant::now();
        let held = attack(&self.guest);
        let grown = self.rss().saturating_sub(before);
        eprintln!(
            "{what}: {:.1} s, the toolstack grew by {} KiB",
            started.elapsed().as_secs_f64(),
            grown >> 10
        );
        assert!(
            grown <= BOUND,
            "{what}: the toolstack grew by {grown} bytes"
        );
        self.assert_dom0_served();
        held
    }

    /// The toolstack holds at most `before` descriptors plus the guest's connection share
    /// (and a few of its own: the CLI's connection, a log file).
    fn assert_fds_bounded(&self, before: usize) {
        let now = self.fds();
        assert!(
            now <= before + CONNECTIONS_PER_DOMAIN + 8,
            "the toolstack holds {now} descriptors (was {before})"
        );
    }
}

/// Where the guest may write: its `data` directory (libxl's layout; the rest of its home is
/// dom0's).
fn data(rest: &str) -> String {
    format!("/local/domain/{GUEST}/data/{rest}")
}

/// A path of about 1.8 KiB in the guest's data directory for leaf `i`: two long shared chains
/// with short leaf names keep every node within the node-size quota.
fn long_path(i: usize) -> String {
    let part = "n".repeat(600);
    data(&format!("{part}/{part}/{part}{}/{i}", i % 2))
}

/// Connects to the guest's socket; the store closes a connection over the guest's limit
/// at once, so a connection here may already be dead.
fn connect(guest: &Path) -> UnixStream {
    let s = UnixStream::connect(guest).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads `n` replies from a pipelining connection.
fn read_replies(s: &mut UnixStream, dec: &mut Decoder, n: usize) -> Vec<Message> {
    let mut got = Vec::with_capacity(n);
    let mut buf = [0u8; 4096];
    while got.len() < n {
        let len = s.read(&mut buf).expect("the store stopped answering");
        assert_ne!(len, 0, "the store closed the guest's connection");
        let mut at = 0;
        while at < len {
            let (used, msg) = dec.decode(&buf[at..len]);
            at += used;
            if let Some(m) = msg.unwrap() {
                got.push(m);
            }
        }
    }
    got
}

#[test]
fn rewriting_one_node_in_a_transaction_keeps_the_toolstack_bounded() {
    let h = start();
    let held = h.replay(
        "one node rewritten 60,000 times in a transaction",
        |guest| {
            let mut s = connect(guest);
            let tx = StoreClient::from_stream(s.try_clone().unwrap())
                .transaction_start()
                .unwrap();
            let mut payload = Message::strings(&[long_path(0)]);
            payload.push(b'v');
            // Pipelined 16 at a time: below the guest's 20 outstanding requests.
            let batch: Vec<u8> = (0..16)
                .flat_map(|_| Message::new(MsgType::Write, 1, tx, payload.clone()).encode())
                .collect();
            let mut dec = Decoder::new();
            for _ in 0..60_000 / 16 {
                s.write_all(&batch).unwrap();
                for reply in read_replies(&mut s, &mut dec, 16) {
                    assert_eq!(reply.ty, MsgType::Write, "{:?}", reply.as_error());
                }
            }
            // The transaction (and its journal) is held open while the toolstack is measured.
            s
        },
    );
    drop(held);
    h.assert_dom0_served();
}

#[test]
fn sixty_connections_of_full_transactions_keep_the_toolstack_bounded() {
    let h = start();
    let fds = h.fds();
    let (held, refused) = h.replay("60 connections x 10 transactions x 900 nodes", |guest| {
        let mut held = Vec::new();
        let mut refused = 0;
        for c in 0..60 {
            let mut g = StoreClient::from_stream(connect(guest));
            'conn: for _ in 0..10 {
                let Ok(tx) = g.transaction_start() else {
                    refused += 1;
                    break;
                };
                for n in 0..900 {
                    let p = data(&format!("c{c}/g{}/{}", n / 100, n % 100));
                    if g.tx_write(tx, &p, &[b'v'; 1500]).is_err() {
                        refused += 1;
                        break 'conn;
                    }
                }
            }
            held.push(g);
        }
        (held, refused)
    });
    // The memory quota (or the connection limit) stopped every connection's attack.
    assert!(
        refused >= 59,
        "only {refused} of 60 connections were refused"
    );
    h.assert_fds_bounded(fds);
    drop(held);
    h.assert_dom0_served();
}

/// Whether the store answers a request on `s` (false: it closed the connection). Once a
/// connection is answered or closed, the store has accepted every earlier one.
fn answered(s: &mut UnixStream) -> bool {
    let name = format!("/local/domain/{GUEST}/name\0");
    let req = Message::new(MsgType::Read, 9, 0, name.into_bytes()).encode();
    if s.write_all(&req).is_err() {
        return false;
    }
    let mut reply = [0u8; 16 + 7];
    match s.read_exact(&mut reply) {
        Ok(()) => {
            assert_eq!(&reply[16..], b"guest-a");
            true
        }
        Err(e) => {
            assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "no answer");
            false
        }
    }
}

#[test]
fn a_guest_opening_1100_connections_leaves_dom0_served() {
    let h = start();
    let fds = h.fds();
    let (held, served) = h.replay("1,100 connections", |guest| {
        let mut held: Vec<UnixStream> = (0..1100).map(|_| connect(guest)).collect();
        // The guest uses each: the store has taken them all in before dom0 is checked.
        let served = held.iter_mut().map(answered).filter(|&a| a).count();
        (held, served)
    });
    assert!(
        served <= CONNECTIONS_PER_DOMAIN,
        "the guest was served on {served} connections"
    );
    h.assert_fds_bounded(fds);
    drop(held);
    h.assert_dom0_served();
}

#[test]
fn half_sent_messages_leave_dom0_served_and_time_out() {
    let h = start();
    let fds = h.fds();
    let mut held = h.replay("1,000 half-sent messages", |guest| {
        let full = Message::new(
            MsgType::Write,
            1,
            0,
            format!("{}\0v", data("x")).into_bytes(),
        )
        .encode();
        let held: Vec<UnixStream> = (0..1000)
            .map(|_| {
                let mut s = connect(guest);
                // The store may have closed it already (over the guest's limit).
                let _ = s.write_all(&full[..10]);
                s
            })
            .collect();
        // One more, used: the store has taken in every half-sent one before dom0 is checked.
        answered(&mut connect(guest));
        held
    });
    h.assert_fds_bounded(fds);
    // The store closes every half-sent message's connection (5 s after its first byte).
    let deadline = Instant::now() + Duration::from_secs(15);
    for s in &mut held {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let got = s.read(&mut [0u8; 16]);
        assert!(
            matches!(got, Ok(0))
                || got
                    .as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "a half-sent message's connection is still open: {got:?}"
        );
    }
    h.assert_fds_bounded(fds);
    h.assert_dom0_served();
}

#[test]
fn a_reading_dom0_watcher_survives_900_long_path_nodes() {
    let h = start();
    let mut watcher = StoreClient::connect(&h.store).unwrap();
    let home = format!("/local/domain/{GUEST}");
    watcher.watch(&home, "w").unwrap();
    watcher
        .read_watch_event(Some(Duration::from_secs(5)))
        .unwrap();
    let done = data("done");
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            // Reads every event until the guest's last write, as a toolstack would.
            let mut paths = Vec::new();
            loop {
                match watcher.read_watch_event(Some(Duration::from_secs(30))) {
                    Ok(ev) if ev.path == done => return (Ok(paths), watcher),
                    Ok(ev) => paths.push(ev.path),
                    Err(e) => return (Err(e), watcher),
                }
            }
        })
    };
    h.replay(
        "900 long-path nodes under a reading dom0 watcher",
        |guest| {
            let mut g = StoreClient::from_stream(connect(guest));
            let tx = g.transaction_start().unwrap();
            let mut written = 0;
            for i in 1..=900 {
                // Stops at the guest's memory quota.
                if g.tx_write(tx, &long_path(i), b"").is_err() {
                    break;
                }
                written += 1;
            }
            g.transaction_end(tx, true).unwrap();
            assert!(written >= 400, "only {written} nodes written");
            g.write(&done, b"1").unwrap();
            let (paths, mut watcher) = reader.join().unwrap();
            let paths = paths.expect("the reading dom0 watcher was dropped");
            eprintln!("{written} nodes written, {} events read", paths.len());
            for i in 1..=written {
                assert!(paths.contains(&long_path(i)), "no event for node {i}");
            }
            // Still connected: it is answered.
            assert_eq!(watcher.read(&format!("{home}/name")).unwrap(), b"guest-a");
            g
        },
    );
}
