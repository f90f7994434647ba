//! Issue 18's attacks on the store daemon, replayed through a guest's own
//! socket: connection exhaustion, half-sent messages, watch-event floods and
//! transaction journals. dom0 keeps being served and a reading dom0 watcher
//! is never dropped.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{
    domain_socket_path, spawn, ServerError, StoreConfig, StoreHandle, StoreStats,
};
use ipc::xenstore::wire::{Decoder, Message, MsgType};

/// A path of about 1.8 KiB below `home` for leaf `i`: two long shared
/// chains with short leaf names keep every node within the node-size quota.
fn long_path(home: &str, i: usize) -> String {
    let part = "n".repeat(600);
    format!("{home}/{part}/{part}/{part}{}/{i}", i % 2)
}

struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    handle: StoreHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Running {
    fn with(tweak: impl FnOnce(&mut StoreConfig)) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xs.sock");
        let mut cfg = StoreConfig::new(&path);
        tweak(&mut cfg);
        let (handle, thread) = spawn(cfg).unwrap();
        Running {
            _dir: dir,
            path,
            handle,
            thread: Some(thread),
        }
    }

    fn dom0(&self) -> StoreClient {
        StoreClient::connect(&self.path).unwrap()
    }

    /// Introduces `domid` with a home it owns; returns its socket path.
    fn introduce(&self, domid: u32) -> PathBuf {
        let mut d0 = self.dom0();
        d0.introduce(domid, 0, 0).unwrap();
        let home = format!("/local/domain/{domid}");
        d0.mkdir(&home).unwrap();
        d0.set_perms(&home, &format!("n{domid}").parse().unwrap())
            .unwrap();
        domain_socket_path(&self.path, domid)
    }

    fn stats(&self) -> StoreStats {
        self.handle.stats(Duration::from_secs(5)).unwrap()
    }

    /// Waits (bounded) until the store's statistics satisfy `cond`.
    fn wait_stats(&self, what: &str, cond: impl Fn(&StoreStats) -> bool) -> StoreStats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// dom0's commands work: a fresh client writes and reads back.
    fn assert_dom0_served(&self) {
        let mut c = self.dom0();
        c.write("/alive", b"yes").unwrap();
        assert_eq!(c.read("/alive").unwrap(), b"yes");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Raises this process's descriptor limit to its hard limit, so that the
/// attacker can hold more descriptors than the store has slots.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(8192);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// Resident set size of this process (which hosts the store thread), bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn one_guest_cannot_take_every_connection_slot() {
    raise_fd_limit();
    let st = Running::with(|_| {});
    let sock = st.introduce(5);
    let per_domain = StoreConfig::default().quotas.connections_per_domain;
    let mut held = Vec::new();
    for _ in 0..1100 {
        match UnixStream::connect(&sock) {
            Ok(s) => held.push(s),
            // A full listen backlog: the store refuses faster than we connect.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    let s = st.wait_stats("refusals", |s| {
        s.refused_connections + s.connections as u64 >= held.len() as u64
    });
    assert!(s.connections <= per_domain, "{s:?}");
    // dom0 still gets in and is served; `splitvmm list`-style reads work.
    st.assert_dom0_served();
    let mut d0 = st.dom0();
    assert!(d0
        .directory("/local/domain")
        .unwrap()
        .contains(&"5".to_owned()));
    drop(held);
    st.wait_stats("guest connections closed", |s| s.connections <= 1);
}

#[test]
fn half_sent_messages_time_out_and_free_their_slots() {
    let timeout = Duration::from_millis(1000);
    let st = Running::with(|c| c.partial_message_timeout = timeout);
    let sock = st.introduce(6);
    let full = Message::new(MsgType::Write, 1, 0, b"/local/domain/6/x\0v".to_vec()).encode();
    let mut halves = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        let Ok(mut s) = UnixStream::connect(&sock) else {
            continue;
        };
        if s.write_all(&full[..10]).is_ok() {
            halves.push(s);
        }
    }
    // At most the per-domain connection quota is held at once; each held one times out and
    // frees its slot. On a loaded machine the loop can outlast the timeout, and slots freed
    // meanwhile are taken again: at most one quota's worth per timeout window.
    let windows = (started.elapsed().as_millis() / timeout.as_millis() + 1) as usize;
    st.assert_dom0_served();
    let s = st.wait_stats("half-sent messages timed out", |s| {
        s.timed_out_messages >= 1 && s.connections == 0
    });
    let quota = StoreConfig::default().quotas.connections_per_domain;
    assert!(
        s.timed_out_messages as usize <= quota * windows,
        "{} timed out, quota {quota}, {windows} timeout window(s)",
        s.timed_out_messages
    );
    // Each half-sent connection was closed by the store.
    for mut h in halves {
        h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        assert!(matches!(h.read(&mut b), Ok(0) | Err(_)));
    }
    // The guest connects again and completes a message in time.
    let mut g = StoreClient::connect(&sock).unwrap();
    g.write("/local/domain/6/x", b"v").unwrap();
}

