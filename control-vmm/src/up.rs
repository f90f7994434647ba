//! `splitvmm up CONFIG.toml`: bring a host up and run the main job on it.
//!
//! The main job: every guest attaches its disks and writes and verifies a pattern on each;
//! the last guest's first disk is then detached at run time while the other guests keep doing
//! I/O, re-attached, and its pattern verified again (it must have survived). Then everything
//! is shut down, a table per domain is printed, and the exit status says whether every check
//! passed. With `--stay` the host stays up after the checks, managed through the toolstack
//! socket (`splitvmm create`, `shutdown`, `block-attach`, ...), until SIGINT or SIGTERM; the
//! exit status is then 128 + the signal's number (130 for SIGINT), as a shell reports a
//! program the signal ended.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Result};

use crate::config::HostConfig;
use crate::host::{Host, ShutdownReport};
use crate::{signals, toolstack};

/// UDP echoes per ping check.
const PING_ROUNDS: u32 = 20;

fn seed_for(domid: u32, devid: u32, round: u64) -> u64 {
    (u64::from(domid) << 40) ^ (u64::from(devid) << 8) ^ round
}

/// Runs `splitvmm up`; `run_dir` (from `--run-dir` or `$SPLITVMM_RUN_DIR`) replaces the host
/// file's.
pub fn run(config_path: &Path, stay: bool, run_dir: Option<PathBuf>) -> Result<ExitCode> {
    let mut config = HostConfig::load(config_path)?;
    if let Some(dir) = run_dir {
        config.run_dir = dir;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let caught = Arc::new(AtomicI32::new(0));
    let caught_by_handler = caught.clone();
    signals::handle_termination(move |signal| {
        log::warn!("{signal}: shutting the host down");
        caught_by_handler.store(signal as i32, Ordering::SeqCst);
        flag.store(true, Ordering::SeqCst);
    })?;

    let host = match Host::bring_up(&config, stop.clone()) {
        Ok(host) => Arc::new(host),
        // Interrupted while coming up: what was started has been stopped on the way out.
        Err(_) if caught.load(Ordering::SeqCst) != 0 => {
            return Ok(signals::exit_code(caught.load(Ordering::SeqCst)))
        }
        Err(e) => return Err(e.context("bringing the host up")),
    };
    let mut checks = main_job(&host, &config);
    if stay && checks.is_ok() {
        if let Err(e) = toolstack::serve(&host, &stop) {
            checks = Err(e);
        }
    }
    let host = Arc::into_inner(host).ok_or_else(|| anyhow!("a request still holds the host"))?;
    let report = host.shut_down();
    print_table(&report);
    let clean = report.clean;
    let signal = caught.load(Ordering::SeqCst);
    if signal != 0 {
        // Ended by a signal: the host was shut down in order; say so as a shell would.
        return Ok(signals::exit_code(signal));
    }
    match checks {
        Ok(report) => {
            println!("checks: {} passed, {} failed", report.passed, report.failed);
            if report.failed == 0 && clean {
                Ok(ExitCode::SUCCESS)
            } else {
                if !clean {
                    println!("some domain did not shut down cleanly");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Err(e) => Err(e),
    }
}

#[derive(Default)]
struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn record(&mut self, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

fn main_job(host: &Host, config: &HostConfig) -> Result<Report> {
    let mut report = Report::default();
    for guest in &config.guests {
        for disk in &guest.disks {
            host.attach_disk(&guest.name, disk)?;
        }
    }
    for guest in &config.guests {
        for disk in &guest.disks {
            let seed = seed_for(guest.domid, disk.devid, 0);
            let ok = host.disk_check(&guest.name, disk.devid, seed, disk.readonly)?;
            report.record(ok);
        }
    }

    // Network: every interface joins the driver domain's switch; each guest then resolves
    // the next one's address and exchanges UDP echoes with it.
    let mut interfaces = Vec::new();
    for guest in &config.guests {
        for nic in &guest.nics {
            let ip = host.attach_nic(&guest.name, nic)?;
            interfaces.push((guest.name.clone(), nic.devid, ip));
        }
    }
    if interfaces.len() >= 2 {
        for (i, (name, devid, _)) in interfaces.iter().enumerate() {
            let (_, _, peer) = &interfaces[(i + 1) % interfaces.len()];
            let ok = host.net_ping(name, *devid, *peer, PING_ROUNDS)?;
            report.record(ok);
        }
    }

    // Detach and re-attach one disk at run time while the others keep working.
    let target = config
        .guests
        .iter()
        .rev()
        .find_map(|g| g.disks.first().map(|d| (g, d)));
    if let Some((guest, disk)) = target {
        host.detach_disk(&guest.name, disk.devid)?;
        for other in config.guests.iter().filter(|g| g.name != guest.name) {
            for d in &other.disks {
                let seed = seed_for(other.domid, d.devid, 1);
                let ok = host.disk_check(&other.name, d.devid, seed, d.readonly)?;
                report.record(ok);
            }
        }
        host.attach_disk(&guest.name, disk)?;
        let seed = seed_for(guest.domid, disk.devid, 0);
        // The pattern written before the detach must still be there.
        let ok = host.disk_check(&guest.name, disk.devid, seed, true)?;
        report.record(ok);
    }
    Ok(report)
}

fn print_table(report: &ShutdownReport) {
    println!();
    println!(
        "{:<12} {:>5} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10}",
        "DOMAIN", "ID", "REQUESTS", "BYTES", "KICKS", "SUPPRESSED", "INTERRUPTS", "VMM EXITS"
    );
    for (name, domid, s) in &report.guests {
        match s {
            Some(s) => println!(
                "{name:<12} {domid:>5} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10}",
                s.requests, s.bytes, s.kicks_sent, s.kicks_suppressed, s.interrupts, s.vmm_exits
            ),
            None => println!("{name:<12} {domid:>5} {:>9}", "(no report)"),
        }
    }
    let (name, domid) = &report.driver;
    let sessions: u64 = report.backend.iter().map(|d| d.sessions).sum();
    println!(
        "{name:<12} {domid:>5} backend: {} device(s), {sessions} vhost-user session(s)",
        report.backend.len()
    );
    println!();
}
