//! blk-bench: 4 KiB random reads through the same frontend (libblkio's Rust core) against
//! `driver-domain serve` and `qemu-storage-daemon` (file and null devices), plus native
//! io_uring on the same file and an eventfd ping-pong as floors.
//!
//! Every target runs once per round, the order reversed every other round (alternated pairs),
//! for `--rounds` rounds; the tables give per (target, mode, queue depth) the median IOPS with
//! its spread (lowest-highest), the median p50/p99 latency and the backend's CPU time per
//! request, then the ratios ours/QSD and ours/native, each computed within a round and given
//! as the median of the rounds with its spread. Never best-of.
//!
//! Modes: `irq` = frontend waits on the call eventfd; ours does not poll, QSD's iothread keeps
//! its default adaptive polling (QSD at its best); `poll` = frontend busy-polls the used ring
//! (a libblkio poll queue), backends busy-poll (ours: `--poll-us`, QSD: its default adaptive
//! polling). `ours-file` batches through io_uring (`--io-engine io-uring`, the default),
//! `ours-file-sync` does one preadv per request (`--io-engine sync`).
//!
//! Build and run: `cargo build --release -p splitvmm-driver-domain -p splitvmm-tests &&
//! target/release/blk-bench --seconds 1 --rounds 3`

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::Parser;
use splitvmm_tests::backends::Reaped;
use splitvmm_tests::bench_stats::{cpu_secs, load_averages_text, median, spread};
use splitvmm_tests::XorShift;

const BS: usize = 4096;

#[derive(Parser)]
#[command(about = "virtio-blk backend benchmark: driver-domain vs qemu-storage-daemon")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Size of the test image in MiB (kept in the page cache).
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// The driver-domain binary (default: next to this binary).
    #[arg(long)]
    driver_domain: Option<PathBuf>,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: String,
    /// Backend busy-poll window in polling mode (µs).
    #[arg(long, default_value_t = 100)]
    poll_us: u64,
    /// Only run targets whose name contains this (e.g. `ours`, `file`, `native`).
    #[arg(long)]
    only: Option<String>,
    /// Modes to run: `irq`, `poll` or both (comma separated).
    #[arg(long, default_value = "irq,poll")]
    modes: String,
    /// Rounds (each target once per round, the order reversed every other round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory for the image (a real file system, not tmpfs, where io_uring punts reads).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Pin the frontend (this process) to CPU A and every backend to CPU B ("A,B"): on a
    /// two-CPU machine polling is otherwise at the mercy of the scheduler.
    #[arg(long, value_name = "A,B")]
    pin: Option<String>,
    /// 4 KiB random writes instead of reads (buffered, into the page cache; the image is
    /// rewritten before the run and re-read before each target).
    #[arg(long)]
    write: bool,
    /// Queue depths to measure (comma separated).
    #[arg(long, default_value = "1,32")]
    depths: String,
    /// A second driver-domain binary (an A/B of two builds): every `ours-*` target runs
    /// with it too, as `ours-*@b`, in the same alternated rounds, with its ratio to A.
    #[arg(long)]
    driver_domain_b: Option<PathBuf>,
}

