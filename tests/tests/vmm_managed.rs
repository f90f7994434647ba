//! `splitvmm-vmm --managed-domid`: the VMM as a guest domain of the toolstack. This test plays
//! the toolstack's part (as `splitvmm up` does for process guests): a store, the real driver
//! domain in managed mode, AttachBlock with a vhost-user connection, the xenbus walk to
//! Connected, disk checks that each boot the tiny kernel in a KVM machine, detach, shutdown.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

mod vmm_support;

use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use control_vmm::domains;
use ipc::connection::private_connection;
use ipc::control::messages::{BackendEvent, BackendRequest, GuestEvent, GuestRequest};
use ipc::control::ControlChannel;
use ipc::xenbus::{keys, DeviceId, DeviceKind, XenbusState};
use splitvmm_tests::toolstack::{create_image, ToolstackStore};
use splitvmm_tests::workspace_bin;
use vmm_support::*;

const DRIVER: u32 = 1;
const GUEST: u32 = 2;
const DEVID: u32 = 51712;
const WAIT: Duration = Duration::from_secs(15);

fn event(ctl: &ControlChannel) -> GuestEvent {
    match ctl.recv_timeout::<GuestEvent>(WAIT).unwrap() {
        Some((e, _)) => e,
        None => panic!("no event from the managed VMM within {WAIT:?}"),
    }
}

fn check(ctl: &ControlChannel, seed: u64, bytes: u64, verify_only: bool) -> (bool, String) {
    ctl.send(
        &GuestRequest::DiskCheck {
            devid: DEVID,
            seed,
            bytes,
            verify_only,
        },
        &[],
    )
    .unwrap();
    match event(ctl) {
        GuestEvent::DiskCheck {
            devid,
            passed,
            detail,
        } if devid == DEVID => (passed, detail),
        other => panic!("expected a disk check result, got {other:?}"),
    }
}

#[test]
fn managed_kvm_guest_walks_xenbus_and_checks_its_disk_through_the_driver_domain() {
    if !kvm_or_skip("managed_kvm_guest_walks_xenbus_and_checks_its_disk_through_the_driver_domain")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut host = ToolstackStore::start(dir.path(), &[(DRIVER, "driver"), (GUEST, "kvm-guest")]);

    let mut cmd = Command::new(workspace_bin("driver-domain"));
    cmd.args(["managed", "--domid", &DRIVER.to_string()]);
    let (mut driver, dd_ctl) = host.start_domain(DRIVER, "driver", cmd);
    match dd_ctl.recv_timeout::<BackendEvent>(WAIT).unwrap() {
        Some((BackendEvent::Ready, _)) => {}
        other => panic!("driver domain not ready: {other:?}"),
    }
    let mut cmd = Command::new(workspace_bin("splitvmm-vmm"));
    cmd.arg("--kernel").arg(tiny_kernel()).args([
        "--managed-domid",
        &GUEST.to_string(),
        "--batch",
        "4",
    ]);
    let (mut vm, vm_ctl) = host.start_domain(GUEST, "kvm-guest", cmd);

    // Attach, as the toolstack does: descriptors first, then the store directories.
    let image_path = dir.path().join("disk.img");
    let image = create_image(&image_path, 1 << 20);
    let (listener, frontend_end) = private_connection(dir.path(), "vbd.sock").unwrap();
    dd_ctl
        .send(
            &BackendRequest::ServeBlock {
                frontend: GUEST,
                devid: DEVID,
                readonly: false,
                grant: ipc::control::messages::MemoryGrant::Window {
                    guest_address: control_vmm::vmm::layout::WINDOW_GPA,
                    max_bytes: control_vmm::vmm::layout::WINDOW_DEFAULT_BYTES,
                },
                queues: 1,
                device: None,
            },
            &[image.as_fd(), listener.as_fd()],
        )
        .unwrap();
    vm_ctl
        .send(
            &GuestRequest::AttachBlock { devid: DEVID },
            &[frontend_end.as_fd()],
        )
        .unwrap();
    drop((listener, frontend_end));
    let dev = DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend: GUEST,
        devid: DEVID,
    };
    domains::add_device(
        &mut host.dom0,
        &dev,
        &[(keys::MODE, "w".into())],
        &[(keys::VIRTUAL_DEVICE, DEVID.to_string())],
    )
    .unwrap();
    match event(&vm_ctl) {
        GuestEvent::Connected { devid, sectors } => assert_eq!((devid, sectors), (DEVID, 2048)),
        other => panic!("expected Connected, got {other:?}"),
    }
    domains::wait_for_state(
        &mut host.dom0,
        &dev.frontend_path(),
        XenbusState::Connected,
        WAIT,
    )
    .unwrap();

    // Each check is a fresh KVM machine on the same vhost-user session.
    let seed = 0x00c0_ffee;
    let (passed, detail) = check(&vm_ctl, seed, 16 << 10, false);
    assert!(passed, "{detail}");
    assert!(detail.contains("KVM guest"), "{detail}");
    assert_pattern(&std::fs::read(&image_path).unwrap(), seed, 32);
    let (passed, detail) = check(&vm_ctl, seed, 16 << 10, true);
    assert!(passed, "verify-only with the same seed: {detail}");
    let (passed, detail) = check(&vm_ctl, seed + 1, 16 << 10, true);
    assert!(!passed, "verify-only with another seed must fail: {detail}");
    let (passed, detail) = check(&vm_ctl, seed, 2 << 20, false);
    assert!(!passed, "a check larger than the disk is refused: {detail}");
    assert!(detail.contains("does not fit"), "{detail}");

    // Detach with the xenbus walk.
    domains::request_close(&mut host.dom0, &dev).unwrap();
    match event(&vm_ctl) {
        GuestEvent::Closed { devid } => assert_eq!(devid, DEVID),
        other => panic!("expected Closed, got {other:?}"),
    }
    domains::wait_for_state(
        &mut host.dom0,
        &dev.backend_path(),
        XenbusState::Closed,
        WAIT,
    )
    .unwrap();
    domains::remove_device(&mut host.dom0, &dev).unwrap();

    vm_ctl.send(&GuestRequest::Shutdown, &[]).unwrap();
    match event(&vm_ctl) {
        // 16 KiB in 4 KiB requests: 4 writes + 4 reads, then 4 reads twice.
        GuestEvent::Stats(s) => assert_eq!(s.requests, 16, "{s:?}"),
        other => panic!("expected Stats, got {other:?}"),
    }
    assert!(vm
        .wait_timeout(WAIT)
        .unwrap()
        .expect("VMM exited")
        .success());
    assert!(
        driver.try_wait().unwrap().is_none(),
        "driver domain still serving"
    );
    dd_ctl.send(&BackendRequest::Shutdown, &[]).unwrap();
    assert!(driver
        .wait_timeout(WAIT)
        .unwrap()
        .expect("driver exited")
        .success());
    host.stop();
}
