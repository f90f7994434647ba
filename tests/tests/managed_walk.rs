//! The xenbus walk between the real driver domain (a separate process in managed mode) and a
//! frontend played by this test, step by step: attach, I/O, detach, re-attach. Also checks
//! that the I/O window is the only guest memory the driver domain maps.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use control_vmm::domains;
use control_vmm::supervisor::DomainProcess;
use guest_frontend::process::{BlockFrontend, BlockFrontendConfig};
use ipc::connection::private_connection;
use ipc::control::messages::{
    BackendEvent, BackendRequest, MemoryGrant, PROCESS_WINDOW_GPA, PROCESS_WINDOW_MAX_BYTES,
};
use ipc::control::ControlChannel;
use ipc::xenbus::{DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::StoreClient;
use splitvmm_tests::toolstack::{create_image, ToolstackStore};
use splitvmm_tests::workspace_bin;

const DRIVER: u32 = 1;
const GUEST: u32 = 2;
const WAIT: Duration = Duration::from_secs(20);
/// What the toolstack grants a process guest's device.
const PROCESS_GUEST_GRANT: MemoryGrant = MemoryGrant::Window {
    guest_address: PROCESS_WINDOW_GPA,
    max_bytes: PROCESS_WINDOW_MAX_BYTES,
};

fn start_driver_domain(host: &ToolstackStore) -> (DomainProcess, ControlChannel) {
    let mut cmd = Command::new(workspace_bin("driver-domain"));
    cmd.args(["managed", "--domid", &DRIVER.to_string()]);
    let (process, ours) = host.start_domain(DRIVER, "driver", cmd);
    match ours.recv_timeout::<BackendEvent>(WAIT).unwrap() {
        Some((BackendEvent::Ready, _)) => {}
        other => panic!("driver domain not ready: {other:?}"),
    }
    (process, ours)
}

fn wait_state(client: &mut StoreClient, dir: &str, want: XenbusState) {
    domains::wait_for_state(client, dir, want, WAIT)
        .unwrap_or_else(|e| panic!("waiting for {dir} to be {want:?}: {e}"));
}

fn serve(ctl: &ControlChannel, image: &File, readonly: bool) -> UnixStream {
    serve_devid(ctl, image, readonly, 51712)
}

fn serve_devid(ctl: &ControlChannel, image: &File, readonly: bool, devid: u32) -> UnixStream {
    serve_queues(ctl, image, (readonly, 1), devid)
}

fn serve_queues(
    ctl: &ControlChannel,
    image: &File,
    (readonly, queues): (bool, u16),
    devid: u32,
) -> UnixStream {
    let dir = tempfile::tempdir().unwrap();
    let (listener, frontend_end) = private_connection(dir.path(), "dev.sock").unwrap();
    ctl.send(
        &BackendRequest::ServeBlock {
            frontend: GUEST,
            devid,
            readonly,
            grant: PROCESS_GUEST_GRANT,
            queues,
            device: None,
        },
        &[image.as_fd(), listener.as_fd()],
    )
    .unwrap();
    frontend_end
}

/// Proves that the driver domain has taken at least one full look at its devices since this
/// call began, so that a negative check after it means something: a witness device (a fresh
/// device number each time, above every device under test, so it is stepped after them in
/// each pass) is handed over and added, and reaches InitWait only in a pass that began after
/// the control requests and store writes made before this call. It is then removed.
fn backend_has_looked(
    ctl: &ControlChannel,
    dom0: &mut StoreClient,
    image: &File,
    witnesses: &mut u32,
) {
    *witnesses += 1;
    let witness = DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend: GUEST,
        // xvdb, xvdc, ...: above the device under test (51712, xvda).
        devid: 51712 + 16 * *witnesses,
    };
    let _connection = serve_devid(ctl, image, true, witness.devid);
    domains::add_device(dom0, &witness, &[("mode", "r".into())], &[]).unwrap();
    wait_state(dom0, &witness.backend_path(), XenbusState::InitWait);
    domains::remove_device(dom0, &witness).unwrap();
}

/// Memfd mappings of a process that came from a peer: (name, bytes).
fn memfd_mappings(pid: u32) -> Vec<(String, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| l.contains("/memfd:"))
        // The backend's own in-flight log is its memory, not the guest's.
        .filter(|l| !l.contains("/memfd:splitvmm-blk-inflight"))
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            let len =
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            let name = l.split("/memfd:").nth(1).unwrap().to_owned();
            (name, len)
        })
        .collect()
}

