//! The store daemon over Unix sockets: identity by socket, INTRODUCE/RELEASE,
//! the client library, and bad clients that must not hurt anyone else.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{domain_socket_path, spawn, ServerError, StoreConfig, StoreHandle};
use ipc::xenstore::wire::{Decoder, Message, MsgType, XsError};
use ipc::xenstore::Perms;
use ipc::xenstore::StoreThread;

struct Running {
    path: PathBuf,
    store: StoreThread,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start() -> Running {
        Running::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut StoreConfig)) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xs.sock");
        let mut cfg = StoreConfig::new(&path);
        tweak(&mut cfg);
        Running {
            path,
            store: StoreThread::start(cfg).unwrap(),
            _dir: dir,
        }
    }

    fn dom0(&self) -> StoreClient {
        StoreClient::connect(&self.path).unwrap()
    }

    /// Introduces `domid` with a home it owns, returns a client for it.
    fn guest(&self, domid: u32) -> StoreClient {
        let mut d0 = self.dom0();
        d0.introduce(domid, 0, 0).unwrap();
        let home = format!("/local/domain/{domid}");
        d0.mkdir(&home).unwrap();
        d0.set_perms(&home, &format!("n{domid}").parse().unwrap())
            .unwrap();
        StoreClient::from_stream(self.store.handle().connect_domain(domid).unwrap())
    }

    /// Asserts the store still answers a fresh client.
    fn assert_serving(&self) {
        let mut c = self.dom0();
        c.write("/alive", b"yes").unwrap();
        assert_eq!(c.read("/alive").unwrap(), b"yes");
    }
}

fn raw(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_reply(s: &mut UnixStream) -> Message {
    let mut d = Decoder::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).unwrap();
        assert_eq!(n, 1, "connection closed");
        if let Some(m) = d.decode(&b).1.unwrap() {
            return m;
        }
    }
}

/// Reads until EOF (true) or the deadline (false), discarding data.
fn wait_for_eof(s: &mut UnixStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn client_covers_every_operation() {
    let st = Running::start();
    let mut c = st.dom0();
    c.write("/a/b", b"v").unwrap();
    assert_eq!(c.read("/a/b").unwrap(), b"v");
    c.mkdir("/a/c").unwrap();
    assert_eq!(c.directory("/a").unwrap(), vec!["b", "c"]);
    c.set_perms("/a/b", &"n0 r3".parse().unwrap()).unwrap();
    assert_eq!(c.get_perms("/a/b").unwrap().to_string(), "n0 r3");
    c.rm("/a").unwrap();
    assert_eq!(
        c.read("/a/b").unwrap_err().xs_error(),
        Some(XsError::ENOENT)
    );
    assert_eq!(c.get_domain_path(3).unwrap(), "/local/domain/3");
    assert!(!c.is_domain_introduced(3).unwrap());
    c.introduce(3, 1234, 5).unwrap();
    assert!(c.is_domain_introduced(3).unwrap());
    c.release(3).unwrap();
    assert!(!c.is_domain_introduced(3).unwrap());
}

#[test]
fn watch_events_arriving_before_a_reply_are_queued() {
    let st = Running::start();
    let mut c = st.dom0();
    c.watch("/w", "tok").unwrap();
    c.write("/w/x", b"1").unwrap(); // the event for this write precedes nothing; reply comes first
    c.write("/w/y", b"2").unwrap();
    let first = c.read_watch_event(Some(Duration::from_secs(5))).unwrap();
    assert_eq!((first.path.as_str(), first.token.as_str()), ("/w", "tok"));
    let a = c.read_watch_event(Some(Duration::from_secs(5))).unwrap();
    let b = c.read_watch_event(Some(Duration::from_secs(5))).unwrap();
    assert_eq!((a.path.as_str(), b.path.as_str()), ("/w/x", "/w/y"));
    let none = c.read_watch_event(Some(Duration::from_millis(100)));
    assert!(matches!(none, Err(ipc::xenstore::ClientError::Timeout)));
    c.unwatch("/w", "tok").unwrap();
}

#[test]
fn transactions_through_the_client_conflict_with_eagain() {
    let st = Running::start();
    let mut a = st.dom0();
    let mut b = st.dom0();
    a.write("/n", b"0").unwrap();
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.tx_read(tx, "/n").unwrap(), b"0");
    a.tx_write(tx, "/n", b"a").unwrap();
    b.write("/n", b"b").unwrap();
    let e = a.transaction_end(tx, true).unwrap_err();
    assert_eq!(e.xs_error(), Some(XsError::EAGAIN));
    assert_eq!(a.read("/n").unwrap(), b"b");
    let tx = a.transaction_start().unwrap();
    a.tx_write(tx, "/n", b"c").unwrap();
    a.transaction_end(tx, true).unwrap();
    assert_eq!(b.read("/n").unwrap(), b"c");
}

