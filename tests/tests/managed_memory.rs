//! Sealed, granted memory in managed mode (issue 16): the driver domain maps a guest's memory
//! only if it is sealed against shrinking and is exactly the I/O window the toolstack granted
//! for that device. A guest that sends an unsealed window (which it could truncate under the
//! shared driver domain: SIGBUS, every guest's disk and network gone) or a table that is not
//! its window is refused, and the other guests keep working. Each refusal is written to the
//! store as a Xen backend reports a failure (state Closed and an `error` node) and shown by
//! `splitvmm list`.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use control_vmm::domains;
use control_vmm::supervisor::DomainProcess;
use guest_frontend::process::{BlockFrontend, BlockFrontendConfig};
use ipc::connection::private_connection;
use ipc::control::messages::{
    BackendRequest, MemoryGrant, PROCESS_WINDOW_GPA, PROCESS_WINDOW_MAX_BYTES,
};
use ipc::control::ControlChannel;
use ipc::xenbus::{DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn, StoreConfig, StoreHandle};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

const DRIVER: u32 = 1;
const GOOD: u32 = 2;
const EVIL: u32 = 3;
const WAIT: Duration = Duration::from_secs(20);
const GRANT: MemoryGrant = MemoryGrant::Window {
    guest_address: PROCESS_WINDOW_GPA,
    max_bytes: PROCESS_WINDOW_MAX_BYTES,
};
const WINDOW: u64 = 1 << 20;

/// A region of a hostile table: (a sealable memfd?, guest address, bytes).
type Region = (bool, u64, u64);

fn start_driver_domain(store: &StoreHandle) -> (DomainProcess, ControlChannel) {
    splitvmm_tests::toolstack::start_managed_driver_domain(store, DRIVER, WAIT)
}

/// Attaches a disk of `frontend` as the toolstack does; returns the frontend's connection
/// once the backend is in InitWait.
fn attach(
    ctl: &ControlChannel,
    dom0: &mut StoreClient,
    image: &File,
    dev: &DeviceId,
) -> UnixStream {
    let dir = tempfile::tempdir().unwrap();
    let (listener, frontend_end) = private_connection(dir.path(), "dev.sock").unwrap();
    ctl.send(
        &BackendRequest::ServeBlock {
            frontend: dev.frontend,
            devid: dev.devid,
            readonly: false,
            grant: GRANT,
            queues: 1,
            device: None,
        },
        &[image.as_fd(), listener.as_fd()],
    )
    .unwrap();
    domains::add_device(dom0, dev, &[("mode", "w".into())], &[]).unwrap();
    domains::wait_for_state(dom0, &dev.backend_path(), XenbusState::InitWait, WAIT).unwrap();
    frontend_end
}

fn vbd(frontend: u32, devid: u32) -> DeviceId {
    DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend,
        devid,
    }
}

/// A vhost-user frontend on `connection` that asks for a reply to every message.
fn negotiate(connection: UnixStream) -> Frontend {
    let mut fe = Frontend::from_stream(connection, 1);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

fn memfd(sealable: bool, len: u64) -> File {
    let flags = if sealable {
        MemFdCreateFlag::MFD_ALLOW_SEALING
    } else {
        MemFdCreateFlag::empty()
    };
    let f = File::from(memfd_create(c"guest-window", flags).unwrap());
    f.set_len(len).unwrap();
    f
}

fn region(file: &File, gpa: u64, len: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: 0x7f00_0000_0000 + gpa,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }
}

/// The good guest's disk still works: a write and its read-back through the driver domain.
fn good_guest_still_served(frontend: &BlockFrontend, round: u8) {
    let data = vec![round; 4096];
    frontend.write(u64::from(round) * 8, &data).unwrap();
    let mut back = vec![0u8; 4096];
    frontend.read(u64::from(round) * 8, &mut back).unwrap();
    assert_eq!(back, data, "round {round}");
}