#[test]
fn attach_io_detach_reattach_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = ToolstackStore::start(dir.path(), &[(DRIVER, "driver"), (GUEST, "guest")]);
    let (driver, ctl) = start_driver_domain(&host);
    let mut guest = host.client_of(GUEST);

    let image_path = dir.path().join("disk.img");
    let image = create_image(&image_path, 8 << 20);
    let dev = DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend: GUEST,
        devid: 51712,
    };
    let (be, fe) = (dev.backend_path(), dev.frontend_path());
    let mut witnesses = 0;

    for round in 0..2u8 {
        // Attach: descriptors first, then the directories; the backend must not leave
        // Initialising (write a state of its own) before both are there. In the second round
        // the first round's directory is gone, so there is no state either.
        let connection = serve(&ctl, &image, false);
        backend_has_looked(&ctl, &mut host.dom0, &image, &mut witnesses);
        assert!(
            guest.read(&format!("{be}/state")).is_err(),
            "round {round}: a backend state before the directories were added"
        );
        domains::add_device(&mut host.dom0, &dev, &[("mode", "w".into())], &[]).unwrap();
        wait_state(&mut host.dom0, &be, XenbusState::InitWait);
        assert_eq!(guest.read(&format!("{be}/sectors")).unwrap(), b"16384");
        // InitWait is not Connected: the backend waits for the frontend.
        backend_has_looked(&ctl, &mut host.dom0, &image, &mut witnesses);
        assert_eq!(guest.read(&format!("{be}/state")).unwrap(), b"2");

        let frontend = BlockFrontend::connect(connection, BlockFrontendConfig::default()).unwrap();
        guest.write(&format!("{fe}/state"), b"3").unwrap();
        wait_state(&mut host.dom0, &be, XenbusState::Connected);
        guest.write(&format!("{fe}/state"), b"4").unwrap();

        // I/O; the second round reads what the first wrote.
        let mut buf = vec![0u8; 8192];
        if round == 0 {
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            frontend.write(8, &data).unwrap();
            frontend.flush().unwrap();
        }
        frontend.read(8, &mut buf).unwrap();
        assert!(
            buf.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
            "round {round}"
        );

        // Of guest memory, the driver domain maps exactly one memfd: this device's I/O window.
        let maps = memfd_mappings(driver.pid().unwrap());
        assert_eq!(maps.len(), 1, "driver domain memfd mappings: {maps:?}");
        assert_eq!(
            maps[0].1,
            BlockFrontendConfig::default().window_size as u64,
            "{maps:?}"
        );

        // Detach, as the toolstack does it.
        domains::request_close(&mut host.dom0, &dev).unwrap();
        frontend.shutdown().unwrap();
        guest.write(&format!("{fe}/state"), b"5").unwrap();
        guest.write(&format!("{fe}/state"), b"6").unwrap();
        wait_state(&mut host.dom0, &be, XenbusState::Closed);
        domains::remove_device(&mut host.dom0, &dev).unwrap();
        // Nothing of the window stays mapped after the session ended.
        let deadline = Instant::now() + WAIT;
        while !memfd_mappings(driver.pid().unwrap()).is_empty() {
            assert!(
                Instant::now() < deadline,
                "window still mapped after detach"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    ctl.send(&BackendRequest::Shutdown, &[]).unwrap();
    let mut driver = driver;
    let status = driver
        .wait_timeout(WAIT)
        .unwrap()
        .expect("driver domain exited");
    assert!(status.success());
    host.stop();
}

#[test]
fn frontend_closing_on_its_own_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = ToolstackStore::start(dir.path(), &[(DRIVER, "driver"), (GUEST, "guest")]);
    let (_driver, ctl) = start_driver_domain(&host);
    let mut guest = host.client_of(GUEST);
    let image = tempfile::tempfile().unwrap();
    image.set_len(1 << 20).unwrap();
    let dev = DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend: GUEST,
        devid: 51712,
    };
    let connection = serve(&ctl, &image, true);
    domains::add_device(&mut host.dom0, &dev, &[("mode", "r".into())], &[]).unwrap();
    wait_state(&mut host.dom0, &dev.backend_path(), XenbusState::InitWait);
    let frontend = BlockFrontend::connect(connection, BlockFrontendConfig::default()).unwrap();
    guest
        .write(&format!("{}/state", dev.frontend_path()), b"3")
        .unwrap();
    wait_state(&mut host.dom0, &dev.backend_path(), XenbusState::Connected);
    // A read-only disk refuses writes, and the session survives the refusal.
    assert!(frontend.write(0, &[1u8; 512]).is_err());
    let mut buf = [0u8; 512];
    frontend.read(0, &mut buf).unwrap();
    // The guest closes by itself (no toolstack request).
    frontend.shutdown().unwrap();
    guest
        .write(&format!("{}/state", dev.frontend_path()), b"5")
        .unwrap();
    guest
        .write(&format!("{}/state", dev.frontend_path()), b"6")
        .unwrap();
    wait_state(&mut host.dom0, &dev.backend_path(), XenbusState::Closed);
    ctl.send(&BackendRequest::Shutdown, &[]).unwrap();
    host.stop();
}

#[test]
fn a_disk_handed_with_four_queues_is_served_with_four() {
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    let dir = tempfile::tempdir().unwrap();
    let mut host = ToolstackStore::start(dir.path(), &[(DRIVER, "driver"), (GUEST, "guest")]);
    let (_driver, ctl) = start_driver_domain(&host);
    let image = create_image(&dir.path().join("disk.img"), 1 << 20);
    let dev = DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend: GUEST,
        devid: 51712,
    };
    let connection = serve_queues(&ctl, &image, (false, 4), dev.devid);
    domains::add_device(&mut host.dom0, &dev, &[("mode", "w".into())], &[]).unwrap();
    wait_state(&mut host.dom0, &dev.backend_path(), XenbusState::InitWait);
    // Asked as any vhost-user frontend asks: the MQ protocol feature, then the queue count.
    let mut frontend = Frontend::from_stream(connection, 4);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::MQ));
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::MQ)
        .unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 4);
    // VIRTIO_BLK_F_MQ (bit 12) is offered with it.
    assert_ne!(features & (1 << 12), 0, "features {features:#x}");
}
