//! A confined managed driver domain hands a VF to a guest through the privileged hardware
//! helper (docs/security.md, "The hardware helper"): this test plays the toolstack, starts
//! `splitvmm-hw-helper` (as root, on a fake sysfs tree and fake `/dev/vfio` nodes) and the
//! driver domain (confined where this runs as root) with the channel between them, and asks
//! the driver domain for VFs as `splitvmm up` does. The helper's policy is the last word: the
//! driver domain is told it owns a second PF the helper was not given, and a VF of that PF is
//! refused by the helper.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use control_vmm::supervisor::{DomainProcess, Launch};
use driver_domain::hw::pci::fake::FakeSysfs;
use ipc::control::messages::{BackendEvent, BackendRequest};
use ipc::control::ControlChannel;
use splitvmm_tests::toolstack::ToolstackStore;
use splitvmm_tests::workspace_bin;

const DRIVER: u32 = 1;
const WAIT: Duration = Duration::from_secs(20);
const PF: &str = "0000:00:02.0";
const VF1: &str = "0000:00:02.1";
/// A PF the host file (the helper's `--owns`) does not give the driver domain.
const FOREIGN_PF: &str = "0000:00:03.0";

/// An NVMe PF with two VFs enabled (VF 1 already on vfio-pci, IOMMU group 4) and a foreign PF
/// with one; the VFIO group nodes are plain files naming their group.
fn fake_host() -> FakeSysfs {
    FakeSysfs::owned_and_foreign_pfs()
}