#[test]
fn connect_domain_speaks_for_that_domain_only() {
    let st = Running::start();
    let mut d0 = st.dom0();
    d0.write("/secret", b"s").unwrap();
    let mut g = st.guest(5);
    assert_eq!(
        g.read("/secret").unwrap_err().xs_error(),
        Some(XsError::EACCES)
    );
    g.write("mine", b"x").unwrap();
    assert_eq!(
        d0.get_perms("/local/domain/5/mine").unwrap(),
        Perms::owned_by(5)
    );
    assert_eq!(
        g.introduce(9, 0, 0).unwrap_err().xs_error(),
        Some(XsError::EACCES)
    );
}

#[test]
fn introduce_opens_a_domain_socket_and_release_closes_it() {
    let st = Running::start();
    let mut d0 = st.dom0();
    d0.introduce(7, 0, 0).unwrap();
    d0.mkdir("/local/domain/7").unwrap();
    d0.set_perms("/local/domain/7", &"n7".parse().unwrap())
        .unwrap();
    let sock = domain_socket_path(&st.path, 7);
    let mut g = StoreClient::connect(&sock).unwrap();
    g.write("name", b"guest7").unwrap();
    assert_eq!(d0.get_perms("/local/domain/7/name").unwrap().owner(), 7);
    assert_eq!(
        g.read("/local/domain/0").unwrap_err().xs_error(),
        Some(XsError::EACCES)
    );
    d0.release(7).unwrap();
    assert!(!sock.exists(), "domain socket removed");
    assert!(
        g.read("name").is_err(),
        "released domain's connection is closed"
    );
    assert!(UnixStream::connect(&sock).is_err());
}

#[test]
fn oversized_length_disconnects_only_the_offender() {
    let st = Running::start();
    let mut good = st.dom0();
    let mut bad = raw(&st.path);
    let mut hdr = Vec::new();
    for w in [MsgType::Read as u32, 1, 0, 4097] {
        hdr.extend_from_slice(&w.to_le_bytes());
    }
    bad.write_all(&hdr).unwrap();
    assert!(wait_for_eof(&mut bad, Duration::from_secs(5)));
    good.write("/still", b"ok").unwrap();
    st.assert_serving();
}

#[test]
fn unknown_type_gets_enosys_and_the_connection_lives_on() {
    let st = Running::start();
    let mut s = raw(&st.path);
    let mut msg = Vec::new();
    for w in [99u32, 42, 0, 2] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    msg.extend_from_slice(b"x\0");
    s.write_all(&msg).unwrap();
    let r = read_reply(&mut s);
    assert_eq!((r.req_id, r.as_error()), (42, Some(XsError::ENOSYS)));
    s.write_all(&Message::new(MsgType::Read, 43, 0, b"/\0".to_vec()).encode())
        .unwrap();
    let r = read_reply(&mut s);
    assert_eq!((r.ty, r.req_id), (MsgType::Read, 43));
}

#[test]
fn half_sent_message_does_not_block_others() {
    let st = Running::start();
    let mut slow = raw(&st.path);
    let full = Message::new(MsgType::Write, 1, 0, b"/half\0done".to_vec()).encode();
    slow.write_all(&full[..10]).unwrap();
    st.assert_serving();
    slow.write_all(&full[10..]).unwrap();
    assert_eq!(read_reply(&mut slow).payload, b"OK\0");
    assert_eq!(st.dom0().read("/half").unwrap(), b"done");
}

#[test]
fn client_that_never_reads_a_watch_flood_is_cut_off() {
    let st = Running::with(|c| c.max_output_bytes = 64 * 1024);
    let mut lazy = raw(&st.path);
    let token = "t".repeat(1000);
    lazy.write_all(
        &Message::new(MsgType::Watch, 1, 0, Message::strings(&["/flood", &token])).encode(),
    )
    .unwrap();
    let mut w = st.dom0();
    let mut writes = 0;
    // 2 MB of events: more than any socket buffer plus the 64 KiB queue.
    while writes < 2000 {
        w.write(&format!("/flood/k{}", writes % 10), b"x").unwrap();
        writes += 1;
    }
    let s = st.store.handle().stats(Duration::from_secs(5)).unwrap();
    assert!(
        s.queued_output_bytes <= 64 * 1024,
        "output queue bounded: {s:?}"
    );
    assert!(
        wait_for_eof(&mut lazy, Duration::from_secs(10)),
        "lazy watcher was not disconnected"
    );
    w.write("/after", b"1").unwrap();
    st.assert_serving();
}

#[test]
fn pipelining_client_that_never_reads_is_throttled_not_fatal() {
    let st = Running::start();
    let g = st.guest(4);
    drop(g);
    let stream = st.store.handle().connect_domain(4).unwrap();
    let writer = stream.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut writer = writer;
        let req = Message::new(MsgType::Read, 1, 0, b"/local/domain/4\0".to_vec()).encode();
        for _ in 0..200_000 {
            if writer.write_all(&req).is_err() {
                return;
            }
        }
    });
    // While the client floods requests and reads nothing, the store's buffers stay bounded.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let s = st.store.handle().stats(Duration::from_secs(5)).unwrap();
        assert!(s.buffered_input_bytes <= 64 * 1024, "{s:?}");
        assert!(s.queued_output_bytes <= 1 << 20, "{s:?}");
    }
    st.assert_serving();
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    t.join().unwrap();
    st.assert_serving();
}

