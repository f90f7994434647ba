//! Debian's xenstore-utils (libxenstore, written by the Xen project) against
//! this project's store, connected through `XENSTORED_PATH`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{domain_socket_path, StoreConfig};
use ipc::xenstore::StoreThread;
use ipc::xenstore::XsError;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Running {
    path: PathBuf,
    _store: StoreThread,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start() -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xs.sock");
        Running {
            _store: StoreThread::start(StoreConfig::new(&path)).unwrap(),
            path,
            _dir: dir,
        }
    }
    fn client(&self) -> StoreClient {
        StoreClient::connect(&self.path).unwrap()
    }
}

/// True if xenstore-utils are installed; otherwise records the skip of `test`.
fn have_utils(test: &str) -> bool {
    test_support::require(test, test_support::peers::xenstore_utils())
}

/// The fresh-machine case, on any machine: this binary's first test, run again with
/// xenstore-utils hidden from PATH, passes and leaves a skip marker under its own name.
#[test]
fn a_hidden_peer_is_a_recorded_skip() {
    let skips = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "write_then_read_several_keys",
            "--test-threads=1",
        ])
        .env("PATH", test_support::peers::path_without("xenstore-read"))
        .env(test_support::SKIP_DIR_ENV, skips.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    let markers: Vec<_> = std::fs::read_dir(skips.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    let recorded = std::fs::read_to_string(&markers[0]).unwrap();
    assert!(
        recorded
            .starts_with("store_interop::write_then_read_several_keys: xenstore-read not found"),
        "{recorded}"
    );
}

/// Kills a child that outlives its welcome.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `xenstore-<tool> args...` against `socket`; a hang is killed and fails the test.
fn xs(socket: &Path, tool: &str, args: &[&str]) -> Output {
    let child = Command::new(format!("xenstore-{tool}"))
        .args(args)
        .env("XENSTORED_PATH", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("xenstore-{tool} {args:?} hung");
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn write_then_read_several_keys() {
    if !have_utils("write_then_read_several_keys") {
        return;
    }
    let st = Running::start();
    // xenstore-write with several pairs writes them in one transaction.
    ok(&xs(
        &st.path,
        "write",
        &["/vm/a", "1", "/vm/b", "two words"],
    ));
    assert_eq!(
        ok(&xs(&st.path, "read", &["/vm/a", "/vm/b"])),
        "1\ntwo words\n"
    );
    assert_eq!(st.client().read("/vm/b").unwrap(), b"two words");
    let out = xs(&st.path, "read", &["/vm/missing"]);
    assert!(!out.status.success());
}

#[test]
fn ls_list_and_exists() {
    if !have_utils("ls_list_and_exists") {
        return;
    }
    let st = Running::start();
    let mut c = st.client();
    c.write("/top/x", b"1").unwrap();
    c.write("/top/y/z", b"deep").unwrap();
    assert_eq!(ok(&xs(&st.path, "list", &["/top"])), "x\ny\n");
    let ls = ok(&xs(&st.path, "ls", &["/top"]));
    assert!(ls.contains("x = \"1\""), "{ls}");
    assert!(ls.contains("z = \"deep\""), "{ls}");
    let lsp = ok(&xs(&st.path, "ls", &["-p", "/top"]));
    assert!(lsp.contains("n0"), "permissions shown: {lsp}");
    assert!(xs(&st.path, "exists", &["/top/y/z"]).status.success());
    assert!(!xs(&st.path, "exists", &["/top/nope"]).status.success());
}

#[test]
fn rm_removes_subtree() {
    if !have_utils("rm_removes_subtree") {
        return;
    }
    let st = Running::start();
    let mut c = st.client();
    c.write("/gone/a/b", b"1").unwrap();
    ok(&xs(&st.path, "rm", &["/gone/a"]));
    assert_eq!(
        c.read("/gone/a/b").unwrap_err().xs_error(),
        Some(XsError::ENOENT)
    );
    assert_eq!(c.directory("/gone").unwrap(), Vec::<String>::new());
}

#[test]
fn chmod_sets_permissions() {
    if !have_utils("chmod_sets_permissions") {
        return;
    }
    let st = Running::start();
    let mut c = st.client();
    c.write("/perm/child", b"1").unwrap();
    ok(&xs(&st.path, "chmod", &["/perm", "n0", "r5", "b7"]));
    assert_eq!(c.get_perms("/perm").unwrap().to_string(), "n0 r5 b7");
    assert_eq!(c.get_perms("/perm/child").unwrap().to_string(), "n0");
    ok(&xs(&st.path, "chmod", &["-r", "/perm", "r0"]));
    assert_eq!(c.get_perms("/perm/child").unwrap().to_string(), "r0");
}

#[test]
fn watch_reports_initial_and_later_events() {
    if !have_utils("watch_reports_initial_and_later_events") {
        return;
    }
    let st = Running::start();
    st.client().write("/watched", b"0").unwrap();
    let child = Command::new("xenstore-watch")
        .args(["-n", "2", "/watched"])
        .env("XENSTORED_PATH", &st.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut r = Reaper(child);
    let stdout = r.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(TIMEOUT).expect("initial watch event");
    assert_eq!(first, "/watched");
    st.client().write("/watched/leaf", b"1").unwrap();
    let second = rx.recv_timeout(TIMEOUT).expect("event for the write");
    assert_eq!(second, "/watched/leaf");
    let end = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = r.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "xenstore-watch -n 2 exits after two events"
            );
            break;
        }
        assert!(Instant::now() < end, "xenstore-watch did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn domain_socket_gives_the_domains_identity() {
    if !have_utils("domain_socket_gives_the_domains_identity") {
        return;
    }
    let st = Running::start();
    let mut c = st.client();
    c.write("/secret", b"s").unwrap();
    c.introduce(5, 0, 0).unwrap();
    c.mkdir("/local/domain/5").unwrap();
    c.set_perms("/local/domain/5", &"n5".parse().unwrap())
        .unwrap();
    let sock = domain_socket_path(&st.path, 5);
    let out = xs(&sock, "read", &["/secret"]);
    assert!(!out.status.success(), "domain 5 must not read dom0's node");
    ok(&xs(&sock, "write", &["/local/domain/5/name", "guest"]));
    assert_eq!(c.get_perms("/local/domain/5/name").unwrap().owner(), 5);
}

/// Forwards one client connection to the store, recording the request types.
fn recording_proxy(store: PathBuf, listen: &Path) -> mpsc::Receiver<Vec<ipc::xenstore::MsgType>> {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(listen).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut upstream = UnixStream::connect(store).unwrap();
        let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Write);
        });
        let mut dec = ipc::xenstore::wire::Decoder::new();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            for m in dec.decode_all(&buf[..n]).unwrap() {
                seen.push(m.ty);
            }
            upstream.write_all(&buf[..n]).unwrap();
        }
        let _ = upstream.shutdown(std::net::Shutdown::Write);
        let _ = tx.send(seen);
    });
    rx
}

