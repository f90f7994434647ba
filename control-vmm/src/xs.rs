//! `splitvmm xs|destroy|devices`: the store from the command line.
//!
//! Reads, writes, listings and removals go through the `xenstore-rs` client (the same code a
//! third-party tool would use); watches and domain release need operations that client lacks,
//! so they use this project's own client.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ipc::xenstore::client::{ClientError, StoreClient};
use xenstore_rs::unix::XsUnix;
use xenstore_rs::Xs;

/// One store operation.
#[derive(Subcommand, Debug)]
pub enum XsOp {
    /// Print a node's value.
    Read { path: String },
    /// Set a node's value, creating it and its parents.
    Write { path: String, value: String },
    /// Print a subtree as `path = "value"` lines.
    Ls {
        #[arg(default_value = "/")]
        path: String,
    },
    /// Remove a node and everything below it.
    Rm { path: String },
    /// Print the paths of changes below a node (the first event fires at registration).
    Watch {
        path: String,
        /// Stop after this many events.
        #[arg(short = 'n', long)]
        count: Option<u64>,
        /// Fail if no event arrives within this many seconds.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Wait until a node holds a value (for scripts walking xenbus states).
    Wait {
        path: String,
        value: String,
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        timeout: u64,
    },
}

/// Connects xenstore-rs to `socket`. It finds its socket through `XENSTORED_PATH`, and falls
/// back to `/dev/xen/xenbus` when the socket is absent, so check the socket first for a clear
/// error.
pub(crate) fn xenstore_rs_client(socket: &Path) -> Result<XsUnix> {
    crate::location::check_store(socket)?;
    // The CLI is single-threaded at this point, so changing the environment races nobody.
    std::env::set_var("XENSTORED_PATH", socket);
    XsUnix::new().with_context(|| format!("connecting to the store at {}", socket.display()))
}

fn own_client(socket: &Path) -> Result<StoreClient> {
    crate::location::check_store(socket)?;
    StoreClient::connect(socket)
        .with_context(|| format!("cannot reach the store at {}", socket.display()))
}

/// Runs one `splitvmm xs` operation.
pub fn run(socket: &Path, op: XsOp) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match op {
        XsOp::Read { path } => {
            let value = xenstore_rs_client(socket)?
                .read(&path)
                .with_context(|| format!("read {path}"))?;
            writeln!(out, "{value}")?;
        }
        XsOp::Write { path, value } => {
            xenstore_rs_client(socket)?
                .write(&path, &value)
                .with_context(|| format!("write {path}"))?;
        }
        XsOp::Rm { path } => {
            xenstore_rs_client(socket)?
                .rm(&path)
                .with_context(|| format!("rm {path}"))?;
        }
        XsOp::Ls { path } => {
            let client = xenstore_rs_client(socket)?;
            print_tree(&client, &path, &mut out)?;
        }
        XsOp::Watch {
            path,
            count,
            timeout,
        } => {
            let mut client = own_client(socket)?;
            client
                .watch(&path, "splitvmm-xs")
                .with_context(|| format!("watch {path}"))?;
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let event = match client.read_watch_event(timeout.map(Duration::from_secs)) {
                    Ok(event) => event,
                    Err(ClientError::Timeout) => {
                        bail!("no change below {path} within {}s", timeout.unwrap_or(0))
                    }
                    Err(e) => return Err(e).context("waiting for a watch event"),
                };
                writeln!(out, "{}", event.path)?;
                out.flush()?;
                seen += 1;
            }
        }
        XsOp::Wait {
            path,
            value,
            timeout,
        } => {
            let mut client = own_client(socket)?;
            client.watch(&path, "splitvmm-wait")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                if let Ok(current) = client.read(&path) {
                    if current == value.as_bytes() {
                        break;
                    }
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    bail!("{path} did not become {value:?} within {timeout}s");
                }
                match client.read_watch_event(Some(left)) {
                    Ok(_) | Err(ClientError::Timeout) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_tree(client: &XsUnix, path: &str, out: &mut impl Write) -> Result<()> {
    let value = client.read(path).unwrap_or_default();
    writeln!(out, "{path} = {value:?}")?;
    let children = client
        .directory(path)
        .with_context(|| format!("list {path}"))?;
    for child in children {
        let child_path = if path.ends_with('/') {
            format!("{path}{child}")
        } else {
            format!("{path}/{child}")
        };
        print_tree(client, &child_path, out)?;
    }
    Ok(())
}

/// The domains the store knows: (id, name), by id.
pub(crate) fn domains(client: &XsUnix) -> Result<Vec<(u32, String)>> {
    let mut domains = Vec::new();
    for entry in client.directory("/local/domain").unwrap_or_default() {
        let Ok(domid) = entry.parse::<u32>() else {
            continue;
        };
        let name = client
            .read(&format!("/local/domain/{domid}/name"))
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "-".to_owned());
        domains.push((domid, name));
    }
    domains.sort();
    Ok(domains)
}

/// `splitvmm destroy`: removes a domain's directory and its backend entries, and releases it
/// so a reused id inherits nothing.
pub fn destroy_domain(socket: &Path, domain: &str) -> Result<ExitCode> {
    let client = xenstore_rs_client(socket)?;
    let known = domains(&client)?;
    let domid = match domain.parse::<u32>() {
        Ok(id) => known.iter().find(|(d, _)| *d == id),
        Err(_) => known.iter().find(|(_, n)| n == domain),
    }
    .map(|(d, _)| *d)
    .with_context(|| format!("no domain named or numbered {domain:?} in the store"))?;
    if domid == 0 {
        bail!("domain 0 is the control domain and cannot be destroyed");
    }
    for (backend, _) in &known {
        for kind in ["vbd", "vif"] {
            let dir = format!("/local/domain/{backend}/backend/{kind}/{domid}");
            if client.read(&dir).is_ok() {
                client.rm(&dir).with_context(|| format!("rm {dir}"))?;
            }
        }
    }
    let mut own = own_client(socket)?;
    crate::domains::destroy_domain(&mut own, domid)?;
    println!("destroyed domain {domid}");
    Ok(ExitCode::SUCCESS)
}

/// `splitvmm devices`: the PCI functions each driver domain owns, as it reported them.
pub fn list_devices(socket: &Path) -> Result<ExitCode> {
    let client = xenstore_rs_client(socket)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<12} {:<13} {:<10} {:<8} {:<9} {:>5} {:>7}  STATE",
        "DOMAIN", "ADDRESS", "ID", "CLASS", "DRIVER", "GROUP", "VFS"
    )?;
    for (domid, name) in domains(&client)? {
        let base = format!("/local/domain/{domid}/hardware/pci");
        let Ok(entries) = client.directory(&base) else {
            continue;
        };
        let mut entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        entries.sort_by_key(|e| {
            e.trim_start_matches("dev-")
                .parse::<u32>()
                .unwrap_or(u32::MAX)
        });
        for entry in entries {
            let get = |key: &str| {
                client
                    .read(&format!("{base}/{entry}/{key}"))
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| "-".to_owned())
            };
            let vfs = match (
                get("sriov-num-vfs").as_str(),
                get("sriov-total-vfs").as_str(),
            ) {
                ("-", _) => "-".to_owned(),
                (num, total) => format!("{num}/{total}"),
            };
            writeln!(
                out,
                "{name:<12} {:<13} {:<10} {:<8} {:<9} {:>5} {vfs:>7}  {}",
                get("address"),
                format!("{}:{}", get("vendor"), get("device")),
                get("class"),
                get("driver"),
                get("iommu-group"),
                get("state"),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `splitvmm pci-list`: the VFs each guest holds (`/local/domain/<id>/pci/<index>/...`, written
/// by the toolstack when it handed the VF over).
pub fn list_pci(socket: &Path) -> Result<ExitCode> {
    let client = xenstore_rs_client(socket)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<12} {:>5} {:>5}  {:<13} {:<13} {:>3}  BACKEND",
        "DOMAIN", "ID", "INDEX", "ADDRESS", "PF", "VF"
    )?;
    for (domid, name) in domains(&client)? {
        let base = format!("/local/domain/{domid}/pci");
        let Ok(entries) = client.directory(&base) else {
            continue;
        };
        let mut entries: Vec<u32> = entries.iter().filter_map(|e| e.parse().ok()).collect();
        entries.sort_unstable();
        for index in entries {
            let get = |key: &str| {
                client
                    .read(&format!("{base}/{index}/{key}"))
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| "-".to_owned())
            };
            writeln!(
                out,
                "{name:<12} {domid:>5} {index:>5}  {:<13} {:<13} {:>3}  {}",
                get("address"),
                get("pf"),
                get("vf"),
                get("backend"),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
