//! `splitvmm list|top|block-list|network-list`: what the store says about the domains and
//! their devices, as tables for people or JSON for scripts.
//!
//! Everything here is read from the store, as `xl list` and `xl block-list` read xenstore, so
//! it works with any store, managed or not. Counters come from where each side publishes them:
//! a guest's totals under its own `data/io` (`requests`, `bytes`, `kicks`, `interrupts`,
//! `vmm-exits`), and each backend device's under its driver domain's
//! `data/io/<vbd|vif>/<frontend>/<devid>` (`requests`, `bytes`, `kicks`, `interrupts`,
//! `errors`). A counter nobody published is `-` in tables and `null` in JSON.
//!
//! The JSON is a stable interface: fields are added, never renamed or removed.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use xenstore_rs::unix::XsUnix;
use xenstore_rs::Xs;

use crate::vdev::Vdev;
use crate::xs::{domains, xenstore_rs_client};

/// Counter names a guest publishes under `data/io`.
const GUEST_COUNTERS: [&str; 5] = ["requests", "bytes", "kicks", "interrupts", "vmm-exits"];
/// Counter names a backend publishes per device.
const DEVICE_COUNTERS: [&str; 5] = ["requests", "bytes", "kicks", "interrupts", "errors"];

/// One domain, as `list --json` prints it.
#[derive(Debug, Serialize)]
pub struct DomainInfo {
    pub domid: u32,
    pub name: String,
    /// Block devices and network interfaces this domain has as a frontend.
    pub vbds: usize,
    pub vifs: usize,
    /// Guest memory its disks' backend maps, when not only the I/O window: `all-ram` for a
    /// Linux guest (the host file's `share`).
    pub share: Option<String>,
    /// Its own counters (a guest's totals), by name.
    pub io: BTreeMap<String, Option<u64>>,
    /// Devices this domain serves as a backend, with their counters.
    pub backend: Vec<BackendDeviceInfo>,
}

/// A device a domain serves, with the counters its backend published.
#[derive(Debug, Serialize)]
pub struct BackendDeviceInfo {
    pub kind: String,
    pub frontend: u32,
    pub devid: u32,
    /// `xvda`, ... for disks.
    pub vdev: Option<String>,
    /// The backend's xenbus state (4 is Connected), as in the store.
    pub state: Option<u32>,
    /// Why the device's session failed (the backend's `error` node), if it did.
    pub error: Option<String>,
    pub counters: BTreeMap<String, Option<u64>>,
}

/// One device of a guest, as `block-list` and `network-list` print it.
#[derive(Debug, Serialize)]
pub struct DeviceInfo {
    pub devid: u32,
    /// `xvda`, ... for disks.
    pub vdev: Option<String>,
    pub backend_id: Option<u32>,
    /// Xenbus states by number (4 is Connected), as in the store.
    pub state: Option<u32>,
    pub backend_state: Option<u32>,
    /// Disks: `r` or `w`, and the image; interfaces: the MAC and IPv4 address.
    pub mode: Option<String>,
    pub image: Option<String>,
    pub mac: Option<String>,
    pub ip: Option<String>,
    /// Why the device's session failed (the backend's `error` node), if it did.
    pub error: Option<String>,
    /// The backend's counters for this device.
    pub counters: BTreeMap<String, Option<u64>>,
}

fn read(client: &XsUnix, path: &str) -> Option<String> {
    client.read(path).ok().map(|v| v.to_string())
}

fn counters(client: &XsUnix, dir: &str, names: &[&str]) -> BTreeMap<String, Option<u64>> {
    names
        .iter()
        .map(|n| {
            let v = read(client, &format!("{dir}/{n}")).and_then(|v| v.parse().ok());
            ((*n).to_owned(), v)
        })
        .collect()
}

fn children(client: &XsUnix, path: &str) -> Vec<String> {
    let mut out: Vec<String> = client
        .directory(path)
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_string())
        .collect();
    out.sort_by_key(|c| (c.parse::<u64>().unwrap_or(u64::MAX), c.clone()));
    out
}

fn vdev_name(kind: &str, devid: u32) -> Option<String> {
    (kind == "vbd").then(|| Vdev(devid).to_string())
}