#[test]
fn a_guests_event_flood_throttles_the_guest_not_the_reading_dom0_watcher() {
    let st = Running::with(|c| c.max_output_bytes = 64 * 1024);
    let sock = st.introduce(7);
    let mut watcher = st.dom0();
    watcher.watch("/local/domain/7", "w").unwrap();
    watcher
        .read_watch_event(Some(Duration::from_secs(5)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = 0usize;
        while watcher
            .read_watch_event(Some(Duration::from_secs(5)))
            .is_ok()
        {
            got += 1;
        }
        (got, watcher)
    });
    // 900 long-path nodes in one transaction: 900 events of ~1.9 KiB, far
    // more than the 64 KiB output bound, all caused by the guest.
    let mut g = StoreClient::connect(&sock).unwrap();
    let tx = g.transaction_start().unwrap();
    let mut written = 0;
    for i in 0..900 {
        // Stops at the memory quota (the journal is charged to the guest).
        if g.tx_write(tx, &long_path("/local/domain/7", i), b"")
            .is_err()
        {
            break;
        }
        written += 1;
    }
    g.transaction_end(tx, true).unwrap();
    assert!(written > 100, "{written}");
    // The guest goes on (throttled while dom0 catches up).
    for i in 0..50 {
        g.write(&format!("/local/domain/7/after{i}"), b"1").unwrap();
    }
    let (got, mut watcher) = reader.join().unwrap();
    // Every node written, its directories and the 50 later writes fired.
    assert!(got >= written + 50, "{got} events for {written} nodes");
    watcher.write("/still-connected", b"1").unwrap();
    let s = st.stats();
    assert_eq!(s.dropped_events, 0, "{s:?}");
}

#[test]
fn a_dom0_watcher_that_never_reads_stalls_only_the_guest_until_events_expire() {
    let st = Running::with(|c| c.watch_event_timeout = Duration::from_millis(200));
    let sock = st.introduce(8);
    let mut lazy = UnixStream::connect(&st.path).unwrap();
    lazy.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let watch = Message::strings(&["/local/domain/8", "t"]);
    lazy.write_all(&Message::new(MsgType::Watch, 1, 0, watch).encode())
        .unwrap();
    let mut dec = Decoder::new();
    let mut next = |s: &mut UnixStream| loop {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 1, "lazy watcher disconnected");
        if let Some(m) = dec.decode(&b).1.unwrap() {
            return m;
        }
    };
    // The watch's reply and its initial event; then it reads nothing.
    assert_eq!(next(&mut lazy).ty, MsgType::Watch);
    assert_eq!(next(&mut lazy).ty, MsgType::WatchEvent);
    // ~1.8 KiB events: 300 of them overflow the socket buffer, so events
    // stay queued in the store, charged to the guest.
    let mut g = StoreClient::connect(&sock).unwrap();
    let start = Instant::now();
    for i in 0..300 {
        g.write(&long_path("/local/domain/8", i), b"1").unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "the guest was never throttled"
    );
    let s = st.stats();
    assert!(s.dropped_events >= 1, "{s:?}");
    st.assert_dom0_served();
    // The lazy dom0 client was not disconnected: once it reads, its reply comes.
    lazy.write_all(&Message::new(MsgType::Read, 2, 0, b"/alive\0".to_vec()).encode())
        .unwrap();
    loop {
        let m = next(&mut lazy);
        if m.ty == MsgType::Read {
            assert_eq!(m.payload, b"yes");
            break;
        }
        assert_eq!(m.ty, MsgType::WatchEvent);
    }
}

#[test]
fn transaction_journal_attack_keeps_memory_bounded() {
    let st = Running::with(|_| {});
    let sock = st.introduce(9);
    let before = rss_bytes();
    // Rewrite one node inside a transaction, pipelined 20 at a time.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = StoreClient::from_stream(s.try_clone().unwrap());
    let tx = g.transaction_start().unwrap();
    drop(g);
    let path = format!("/local/domain/9/{}", "p".repeat(2000));
    let mut payload = Message::strings(&[&path]);
    payload.push(b'v');
    let req = Message::new(MsgType::Write, 7, tx, payload).encode();
    let rounds = 2500;
    let mut reply = vec![0u8; 16 + 3];
    for _ in 0..rounds {
        for _ in 0..20 {
            s.write_all(&req).unwrap();
        }
        for _ in 0..20 {
            s.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[16..], b"OK\0");
        }
    }
    // 50,000 rewrites of a 2 KiB path grew the old store by ~100 MB.
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown <= 64 << 20, "grew {grown} bytes");
    st.assert_dom0_served();
}