#[test]
fn transaction_storm_hits_the_quota_and_others_continue() {
    let st = Running::start();
    let mut g = st.guest(6);
    let mut opened = Vec::new();
    let err = loop {
        match g.transaction_start() {
            Ok(tx) => opened.push(tx),
            Err(e) => break e,
        }
        assert!(opened.len() <= 10);
    };
    assert_eq!(err.xs_error(), Some(XsError::ENOSPC));
    assert_eq!(opened.len(), 10);
    st.assert_serving();
    g.transaction_end(opened[0], false).unwrap();
    g.transaction_start().unwrap();
}

#[test]
fn bad_arguments_get_errors_not_disconnects() {
    let st = Running::start();
    let mut g = st.guest(8);
    let long_token = "x".repeat(3000);
    assert_eq!(
        g.watch("w", &long_token).unwrap_err().xs_error(),
        Some(XsError::E2BIG)
    );
    for bad in ["/a//b", "/a/", "a b", "/x.y"] {
        assert_eq!(
            g.read(bad).unwrap_err().xs_error(),
            Some(XsError::EINVAL),
            "{bad}"
        );
    }
    g.write("fine", b"1").unwrap();
}

#[test]
fn too_large_request_is_refused_by_the_client() {
    let st = Running::start();
    let mut c = st.dom0();
    let e = c.write("/big", &vec![b'a'; 5000]).unwrap_err();
    assert!(matches!(e, ipc::xenstore::ClientError::TooLarge(_)));
    c.write("/ok", b"1").unwrap();
}

#[test]
fn shutdown_stops_the_store_and_removes_the_socket() {
    let Running { path, store, _dir } = Running::start();
    store.handle().shutdown();
    // Joins the store's thread, which the shutdown above has ended.
    store.stop().unwrap();
    assert!(!path.exists());
}

#[test]
fn second_store_on_a_live_socket_is_refused() {
    let st = Running::start();
    let r = spawn(StoreConfig::new(&st.path));
    assert!(matches!(r, Err(ServerError::InUse(_))));
    st.assert_serving();
}

#[test]
fn deep_pipeline_is_answered_completely_and_in_order() {
    let st = Running::start();
    let mut g = st.guest(3);
    let value = vec![b'v'; 1500];
    g.write("big", &value).unwrap();
    drop(g);
    let stream = st.store.handle().connect_domain(3).unwrap();
    let mut writer = stream.try_clone().unwrap();
    const N: u32 = 2000; // ~3 MB of replies: far beyond socket buffers, so the store must throttle.
    let t = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 1..=N {
            Message::new(MsgType::Read, i, 0, b"big\0".to_vec()).encode_into(&mut all);
        }
        writer.write_all(&all).unwrap();
    });
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut d = Decoder::new();
    let mut buf = vec![0u8; 65536];
    let mut next = 1;
    while next <= N {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {next} replies");
        for m in d.decode_all(&buf[..n]).unwrap() {
            assert_eq!((m.ty, m.req_id), (MsgType::Read, next));
            assert_eq!(m.payload.len(), 1500);
            next += 1;
        }
    }
    t.join().unwrap();
    st.assert_serving();
}

#[test]
fn client_lists_huge_directories_in_parts() {
    let st = Running::start();
    let mut c = st.dom0();
    let names: Vec<String> = (0..400)
        .map(|i| format!("node-with-a-fairly-long-name-{i:06}"))
        .collect();
    let tx = c.transaction_start().unwrap();
    for n in &names {
        c.tx_mkdir(tx, &format!("/huge/{n}")).unwrap();
    }
    c.transaction_end(tx, true).unwrap();
    assert_eq!(c.directory("/huge").unwrap(), names);
}

#[test]
fn handle_is_clone_and_send() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<StoreHandle>();
    let st = Running::start();
    let h = st.store.handle().clone();
    let stream = std::thread::spawn(move || h.connect_domain(0).unwrap())
        .join()
        .unwrap();
    let mut c = StoreClient::from_stream(stream);
    c.write("/from-thread", b"1").unwrap();
}

#[test]
fn connections_beyond_the_limit_are_refused_and_others_served() {
    let st = Running::with(|c| c.max_connections = 4);
    let mut kept: Vec<StoreClient> = (0..4).map(|_| st.dom0()).collect();
    kept[0].write("/k", b"1").unwrap();
    let mut extra = raw(&st.path);
    assert!(
        wait_for_eof(&mut extra, Duration::from_secs(5)),
        "fifth client refused"
    );
    for c in &mut kept {
        assert_eq!(c.read("/k").unwrap(), b"1");
    }
    drop(kept);
    // Closed slots are reused.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = st.dom0();
        match c.read("/k") {
            Ok(v) => {
                assert_eq!(v, b"1");
                break;
            }
            Err(_) => assert!(Instant::now() < deadline, "slots never freed"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