/// Every domain the store knows, with counters.
pub fn collect_domains(client: &XsUnix) -> Result<Vec<DomainInfo>> {
    let mut out = Vec::new();
    for (domid, name) in domains(client)? {
        let dom = format!("/local/domain/{domid}");
        let mut backend = Vec::new();
        for kind in ["vbd", "vif"] {
            // Devices it serves: its backend directories, and those it still has counters of.
            let mut served = std::collections::BTreeSet::<(u32, u32)>::new();
            for dir in [
                format!("{dom}/backend/{kind}"),
                format!("{dom}/data/io/{kind}"),
            ] {
                for fe in children(client, &dir) {
                    for devid in children(client, &format!("{dir}/{fe}")) {
                        if let (Ok(frontend), Ok(devid)) = (fe.parse(), devid.parse()) {
                            served.insert((frontend, devid));
                        }
                    }
                }
            }
            for (frontend, devid) in served {
                let be = format!("{dom}/backend/{kind}/{frontend}/{devid}");
                backend.push(BackendDeviceInfo {
                    kind: kind.to_owned(),
                    frontend,
                    devid,
                    vdev: vdev_name(kind, devid),
                    state: read(client, &format!("{be}/state")).and_then(|v| v.parse().ok()),
                    error: read(client, &format!("{be}/error")),
                    counters: counters(
                        client,
                        &format!("{dom}/data/io/{kind}/{frontend}/{devid}"),
                        &DEVICE_COUNTERS,
                    ),
                });
            }
        }
        out.push(DomainInfo {
            domid,
            name,
            vbds: children(client, &format!("{dom}/device/vbd")).len(),
            vifs: children(client, &format!("{dom}/device/vif")).len(),
            share: read(client, &format!("{dom}/share")),
            io: counters(client, &format!("{dom}/data/io"), &GUEST_COUNTERS),
            backend,
        });
    }
    Ok(out)
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn print_domains(domains: &[DomainInfo], out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "{:<6} {:<20} {:>4} {:>4} {:>10} {:>12} {:>10} {:>11} {:>10}  SHARE",
        "ID", "NAME", "VBDS", "VIFS", "REQUESTS", "BYTES", "KICKS", "INTERRUPTS", "VMM EXITS"
    )?;
    for d in domains {
        let io = |k: &str| show(d.io.get(k).copied().flatten());
        writeln!(
            out,
            "{:<6} {:<20} {:>4} {:>4} {:>10} {:>12} {:>10} {:>11} {:>10}  {}",
            d.domid,
            d.name,
            d.vbds,
            d.vifs,
            io("requests"),
            io("bytes"),
            io("kicks"),
            io("interrupts"),
            io("vmm-exits"),
            d.share.as_deref().unwrap_or("-")
        )?;
        for b in &d.backend {
            let c = |k: &str| show(b.counters.get(k).copied().flatten());
            let device = match &b.vdev {
                Some(vdev) => format!("{} {}/{vdev}", b.kind, b.frontend),
                None => format!("{} {}/{}", b.kind, b.frontend, b.devid),
            };
            let state = b.state.map_or_else(|| "-".to_owned(), |s| s.to_string());
            writeln!(
                out,
                "{:<6} {:<20} {:>9} {:>10} {:>12} {:>10} {:>11} {:>10}",
                "",
                format!("  serves {device}"),
                format!("state {state}"),
                c("requests"),
                c("bytes"),
                c("kicks"),
                c("interrupts"),
                format!("{} err", c("errors"))
            )?;
            if let Some(error) = &b.error {
                writeln!(out, "{:<6}     error: {error}", "")?;
            }
        }
    }
    Ok(())
}

