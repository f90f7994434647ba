//! Supervision and restart (issue 17), judged from outside: /proc, the store, the images read
//! from the host, and the CLI.
//!
//! - A process guest killed with SIGKILL is reaped and its devices and domain are gone from
//!   the store within a second, with nobody running `destroy`.
//! - A driver domain killed with SIGKILL while both guests are in the middle of disk checks
//!   is restarted with its devices; the guests reconnect, resubmit what was in flight, and
//!   their checks pass within 5 s of the kill; every byte they wrote is on the images; the
//!   UDP exchange between the guests works again; the store and `splitvmm list` show the new
//!   driver domain serving every device, Connected.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipc::xenstore::client::StoreClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use splitvmm_tests::running::{child_with_arg, run, RunningHost};
use splitvmm_tests::{assert_process_guest_pattern, wait_for};

/// Bytes a process guest's disk check covers.
const CHECK_BYTES: u64 = 1 << 20;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Two process guests (domains 2 and 3), each with a fresh 4 MiB disk and an interface.
fn host_file(dir: &Path) -> PathBuf {
    let mut text = "run_dir = \"run\"\n[driver_domain]\nname = \"driver\"\ndomid = 1\n".to_owned();
    for (name, domid) in [("guest-a", 2), ("guest-b", 3)] {
        text.push_str(&format!(
            "[[guest]]\nname = \"{name}\"\ndomid = {domid}\n\
             [[guest.disk]]\nimage = \"{name}.img\"\nsize_mib = 4\n[[guest.nic]]\n"
        ));
    }
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn exists(client: &mut StoreClient, path: &str) -> bool {
    client.read(path).is_ok()
}

fn json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether `pid` is gone: no process, not even a zombie.
fn reaped(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_killed_process_guest_is_torn_down_within_a_second() {
    if !is_root() {
        test_support::skip(
            "a_killed_process_guest_is_torn_down_within_a_second",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("run/xenstored.sock");
    let up = RunningHost::start(&host_file(dir.path()), &store, &[]);
    let guest = child_with_arg(up.pid(), "guest-a").expect("guest-a runs");
    let mut client = StoreClient::connect(&store).unwrap();
    let entries = [
        "/local/domain/2",
        "/local/domain/1/backend/vbd/2/51712",
        "/local/domain/1/backend/vif/2/0",
    ];
    for path in entries {
        assert!(exists(&mut client, path), "{path} missing before the kill");
    }

    kill(Pid::from_raw(guest), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    loop {
        let left: Vec<&str> = entries
            .iter()
            .copied()
            .filter(|p| exists(&mut client, p))
            .collect();
        if left.is_empty() && reaped(guest) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "1 s after the kill: still in the store {left:?}, reaped {}",
            reaped(guest)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("torn down {:?} after the kill", killed.elapsed());

    // The other guest and the driver domain are untouched; list no longer shows guest-a.
    let list = json(&up.cli(&["list", "--json"]));
    let names: Vec<&str> = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(!names.contains(&"guest-a"), "{names:?}");
    assert!(names.contains(&"guest-b") && names.contains(&"driver"));
    up.cli_ok(&["disk-check", "guest-b", "xvda", "--seed", "3"]);
}

/// Whether a thread of process `pid` waits in a process guest queue's poll on its call
/// eventfd and its backend connection (`BlockFrontendQueue`'s wait; a ping's receive is the
/// only other two-descriptor poll, and none runs meanwhile): it has a request in flight. Read from /proc/PID/task/*/syscall
/// (`poll` is 7 on x86-64, `ppoll` 271; the second argument is the descriptor count).
fn waits_for_a_completion(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("syscall")).is_ok_and(|line| {
            let mut fields = line.split_whitespace();
            matches!(fields.next(), Some("7" | "271")) && fields.nth(1).is_some_and(|n| n == "0x2")
        })
    })
}

#[test]
fn a_killed_driver_domain_is_restarted_and_the_guests_lose_nothing() {
    if !is_root() {
        test_support::skip(
            "a_killed_driver_domain_is_restarted_and_the_guests_lose_nothing",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("run/xenstored.sock");
    let up = RunningHost::start(&host_file(dir.path()), &store, &[]);
    up.cli_ok(&["net-ping", "guest-a", "0", "10.0.0.3", "--rounds", "2"]);
    let driver = child_with_arg(up.pid(), "managed").expect("the driver domain runs");

    // Stop the driver domain, start both guests' checks (their first writes are then in
    // flight, unanswered), and kill it: the guests must reconnect and resubmit them.
    kill(Pid::from_raw(driver), Signal::SIGSTOP).unwrap();
    let seeds = [("guest-a", 0xa11ceu64), ("guest-b", 0xb0bu64)];
    let mut checks: Vec<std::process::Child> = seeds
        .iter()
        .map(|(name, seed)| {
            up.cmd(&["disk-check", name, "xvda", "--seed", &seed.to_string()])
                .spawn()
                .unwrap()
        })
        .collect();
    // Both guests wait for a completion (their first write is in flight) before the kill.
    let guests: Vec<i32> = seeds
        .iter()
        .map(|(name, _)| child_with_arg(up.pid(), name).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !guests.iter().all(|pid| waits_for_a_completion(*pid)) {
        assert!(
            Instant::now() < deadline,
            "the checks never got a request in flight"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(Pid::from_raw(driver), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    // guest-a is held (a stopped guest is only a slow one) until its backend is seen back at
    // InitWait, which otherwise lasts as long as the frontend takes to answer.
    kill(Pid::from_raw(guests[0]), Signal::SIGSTOP).unwrap();
    let mut dom0 = StoreClient::connect(&store).unwrap();
    let state = "/local/domain/1/backend/vbd/2/51712/state";
    while dom0.read(state).ok().as_deref() != Some(b"2".as_slice()) {
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "the backend never came back to InitWait"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(guests[0]), Signal::SIGCONT).unwrap();

    for check in &mut checks {
        assert!(
            wait_for(check, Duration::from_secs(5)),
            "a disk check did not end within 5 s of the kill"
        );
        assert!(check.wait().unwrap().success(), "a disk check failed");
    }
    eprintln!("checks passed {:?} after the kill", killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert!(reaped(driver), "the dead driver domain was not reaped");
    let restarted = child_with_arg(up.pid(), "managed").expect("a new driver domain runs");
    assert_ne!(restarted, driver);

    // Every acknowledged write is on the images, read from the host.
    for (name, seed) in seeds {
        assert_process_guest_pattern(&dir.path().join(format!("{name}.img")), seed, CHECK_BYTES);
    }
    // The in-flight writes were resubmitted, not failed (the guests' logs say how many).
    for (name, _) in seeds {
        let log = std::fs::read_to_string(dir.path().join(format!("run/logs/{name}.log")))
            .unwrap_or_default();
        assert!(
            log.contains("request(s) in flight resubmitted"),
            "{name} did not resubmit:\n{log}"
        );
    }

    // The UDP exchange between the guests works again, both ways.
    up.cli_ok(&["net-ping", "guest-a", "0", "10.0.0.3", "--rounds", "3"]);
    up.cli_ok(&["net-ping", "guest-b", "0", "10.0.0.2", "--rounds", "3"]);

    // The store went Closed (the new driver domain found every device so, its log says),
    // then InitWait (seen above), then Connected; list shows the driver serving all four
    // devices, Connected, without errors.
    let driver_log = std::fs::read_to_string(dir.path().join("run/logs/driver.log")).unwrap();
    for device in ["vbd-2-51712", "vbd-3-51712", "vif-2-0", "vif-3-0"] {
        assert!(
            driver_log.contains(&format!("{device} (backend dom1): found Closed")),
            "{device}:\n{driver_log}"
        );
    }
    let list = json(&up.cli(&["list", "--json"]));
    let domains = list["domains"].as_array().unwrap();
    let dd = domains.iter().find(|d| d["name"] == "driver").unwrap();
    let served = dd["backend"].as_array().unwrap();
    assert_eq!(served.len(), 4, "{dd}");
    for device in served {
        assert_eq!(device["state"], 4, "{device}");
        assert!(device["error"].is_null(), "{device}");
    }
    for name in ["guest-a", "guest-b"] {
        let disks = json(&up.cli(&["block-list", name, "--json"]));
        assert_eq!(disks[0]["state"], 4);
        assert_eq!(disks[0]["backend_state"], 4);
    }
    let text = run(&mut up.cmd(&["list"]));
    assert!(String::from_utf8_lossy(&text.stdout).contains("serves vbd 2/xvda"));
}

#[test]
fn a_ping_running_when_the_driver_domain_dies_passes_after_the_restart() {
    if !is_root() {
        test_support::skip(
            "a_ping_running_when_the_driver_domain_dies_passes_after_the_restart",
            "confined domains need root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("run/xenstored.sock");
    let up = RunningHost::start(&host_file(dir.path()), &store, &[]);
    let driver = child_with_arg(up.pid(), "managed").expect("the driver domain runs");
    let guest = child_with_arg(up.pid(), "guest-a").unwrap();
    // guest-a's ARP request is out and it waits for the answer when the driver domain dies.
    kill(Pid::from_raw(driver), Signal::SIGSTOP).unwrap();
    let mut ping = up
        .cmd(&["net-ping", "guest-a", "0", "10.0.0.3", "--rounds", "5"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waits_for_a_completion(guest) {
        assert!(
            Instant::now() < deadline,
            "the ping never waited for a frame"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(driver), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    assert!(
        wait_for(&mut ping, Duration::from_secs(5)),
        "the ping did not end within 5 s of the kill"
    );
    assert!(ping.wait().unwrap().success(), "the ping failed");
    eprintln!("ping passed {:?} after the kill", killed.elapsed());
    // It was interrupted and ran again, rather than finishing before the kill.
    let log = std::fs::read_to_string(dir.path().join("run/logs/guest-a.log")).unwrap();
    assert!(log.contains("vif 0: backend gone (ping"), "{log}");
}