/// Whether the workload is 4 KiB random writes instead of reads (`--write`, set once in main).
static WRITES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The backend's CPU, when `--pin` asked for one (set once in main).
static BACKEND_CPU: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// `program`, run on the backend's CPU when pinned (through taskset, which execs it: the pid
/// is the program's).
fn backend_command(program: &Path) -> Command {
    match BACKEND_CPU.get() {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Pins the calling thread (and the threads it starts) to `cpu`.
fn pin_self(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (cpu is
    // checked against its size first); sched_setaffinity reads it for its stated size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            bail!("CPU {cpu} is past the affinity mask");
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
struct Stats {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU used by the backend process during the run, in CPUs (NaN when not measured).
    backend_cpu: f64,
}

fn percentiles(mut lat_ns: Vec<u32>, ops: u64, secs: f64) -> Stats {
    lat_ns.sort_unstable();
    let pick = |q: f64| {
        if lat_ns.is_empty() {
            return 0.0;
        }
        let i = ((lat_ns.len() as f64 - 1.0) * q).round() as usize;
        f64::from(lat_ns[i]) / 1000.0
    };
    Stats {
        iops: ops as f64 / secs,
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        backend_cpu: f64::NAN,
    }
}

/// Random 4 KiB reads (or writes, with `WRITES` set) at queue depth `qd` for `secs` seconds
/// on `q`.
fn run_queue(q: &mut Blkioq, buf: usize, qd: usize, capacity: u64, secs: f64) -> Result<Stats> {
    let writes = WRITES.load(std::sync::atomic::Ordering::Relaxed);
    let blocks = capacity / BS as u64;
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut start = vec![Instant::now(); qd];
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let submit = |q: &mut Blkioq, rng: &mut XorShift, slot: usize| {
        let off = rng.below(blocks) * BS as u64;
        let at = buf + slot * BS;
        if writes {
            q.write(off, at as *const u8, BS, slot, ReqFlags::empty());
        } else {
            q.read(off, at as *mut u8, BS, slot, ReqFlags::empty());
        }
    };
    for (slot, s) in start.iter_mut().enumerate() {
        *s = Instant::now();
        submit(q, &mut rng, slot);
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let mut ops = 0u64;
    let mut inflight = qd;
    let mut measuring = true;
    while inflight > 0 {
        let mut t = Duration::from_secs(5);
        let n = q
            .do_io(&mut comps, 1, Some(&mut t), None)
            .map_err(|e| anyhow!("do_io: {e:?}"))?;
        if n == 0 {
            bail!("no completion within 5 s");
        }
        let now = Instant::now();
        if measuring && now >= deadline {
            measuring = false;
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                bail!("request at QD{qd} failed: {}", c.ret);
            }
            let slot = c.user_data;
            if measuring {
                ops += 1;
                lat.push(
                    u32::try_from(now.duration_since(start[slot]).as_nanos()).unwrap_or(u32::MAX),
                );
                start[slot] = Instant::now();
                submit(q, &mut rng, slot);
            } else {
                inflight -= 1;
            }
        }
    }
    let _ = t0;
    Ok(percentiles(lat, ops, secs))
}

/// Connect libblkio to a vhost-user-blk socket and run QD1 and QD32.
fn bench_vhost(
    sock: &Path,
    pid: u32,
    poll: bool,
    secs: f64,
    depths: &[usize],
) -> Result<Vec<(usize, Stats)>> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| anyhow!("{e:?}"))?;
    b.set_str("path", sock.to_str().context("socket path")?)
        .map_err(|e| anyhow!("{e:?}"))?;
    // The socket file can appear a moment before the server listens on it.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match b.connect() {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => bail!("connect {}: {e:?}", sock.display()),
        }
    }
    let (nq, npq) = if poll { (0, 1) } else { (1, 0) };
    b.set_i32("num-queues", nq).map_err(|e| anyhow!("{e:?}"))?;
    b.set_i32("num-poll-queues", npq)
        .map_err(|e| anyhow!("{e:?}"))?;
    b.set_i32("queue-size", 256).map_err(|e| anyhow!("{e:?}"))?;
    measure_depths(&mut b, poll, secs, Some(pid), depths)
}

/// Starts a connected `b` and runs QD1 and QD32 on its first queue (its polled one with
/// `poll`), charging `backend`'s CPU time to each run when given.
fn measure_depths(
    b: &mut Blkio,
    poll: bool,
    secs: f64,
    backend: Option<u32>,
    depths: &[usize],
) -> Result<Vec<(usize, Stats)>> {
    let mut out = b.start().map_err(|e| anyhow!("start: {e:?}"))?;
    let capacity = b.get_u64("capacity").map_err(|e| anyhow!("{e:?}"))?;
    let max_qd = depths.iter().copied().max().unwrap_or(1);
    let region = b
        .alloc_mem_region(max_qd * BS)
        .map_err(|e| anyhow!("{e:?}"))?;
    b.map_mem_region(&region).map_err(|e| anyhow!("{e:?}"))?;
    let q = if poll {
        &mut out.poll_queues[0]
    } else {
        &mut out.queues[0]
    };
    let mut res = Vec::new();
    for &qd in depths {
        let c0 = backend.map(cpu_secs);
        let mut st = run_queue(q, region.addr, qd, capacity, secs)?;
        if let (Some(pid), Some(c0)) = (backend, c0) {
            st.backend_cpu = (cpu_secs(pid) - c0) / secs;
        }
        res.push((qd, st));
    }
    Ok(res)
}

