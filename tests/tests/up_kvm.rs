//! `splitvmm up` with a KVM guest (the tiny kernel under `splitvmm-vmm`) next to a process
//! guest: both are frontends of the same driver domain, the main job passes for both, and the
//! KVM guest's disk is the one detached and re-attached at run time; a KVM guest reboots as a
//! fresh VMM process with its disk.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

mod vmm_support;

use std::process::Command;

use control_vmm::config::GuestKind;
use control_vmm::up::seed_for;
use splitvmm_tests::running::RunningHost;
use splitvmm_tests::{assert_process_guest_pattern, workspace_bin};

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
             [checks]\ndisk = true\nreplug = true\n\
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
    assert!(
        stdout.contains("checks: 5 passed, 0 failed, 0 skipped"),
        "{stdout}"
    );
    assert!(stdout.contains("tiny: vbd 51712 detached"), "{stdout}");
    assert!(stdout.contains("in a KVM guest"), "{stdout}");
    let tiny = stdout.lines().find(|l| l.starts_with("tiny ")).unwrap();
    let requests: u64 = tiny.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(requests > 0, "{tiny}");
    // Judged from the host: the KVM guest (the detached disk: written in round 0, only
    // verified after re-attach) left the tiny kernel's pattern on its checked sectors; the
    // process guest wrote its own pattern again (round 1) while that disk was away.
    let sectors = GuestKind::Kvm.check_bytes() / 512;
    let t = std::fs::read(dir.path().join("t.img")).unwrap();
    vmm_support::assert_pattern(&t, seed_for(3, 51712, 0), sectors);
    assert!(
        t[sectors as usize * 512..].iter().all(|&b| b == 0),
        "the KVM guest wrote beyond its check"
    );
    assert_process_guest_pattern(
        &dir.path().join("p.img"),
        seed_for(2, 51712, 1),
        GuestKind::Process.check_bytes(),
    );
}

/// Exits of `row` (the ninth column of `splitvmm list`, before SHARE).
fn vmm_exits(list: &str, name: &str) -> u64 {
    let row = list
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no row for {name}:\n{list}"));
    row.split_whitespace().nth(8).unwrap().parse().unwrap()
}

#[test]
fn list_top_and_console_show_a_running_kvm_guest() {
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
             [checks]\ndisk = true\n\
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
    let mut host = RunningHost::start(&config, &store, &[]);
    let cli = |args: &[&str]| String::from_utf8_lossy(&host.cli_ok(args).stdout).into_owned();
    // The guest is running: it answers a disk check now (each check boots the tiny kernel
    // in its VMM process), its exit counter grows with it, and the host reads the pattern
    // it wrote.
    let before = vmm_exits(&cli(&["list"]), "tiny");
    cli(&["disk-check", "tiny", "51712", "--seed", "77"]);
    let list = cli(&["list"]);
    let after = vmm_exits(&list, "tiny");
    assert!(after > before, "exits {before} -> {after}:\n{list}");
    let sectors = GuestKind::Kvm.check_bytes() / 512;
    let t = std::fs::read(dir.path().join("t.img")).unwrap();
    vmm_support::assert_pattern(&t, 77, sectors);
    assert!(cli(&["top", "-n", "1"]).contains("tiny"));
    let console = cli(&["console", "tiny", "--no-follow"]);
    assert!(console.contains("hello"), "{console}");
    assert!(console.contains("verify ok"), "{console}");
    // Reboot: the VMM process restarts (a fresh VM booting the same kernel) with its disk
    // attached again, and the new VM checks it.
    assert!(cli(&["reboot", "tiny"]).contains("rebooted tiny"));
    cli(&["disk-check", "tiny", "xvda", "--seed", "7"]);
    cli(&["disk-check", "tiny", "xvda", "--seed", "7", "--verify-only"]);
    // SIGTERM is the way out of --stay: a clean shutdown after passed checks exits 0.
    let status = host
        .stop(nix::sys::signal::Signal::SIGTERM)
        .expect("splitvmm up ignored SIGTERM");
    let rest = host.output_after_startup();
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(
        rest.contains("checks: 1 passed, 0 failed, 0 skipped"),
        "{rest}"
    );
}

#[test]
fn a_kvm_guest_keeps_its_disk_across_a_driver_domain_restart() {
    if !vmm_support::kvm_or_skip("a_kvm_guest_keeps_its_disk_across_a_driver_domain_restart") {
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
    let host = RunningHost::start(&config, &store, &[]);
    host.cli_ok(&["disk-check", "tiny", "xvda", "--seed", "21"]);
    let driver = splitvmm_tests::running::child_with_arg(host.pid(), "managed").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(driver),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The disk walks back to Connected on both sides (the VMM reconnected idle).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = host.cli_ok(&["block-list", "tiny", "--json"]);
        let disks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let new_driver = splitvmm_tests::running::child_with_arg(host.pid(), "managed");
        if disks[0]["state"] == 4
            && disks[0]["backend_state"] == 4
            && new_driver.is_some_and(|p| p != driver)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not Connected again: {disks}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A new machine reads what the old backend wrote, through the new one, and writes anew.
    host.cli_ok(&[
        "disk-check",
        "tiny",
        "xvda",
        "--seed",
        "21",
        "--verify-only",
    ]);
    host.cli_ok(&["disk-check", "tiny", "xvda", "--seed", "22"]);
    let sectors = GuestKind::Kvm.check_bytes() / 512;
    let t = std::fs::read(dir.path().join("t.img")).unwrap();
    vmm_support::assert_pattern(&t, 22, sectors);
}
