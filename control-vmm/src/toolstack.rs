//! The running toolstack's management socket: `splitvmm up --stay` serves it, and
//! `splitvmm block-attach` / `block-detach` / `disk-check` / `network-attach` /
//! `network-detach` / `net-ping` talk to it.
//!
//! It lives next to the store socket (`<run_dir>/toolstack.sock`); requests are
//! [`ToolstackRequest`]s on a control channel, one reply each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipc::control::messages::{ToolstackReply, ToolstackRequest};
use ipc::control::{ChannelError, ControlChannel, ControlListener};

use crate::config::{DiskConfig, NicConfig};
use crate::host::Host;

/// How long a client waits for the toolstack to carry out a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// The management socket that belongs with the store socket `store`.
pub fn socket_path(store: &Path) -> PathBuf {
    store.with_file_name("toolstack.sock")
}

/// Serves management requests on `host` until `stop` is set.
pub fn serve(host: &mut Host, store: &Path, stop: &AtomicBool) -> Result<()> {
    let path = socket_path(store);
    let listener =
        ControlListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    host.progress(&format!(
        "host is up; manage it through {} (Ctrl-C to shut down)",
        path.display()
    ));
    while !stop.load(Ordering::SeqCst) {
        let Some(client) = listener.accept_timeout(Duration::from_millis(200))? else {
            continue;
        };
        let request = match client.recv_timeout::<ToolstackRequest>(Duration::from_secs(5)) {
            Ok(Some((request, _))) => request,
            // A probe (`toolstack::is_running`) connects and leaves without a word.
            Ok(None) | Err(ChannelError::Closed) => continue,
            Err(e) => {
                log::warn!("management client: {e}");
                continue;
            }
        };
        let reply = match handle(host, request) {
            Ok(done) => ToolstackReply::Done(done),
            Err(e) => ToolstackReply::Failed(format!("{e:#}")),
        };
        if let Err(e) = client.send(&reply, &[]) {
            log::warn!("management client went away: {e}");
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn handle(host: &mut Host, request: ToolstackRequest) -> Result<String> {
    match request {
        ToolstackRequest::BlockAttach {
            guest,
            image,
            devid,
            readonly,
            size_mib,
            scratch,
        } => {
            let disk = DiskConfig {
                image: image.into(),
                size_mib,
                devid,
                readonly,
                scratch,
            };
            let sectors = host.attach_disk(&guest, &disk)?;
            Ok(format!("{guest}: vbd {devid} attached, {sectors} sectors"))
        }
        ToolstackRequest::BlockDetach { guest, devid } => {
            host.detach_disk(&guest, devid)?;
            Ok(format!("{guest}: vbd {devid} detached"))
        }
        ToolstackRequest::NetworkAttach {
            guest,
            devid,
            mac,
            ip,
        } => {
            let nic = NicConfig { devid, mac, ip };
            let ip = host.attach_nic(&guest, &nic)?;
            Ok(format!(
                "{guest}: vif {devid} attached, {}.{}.{}.{}",
                ip[0], ip[1], ip[2], ip[3]
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
            host.destroy_guest(&guest)?;
            Ok(format!("destroyed {guest}"))
        }
        ToolstackRequest::DiskCheck {
            guest,
            devid,
            seed,
            verify_only,
        } => {
            if host.disk_check(&guest, devid, seed, verify_only)? {
                Ok(format!("{guest}: vbd {devid} check passed"))
            } else {
                bail!("{guest}: vbd {devid} check failed")
            }
        }
    }
}

/// Whether a toolstack is running for the store at `store`.
pub fn is_running(store: &Path) -> bool {
    ControlChannel::connect(&socket_path(store)).is_ok()
}

/// Sends one request to a running toolstack and prints its answer.
pub fn request(store: &Path, request: ToolstackRequest) -> Result<ExitCode> {
    let path = socket_path(store);
    let channel = ControlChannel::connect(&path).with_context(|| {
        format!(
            "no running toolstack at {} (start one with `splitvmm up CONFIG --stay`)",
            path.display()
        )
    })?;
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