fn bench_native(img: &Path, secs: f64, depths: &[usize]) -> Result<Vec<(usize, Stats)>> {
    let mut b = Blkio::new("io_uring").map_err(|e| anyhow!("{e:?}"))?;
    b.set_str("path", img.to_str().context("image path")?)
        .map_err(|e| anyhow!("{e:?}"))?;
    b.set_bool("direct", false).map_err(|e| anyhow!("{e:?}"))?;
    b.connect()
        .map_err(|e| anyhow!("io_uring connect: {e:?}"))?;
    b.set_i32("num-queues", 1).map_err(|e| anyhow!("{e:?}"))?;
    measure_depths(&mut b, false, secs, None, depths)
}

/// Round trips through two eventfds between two threads: the notification floor.
fn eventfd_pingpong(secs: f64) -> Result<Stats> {
    use vmm_sys_util::eventfd::EventFd;
    let a = EventFd::new(0)?;
    let b = EventFd::new(0)?;
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let peer = std::thread::spawn(move || loop {
        match a2.read() {
            Ok(v) if v >= 1 << 40 => break,
            Ok(_) => {
                let _ = b2.write(1);
            }
            Err(_) => break,
        }
    });
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let s = Instant::now();
        a.write(1)?;
        b.read()?;
        lat.push(u32::try_from(s.elapsed().as_nanos()).unwrap_or(u32::MAX));
    }
    a.write(1 << 40)?;
    let _ = peer.join();
    let n = lat.len() as u64;
    Ok(percentiles(lat, n, t0.elapsed().as_secs_f64()))
}

