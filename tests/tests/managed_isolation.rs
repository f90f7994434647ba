//! Authorization in the store: with the directories the toolstack creates (libxl's owners and
//! permissions), a guest reaches its own devices and nothing of another guest's, and the
//! driver domain reads but cannot forge a frontend's state.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use control_vmm::domains;
use ipc::xenbus::{DeviceId, DeviceKind};
use ipc::xenstore::wire::XsError;
use splitvmm_tests::toolstack::ToolstackStore;

const DRIVER: u32 = 1;
const GUEST_A: u32 = 2;
const GUEST_B: u32 = 3;

fn vbd(frontend: u32) -> DeviceId {
    DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend,
        devid: 51712,
    }
}

fn refused(result: Result<impl std::fmt::Debug, ipc::xenstore::client::ClientError>) -> XsError {
    match result {
        Ok(v) => panic!("expected the store to refuse, got {v:?}"),
        Err(e) => e
            .xs_error()
            .unwrap_or_else(|| panic!("not a store error: {e}")),
    }
}

#[test]
fn guests_reach_only_their_own_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = ToolstackStore::start(
        dir.path(),
        &[(DRIVER, "driver"), (GUEST_A, "a"), (GUEST_B, "b")],
    );
    for guest in [GUEST_A, GUEST_B] {
        domains::add_device(&mut host.dom0, &vbd(guest), &[("mode", "w".into())], &[]).unwrap();
    }
    let mut a = host.client_of(GUEST_A);
    let mut driver = host.client_of(DRIVER);
    let (own, other) = (vbd(GUEST_A), vbd(GUEST_B));

    // Own frontend directory: read and write.
    assert_eq!(
        a.read(&format!("{}/state", own.frontend_path())).unwrap(),
        b"1"
    );
    a.write(&format!("{}/state", own.frontend_path()), b"3")
        .unwrap();
    // Own backend directory: read only.
    assert_eq!(
        a.read(&format!("{}/mode", own.backend_path())).unwrap(),
        b"w"
    );
    assert_eq!(
        refused(a.write(&format!("{}/state", own.backend_path()), b"4")),
        XsError::EACCES
    );

    // Another guest's devices: nothing, neither side, neither read nor write.
    for path in [other.frontend_path(), other.backend_path()] {
        assert_eq!(
            refused(a.read(&format!("{path}/state"))),
            XsError::EACCES,
            "{path}"
        );
        assert_eq!(refused(a.directory(&path)), XsError::EACCES, "{path}");
        assert_eq!(
            refused(a.write(&format!("{path}/state"), b"6")),
            XsError::EACCES,
            "{path}"
        );
        assert_eq!(refused(a.rm(&path)), XsError::EACCES, "{path}");
    }
    assert_eq!(
        refused(a.read(&format!("/local/domain/{GUEST_B}/name"))),
        XsError::EACCES
    );
    // Nor can it grant itself access.
    assert!(a
        .set_perms(&other.frontend_path(), &"n2".parse().unwrap())
        .is_err());

    // The driver domain reads the frontend's state but cannot forge it.
    assert_eq!(
        driver
            .read(&format!("{}/state", own.frontend_path()))
            .unwrap(),
        b"3"
    );
    assert_eq!(
        refused(driver.write(&format!("{}/state", own.frontend_path()), b"4")),
        XsError::EACCES
    );
    // And it owns its backend directories.
    driver
        .write(&format!("{}/state", own.backend_path()), b"2")
        .unwrap();

    host.stop();
}

#[test]
fn released_domain_id_inherits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = ToolstackStore::start(dir.path(), &[(DRIVER, "driver"), (GUEST_A, "a")]);
    domains::add_device(&mut host.dom0, &vbd(GUEST_A), &[], &[]).unwrap();
    // The driver domain's backend dir names guest A as a reader.
    let be = vbd(GUEST_A).backend_path();
    assert!(host
        .dom0
        .get_perms(&be)
        .unwrap()
        .to_string()
        .contains(&format!("r{GUEST_A}")));
    // Guest A is destroyed; its id is reused by a new domain.
    domains::destroy_domain(&mut host.dom0, GUEST_A).unwrap();
    let perms = host.dom0.get_perms(&be).unwrap().to_string();
    assert!(!perms.contains(&format!("r{GUEST_A}")), "{perms}");
    domains::create_domain(&mut host.dom0, GUEST_A, "impostor").unwrap();
    let mut impostor = host.client_of(GUEST_A);
    assert_eq!(
        refused(impostor.read(&format!("{be}/state"))),
        XsError::EACCES
    );
    host.stop();
}
