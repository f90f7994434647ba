//! `splitvmm up` with a KVM guest (the tiny kernel under `splitvmm-vmm`) next to a process
//! guest: both are frontends of the same driver domain, the main job passes for both, and the
//! KVM guest's disk is the one detached and re-attached at run time.

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
