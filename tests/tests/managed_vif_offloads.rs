//! A vif's `offloads` setting (the host file's `[[guest.nic]] offloads = false`) reaches the
//! managed driver domain: the toolstack's `ServeNet` request carries it, and the port's
//! vhost-user device offers checksum offload and TCP segmentation only when it is on. Judged
//! from outside: the feature bits a vhost-user frontend reads from each port.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use control_vmm::domains;
use control_vmm::supervisor::DomainProcess;
use driver_domain::net::config::{
    NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_TSO4, NET_F_HOST_ECN, NET_F_HOST_TSO4,
    NET_F_HOST_TSO6, NET_F_MAC,
};
use ipc::connection::private_connection;
use ipc::control::messages::{
    BackendRequest, MemoryGrant, PROCESS_WINDOW_GPA, PROCESS_WINDOW_MAX_BYTES,
};
use ipc::control::ControlChannel;
use ipc::xenbus::{DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn, StoreConfig, StoreHandle};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const DRIVER: u32 = 1;
const GUEST: u32 = 2;
const WAIT: Duration = Duration::from_secs(20);
const GRANT: MemoryGrant = MemoryGrant::Window {
    guest_address: PROCESS_WINDOW_GPA,
    max_bytes: PROCESS_WINDOW_MAX_BYTES,
};
const OFFLOADS: [u32; 6] = [
    NET_F_CSUM,
    NET_F_GUEST_CSUM,
    NET_F_HOST_TSO4,
    NET_F_HOST_TSO6,
    NET_F_HOST_ECN,
    NET_F_GUEST_TSO4,
];

fn start_driver_domain(store: &StoreHandle) -> (DomainProcess, ControlChannel) {
    splitvmm_tests::toolstack::start_managed_driver_domain(store, DRIVER, WAIT)
}

/// Attaches vif `devid` of the guest as the toolstack does; returns the frontend's
/// connection once the backend is in InitWait.
fn attach(
    ctl: &ControlChannel,
    dom0: &mut StoreClient,
    dir: &std::path::Path,
    devid: u32,
    offloads: bool,
) -> UnixStream {
    let (listener, frontend_end) = private_connection(dir, &format!("vif{devid}.sock")).unwrap();
    let mac = [0x02, 0, 0, 0, GUEST as u8, devid as u8];
    ctl.send(
        &BackendRequest::ServeNet {
            frontend: GUEST,
            devid,
            mac,
            grant: GRANT,
            offloads,
        },
        &[listener.as_fd()],
    )
    .unwrap();
    let dev = DeviceId {
        kind: DeviceKind::Vif,
        backend: DRIVER,
        frontend: GUEST,
        devid,
    };
    let mac_text = mac.map(|b| format!("{b:02x}")).join(":");
    domains::add_device(
        dom0,
        &dev,
        &[("mac", mac_text.clone()), ("handle", devid.to_string())],
        &[("mac", mac_text), ("handle", devid.to_string())],
    )
    .unwrap();
    domains::wait_for_state(dom0, &dev.backend_path(), XenbusState::InitWait, WAIT).unwrap();
    frontend_end
}

fn features(connection: UnixStream) -> u64 {
    let fe = Frontend::from_stream(connection, 1);
    fe.set_owner().unwrap();
    fe.get_features().unwrap()
}

#[test]
fn a_vif_with_offloads_off_offers_none_and_its_neighbour_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    let (store, thread) = spawn(StoreConfig::new(&socket)).unwrap();
    let mut dom0 = StoreClient::connect(&socket).unwrap();
    for (domid, name) in [(DRIVER, "driver"), (GUEST, "guest")] {
        domains::create_domain(&mut dom0, domid, name).unwrap();
    }
    let (mut driver, ctl) = start_driver_domain(&store);

    let off = features(attach(&ctl, &mut dom0, dir.path(), 0, false));
    let on = features(attach(&ctl, &mut dom0, dir.path(), 1, true));
    assert_ne!(off & 1 << NET_F_MAC, 0, "a net device answered: {off:#x}");
    for b in OFFLOADS {
        assert_eq!(
            off & 1 << b,
            0,
            "bit {b} offered with offloads off: {off:#x}"
        );
        assert_ne!(on & 1 << b, 0, "bit {b} missing with offloads on: {on:#x}");
    }

    ctl.send(&BackendRequest::Shutdown, &[]).unwrap();
    let status = driver.wait_timeout(WAIT).unwrap().expect("driver exited");
    assert!(status.success(), "{status:?}");
    store.shutdown();
    thread.join().unwrap().unwrap();
}
