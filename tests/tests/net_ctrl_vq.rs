//! The virtio-net control queue between the VMM and the driver domain: the VMM's vhost-user
//! session to a driver-domain port offers a Linux guest the control queue (CTRL_VQ, CTRL_RX) as
//! the third virtqueue only when it was told the backend serves it; otherwise the control
//! queue and every feature that needs it stay hidden. Linux driving it is the lab's
//! `linux-devices` scenario.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use control_vmm::vmm::vhost_device::{VhostDevice, VirtioBackend, VirtioDeviceType};
use driver_domain::net::config::{NET_F_CTRL_RX, NET_F_CTRL_VQ, NET_F_MQ};
use driver_domain::net::{NetBackendConfig, NetBackendDevice, Switch, SwitchConfig};
use driver_domain::vhost_user::serve_listener;

/// A VMM-side session to a fresh driver-domain port with `cfg`.
fn session(cfg: NetBackendConfig, pass_ctrl: bool) -> (VhostDevice, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vif.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let port = Arc::new(sw.attach_guest("vif", cfg.mac).unwrap());
    let server = std::thread::spawn(move || {
        let device = NetBackendDevice::new(port, cfg).unwrap();
        // The session ends when the VMM's side closes; how does not matter here.
        let _ = serve_listener(listener, device, |_| {});
    });
    let stream = UnixStream::connect(&path).unwrap();
    let dev = VhostDevice::from_stream(VirtioDeviceType::Net, stream, Vec::new()).unwrap();
    let dev = if pass_ctrl {
        dev.with_backend_control_queue()
    } else {
        dev
    };
    (dev, server)
}

const CTRL: u64 = 1 << NET_F_CTRL_VQ | 1 << NET_F_CTRL_RX;

#[test]
fn the_control_queue_reaches_the_guest_only_from_the_driver_domain() {
    let (dev, server) = session(NetBackendConfig::default(), true);
    assert_eq!(dev.num_queues(), 3, "receive, transmit, control");
    assert_eq!(dev.device_features() & CTRL, CTRL);
    assert_eq!(dev.device_features() & 1 << NET_F_MQ, 0);
    drop(dev);
    server.join().unwrap();

    let (dev, server) = session(NetBackendConfig::default(), false);
    assert_eq!(
        dev.device_features() & CTRL,
        0,
        "an unknown backend's CTRL_VQ stays hidden"
    );
    drop(dev);
    server.join().unwrap();

    let no_ctrl = NetBackendConfig {
        ctrl_vq: false,
        ..NetBackendConfig::default()
    };
    let (dev, server) = session(no_ctrl, true);
    assert_eq!(dev.num_queues(), 2);
    assert_eq!(dev.device_features() & CTRL, 0);
    drop(dev);
    server.join().unwrap();
}
