//! `net-bench`: packet rates of the driver domain's virtio-net backend against DPDK's own
//! vhost-user PMD, measured in the same run with the same traffic generator.
//!
//! Scenarios, each at every frame size:
//! - **sink**: `dpdk-testpmd` virtio-user in txonly mode into one backend port. Ours: a
//!   `driver-domain serve --net` port alone on its switch. Each frame is copied out of the
//!   generator's buffer into a pooled host buffer, its header validated, its source address
//!   checked and both addresses looked up in the switch's MAC table; flooded to no other port,
//!   the buffer is reused. The rate is the port's `tx_frames` counter (frames that passed all
//!   of that; the run fails if any frame was refused). Reference: testpmd with
//!   `--vdev net_vhost0` in rxonly mode (each frame copied out of the guest's buffer into an
//!   mbuf and freed); the rate is its RX count.
//! - **guest-to-guest**: testpmd txonly on one port, testpmd rxonly on another. Ours: two ports
//!   of one switch (unicast to the receiver's address). Reference: testpmd with two vhost PMD
//!   ports in io forwarding mode. The rate is the receiver's RX count.
//!
//! Rates are over the generator's forwarding time. CPU per frame is the CPU time (user +
//! system, every thread, from `/proc/<pid>/stat`) of the side under test during the traffic,
//! per frame. Every point is measured `--rounds` times as alternated pairs (ours first in even
//! rounds, DPDK first in odd ones); the table gives medians, the ratio's median over the pairs
//! and its spread (lowest-highest), never best-of. The generator runs on one CPU and the side
//! under test (and, guest-to-guest, the receiver) on another (`--pin`). Before each pair it
//! waits (`--quiet-wait`) until the machine is 90% idle; the load column gives the load
//! average range and the lowest idle fraction seen before a pair.

mod measure;
mod testpmd;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use measure::Sample;
use splitvmm_tests::backends::Reaped;
use splitvmm_tests::bench_stats::{cpu_secs, load_average, median, spread, wait_idle};
use testpmd::{Spec, Testpmd};

/// The backend's first port's address (`serve --net`'s default); port i adds i.
const PORT_MAC: [&str; 2] = ["52:54:00:12:34:56", "52:54:00:12:34:57"];

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
    /// Alternated pairs (ours, DPDK) per point; medians and spreads are over these.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// `--poll-us` for the backend (DPDK's vhost PMD always polls).
    #[arg(long, default_value_t = 200)]
    poll_us: u64,
    /// CPUs of the generator and of the side under test ("GEN,SUT"; guest-to-guest's receiver
    /// shares SUT's CPU).
    #[arg(long, value_name = "GEN,SUT", default_value = "0,1")]
    pin: String,
    /// Scenarios to run: sink, g2g.
    #[arg(long, value_delimiter = ',', default_value = "sink,g2g")]
    scenarios: Vec<String>,
    /// Before each pair, wait up to this many seconds for the machine to be 90% idle (other
    /// jobs' builds skew a pair; 0: do not wait).
    #[arg(long, default_value_t = 60.0)]
    quiet_wait: f64,
    /// Extra arguments for our backend (A/B experiments).
    #[arg(long, allow_hyphen_values = true)]
    ours_arg: Vec<String>,
}

struct Bench {
    args: Args,
    bin: PathBuf,
    dir: tempfile::TempDir,
    gen_cpu: u32,
    sut_cpu: u32,
}

/// Our backend, pinned, its log (with the counters it prints when a frontend goes) in a file.
struct Ours {
    process: Reaped,
    log: PathBuf,
}