#[test]
fn multi_key_write_uses_a_transaction() {
    if !have_utils("multi_key_write_uses_a_transaction") {
        return;
    }
    use ipc::xenstore::MsgType;
    let st = Running::start();
    let proxy = st.path.with_file_name("proxy.sock");
    let rx = recording_proxy(st.path.clone(), &proxy);
    ok(&xs(&proxy, "write", &["/t/a", "1", "/t/b", "2"]));
    let seen = rx.recv_timeout(TIMEOUT).unwrap();
    let writes = seen.iter().filter(|t| **t == MsgType::Write).count();
    assert_eq!(writes, 2, "{seen:?}");
    assert_eq!(seen.first(), Some(&MsgType::TransactionStart), "{seen:?}");
    assert_eq!(seen.last(), Some(&MsgType::TransactionEnd), "{seen:?}");
    assert_eq!(st.client().read("/t/b").unwrap(), b"2");
}

#[test]
fn listing_a_directory_too_big_for_one_reply() {
    if !have_utils("listing_a_directory_too_big_for_one_reply") {
        return;
    }
    let st = Running::start();
    let mut c = st.client();
    // 200 names of 40 bytes: ~8 KB of children, so DIRECTORY answers E2BIG and
    // libxenstore falls back to DIRECTORY_PART.
    let names: Vec<String> = (0..200)
        .map(|i| format!("a-rather-long-child-name-number-{i:08}"))
        .collect();
    let tx = c.transaction_start().unwrap();
    for n in &names {
        c.tx_mkdir(tx, &format!("/wide/{n}")).unwrap();
    }
    c.transaction_end(tx, true).unwrap();
    let plain = c.request(ipc::xenstore::MsgType::Directory, 0, b"/wide\0".to_vec());
    assert_eq!(plain.unwrap_err().xs_error(), Some(XsError::E2BIG));
    let listed = ok(&xs(&st.path, "list", &["/wide"]));
    let got: Vec<&str> = listed.lines().collect();
    assert_eq!(got, names);
}