#[test]
fn unsealed_windows_and_foreign_tables_are_refused_and_other_guests_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    let (store, thread) = spawn(StoreConfig::new(&socket)).unwrap();
    let mut dom0 = StoreClient::connect(&socket).unwrap();
    for (domid, name) in [(DRIVER, "driver"), (GOOD, "good"), (EVIL, "evil")] {
        domains::create_domain(&mut dom0, domid, name).unwrap();
    }
    let (mut driver, ctl) = start_driver_domain(&store);
    let mut good_store = StoreClient::from_stream(store.connect_domain(GOOD).unwrap());

    // The good guest: its window, sealed, at the granted address (BlockFrontend's default).
    let good_image = tempfile::tempfile().unwrap();
    good_image.set_len(4 << 20).unwrap();
    let good = vbd(GOOD, 51712);
    let connection = attach(&ctl, &mut dom0, &good_image, &good);
    let frontend = BlockFrontend::connect(connection, BlockFrontendConfig::default()).unwrap();
    good_store
        .write(&format!("{}/state", good.frontend_path()), b"3")
        .unwrap();
    domains::wait_for_state(
        &mut dom0,
        &good.backend_path(),
        XenbusState::Connected,
        WAIT,
    )
    .unwrap();
    good_guest_still_served(&frontend, 1);

    let evil_image = tempfile::tempfile().unwrap();
    evil_image.set_len(1 << 20).unwrap();
    // The control: the same frontend with a sealable window where it was granted is served.
    {
        let connection = attach(&ctl, &mut dom0, &evil_image, &vbd(EVIL, 51712));
        let fe = negotiate(connection);
        let window = memfd(true, WINDOW);
        fe.set_mem_table(&[region(&window, PROCESS_WINDOW_GPA, WINDOW)])
            .expect("a sealable window at the granted address is accepted");
        assert!(
            window.set_len(0).is_err(),
            "the driver domain sealed the window"
        );
    }
    let cases: [(&str, Vec<Region>); 4] = [
        // A window it could truncate later (no MFD_ALLOW_SEALING: the backend cannot seal).
        ("unsealed window", vec![(false, PROCESS_WINDOW_GPA, WINDOW)]),
        // Sealable, but not where the window was granted.
        ("window elsewhere", vec![(true, 0, WINDOW)]),
        // The window and more (all of its RAM, say).
        (
            "window and more",
            vec![(true, 0, WINDOW), (true, PROCESS_WINDOW_GPA, WINDOW)],
        ),
        // Larger than any window granted to a process guest.
        (
            "oversized window",
            vec![(true, PROCESS_WINDOW_GPA, 2 * PROCESS_WINDOW_MAX_BYTES)],
        ),
    ];
    for (round, (what, table)) in cases.iter().enumerate() {
        let devid = 51728 + 16 * round as u32;
        let connection = attach(&ctl, &mut dom0, &evil_image, &vbd(EVIL, devid));
        let fe = negotiate(connection);
        let files: Vec<File> = table
            .iter()
            .map(|(sealable, _, len)| memfd(*sealable, *len))
            .collect();
        let regions: Vec<_> = files
            .iter()
            .zip(table)
            .map(|(f, (_, gpa, len))| region(f, *gpa, *len))
            .collect();
        let result = fe.set_mem_table(&regions);
        eprintln!("{what}: {result:?}");
        assert!(result.is_err(), "{what}: the driver domain accepted it");
        // The unsealed window is truncated now: the driver domain never mapped it.
        for f in &files {
            let _ = f.set_len(0);
        }
        drop(fe);
        assert!(
            driver.try_wait().unwrap().is_none(),
            "{what}: the driver domain died"
        );
        // The failure is in the store, as a Xen backend reports one: Closed, and why.
        let refused = vbd(EVIL, devid);
        domains::wait_for_state(
            &mut dom0,
            &refused.backend_path(),
            XenbusState::Closed,
            WAIT,
        )
        .unwrap();
        let error = dom0
            .read(&format!("{}/error", refused.backend_path()))
            .expect("an error node");
        let error = String::from_utf8_lossy(&error);
        assert!(
            error.contains("sealed") || error.contains("granted I/O window"),
            "{what}: error node {error:?}"
        );
        good_guest_still_served(&frontend, round as u8 + 2);
    }
    // `splitvmm list` shows each refused device's state and error; the good one has none.
    let list = splitvmm_tests::running::run(
        splitvmm_tests::running::splitvmm()
            .args(["list", "--json", "--store"])
            .arg(&socket),
    );
    assert!(list.status.success());
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let served = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domid"] == DRIVER)
        .unwrap()["backend"]
        .as_array()
        .unwrap()
        .clone();
    let refused: Vec<&serde_json::Value> = served
        .iter()
        .filter(|d| d["frontend"] == EVIL && d["devid"] != 51712)
        .collect();
    assert_eq!(refused.len(), cases.len(), "{served:?}");
    for device in refused {
        assert_eq!(device["state"], 6, "{device}");
        assert!(device["error"].is_string(), "{device}");
    }
    let good_listed = served.iter().find(|d| d["frontend"] == GOOD).unwrap();
    assert_eq!(good_listed["state"], 4);
    assert!(good_listed["error"].is_null());
    frontend.shutdown().unwrap();
    ctl.send(&BackendRequest::Shutdown, &[]).unwrap();
    let status = driver.wait_timeout(WAIT).unwrap().expect("driver exited");
    assert!(status.success(), "{status:?}");
    store.shutdown();
    thread.join().unwrap().unwrap();
}
