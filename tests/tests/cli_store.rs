//! The toolstack's store commands against a standalone `splitvmm store`: xs read, write, ls,
//! rm, watch and wait, list and destroy, and their errors.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use splitvmm_tests::running::start_store;
use splitvmm_tests::workspace_bin;

fn xs(socket: &Path, args: &[&str]) -> Output {
    Command::new(workspace_bin("splitvmm"))
        .args(args)
        .arg("--store")
        .arg(socket)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn xs_commands_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    let _store = start_store(&socket);

    stdout(&xs(
        &socket,
        &["xs", "write", "/local/domain/7/name", "seven"],
    ));
    stdout(&xs(
        &socket,
        &["xs", "write", "/local/domain/7/data/x", "1"],
    ));
    assert_eq!(
        stdout(&xs(&socket, &["xs", "read", "/local/domain/7/name"])),
        "seven\n"
    );
    let tree = stdout(&xs(&socket, &["xs", "ls", "/local/domain/7"]));
    assert!(tree.contains("/local/domain/7/name = \"seven\""), "{tree}");
    assert!(tree.contains("/local/domain/7/data/x = \"1\""), "{tree}");
    let list = stdout(&xs(&socket, &["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with('7') && l.contains("seven")),
        "{list}"
    );

    stdout(&xs(&socket, &["xs", "rm", "/local/domain/7/data"]));
    let missing = xs(&socket, &["xs", "read", "/local/domain/7/data/x"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("ENOENT"));

    stdout(&xs(&socket, &["destroy", "seven"]));
    assert!(!stdout(&xs(&socket, &["list"])).contains("seven"));
    let again = xs(&socket, &["destroy", "seven"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no domain"));
}

#[test]
fn xs_watch_reports_changes_and_wait_sees_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    let _store = start_store(&socket);
    let mut watch = Command::new(workspace_bin("splitvmm"))
        .args([
            "xs",
            "watch",
            "/local/w",
            "-n",
            "3",
            "--timeout",
            "10",
            "--store",
        ])
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The first event fires at registration.
    assert_eq!(lines.next().unwrap().unwrap(), "/local/w");
    stdout(&xs(&socket, &["xs", "write", "/local/w/a", "1"]));
    assert_eq!(lines.next().unwrap().unwrap(), "/local/w/a");
    stdout(&xs(&socket, &["xs", "write", "/local/other", "1"]));
    stdout(&xs(&socket, &["xs", "write", "/local/w/b", "1"]));
    assert_eq!(lines.next().unwrap().unwrap(), "/local/w/b");
    assert!(watch.wait().unwrap().success());

    // `xs wait` ends when the node holds the value, not before. It watches the node before
    // reading it, so a write lands either before its read (which sees it) or after its watch
    // (which fires): whenever it starts relative to the writes below, it must end on the
    // "4" and not on the "3", so there is no moment to wait for.
    stdout(&xs(&socket, &["xs", "write", "/local/state", "2"]));
    let mut wait = Command::new(workspace_bin("splitvmm"))
        .args([
            "xs",
            "wait",
            "/local/state",
            "4",
            "--timeout",
            "10",
            "--store",
        ])
        .arg(&socket)
        .spawn()
        .unwrap();
    stdout(&xs(&socket, &["xs", "write", "/local/state", "3"]));
    assert!(
        !matches!(wait.try_wait(), Ok(Some(_))),
        "xs wait ended before the value was there"
    );
    stdout(&xs(&socket, &["xs", "write", "/local/state", "4"]));
    assert!(wait.wait().unwrap().success());

    let timeout = xs(
        &socket,
        &["xs", "wait", "/local/state", "6", "--timeout", "1"],
    );
    assert!(!timeout.status.success());
}

#[test]
fn unreachable_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = xs(&dir.path().join("nothing.sock"), &["xs", "read", "/"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no store at"), "{err}");
    assert!(
        err.contains("--run-dir"),
        "the error says what to pass: {err}"
    );
    assert!(err.contains("nothing.sock"), "{err}");
}