impl Ours {
    fn start(b: &Bench, sockets: &[PathBuf]) -> Result<Ours> {
        let id = next_id();
        let log = b.dir.path().join(format!("driver-domain-{id}.log"));
        let out = std::fs::File::create(&log)?;
        let list: Vec<String> = sockets.iter().map(|p| p.display().to_string()).collect();
        // taskset execs the program: the pid is the backend's.
        let child = Command::new("taskset")
            .arg("-c")
            .arg(b.sut_cpu.to_string())
            .arg(&b.bin)
            .args(["serve", "--net", "--net-sockets", &list.join(",")])
            .arg(format!("--poll-us={}", b.args.poll_us))
            .args(&b.args.ours_arg)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", b.bin.display()))?;
        let ours = Ours {
            process: Reaped(child),
            log,
        };
        wait_sockets(sockets)?;
        Ok(ours)
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Port `port`'s counters, logged when its frontend disconnected.
    fn counters(&self, port: usize) -> Result<Vec<(String, u64)>> {
        let tag = format!("net port {port}: counters ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.log)?;
            if let Some(line) = text.lines().rev().find(|l| l.contains(&tag)) {
                let tail = line.split_once(&tag).map_or("", |(_, t)| t);
                return Ok(tail
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect());
            }
            if Instant::now() > deadline {
                bail!("port {port} logged no counters:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn counter(c: &[(String, u64)], name: &str) -> u64 {
    c.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
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

impl Bench {
    fn testpmd(&self, prefix: &str, vdevs: &[String], mode: &str, lcore: u32) -> Result<Testpmd> {
        self.testpmd_with(prefix, vdevs, mode, lcore, &[])
    }

    fn testpmd_with(
        &self,
        prefix: &str,
        vdevs: &[String],
        mode: &str,
        lcore: u32,
        extra: &[String],
    ) -> Result<Testpmd> {
        let spec = Spec {
            prefix,
            vdevs,
            mode,
            fwd_lcore: lcore,
            extra,
        };
        let mut t = Testpmd::spawn(self.dir.path(), &spec)?;
        t.wait_started(Duration::from_secs(10))
            .map_err(anyhow::Error::msg)?;
        Ok(t)
    }

    /// testpmd virtio-user txonly on `sock`, sending `len`-byte frames from `PORT_MAC[0]` to
    /// `PORT_MAC[1]`.
    fn generator(&self, prefix: &str, sock: &Path, len: usize) -> Result<Testpmd> {
        let vdevs = [format!(
            "net_virtio_user0,path={},mac={}",
            sock.display(),
            PORT_MAC[0]
        )];
        let extra = [
            format!("--txpkts={len}"),
            format!("--eth-peer=0,{}", PORT_MAC[1]),
        ];
        self.testpmd_with(prefix, &vdevs, "txonly", self.gen_cpu, &extra)
    }

    /// Let the generator run, sampling `sut`'s CPU time in between; stop it. Returns the
    /// forwarding time and the CPU seconds per wall second of the side under test.
    fn run_traffic(&self, tx: Testpmd, sut: u32) -> Result<(f64, f64)> {
        let (c0, t0) = (cpu_secs(sut), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(self.args.secs));
        let (c1, t1) = (cpu_secs(sut), t0.elapsed().as_secs_f64());
        let secs = tx.elapsed().as_secs_f64();
        tx.stop(Duration::from_secs(10))
            .map_err(anyhow::Error::msg)?;
        Ok((secs, (c1 - c0) / t1))
    }

    /// Frames per second into a sink port.
    fn sink(&self, len: usize, dpdk: bool) -> Result<Sample> {
        let id = next_id();
        let sock = self.dir.path().join(format!("sink-{id}.sock"));
        let tag = format!("{id}p{}", std::process::id());
        if dpdk {
            let v = [format!("net_vhost0,iface={}", sock.display())];
            let pmd = self.testpmd(&format!("vs{tag}"), &v, "rxonly", self.sut_cpu)?;
            let tx = self.generator(&format!("gs{tag}"), &sock, len)?;
            let (secs, cpu) = self.run_traffic(tx, pmd.pid())?;
            let rx = pmd
                .stop(Duration::from_secs(10))
                .map_err(anyhow::Error::msg)?
                .rx;
            return Ok(sample(rx, secs, cpu));
        }
        let ours = Ours::start(self, std::slice::from_ref(&sock))?;
        let tx = self.generator(&format!("gs{tag}"), &sock, len)?;
        let (secs, cpu) = self.run_traffic(tx, ours.pid())?;
        let c = ours.counters(0)?;
        let refused = ["tx_invalid", "tx_spoofed", "tx_dropped", "tx_filtered"]
            .iter()
            .map(|k| counter(&c, k))
            .sum::<u64>();
        if refused > 0 {
            bail!("the sink port refused frames (not a like-for-like run): {c:?}");
        }
        Ok(sample(counter(&c, "tx_frames"), secs, cpu))
    }

    /// Frames per second from one guest port to another.
    fn g2g(&self, len: usize, dpdk: bool) -> Result<Sample> {
        let id = next_id();
        let a = self.dir.path().join(format!("a-{id}.sock"));
        let b = self.dir.path().join(format!("b-{id}.sock"));
        let tag = format!("{id}p{}", std::process::id());
        let rv = [format!(
            "net_virtio_user0,path={},mac={}",
            b.display(),
            PORT_MAC[1]
        )];
        let (ours, pmd, sut) = if dpdk {
            let v = [
                format!("net_vhost0,iface={}", a.display()),
                format!("net_vhost1,iface={}", b.display()),
            ];
            let pmd = self.testpmd(&format!("vg{tag}"), &v, "io", self.sut_cpu)?;
            let pid = pmd.pid();
            (None, Some(pmd), pid)
        } else {
            let o = Ours::start(self, &[a.clone(), b.clone()])?;
            let pid = o.pid();
            (Some(o), None, pid)
        };
        let rx = self.testpmd(&format!("r{tag}"), &rv, "rxonly", self.sut_cpu)?;
        let tx = self.generator(&format!("g{tag}"), &a, len)?;
        let (secs, cpu) = self.run_traffic(tx, sut)?;
        std::thread::sleep(Duration::from_millis(200));
        let got = rx
            .stop(Duration::from_secs(10))
            .map_err(anyhow::Error::msg)?
            .rx;
        drop((ours, pmd));
        Ok(sample(got, secs, cpu))
    }
}

fn sample(frames: u64, secs: f64, cpu_per_sec: f64) -> Sample {
    let rate = frames as f64 / secs;
    Sample {
        rate,
        cpu_ns: if rate > 0.0 {
            cpu_per_sec / rate * 1e9
        } else {
            f64::NAN
        },
    }
}

/// A fresh number for socket names and file prefixes (every run binds new sockets).
fn next_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_pin(s: &str) -> Result<(u32, u32)> {
    let v: Vec<u32> = s
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()
        .context("--pin GEN,SUT: two CPU numbers")?;
    match v.as_slice() {
        [g, s] if g != s => Ok((*g, *s)),
        _ => bail!("--pin GEN,SUT: two different CPU numbers"),
    }
}

fn mpps(v: f64) -> String {
    format!("{:.2}", v / 1e6)
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
    let (gen_cpu, sut_cpu) = parse_pin(&args.pin)?;
    let bench = Bench {
        bin,
        dir: tempfile::tempdir()?,
        gen_cpu,
        sut_cpu,
        args,
    };
    let args = &bench.args;
    let cmd: Vec<String> = std::env::args().collect();
    println!("command: {}", cmd.join(" "));
    println!(
        "net-bench: {} cores, {} s per point, {} alternated pairs, backend --poll-us={} {}; \
         generator on CPU {gen_cpu}, side under test on CPU {sut_cpu}",
        cores(),
        args.secs,
        args.rounds,
        args.poll_us,
        args.ours_arg.join(" "),
    );
    if cores() < 4 {
        println!(
            "note: guest -> switch -> guest needs three polling parties (generator, switch, \
             receiver); with fewer than 4 cores switch and receiver share CPU {sut_cpu}, so that \
             row measures the scheduler as much as the switch"
        );
    }
    println!(
        "| scenario | frame | ours Mpps (spread) | ours CPU ns/frame | DPDK Mpps (spread) | \
         DPDK CPU ns/frame | ratio (spread) | load |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    type Scenario = fn(&Bench, usize, bool) -> Result<Sample>;
    let all: [(&str, &str, Scenario); 2] = [
        ("sink", "virtio-user -> backend (sink)", Bench::sink),
        ("g2g", "guest -> switch -> guest", Bench::g2g),
    ];
    for (key, name, f) in all {
        if !args.scenarios.iter().any(|s| s == key) {
            continue;
        }
        for &len in &args.sizes {
            let (mut o, mut d, mut load) = (Vec::new(), Vec::new(), Vec::new());
            let mut idle = Vec::new();
            for round in 0..args.rounds.max(1) {
                if args.quiet_wait > 0.0 {
                    idle.push(wait_idle(0.9, Duration::from_secs_f64(args.quiet_wait)));
                }
                load.push(load_average());
                if round % 2 == 0 {
                    o.push(f(&bench, len, false)?);
                    d.push(f(&bench, len, true)?);
                } else {
                    d.push(f(&bench, len, true)?);
                    o.push(f(&bench, len, false)?);
                }
            }
            load.push(load_average());
            let rates = |v: &[Sample]| v.iter().map(|s| s.rate).collect::<Vec<_>>();
            let cpu = |v: &[Sample]| median(v.iter().map(|s| s.cpu_ns).collect());
            let (or, dr) = (rates(&o), rates(&d));
            let ratios: Vec<f64> = or.iter().zip(&dr).map(|(a, b)| a / b).collect();
            let (olo, ohi) = spread(&or);
            let (dlo, dhi) = spread(&dr);
            let (rlo, rhi) = spread(&ratios);
            let (llo, lhi) = spread(&load);
            let (ilo, _) = spread(&idle);
            let quiet = if idle.is_empty() {
                String::new()
            } else {
                format!(", idle >= {:.0}%", ilo * 100.0)
            };
            println!(
                "| {name} | {len} B | {} ({}-{}) | {:.0} | {} ({}-{}) | {:.0} | {:.2}x \
                 ({:.2}-{:.2}) | {llo:.1}-{lhi:.1}{quiet} |",
                mpps(median(or.clone())),
                mpps(olo),
                mpps(ohi),
                cpu(&o),
                mpps(median(dr.clone())),
                mpps(dlo),
                mpps(dhi),
                cpu(&d),
                median(ratios),
                rlo,
                rhi,
            );
        }
    }
    Ok(())
}