/// `splitvmm list`: one line per domain the store knows, with its I/O counters, and one per
/// device it serves as a backend; with `json`, one JSON document.
pub fn list(socket: &Path, json: bool) -> Result<ExitCode> {
    let client = xenstore_rs_client(socket)?;
    let domains = collect_domains(&client)?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &ListJson { domains })?;
        writeln!(out)?;
    } else {
        print_domains(&domains, &mut out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The document `list --json` prints (and `top --json`, one per line and round).
#[derive(Debug, Serialize)]
struct ListJson {
    domains: Vec<DomainInfo>,
}

/// `splitvmm top`: `list`, refreshed every `interval` (`rounds` times, or until interrupted).
/// On a terminal it redraws the screen; otherwise (a pipe, a file) it prints one table after
/// another without terminal codes; with `json`, one JSON document per line and round.
pub fn top(socket: &Path, interval: Duration, rounds: Option<u64>, json: bool) -> Result<ExitCode> {
    let client = xenstore_rs_client(socket)?;
    let redraw = !json && std::io::stdout().is_terminal();
    let mut round = 0u64;
    while rounds.is_none_or(|n| round < n) {
        let domains = collect_domains(&client)?;
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &ListJson { domains })?;
            writeln!(out)?;
        } else {
            if redraw {
                // Clear the screen and home the cursor, as top does.
                write!(out, "\x1b[2J\x1b[H")?;
            } else if round > 0 {
                writeln!(out)?;
            }
            print_domains(&domains, &mut out)?;
        }
        out.flush()?;
        drop(out);
        round += 1;
        if rounds.is_none_or(|n| round < n) {
            std::thread::sleep(interval);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The domain id of `domain` (a name or an id) in the store.
fn find_domain(client: &XsUnix, domain: &str) -> Result<u32> {
    let known = domains(client)?;
    match domain.parse::<u32>() {
        Ok(id) => known.iter().find(|(d, _)| *d == id),
        Err(_) => known.iter().find(|(_, n)| n == domain),
    }
    .map(|(d, _)| *d)
    .with_context(|| format!("no domain named or numbered {domain:?} in the store"))
}

/// The devices of one kind of a domain, with their backends' view and counters.
pub fn collect_devices(client: &XsUnix, domid: u32, kind: &str) -> Vec<DeviceInfo> {
    let dir = format!("/local/domain/{domid}/device/{kind}");
    let mut out = Vec::new();
    for entry in children(client, &dir) {
        let Ok(devid) = entry.parse::<u32>() else {
            continue;
        };
        let fe = format!("{dir}/{devid}");
        let be = read(client, &format!("{fe}/backend"));
        let be_read = |key: &str| {
            be.as_ref()
                .and_then(|b| read(client, &format!("{b}/{key}")))
        };
        let backend_id: Option<u32> =
            read(client, &format!("{fe}/backend-id")).and_then(|v| v.parse().ok());
        let counters = backend_id.map_or_else(BTreeMap::new, |b| {
            counters(
                client,
                &format!("/local/domain/{b}/data/io/{kind}/{domid}/{devid}"),
                &DEVICE_COUNTERS,
            )
        });
        out.push(DeviceInfo {
            devid,
            vdev: vdev_name(kind, devid),
            backend_id,
            state: read(client, &format!("{fe}/state")).and_then(|v| v.parse().ok()),
            backend_state: be_read("state").and_then(|v| v.parse().ok()),
            mode: be_read("mode"),
            image: be_read("params"),
            mac: read(client, &format!("{fe}/mac")),
            ip: be_read("ip"),
            error: be_read("error"),
            counters,
        });
    }
    out
}

/// `splitvmm block-list` (`kind` "vbd") and `network-list` ("vif").
pub fn list_devices_of(socket: &Path, domain: &str, kind: &str, json: bool) -> Result<ExitCode> {
    let client = xenstore_rs_client(socket)?;
    let domid = find_domain(&client, domain)?;
    let devices = collect_devices(&client, domid, kind);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &devices)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let num = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let c = |d: &DeviceInfo, k: &str| show(d.counters.get(k).copied().flatten());
    if kind == "vbd" {
        writeln!(
            out,
            "{:<6} {:>10} {:>3} {:>5} {:>8} {:>4} {:>9} {:>11}  IMAGE",
            "VDEV", "DEVID", "BE", "STATE", "BE-STATE", "MODE", "REQUESTS", "BYTES"
        )?;
        for d in &devices {
            writeln!(
                out,
                "{:<6} {:>10} {:>3} {:>5} {:>8} {:>4} {:>9} {:>11}  {}",
                opt(&d.vdev),
                d.devid,
                num(d.backend_id),
                num(d.state),
                num(d.backend_state),
                opt(&d.mode),
                c(d, "requests"),
                c(d, "bytes"),
                opt(&d.image)
            )?;
            if let Some(error) = &d.error {
                writeln!(out, "       error: {error}")?;
            }
        }
    } else {
        writeln!(
            out,
            "{:<5} {:>3} {:>5} {:>8} {:<17} {:<15} {:>9} {:>11}",
            "DEVID", "BE", "STATE", "BE-STATE", "MAC", "IP", "FRAMES", "BYTES"
        )?;
        for d in &devices {
            writeln!(
                out,
                "{:<5} {:>3} {:>5} {:>8} {:<17} {:<15} {:>9} {:>11}",
                d.devid,
                num(d.backend_id),
                num(d.state),
                num(d.backend_state),
                opt(&d.mac),
                opt(&d.ip),
                c(d, "requests"),
                c(d, "bytes")
            )?;
            if let Some(error) = &d.error {
                writeln!(out, "      error: {error}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
