//! The tap uplink in managed mode: `splitvmm up --stay` with `[driver_domain] uplink = ...`,
//! run inside a network namespace this test creates. The driver domain opens the tap on its
//! switch; the namespace's kernel (10.0.0.1 on the tap) resolves guest-a (10.0.0.2) and gets
//! its UDP echo back, so frames cross the tap, the switch and the guest's vif both ways; and
//! again after the driver domain is killed and restarted (the toolstack keeps the tap and
//! hands it to the new one).
//! Skipped (and the skip recorded) when not root, without /dev/net/tun, or without `ip`.

#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use splitvmm_tests::running::RunningHost;
use splitvmm_tests::workspace_bin;

const TAP: &str = "svup0";

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().unwrap().success()
}

/// Sends UDP datagrams to guest-a's echo port from inside `ns` until one comes back.
fn echo_from_namespace(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on an open namespace file affects only this thread (a fresh one).
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let sock = UdpSocket::bind("10.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let message = b"through the uplink";
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        sock.send_to(message, "10.0.0.2:7").unwrap();
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(from.to_string(), "10.0.0.2:7");
            assert_eq!(&buf[..n], message);
            return Ok(());
        }
    }
    Err("no echo from guest-a through the uplink".into())
}

#[test]
fn managed_mode_uplink_carries_a_guests_frames_to_the_host() {
    if !test_support::require(
        "managed_mode_uplink_carries_a_guests_frames_to_the_host",
        test_support::peers::netns_tap(),
    ) {
        return;
    }
    let ns = Netns(format!("svmm-up-{}", std::process::id()));
    assert!(ip(&["netns", "add", &ns.0]));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"run\"\n[driver_domain]\nname = \"driver\"\ndomid = 1\nuplink = \"{TAP}\"\n\
             [[guest]]\nname = \"guest-a\"\ndomid = 2\n[[guest.nic]]\n"
        ),
    )
    .unwrap();
    let store = dir.path().join("run/xenstored.sock");
    workspace_bin("driver-domain");
    workspace_bin("process-guest");
    // `ip netns exec` execs splitvmm: the host's processes live in the namespace.
    let mut up = Command::new("ip");
    up.args(["netns", "exec", &ns.0])
        .arg(workspace_bin("splitvmm"))
        .arg("up")
        .arg(&config)
        .arg("--stay");
    let host = RunningHost::start_from(&mut up, &store);
    // The driver domain made the tap in the host's namespace.
    assert!(
        ip(&["-n", &ns.0, "link", "show", TAP]),
        "no tap {TAP} in the host's namespace"
    );
    assert!(ip(&["-n", &ns.0, "link", "set", TAP, "up"]));
    assert!(ip(&["-n", &ns.0, "addr", "add", "10.0.0.1/24", "dev", TAP]));
    let ns_name = ns.0.clone();
    let echoed = std::thread::spawn(move || echo_from_namespace(&ns_name))
        .join()
        .unwrap();
    echoed.unwrap();

    // Kill the driver domain: the tap survives (the toolstack holds it), the restarted
    // driver domain gets it back, and the echo works again.
    let driver = splitvmm_tests::running::child_with_arg(host.pid(), "managed")
        .expect("the driver domain runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(driver),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while splitvmm_tests::running::child_with_arg(host.pid(), "managed")
        .is_none_or(|pid| pid == driver)
    {
        assert!(
            Instant::now() < deadline,
            "the driver domain was not restarted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ip(&["-n", &ns.0, "link", "show", TAP]),
        "the tap went with the dead driver domain"
    );
    let ns_name = ns.0.clone();
    let echoed = std::thread::spawn(move || echo_from_namespace(&ns_name))
        .join()
        .unwrap();
    echoed.unwrap();
    drop(host);
    // The tap goes with the host.
    assert!(
        !ip(&["-n", &ns.0, "link", "show", TAP]),
        "the tap outlived the host"
    );
}
