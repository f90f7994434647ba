//! `splitvmm up CONFIG.toml`: bring a host up, attach every guest's devices, and run the
//! checks asked for.
//!
//! Checks run only where the host file (`[checks]`) or the command line (`--check`) asks:
//! `disk`, every guest writes and verifies a pattern on each of its scratch disks (others are
//! skipped: a check never writes to a user's image); `ping`, the guests resolve each other
//! and exchange UDP echoes through the driver domain's switch; `replug`, the last guest's first
//! disk is detached at run time while the other guests keep doing I/O, re-attached, and (with
//! `disk`) its pattern verified again. Then everything is shut down, a table per domain is
//! printed, and the exit status says whether every check passed. With `--stay` the host stays
//! up after the checks, managed through its run directory (`splitvmm create`, `shutdown`,
//! `block-attach`, ...), until SIGINT or SIGTERM. After SIGINT (Ctrl-C) the exit status is 130,
//! as a shell reports a program Ctrl-C ended; after SIGTERM (how services are stopped) it
//! says how the checks and the shutdown went, 0 if all was well.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Result};

use crate::config::{ChecksConfig, DiskConfig, GuestConfig, GuestKind, HostConfig};
use crate::host::{Host, ShutdownReport};
use crate::{signals, toolstack};

/// UDP echoes per ping check.
const PING_ROUNDS: u32 = 20;

/// The seed of the pattern the main job has a guest write on disk `devid` in `round` (0: the
/// first check; 1: the check while another guest's disk is detached). Public so tests can
/// recompute what the disk image must hold.
pub fn seed_for(domid: u32, devid: u32, round: u64) -> u64 {
    (u64::from(domid) << 40) ^ (u64::from(devid) << 8) ^ round
}

/// Runs `splitvmm up`; `check_all` runs every check whatever the host file asks; `run_dir`
/// (from `--run-dir` or `$SPLITVMM_RUN_DIR`) replaces the host file's.
pub fn run(
    config_path: &Path,
    stay: bool,
    check_all: bool,
    run_dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let mut config = HostConfig::load(config_path)?;
    if let Some(dir) = run_dir {
        config.run_dir = dir;
    }
    let checks = if check_all {
        ChecksConfig::ALL
    } else {
        config.checks
    };
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
        Err(e) if caught.load(Ordering::SeqCst) != 0 => {
            return match signals::exit_code(caught.load(Ordering::SeqCst)) {
                Some(code) => Ok(code),
                None => Err(e.context("interrupted while bringing the host up")),
            };
        }
        Err(e) => return Err(e.context("bringing the host up")),
    };
    // Every domain process is watched from here on: a dead guest is torn down, a dead driver
    // domain restarted with its devices.
    host.start_supervision()?;
    let mut checks = main_job(&host, &config, checks);
    if stay && checks.is_ok() {
        if let Err(e) = toolstack::serve(&host, &stop) {
            checks = Err(e);
        }
    }
    host.stop_supervision();
    let host = Arc::into_inner(host).ok_or_else(|| anyhow!("a request still holds the host"))?;
    let report = host.shut_down();
    print_table(&report);
    let clean = report.clean;
    if let Some(code) = signals::exit_code(caught.load(Ordering::SeqCst)) {
        // Ended by Ctrl-C: the host was shut down in order; say so as a shell would.
        return Ok(code);
    }
    match checks {
        Ok(report) => {
            println!(
                "checks: {} passed, {} failed, {} skipped",
                report.passed, report.failed, report.skipped
            );
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
    skipped: u32,
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

fn main_job(host: &Host, config: &HostConfig, checks: ChecksConfig) -> Result<Report> {
    let mut report = Report::default();
    for guest in &config.guests {
        for disk in &guest.disks {
            host.attach_disk(&guest.name, disk)?;
        }
    }
    // Network: every interface joins the driver domain's switch.
    let mut interfaces = Vec::new();
    for guest in &config.guests {
        for nic in &guest.nics {
            let ip = host.attach_nic(&guest.name, nic)?;
            interfaces.push((guest.name.clone(), nic.devid, ip));
        }
    }
    if !checks.any() {
        host.progress("every device attached; no checks asked for ([checks] or --check)");
        return Ok(report);
    }
    // The checks run in the tiny KVM guest or a process guest; a Linux guest's disk is the
    // guest's own.
    for guest in config.guests.iter().filter(|g| g.kind == GuestKind::Linux) {
        host.progress(&format!(
            "{}: checks skipped: they do not run in a kind = \"linux\" guest",
            guest.name
        ));
        report.skipped += 1;
    }
    let checked: Vec<&GuestConfig> = config
        .guests
        .iter()
        .filter(|g| g.kind != GuestKind::Linux)
        .collect();
    if checks.disk {
        for guest in &checked {
            for disk in &guest.disks {
                let seed = seed_for(guest.domid, disk.devid, 0);
                disk_check(host, &mut report, &guest.name, disk, seed, false)?;
            }
        }
    }

    // Each guest resolves the next one's address and exchanges UDP echoes with it.
    if checks.ping && interfaces.len() >= 2 {
        for (i, (name, devid, _)) in interfaces.iter().enumerate() {
            let (_, _, peer) = &interfaces[(i + 1) % interfaces.len()];
            let ok = host.net_ping(name, *devid, *peer, PING_ROUNDS)?;
            report.record(ok);
        }
    }

    // Detach and re-attach one disk at run time while the others keep working.
    let target = checked
        .iter()
        .rev()
        .find_map(|g| g.disks.first().map(|d| (g, d)));
    if let Some((guest, disk)) = target.filter(|_| checks.replug) {
        host.detach_disk(&guest.name, disk.devid)?;
        if checks.disk {
            for other in checked.iter().filter(|g| g.name != guest.name) {
                for d in &other.disks {
                    let seed = seed_for(other.domid, d.devid, 1);
                    disk_check(host, &mut report, &other.name, d, seed, false)?;
                }
            }
        }
        host.attach_disk(&guest.name, disk)?;
        report.record(true);
        if checks.disk {
            // The pattern written before the detach must still be there.
            let seed = seed_for(guest.domid, disk.devid, 0);
            disk_check(host, &mut report, &guest.name, disk, seed, true)?;
        }
    }
    Ok(report)
}

/// A disk check on a scratch, writable disk; any other disk is skipped, never written.
fn disk_check(
    host: &Host,
    report: &mut Report,
    name: &str,
    disk: &DiskConfig,
    seed: u64,
    verify_only: bool,
) -> Result<()> {
    if disk.readonly || !host.is_scratch(name, disk.devid) {
        host.progress(&format!(
            "{name}: vbd {} check skipped: {} is not a scratch image (mark it scratch = true \
             to let checks write to it)",
            disk.devid,
            disk.image.display()
        ));
        report.skipped += 1;
        return Ok(());
    }
    let ok = host.disk_check(name, disk.devid, seed, verify_only)?;
    report.record(ok);
    Ok(())
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