/// The `Key:` line of /proc/<pid>/status, its first field.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// How many of `pid`'s descriptors are `path`, once its count has dropped to 0 or after 3 s
/// (a process closes its copy just after sending it).
fn descriptors_of(pid: u32, path: &std::path::Path) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let n = count();
        if n == 0 || std::time::Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_confined_driver_domain_hands_out_vfs_through_the_hardware_helper() {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        test_support::skip(
            "a_confined_driver_domain_hands_out_vfs_through_the_hardware_helper",
            "confining the driver domain needs root",
        );
        return;
    }
    let fake = fake_host();
    let dir = tempfile::tempdir().unwrap();
    let host = ToolstackStore::start(dir.path(), &[(DRIVER, "driver")]);

    let (helper_end, driver_end) = ControlChannel::pair().unwrap();
    let mut helper_cmd = Command::new(workspace_bin("splitvmm-hw-helper"));
    helper_cmd
        .args(["--domid", "1", "--owns", PF, "--sysfs-root"])
        .arg(fake.dir.path())
        .arg("--vfio-dir")
        .arg(fake.dir.path().join("vfio"));
    let mut helper = DomainProcess::spawn(
        "hw-helper",
        Launch::plain(helper_cmd),
        vec![helper_end.into_fd()],
    )
    .unwrap();
    let helper_pid = helper.pid().unwrap();

    let mut driver_cmd = Command::new(workspace_bin("driver-domain"));
    driver_cmd
        .args([
            "managed", "--domid", "1", "--owns", PF, "--owns", FOREIGN_PF,
        ])
        .args(["--hw-helper-fd", "5", "--sysfs-root"])
        .arg(fake.dir.path());
    let (mut driver, ctl) =
        host.start_domain_with_fds(DRIVER, "driver", driver_cmd, vec![driver_end.into_fd()]);
    match ctl.recv_timeout::<BackendEvent>(WAIT).unwrap() {
        Some((BackendEvent::Ready, _)) => {}
        other => panic!("driver domain not ready: {other:?}"),
    }
    let driver_pid = driver.pid().unwrap();
    // Judged from outside: the driver domain is confined; the helper is root with one
    // capability and no_new_privs.
    assert!(status_field(driver_pid, "Uid").parse::<u32>().unwrap() >= 200_000);
    assert_eq!(status_field(driver_pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(driver_pid, "Seccomp"), "2");
    assert_eq!(status_field(helper_pid, "Uid"), "0");
    // The helper drops its privileges first thing, but nothing before this point waited
    // for it (the driver domain is ready before it asks the helper anything): give it the
    // time a loaded machine may take to schedule it.
    let deadline = std::time::Instant::now() + WAIT;
    while status_field(helper_pid, "NoNewPrivs") != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the hardware helper never set no_new_privs"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // CAP_SYS_ADMIN (21) alone, and nothing else can come back.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(helper_pid, set), "0000000000200000", "{set}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(status_field(helper_pid, set), "0000000000000000", "{set}");
    }

    // VF 1 of the owned PF: the helper binds it and opens its group; the group reaches this
    // "toolstack" with neither the helper nor the driver domain keeping a copy.
    ctl.send(
        &BackendRequest::AssignVf {
            frontend: 2,
            pf: PF.into(),
            vf: Some(1),
        },
        &[],
    )
    .unwrap();
    let group_node = fake.dir.path().join("vfio/4");
    match ctl.recv_timeout::<BackendEvent>(WAIT).unwrap() {
        Some((
            BackendEvent::VfAssigned {
                frontend: 2,
                vf: 1,
                address,
                ..
            },
            fds,
        )) => {
            assert_eq!(address, VF1);
            assert_eq!(fds.len(), 1);
            assert_eq!(descriptors_of(driver_pid, &group_node), 0);
            assert_eq!(descriptors_of(helper_pid, &group_node), 0);
            let mut text = String::new();
            let mut group = std::fs::File::from(fds.into_iter().next().unwrap());
            group.read_to_string(&mut text).unwrap();
            assert_eq!(text, "group 4", "not VF 1's group node");
        }
        other => panic!("no VF assigned: {other:?}"),
    }

    // The driver domain thinks it owns the foreign PF too; the helper does not agree.
    ctl.send(
        &BackendRequest::AssignVf {
            frontend: 3,
            pf: FOREIGN_PF.into(),
            vf: None,
        },
        &[],
    )
    .unwrap();
    match ctl.recv_timeout::<BackendEvent>(WAIT).unwrap() {
        Some((
            BackendEvent::VfRefused {
                frontend: 3,
                reason,
            },
            fds,
        )) => {
            assert!(fds.is_empty());
            assert!(
                reason.contains("the hardware helper refused")
                    && reason.contains("0000:00:03.0 is not a PF the host file gives"),
                "{reason}"
            );
        }
        other => panic!("the foreign PF's VF was not refused: {other:?}"),
    }

    // Release: the helper resets VF 1.
    assert_eq!(fake.read(&format!("bus/pci/devices/{VF1}/reset")), "");
    ctl.send(
        &BackendRequest::ReleaseVf {
            frontend: 2,
            address: VF1.into(),
        },
        &[],
    )
    .unwrap();
    match ctl.recv_timeout::<BackendEvent>(WAIT).unwrap() {
        Some((
            BackendEvent::VfReleased {
                frontend: 2,
                reset: true,
                address,
                ..
            },
            _,
        )) => assert_eq!(address, VF1),
        other => panic!("VF 1 not released: {other:?}"),
    }
    assert_eq!(fake.read(&format!("bus/pci/devices/{VF1}/reset")), "1");
    assert_eq!(
        fake.read(&format!("bus/pci/devices/{FOREIGN_PF}/sriov_numvfs")),
        "1\n"
    );

    // The driver domain ends; its helper follows on its own (its channel closed).
    ctl.send(&BackendRequest::Shutdown, &[]).unwrap();
    assert!(driver
        .wait_timeout(WAIT)
        .unwrap()
        .is_some_and(|s| s.success()));
    let ended = helper.wait_timeout(WAIT).unwrap();
    assert!(
        ended.is_some_and(|s| s.success()),
        "the helper did not exit cleanly after its driver domain: {ended:?}"
    );
    host.stop();
}
