//! `splitvmm up` with a KVM guest (the tiny kernel under `splitvmm-vmm`) next to a process
//! guest: both are frontends of the same driver domain, the main job passes for both, and the
//! KVM guest's disk is the one detached and re-attached at run time; a KVM guest reboots as a
//! fresh VMM process with its disk.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

mod vmm_support;

use std::process::Command;

use splitvmm_tests::workspace_bin;

#[test]
fn main_job_with_a_kvm_guest() {
    if !vmm_support::kvm_or_skip("main_job_with_a_kvm_guest") {
        return;
    }
    let kernel = vmm_support::tiny_kernel();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"run\"\n\
             [driver_domain]\nname = \"driver\"\ndomid = 1\n\
             [[guest]]\nname = \"proc\"\ndomid = 2\n\
             [[guest.disk]]\nimage = \"p.img\"\nsize_mib = 2\n\
             [[guest]]\nname = \"tiny\"\ndomid = 3\nkind = \"kvm\"\nkernel = {:?}\n\
             [[guest.disk]]\nimage = \"t.img\"\nsize_mib = 2\n",
            kernel.display().to_string()
        ),
    )
    .unwrap();
    workspace_bin("driver-domain");
    workspace_bin("process-guest");
    workspace_bin("splitvmm-vmm");
    let out = Command::new(workspace_bin("splitvmm"))
        .arg("up")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("checks: 4 passed, 0 failed"), "{stdout}");
    assert!(stdout.contains("tiny: vbd 51712 detached"), "{stdout}");
    assert!(stdout.contains("in a KVM guest"), "{stdout}");
    let tiny = stdout.lines().find(|l| l.starts_with("tiny ")).unwrap();
    let requests: u64 = tiny.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(requests > 0, "{tiny}");
}

#[test]
fn list_top_and_console_show_a_running_kvm_guest() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    if !vmm_support::kvm_or_skip("list_top_and_console_show_a_running_kvm_guest") {
        return;
    }
    let kernel = vmm_support::tiny_kernel();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"run\"\n\
             [driver_domain]\nname = \"driver\"\ndomid = 1\n\
             [[guest]]\nname = \"tiny\"\ndomid = 2\nkind = \"kvm\"\nkernel = {:?}\n\
             [[guest.disk]]\nimage = \"t.img\"\nsize_mib = 2\n",
            kernel.display().to_string()
        ),
    )
    .unwrap();
    workspace_bin("driver-domain");
    workspace_bin("splitvmm-vmm");
    let store = dir.path().join("run/xenstored.sock");
    let mut up = Command::new(workspace_bin("splitvmm"))
        .arg("up")
        .arg(&config)
        .arg("--stay")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    while !lines
        .next()
        .expect("up ended early")
        .unwrap()
        .contains("host is up")
    {}
    std::thread::spawn(move || lines.for_each(drop));
    let cli = |args: &[&str]| {
        let out = Command::new(workspace_bin("splitvmm"))
            .args(args)
            .arg("--store")
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let list = cli(&["list"]);
    let row = list.lines().find(|l| l.contains("tiny")).unwrap();
    let exits: u64 = row.split_whitespace().last().unwrap().parse().unwrap();
    assert!(exits > 0, "{list}");
    assert!(cli(&["top", "-n", "1"]).contains("tiny"));
    let console = cli(&["console", "tiny", "--no-follow"]);
    assert!(console.contains("hello"), "{console}");
    assert!(console.contains("verify ok"), "{console}");
    // Reboot: the VMM process restarts (a fresh VM booting the same kernel) with its disk
    // attached again, and the new VM checks it.
    assert!(cli(&["reboot", "tiny"]).contains("rebooted tiny"));
    cli(&["disk-check", "tiny", "xvda", "--seed", "7"]);
    cli(&["disk-check", "tiny", "xvda", "--seed", "7", "--verify-only"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(up.wait().unwrap().code().is_some());
}
