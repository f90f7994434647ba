//! `driver-domain serve --net`: vhost-user-net ports (one per socket) and an optional tap
//! uplink on one switch.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use driver_domain::net::{
    parse_mac, NetBackendConfig, NetBackendDevice, Switch, SwitchConfig, TapUplink,
};
use driver_domain::vhost_user::serve_forever;
use driver_domain::virtio_core::SealPolicy;

/// Serve one port per socket until every port's accept loop fails.
pub fn run(
    sockets: &[PathBuf],
    tap: Option<&str>,
    mac: &str,
    queue_pairs: u16,
    poll_us: u64,
    seal_policy: SealPolicy,
    greeting: Duration,
) -> Result<()> {
    if sockets.is_empty() {
        bail!("--net needs --socket PATH and/or --net-sockets PATH,...");
    }
    let base = parse_mac(mac).with_context(|| format!("invalid MAC address {mac:?}"))?;
    let switch = Switch::new(SwitchConfig::default());
    let _uplink = match tap {
        Some(name) => {
            let port = switch.attach(&format!("tap:{name}"))?;
            Some(TapUplink::open(name, port)?)
        }
        None => None,
    };
    let mut threads = Vec::new();
    for (i, path) in sockets.iter().enumerate() {
        let mut port_mac = base;
        port_mac[5] = port_mac[5].wrapping_add(i as u8);
        let cfg = NetBackendConfig {
            mac: port_mac,
            queue_pairs,
            poll_us,
            seal_policy,
            ..NetBackendConfig::default()
        };
        let port = Arc::new(switch.attach_guest(&path.display().to_string(), port_mac)?);
        let path = path.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("net-port-{i}"))
                .spawn(move || {
                    serve_forever(&path, &AtomicBool::new(false), greeting, || {
                        NetBackendDevice::new(port.clone(), cfg.clone())
                    })
                })?,
        );
    }
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => bail!("a net port thread panicked"),
        }
    }
    Ok(())
}
