//! `net-bench`: packet rates of the driver domain's virtio-net backend against DPDK's own
//! vhost-user PMD, measured in the same run with the same traffic generator.
//!
//! Scenarios, each at every frame size:
//! - **sink**: `dpdk-testpmd` virtio-user in txonly mode into one backend port. Ours: a
//!   `driver-domain serve --net` port (frames are switched, flooded to no other port and freed).
//!   Reference: testpmd with `--vdev net_vhost0` in rxonly mode.
//! - **guest-to-guest**: testpmd txonly on one port, testpmd rxonly on another. Ours: two ports
//!   of one switch. Reference: testpmd with two vhost PMD ports in io forwarding mode.
//!
//! The rate is frames per second the generator got into the ring (sink) or the receiver got
//! out of its ring (guest-to-guest), over the generator's forwarding time.

mod testpmd;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use splitvmm_tests::backends::Reaped;
use testpmd::{Spec, Testpmd};

#[derive(Parser)]
#[command(about = "virtio-net backend vs DPDK vhost PMD packet rates")]
struct Args {
    /// Seconds of traffic per measurement.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Frame sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,1500")]
    sizes: Vec<usize>,
    /// The driver-domain binary (default: next to this one).
    #[arg(long)]
    driver_domain: Option<PathBuf>,
    /// Measurements per side and point; the best of each side is reported (this damps noise
    /// from other load on the machine).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// `--poll-us` for the backend (DPDK's vhost PMD always polls).
    #[arg(long, default_value_t = 200)]
    poll_us: u64,
}

fn wait_sockets(paths: &[PathBuf]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !paths.iter().all(|p| p.exists()) {
        if Instant::now() > deadline {
            bail!("sockets {paths:?} never appeared");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn ours(args: &Args, bin: &Path, sockets: &[PathBuf]) -> Result<Reaped> {
    let list: Vec<String> = sockets.iter().map(|p| p.display().to_string()).collect();
    let child = Command::new(bin)
        .args(["serve", "--net", "--net-sockets", &list.join(",")])
        .arg(format!("--poll-us={}", args.poll_us))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let p = Reaped(child);
    wait_sockets(sockets)?;
    Ok(p)
}

fn pmd(dir: &Path, prefix: &str, vdevs: &[String], mode: &str, lcore: u32) -> Result<Testpmd> {
    let spec = Spec {
        prefix,
        vdevs,
        mode,
        fwd_lcore: lcore,
        extra: &[],
    };
    let mut t = Testpmd::spawn(dir, &spec)?;
    t.wait_started(Duration::from_secs(10))
        .map_err(anyhow::Error::msg)?;
    Ok(t)
}

fn generator(dir: &Path, prefix: &str, sock: &Path, len: usize) -> Result<Testpmd> {
    let vdevs = [format!("net_virtio_user0,path={}", sock.display())];
    let extra = [format!("--txpkts={len}")];
    let spec = Spec {
        prefix,
        vdevs: &vdevs,
        mode: "txonly",
        fwd_lcore: 0,
        extra: &extra,
    };
    let mut t = Testpmd::spawn(dir, &spec)?;
    t.wait_started(Duration::from_secs(10))
        .map_err(anyhow::Error::msg)?;
    Ok(t)
}

fn stop(t: Testpmd) -> Result<testpmd::Stats> {
    t.stop(Duration::from_secs(10)).map_err(anyhow::Error::msg)
}

/// Frames per second into a sink port.
fn sink(args: &Args, bin: &Path, dir: &Path, len: usize, dpdk: bool) -> Result<f64> {
    let sock = dir.join(format!("sink-{len}-{dpdk}-{}.sock", next_id()));
    let tag = format!(
        "{}{len}{}",
        if dpdk { "d" } else { "o" },
        std::process::id()
    );
    let (_ours, _pmd) = if dpdk {
        let v = [format!("net_vhost0,iface={}", sock.display())];
        (None, Some(pmd(dir, &format!("vs{tag}"), &v, "rxonly", 1)?))
    } else {
        (Some(ours(args, bin, std::slice::from_ref(&sock))?), None)
    };
    let tx = generator(dir, &format!("gs{tag}"), &sock, len)?;
    std::thread::sleep(Duration::from_secs_f64(args.secs));
    let secs = tx.elapsed().as_secs_f64();
    let s = stop(tx)?;
    Ok(s.tx as f64 / secs)
}

/// Frames per second from one guest port to another.
fn g2g(args: &Args, bin: &Path, dir: &Path, len: usize, dpdk: bool) -> Result<f64> {
    let id = next_id();
    let a = dir.join(format!("a-{len}-{dpdk}-{id}.sock"));
    let b = dir.join(format!("b-{len}-{dpdk}-{id}.sock"));
    let tag = format!(
        "{}{len}{}",
        if dpdk { "d" } else { "o" },
        std::process::id()
    );
    let (_ours, _pmd) = if dpdk {
        let v = [
            format!("net_vhost0,iface={}", a.display()),
            format!("net_vhost1,iface={}", b.display()),
        ];
        // The reference switch polls a core of its own when there is one.
        let lcore = if cores() >= 3 { 2 } else { 1 };
        (None, Some(pmd(dir, &format!("vg{tag}"), &v, "io", lcore)?))
    } else {
        (Some(ours(args, bin, &[a.clone(), b.clone()])?), None)
    };
    let rv = [format!("net_virtio_user0,path={}", b.display())];
    let rx = pmd(dir, &format!("r{tag}"), &rv, "rxonly", 1)?;
    let tx = generator(dir, &format!("g{tag}"), &a, len)?;
    std::thread::sleep(Duration::from_secs_f64(args.secs));
    let secs = tx.elapsed().as_secs_f64();
    stop(tx)?;
    std::thread::sleep(Duration::from_millis(200));
    let r = stop(rx)?;
    Ok(r.rx as f64 / secs)
}

/// A fresh number for socket names (every run binds new sockets).
fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Err(why) = test_support::peers::dpdk_testpmd() {
        bail!("{why}");
    }
    let bin = match &args.driver_domain {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no executable directory")?
            .join("driver-domain"),
    };
    let dir = tempfile::tempdir()?;
    println!(
        "net-bench: {} cores, {} s per point, best of {} rounds, backend --poll-us={}",
        cores(),
        args.secs,
        args.rounds,
        args.poll_us
    );
    if cores() < 3 {
        println!(
            "note: fewer than 3 cores: DPDK's guest-to-guest reference switch shares its polling \
             core with the receiver, so that ratio is not meaningful here"
        );
    }
    println!("| scenario | frame | splitvmm Mpps | DPDK vhost PMD Mpps | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    type Scenario = fn(&Args, &Path, &Path, usize, bool) -> Result<f64>;
    let scenarios: [(&str, Scenario); 2] = [
        ("virtio-user -> backend", sink),
        ("guest -> switch -> guest", g2g),
    ];
    for (name, f) in scenarios {
        for &len in &args.sizes {
            let (mut o, mut d) = (0f64, 0f64);
            for _ in 0..args.rounds.max(1) {
                o = o.max(f(&args, &bin, dir.path(), len, false)?);
                d = d.max(f(&args, &bin, dir.path(), len, true)?);
            }
            println!(
                "| {name} | {len} B | {:.3} | {:.3} | {:.2}x |",
                o / 1e6,
                d / 1e6,
                if d > 0.0 { o / d } else { 0.0 }
            );
        }
    }
    Ok(())
}
