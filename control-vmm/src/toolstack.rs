//! The running toolstack's management socket: `splitvmm up --stay` serves it, and the
//! per-guest commands (`create`, `shutdown`, `reboot`, `destroy`, `block-attach`,
//! `block-detach`, `disk-check`, `network-attach`, `network-detach`, `net-ping`) talk to it.
//!
//! It lives in the run directory (`<run_dir>/toolstack.sock`, next to the store socket);
//! requests are [`ToolstackRequest`]s on a control channel, one reply each. Each request is
//! served on its own thread, and the host locks per guest, so a slow request to one guest
//! does not hold up requests to the others.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipc::control::messages::{ToolstackReply, ToolstackRequest};
use ipc::control::{ChannelError, ControlChannel, ControlListener};

use crate::config::{DiskConfig, GuestConfig, NicConfig};
use crate::host::Host;
use crate::location;
use crate::vdev::Vdev;

/// How long a client waits for the toolstack to carry out a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves management requests on `host` until `stop` is set, each on its own thread; returns
/// once every request thread has ended.
pub fn serve(host: &Arc<Host>, stop: &AtomicBool) -> Result<()> {
    let path = host.run_dir().join(location::TOOLSTACK_SOCKET);
    let listener =
        ControlListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    host.progress(&format!(
        "host is up; manage it with `splitvmm --run-dir {} COMMAND` (Ctrl-C to shut down)",
        host.run_dir().display()
    ));
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        workers.retain(|w| !w.is_finished());
        let Some(client) = listener.accept_timeout(Duration::from_millis(200))? else {
            continue;
        };
        let host = Arc::clone(host);
        let worker = std::thread::Builder::new()
            .name("request".into())
            .spawn(move || serve_one(&host, client));
        match worker {
            Ok(worker) => workers.push(worker),
            Err(e) => log::error!("starting a request thread: {e}"),
        }
    }
    // Requests in flight see the stop flag and end.
    for worker in workers {
        if worker.join().is_err() {
            log::error!("a request thread panicked");
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn serve_one(host: &Host, client: ControlChannel) {
    let request = match client.recv_timeout::<ToolstackRequest>(Duration::from_secs(5)) {
        Ok(Some((request, _))) => request,
        // A probe (`toolstack::is_running`) connects and leaves without a word.
        Ok(None) | Err(ChannelError::Closed) => return,
        Err(e) => {
            log::warn!("management client: {e}");
            return;
        }
    };
    log::info!("request: {request:?}");
    let reply = match handle(host, request) {
        Ok(done) => ToolstackReply::Done(done),
        Err(e) => ToolstackReply::Failed(format!("{e:#}")),
    };
    if let Err(e) = client.send(&reply, &[]) {
        log::warn!("management client went away: {e}");
    }
}

fn handle(host: &Host, request: ToolstackRequest) -> Result<String> {
    match request {
        ToolstackRequest::BlockAttach {
            guest,
            image,
            devid,
            readonly,
            size_mib,
            scratch,
            queues,
        } => {
            let disk = DiskConfig {
                device: None,
                image: image.into(),
                size_mib,
                devid,
                readonly,
                scratch,
                queues,
            };
            let sectors = host.attach_disk(&guest, &disk)?;
            Ok(format!(
                "{guest}: vbd {} attached, {sectors} sectors",
                Vdev(devid)
            ))
        }
        ToolstackRequest::PciDetach { guest, index } => host.detach_pci(&guest, index),
        ToolstackRequest::BlockDetach { guest, devid } => {
            host.detach_disk(&guest, devid)?;
            Ok(format!("{guest}: vbd {} detached", Vdev(devid)))
        }
        ToolstackRequest::NetworkAttach {
            guest,
            devid,
            mac,
            ip,
        } => {
            // network-attach has no offloads switch: the host file's default.
            let nic = NicConfig {
                devid,
                mac,
                ip,
                offloads: true,
            };
            let ip = host.attach_nic(&guest, &nic)?;
            Ok(format!(
                "{guest}: vif {devid} attached, {}",
                std::net::Ipv4Addr::from(ip)
            ))
        }
        ToolstackRequest::NetworkDetach { guest, devid } => {
            host.detach_nic(&guest, devid)?;
            Ok(format!("{guest}: vif {devid} detached"))
        }
        ToolstackRequest::NetPing {
            guest,
            devid,
            peer,
            rounds,
        } => {
            if host.net_ping(&guest, devid, peer, rounds)? {
                Ok(format!("{guest}: vif {devid} ping passed"))
            } else {
                bail!("{guest}: vif {devid} ping failed")
            }
        }
        ToolstackRequest::Destroy { guest } => {
            let name = host.destroy_guest(&guest)?;
            Ok(format!("destroyed {name}"))
        }
        ToolstackRequest::Create { file } => {
            let file = Path::new(&file);
            let config = GuestConfig::load(file)?;
            let (name, domid) = (config.name.clone(), config.domid);
            host.create_guest(config, Some(file))?;
            Ok(format!("created {name} (domain {domid})"))
        }
        ToolstackRequest::Shutdown { guest } => {
            let (name, stats) = host.shutdown_guest(&guest)?;
            Ok(match stats {
                Some(s) => format!(
                    "shut down {name}: {} requests, {} bytes, {} kicks, {} interrupts",
                    s.requests, s.bytes, s.kicks_sent, s.interrupts
                ),
                None => format!("shut down {name} (it reported no counters)"),
            })
        }
        ToolstackRequest::Reboot { guest } => {
            let name = host.reboot_guest(&guest)?;
            Ok(format!("rebooted {name}"))
        }
        ToolstackRequest::DiskCheck {
            guest,
            devid,
            seed,
            verify_only,
        } => {
            if host.disk_check(&guest, devid, seed, verify_only)? {
                Ok(format!("{guest}: vbd {} check passed", Vdev(devid)))
            } else {
                bail!("{guest}: vbd {} check failed", Vdev(devid))
            }
        }
    }
}

/// Whether a toolstack answers at `socket`.
pub fn is_running(socket: &Path) -> bool {
    ControlChannel::connect(socket).is_ok()
}

/// Sends one request to the toolstack at `socket` and prints its answer.
pub fn request(socket: &Path, request: ToolstackRequest) -> Result<ExitCode> {
    let channel = ControlChannel::connect(socket).map_err(|_| location::no_toolstack(socket))?;
    channel.send(&request, &[])?;
    match channel.recv_timeout::<ToolstackReply>(REPLY_TIMEOUT)? {
        Some((ToolstackReply::Done(text), _)) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Some((ToolstackReply::Failed(text), _)) => bail!("{text}"),
        None => bail!("the toolstack did not answer within {REPLY_TIMEOUT:?}"),
    }
}
