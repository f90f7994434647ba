//! Command-line conventions: output into a closed pipe ends quietly, SIGINT gives 130,
//! internal binaries run by hand explain themselves and exit 2, man pages and completions
//! are generated, and every process logs in one format.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ipc::xenstore::client::StoreClient;
use nix::sys::signal::Signal;
use splitvmm_tests::running::{run, splitvmm, start_store, RunningHost};
use splitvmm_tests::wait_for;
use splitvmm_tests::workspace_bin;

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    let _store = start_store(&socket);
    let mut client = StoreClient::connect(&socket).unwrap();
    // Far more than a pipe holds, so `xs ls` is still writing when its reader goes.
    let value = vec![b'x'; 200];
    for i in 0..2000 {
        client.write(&format!("/big/{i}"), &value).unwrap();
    }
    let mut ls = splitvmm()
        .args(["xs", "--store"])
        .arg(&socket)
        .args(["ls", "/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(ls.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone (as `| head -1` would be).
    let out = ls.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

#[test]
fn internal_binaries_run_by_hand_say_who_starts_them_and_exit_2() {
    for (binary, args) in [
        ("driver-domain", &["managed", "--domid", "1"][..]),
        ("process-guest", &["--domid", "2", "--name", "g"][..]),
        (
            "splitvmm-vmm",
            &["--kernel", "/nonexistent", "--managed-domid", "2"][..],
        ),
    ] {
        let out = run(Command::new(workspace_bin(binary)).args(args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("splitvmm up"), "{binary}: {stderr}");
        assert!(!stderr.contains("IO Safety"), "{binary}: {stderr}");
    }
}

#[test]
fn sigint_shuts_the_host_down_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        "run_dir = \"run\"\n[driver_domain]\nname = \"driver\"\ndomid = 1\n\
         [[guest]]\nname = \"g\"\ndomid = 2\n\
         [[guest.disk]]\nimage = \"g.img\"\nsize_mib = 1\n",
    )
    .unwrap();
    let mut up = RunningHost::start_from(
        splitvmm()
            .arg("up")
            .arg(&config)
            .arg("--stay")
            .env("RUST_LOG", "info"),
        &dir.path().join("run/xenstored.sock"),
    );
    let status = up.stop(Signal::SIGINT).expect("up ignored SIGINT");
    assert_eq!(status.code(), Some(130));
    // Each domain logged into its own file, in the one format: time, level, who, where.
    let log = std::fs::read_to_string(dir.path().join("run/logs/driver.log")).unwrap();
    assert!(
        log.lines().count() > 0,
        "the driver domain logged nothing at info"
    );
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.len() >= 4, "{line}");
        assert!(words[0].ends_with('Z') && words[0].contains('T'), "{line}");
        assert_eq!(words[2], "driver-domain[1]", "{line}");
    }
}

#[test]
fn man_pages_and_completions_come_from_the_command_line() {
    let man = run(splitvmm().arg("man"));
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(man.status.success());
    assert!(page.contains(".TH splitvmm"), "{page}");
    assert!(page.contains("Exit status"), "exit codes are documented");
    let dir = tempfile::tempdir().unwrap();
    assert!(run(splitvmm().args(["man", "--dir"]).arg(dir.path()))
        .status
        .success());
    for page in ["splitvmm.1", "splitvmm-create.1", "splitvmm-block-list.1"] {
        assert!(Path::new(&dir.path().join(page)).exists(), "{page} missing");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = run(splitvmm().args(["completions", shell]));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(script.contains("network-list"), "{shell}: no network-list");
    }
}

#[test]
fn a_standalone_store_exits_130_on_sigint_and_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    for (signal, code) in [(Signal::SIGINT, 130), (Signal::SIGTERM, 0)] {
        let mut store = start_store(&socket);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(store.0.id() as i32), signal).unwrap();
        assert!(
            wait_for(&mut store.0, Duration::from_secs(10)),
            "store ignored {signal}"
        );
        assert_eq!(
            store.0.try_wait().unwrap().and_then(|s| s.code()),
            Some(code),
            "{signal}"
        );
    }
}

#[test]
fn bench_approaches_refuses_a_host_without_the_store_or_the_vf_with_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-device");
    std::fs::write(&file, b"x").unwrap();
    for (store, extra, says) in [
        ("/nonexistent/store", &[][..], "no store /nonexistent/store"),
        (file.to_str().unwrap(), &[][..], "is not a block device"),
        (
            "/dev/null",
            &["--rows", "native", "--l2-bench", "/nonexistent/l2-bench"][..],
            "is not a block device",
        ),
    ] {
        let out = run(splitvmm()
            .args(["bench-approaches", "--kernel"])
            .arg(&file)
            .arg("--initrd")
            .arg(&file)
            .args(["--store", store])
            .args(extra)
            .arg("--work-dir")
            .arg(dir.path().join("work")));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{store}: {stderr}");
        assert!(
            stderr.contains("cannot run the benchmark") && stderr.contains(says),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "nothing measured, no table");
    }
    // A row that does not exist is a usage mistake, not a missing device.
    let out = run(splitvmm()
        .args([
            "bench-approaches",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--store",
            "/dev/null",
        ])
        .args(["--rows", "emulated,paravirt"]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("paravirt: not a row"));
}