fn wait_socket(p: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("backend exited early: {st}");
        }
        if Instant::now() > deadline {
            bail!("socket {} never appeared", p.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn spawn_ours(bin: &Path, sock: &Path, disk: &[String], poll_us: u64) -> Result<Reaped> {
    let _ = std::fs::remove_file(sock);
    let mut c = backend_command(bin)
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .args(disk)
        .arg("--poll-us")
        .arg(poll_us.to_string())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_socket(sock, &mut c)?;
    Ok(Reaped(c))
}

fn spawn_qsd(qsd: &str, sock: &Path, blockdev: &str) -> Result<Reaped> {
    let _ = std::fs::remove_file(sock);
    // Its iothread's default adaptive polling in both modes: QSD at its best.
    let iothread = "iothread,id=io0".to_string();
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={},writable=on,iothread=io0",
        sock.display()
    );
    let mut c = backend_command(Path::new(qsd))
        .args([
            "--blockdev",
            blockdev,
            "--object",
            &iothread,
            "--export",
            &export,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {qsd}"))?;
    wait_socket(sock, &mut c)?;
    Ok(Reaped(c))
}

/// One way to run a backend under test.
struct Target {
    name: &'static str,
    kind: TargetKind,
}

enum TargetKind {
    /// `driver-domain serve` (this binary) with these disk arguments.
    Ours(PathBuf, Vec<String>),
    Qsd(String),
    Native,
}

/// Runs `t` in `mode` once: QD1 and QD32.
fn run_target(
    t: &Target,
    (sock, img): (&Path, &Path),
    poll: bool,
    args: &Args,
    depths: &[usize],
) -> Result<Vec<(usize, Stats)>> {
    match &t.kind {
        TargetKind::Ours(bin, disk) => {
            let poll_us = if poll { args.poll_us } else { 0 };
            let p = spawn_ours(bin, sock, disk, poll_us)?;
            bench_vhost(sock, p.0.id(), poll, args.seconds, depths)
        }
        TargetKind::Qsd(bdev) => {
            let p = spawn_qsd(&args.qsd, sock, bdev)?;
            bench_vhost(sock, p.0.id(), poll, args.seconds, depths)
        }
        TargetKind::Native => bench_native(img, args.seconds, depths),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    WRITES.store(args.write, std::sync::atomic::Ordering::Relaxed);
    let host_cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    if let Some(pin) = &args.pin {
        let cpus: Vec<usize> = pin
            .split(',')
            .map(|c| c.trim().parse())
            .collect::<Result<_, _>>()
            .context("--pin A,B: two CPU numbers")?;
        let [frontend, backend] = cpus[..] else {
            bail!("--pin A,B: two CPU numbers");
        };
        pin_self(frontend)?;
        let _ = BACKEND_CPU.set(backend);
    }
    let bin = match &args.driver_domain {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("driver-domain"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p splitvmm-driver-domain)",
            bin.display()
        );
    }
    let dir = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let img = dir.path().join("bench.img");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)?;
        for i in 0..args.image_mib {
            f.write_all_at(&chunk, i << 20)?;
        }
        f.sync_all()?;
    }
    // Re-read before every run: the machine's reclaim daemon evicts pages between runs.
    let warm = || -> Result<()> {
        let f = std::fs::File::open(&img)?;
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..args.image_mib {
            f.read_exact_at(&mut buf, i << 20)?;
        }
        Ok(())
    };
    let sock = dir.path().join("bench.sock");
    let img_s = img.to_string_lossy().to_string();
    let null_size = (1u64 << 30).to_string();
    let qsd_ok = match test_support::peers::qemu_storage_daemon_named(&args.qsd) {
        Ok(_) => true,
        Err(why) => {
            eprintln!("WARNING: {why}; QSD rows are SKIPPED");
            false
        }
    };
    let mut targets = vec![
        Target {
            name: "ours-file",
            kind: TargetKind::Ours(
                bin.clone(),
                vec![
                    "--blk".into(),
                    img_s.clone(),
                    "--io-engine".into(),
                    "io-uring".into(),
                ],
            ),
        },
        Target {
            name: "ours-file-sync",
            kind: TargetKind::Ours(
                bin.clone(),
                vec![
                    "--blk".into(),
                    img_s.clone(),
                    "--io-engine".into(),
                    "sync".into(),
                ],
            ),
        },
        Target {
            name: "ours-null",
            kind: TargetKind::Ours(bin.clone(), vec!["--null".into(), null_size.clone()]),
        },
    ];
    if let Some(b) = &args.driver_domain_b {
        if !b.exists() {
            bail!("--driver-domain-b {}: not found", b.display());
        }
        let with_b: Vec<Target> = targets
            .iter()
            .filter_map(|t| match &t.kind {
                TargetKind::Ours(_, disk) => Some(Target {
                    // Leaked once per target: the result table is keyed by static names.
                    name: Box::leak(format!("{}@b", t.name).into_boxed_str()),
                    kind: TargetKind::Ours(b.clone(), disk.clone()),
                }),
                _ => None,
            })
            .collect();
        targets.extend(with_b);
    }
    let depths: Vec<usize> = args
        .depths
        .split(',')
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()
        .context("--depths: queue depths, comma separated")?;
    if qsd_ok {
        targets.push(Target {
            name: "qsd-file",
            kind: TargetKind::Qsd(format!(
                "driver=file,filename={img_s},node-name=n,aio=io_uring,cache.direct=off"
            )),
        });
        targets.push(Target {
            name: "qsd-null",
            kind: TargetKind::Qsd(
                "driver=null-co,node-name=n,size=1073741824,read-zeroes=on".to_string(),
            ),
        });
    }
    targets.push(Target {
        name: "native-io_uring",
        kind: TargetKind::Native,
    });
    let modes: Vec<(&'static str, bool)> = [("irq", false), ("poll", true)]
        .into_iter()
        .filter(|(m, _)| args.modes.split(',').any(|x| x == *m))
        .collect();
    let want = |t: &Target, mode: &str| {
        args.only.as_deref().is_none_or(|o| t.name.contains(o))
            && (mode == "irq" || !matches!(t.kind, TargetKind::Native))
    };
    let load_before = load_averages_text();
    // (target, mode, qd) -> one Stats per round, in round order.
    let mut results: BTreeMap<(&'static str, &'static str, usize), Vec<Stats>> = BTreeMap::new();
    for round in 0..args.rounds.max(1) {
        let mut order: Vec<&Target> = targets.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &(mode, poll) in &modes {
            for t in &order {
                if !want(t, mode) {
                    continue;
                }
                warm()?;
                for (qd, st) in run_target(t, (&sock, &img), poll, &args, &depths)? {
                    results.entry((t.name, mode, qd)).or_default().push(st);
                }
            }
        }
    }
    let pingpong = eventfd_pingpong(args.seconds)?;
    let load_after = load_averages_text();

    println!(
        "| target | mode | QD | IOPS (median) | IOPS spread | p50 µs | p99 µs | backend CPU µs/request |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((target, mode, qd), runs) in &results {
        let iops: Vec<f64> = runs.iter().map(|s| s.iops).collect();
        let (lo, hi) = spread(&iops);
        let cpu = median(runs.iter().map(|s| s.backend_cpu / s.iops * 1e6).collect());
        let cpu = if cpu.is_nan() {
            "-".to_string()
        } else {
            format!("{cpu:.2}")
        };
        println!(
            "| {target} | {mode} | {qd} | {:.0} | {lo:.0}-{hi:.0} | {:.1} | {:.1} | {cpu} |",
            median(iops.clone()),
            median(runs.iter().map(|s| s.p50_us).collect()),
            median(runs.iter().map(|s| s.p99_us).collect()),
        );
    }
    println!(
        "| eventfd-pingpong | irq | 1 | {:.0} | - | {:.1} | {:.1} | - |",
        pingpong.iops, pingpong.p50_us, pingpong.p99_us
    );
    println!();
    println!("| ratio (within each round) | mode | QD | IOPS ratio (median, spread) | p50 ratio (median; lower is better) |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let ratio = |a: &'static str, b: &'static str, m: &'static str, qd: usize| {
        let (Some(x), Some(y)) = (results.get(&(a, m, qd)), results.get(&(b, m, qd))) else {
            return;
        };
        let iops: Vec<f64> = x.iter().zip(y).map(|(x, y)| x.iops / y.iops).collect();
        let p50: Vec<f64> = x.iter().zip(y).map(|(x, y)| x.p50_us / y.p50_us).collect();
        let (lo, hi) = spread(&iops);
        println!(
            "| {a} / {b} | {m} | {qd} | {:.2} ({lo:.2}-{hi:.2}) | {:.2} |",
            median(iops.clone()),
            median(p50)
        );
    };
    let b_names: Vec<(&'static str, &'static str)> = targets
        .iter()
        .filter_map(|t| {
            let a = t.name.strip_suffix("@b")?;
            let a = targets.iter().find(|x| x.name == a)?.name;
            Some((t.name, a))
        })
        .collect();
    for m in ["irq", "poll"] {
        for &qd in &depths {
            for &(b, a) in &b_names {
                ratio(b, a, m, qd);
            }
            ratio("ours-file", "qsd-file", m, qd);
            ratio("ours-file-sync", "qsd-file", m, qd);
            ratio("ours-null", "qsd-null", m, qd);
            ratio("ours-file", "ours-file-sync", m, qd);
        }
    }
    for &qd in &depths {
        ratio("ours-file", "native-io_uring", "irq", qd);
        ratio("ours-file-sync", "native-io_uring", "irq", qd);
    }
    println!(
        "\n({}; host: {} CPUs; load average {load_before} before, {load_after} after; {} \
         round(s), order reversed every other round; seconds per point: {}; {})",
        if args.write {
            "4 KiB random writes"
        } else {
            "4 KiB random reads"
        },
        host_cpus,
        args.rounds.max(1),
        args.seconds,
        match &args.pin {
            Some(p) => format!("frontend and backend pinned to CPUs {p}"),
            None => "not pinned".to_owned(),
        }
    );
    Ok(())
}
