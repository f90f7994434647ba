//! `splitvmm bench-approaches`: the three I/O approaches and native, one guest program, one
//! backing store (docs/approaches.md). Each VMM row boots the same Linux guest under
//! `splitvmm-vmm` with one disk on the store:
//!   emulated  `--nvme STORE,rw`: the VMM's emulated NVMe controller (stock `nvme` driver)
//!   virtio    `driver-domain serve --blk STORE` + `--blk-socket`: virtio-blk via the driver domain
//!   vf        `--vfio VF`: the assigned NVMe VF (stock `nvme` driver)
//! and native runs the same program (`l2-bench`) on the host, on the store. The guest's
//! `/init` (tests/lab/guest-init, `l2.approaches=`) writes the row's pattern at 8 MiB and runs
//! `l2-bench` once per workload (4 KiB O_DIRECT random reads, then writes, at QD1 then QD32,
//! for a fixed time each, from 16 MiB on) between the VMM's phase marks. The VMM counts exits
//! by reason, KVM's statistics and the host threads scheduled in (its non-vCPU threads and the
//! driver domain's) over each phase; this joins them with the guest's lines into the table.
//! Each row must show what makes it that approach, and its pattern is read back from the store.

pub mod table;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use table::{FiguresError, Row};

/// Where the pattern goes (bytes into the store) and where random I/O starts (MiB).
const PATTERN_OFFSET: u64 = 8 << 20;
const RANDOM_FROM_MIB: u64 = 16;

/// Why the benchmark could not run or did not show what it should.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The host lacks what a row needs (exit status 3).
    #[error("this host cannot run the benchmark: {0}")]
    Unsupported(String),
    #[error("{row}: {why}")]
    Row { row: String, why: String },
    #[error("{row}: {source}")]
    Figures { row: String, source: FiguresError },
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    #[error("checks failed:\n  {}", .0.join("\n  "))]
    Checks(Vec<String>),
}

impl BenchError {
    /// The exit status: 3 when the host lacks KVM, the store or the VF, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Unsupported(_) => 3,
            _ => 1,
        }
    }
}

/// What to run (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The backing store: a block device (the namespace, on the host's nvme driver).
    pub store: PathBuf,
    /// The VF to assign (on vfio-pci), a function of the same device.
    pub vf: Option<String>,
    pub rows: Vec<String>,
    pub seconds: f64,
    pub mem_mib: u64,
    /// `l2-bench` for the native row.
    pub l2_bench: PathBuf,
    /// Where each row's console and VMM output go.
    pub work_dir: PathBuf,
    pub row_timeout: Duration,
    /// Extra guest kernel arguments.
    pub guest_args: String,
    /// The binaries (`splitvmm-vmm`, `driver-domain`); default: next to splitvmm.
    pub bin_dir: PathBuf,
    /// A tracefs histogram of `kvm_exit` keyed by `exit_reason` the VMM reads at each phase
    /// mark (exits by hardware reason, `exit.*`); the caller sets its trigger.
    pub exit_reason_hist: Option<PathBuf>,
}

/// The workloads, in the order the guest runs them: (queue depth, op).
pub const WORKLOADS: [(u32, &str); 4] = [(1, "read"), (1, "write"), (32, "read"), (32, "write")];

/// Runs the rows, prints the table, checks each row's approach.
pub fn run(s: &Settings) -> Result<ExitCode, BenchError> {
    check_host(s)?;
    std::fs::create_dir_all(&s.work_dir).map_err(|source| BenchError::Io {
        op: format!("creating {}", s.work_dir.display()),
        source,
    })?;
    let tag = format!("SPLITVMM-BENCH-{:x}", std::process::id() ^ now_nanos());
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for name in &s.rows {
        let pattern = format!("{tag}-{name}");
        eprintln!("bench-approaches: row {name}");
        let row = match name.as_str() {
            "native" => native_row(s, &pattern)?,
            _ => vmm_row(s, name, &pattern)?,
        };
        let got = read_pattern(&s.store, pattern.len())?;
        if got != pattern {
            failed.push(format!(
                "{name}: the store holds {got:?} at 8 MiB, expected {pattern:?}"
            ));
        } else {
            eprintln!(
                "bench-approaches: {name}: pattern read back from {}",
                s.store.display()
            );
        }
        failed.extend(approach_checks(&row));
        rows.push(row);
    }
    print!("{}", table::render(&rows));
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(BenchError::Checks(failed))
    }
}

fn now_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Refuses, before anything runs, a host without KVM, without the store or without the VF.
fn check_host(s: &Settings) -> Result<(), BenchError> {
    let unsupported = |why: String| Err(BenchError::Unsupported(why));
    for r in &s.rows {
        if !["emulated", "virtio", "vf", "native"].contains(&r.as_str()) {
            return Err(BenchError::Row {
                row: r.clone(),
                why: "not a row (emulated, virtio, vf, native)".into(),
            });
        }
    }
    let vmm_rows = s.rows.iter().any(|r| r != "native");
    if vmm_rows {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return unsupported(format!("no KVM (/dev/kvm: {e})"));
        }
        for f in [&s.kernel, &s.initrd] {
            if !f.is_file() {
                return unsupported(format!("no guest file {}", f.display()));
            }
        }
        if let Some(h) = s.exit_reason_hist.as_deref().filter(|h| !h.is_file()) {
            return unsupported(format!("no exit-reason histogram {}", h.display()));
        }
    }
    match std::fs::metadata(&s.store) {
        Ok(m) if m.file_type().is_block_device() => {}
        Ok(_) => return unsupported(format!("{} is not a block device", s.store.display())),
        Err(e) => return unsupported(format!("no store {}: {e}", s.store.display())),
    }
    if s.rows.iter().any(|r| r == "vf") {
        let Some(vf) = &s.vf else {
            return unsupported("the vf row needs --vf BDF (an NVMe VF on vfio-pci)".into());
        };
        let dev = Path::new("/sys/bus/pci/devices").join(vf);
        if !dev.exists() {
            return unsupported(format!("no PCI function {vf}"));
        }
        let driver = std::fs::read_link(dev.join("driver")).ok();
        let driver = driver
            .as_deref()
            .and_then(Path::file_name)
            .map(|d| d.to_string_lossy().into_owned());
        if driver.as_deref() != Some("vfio-pci") {
            return unsupported(format!(
                "{vf} is on {}, not vfio-pci (driver-domain hw bind {vf} vfio-pci)",
                driver.as_deref().unwrap_or("no driver")
            ));
        }
        if !dev.join("physfn").exists() {
            return unsupported(format!("{vf} is not an SR-IOV VF"));
        }
    }
    if s.rows.iter().any(|r| r == "native") && !s.l2_bench.is_file() {
        return unsupported(format!(
            "no {} for the native row (tests/lab/l2-bench/build.sh)",
            s.l2_bench.display()
        ));
    }
    Ok(())
}

/// The guest's kernel command line for a row on `bdev`.
fn guest_cmdline(s: &Settings, bdev: &str, pattern: &str) -> String {
    let phases: Vec<String> = WORKLOADS.iter().map(|(q, o)| format!("{q}:{o}")).collect();
    format!(
        "console=ttyS0 loglevel=4 panic=-1 io_delay=none no_timer_check nvme_core.multipath=N \
         {} l2.approaches={bdev} l2.pattern={pattern} l2.bench_seconds={} l2.bench_phases={} \
         l2.bench_from_mib={RANDOM_FROM_MIB}",
        s.guest_args,
        s.seconds,
        phases.join(",")
    )
}

/// Boots the guest for one VMM row and collects its figures.
fn vmm_row(s: &Settings, name: &str, pattern: &str) -> Result<Row, BenchError> {
    let store = s.store.display().to_string();
    let row_err = |why: String| BenchError::Row {
        row: name.to_string(),
        why,
    };
    let mut backend: Option<Child> = None;
    let (bdev, mut args, driver): (&str, Vec<String>, &str) = match name {
        "emulated" => (
            "nvme0n1",
            vec!["--nvme".into(), format!("{store},rw")],
            "nvme",
        ),
        "virtio" => {
            let sock = s.work_dir.join("blk.sock");
            let _ = std::fs::remove_file(&sock);
            let log = output_file(&s.work_dir.join("driver-domain.log"))?;
            let child = Command::new(s.bin_dir.join("driver-domain"))
                .args(["serve", "--blk", &store, "--socket"])
                .arg(&sock)
                .stdout(
                    log.try_clone()
                        .map_err(|source| io("driver-domain log", source))?,
                )
                .stderr(log)
                .spawn()
                .map_err(|e| row_err(format!("starting driver-domain: {e}")))?;
            let pid = child.id();
            let child = backend.insert(child);
            if let Err(e) = wait_for_socket(&sock, child) {
                stop(child);
                return Err(e);
            }
            (
                "vda",
                vec![
                    "--blk-socket".into(),
                    sock.display().to_string(),
                    "--share-all-ram".into(),
                    "--count-threads-of".into(),
                    pid.to_string(),
                ],
                "virtio_blk",
            )
        }
        "vf" => (
            "nvme0n1",
            vec!["--vfio".into(), s.vf.clone().unwrap_or_default()],
            "nvme",
        ),
        _ => return Err(row_err("not a VMM row".into())),
    };
    args.push("--count-vmm-threads".into());
    if let Some(h) = &s.exit_reason_hist {
        args.push("--exit-reason-hist".into());
        args.push(h.display().to_string());
    }
    let console_path = s.work_dir.join(format!("{name}.console"));
    let vmm_path = s.work_dir.join(format!("{name}.vmm"));
    let mut vmm = Command::new(s.bin_dir.join("splitvmm-vmm"));
    vmm.arg("--linux")
        .arg("--kernel")
        .arg(&s.kernel)
        .arg("--initrd")
        .arg(&s.initrd)
        .args(["--vcpus", "1", "--mem-mib", &s.mem_mib.to_string()])
        .args(&args)
        .arg("--cmdline")
        .arg(guest_cmdline(s, bdev, pattern))
        .stdout(output_file(&console_path)?)
        .stderr(output_file(&vmm_path)?);
    eprintln!("bench-approaches: {vmm:?}");
    let status = run_with_timeout(vmm, s.row_timeout);
    if let Some(mut b) = backend {
        stop(&mut b);
    }
    let status = status.map_err(|e| row_err(format!("splitvmm-vmm: {e}")))?;
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    let vmm_out = std::fs::read_to_string(&vmm_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = vmm_out.lines().rev().take(10).collect();
        return Err(row_err(format!(
            "splitvmm-vmm ended with {status} (output in {}; last lines, newest first: {})",
            vmm_path.display(),
            tail.join(" / ")
        )));
    }
    let want = format!("L2-BENCH-DEVICE {bdev} driver {driver}");
    if !console.lines().any(|l| l.trim_end() == want) {
        return Err(row_err(format!(
            "the guest did not report {want:?} (console in {})",
            console_path.display()
        )));
    }
    let figures = |source| BenchError::Figures {
        row: name.to_string(),
        source,
    };
    let phases = table::guest_phases(&console).map_err(figures)?;
    let phases = table::join(phases, table::vmm_rounds(&vmm_out)).map_err(figures)?;
    Ok(Row {
        approach: name.to_string(),
        phases,
        counted: true,
    })
}

/// The same program on the host, on the store (no marks: there is no VMM).
fn native_row(s: &Settings, pattern: &str) -> Result<Row, BenchError> {
    write_pattern(&s.store, pattern)?;
    let mut out = String::new();
    for (qd, op) in WORKLOADS {
        let o = Command::new(&s.l2_bench)
            .arg(&s.store)
            .arg(qd.to_string())
            .arg(format!("{}s", s.seconds))
            .arg(format!("op={op}"))
            .arg(format!("from-mib={RANDOM_FROM_MIB}"))
            .args(["idle=0", "marks=0"])
            .output()
            .map_err(|source| io("running l2-bench", source))?;
        if !o.status.success() {
            return Err(BenchError::Row {
                row: "native".into(),
                why: format!(
                    "l2-bench QD{qd} {op}: {} {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            });
        }
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    let phases = table::guest_phases(&out).map_err(|source| BenchError::Figures {
        row: "native".into(),
        source,
    })?;
    Ok(Row {
        approach: "native".into(),
        phases,
        counted: false,
    })
}

/// What makes each row its approach, per phase: the emulated controller takes at least one
/// doorbell exit per request at QD1 (every request rings the submission doorbell) and at
/// least one per QD requests deeper (a doorbell may cover a batch, never more than the queue
/// depth in flight), the VF almost no exit to the VMM, and every phase completed requests.
pub fn approach_checks(row: &Row) -> Vec<String> {
    let mut failed = Vec::new();
    for p in &row.phases {
        let w = format!("{} {}", row.approach, p.workload());
        if p.requests == 0 {
            failed.push(format!("{w}: no request completed"));
            continue;
        }
        let doorbells = p.per_op("nvme_doorbell");
        match row.approach.as_str() {
            "emulated" if doorbells * f64::from(p.qd.max(1)) < 1.0 => failed.push(format!(
                "{w}: {doorbells:.3} doorbell (MMIO) exits per request, expected >= 1/{}",
                p.qd
            )),
            "vf" if p.per_op("mmio_write") + p.per_op("mmio_read") >= 0.05 => failed.push(format!(
                "{w}: {:.3} MMIO exits to the VMM per request, expected near zero",
                p.per_op("mmio_write") + p.per_op("mmio_read")
            )),
            _ => {}
        }
    }
    failed
}

fn io(op: &str, source: std::io::Error) -> BenchError {
    BenchError::Io {
        op: op.to_string(),
        source,
    }
}

fn output_file(path: &Path) -> Result<std::fs::File, BenchError> {
    std::fs::File::create(path)
        .map_err(|source| io(&format!("creating {}", path.display()), source))
}

/// Waits until the driver domain listens on `sock` (or has ended).
fn wait_for_socket(sock: &Path, backend: &mut Child) -> Result<(), BenchError> {
    let started = Instant::now();
    let failed = |why: String| BenchError::Row {
        row: "virtio".into(),
        why,
    };
    while !sock.exists() {
        if let Ok(Some(status)) = backend.try_wait() {
            return Err(failed(format!("the driver domain ended with {status}")));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(failed(format!(
                "the driver domain made no socket {} in 30 s",
                sock.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs `cmd` to its end, killing it after `limit`.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if started.elapsed() > limit => {
                stop(&mut child);
                return Err(format!("still running after {limit:?}: stopped"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// SIGTERM, then SIGKILL after 10 s; reaped.
fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill on our own child's pid, which is not reaped yet (so not reused).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    for _ in 0..100 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A 4 KiB-aligned block for O_DIRECT.
struct AlignedBlock(*mut u8);

const BLOCK: usize = 4096;

impl AlignedBlock {
    fn layout() -> std::alloc::Layout {
        // 4096 is a nonzero power of two: always a valid layout.
        std::alloc::Layout::from_size_align(BLOCK, BLOCK).unwrap_or_else(|_| unreachable!())
    }

    fn zeroed() -> Self {
        // SAFETY: a nonzero-sized layout; the pointer is checked.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        if p.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        Self(p)
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: self.0 points to BLOCK bytes owned by self, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.0, BLOCK) }
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed() with the same layout, freed once.
        unsafe { std::alloc::dealloc(self.0, Self::layout()) };
    }
}

fn open_direct(store: &Path, write: bool) -> Result<std::fs::File, BenchError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(store)
        .map_err(|source| io(&format!("opening {}", store.display()), source))
}

/// The first `len` bytes at 8 MiB of the store, read past the page cache.
fn read_pattern(store: &Path, len: usize) -> Result<String, BenchError> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(store, false)?;
    let mut b = AlignedBlock::zeroed();
    f.read_exact_at(b.bytes(), PATTERN_OFFSET)
        .map_err(|source| io(&format!("reading {}", store.display()), source))?;
    let mut s = String::new();
    let _ = (&b.bytes()[..len.min(BLOCK)]).read_to_string(&mut s);
    Ok(s)
}

/// `pattern` at 8 MiB of the store (the rest of the block zero), past the page cache.
fn write_pattern(store: &Path, pattern: &str) -> Result<(), BenchError> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(store, true)?;
    let mut b = AlignedBlock::zeroed();
    let n = pattern.len().min(BLOCK);
    b.bytes()[..n].copy_from_slice(&pattern.as_bytes()[..n]);
    f.write_all_at(b.bytes(), PATTERN_OFFSET)
        .map_err(|source| io(&format!("writing {}", store.display()), source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use table::Phase;

    fn phase(qd: u32, requests: u64, counts: &[(&str, u64)]) -> Phase {
        Phase {
            qd,
            op: "read".into(),
            requests,
            seconds: 1.0,
            interrupts: requests,
            counts: counts
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn each_approach_is_checked_for_what_makes_it() {
        let emulated = Row {
            approach: "emulated".into(),
            phases: vec![
                phase(1, 100, &[("nvme_doorbell", 200)]),
                phase(32, 100, &[("nvme_doorbell", 60)]),
            ],
            counted: true,
        };
        assert!(approach_checks(&emulated).is_empty());
        let not_emulated = Row {
            phases: vec![
                phase(1, 100, &[("nvme_doorbell", 50)]),
                phase(32, 320, &[("nvme_doorbell", 9)]),
            ],
            ..emulated
        };
        assert_eq!(approach_checks(&not_emulated).len(), 2);
        let vf = Row {
            approach: "vf".into(),
            phases: vec![phase(1, 100, &[("mmio_write", 1)])],
            counted: true,
        };
        assert!(approach_checks(&vf).is_empty());
        let trapping_vf = Row {
            phases: vec![phase(32, 100, &[("mmio_write", 50)])],
            ..vf
        };
        assert_eq!(approach_checks(&trapping_vf).len(), 1);
        let idle = Row {
            approach: "native".into(),
            phases: vec![phase(1, 0, &[])],
            counted: false,
        };
        assert_eq!(approach_checks(&idle).len(), 1);
    }

    #[test]
    fn the_guest_is_told_the_disk_the_pattern_and_the_workloads() {
        let s = Settings {
            kernel: "k".into(),
            initrd: "i".into(),
            store: "/dev/nvme1n1".into(),
            vf: None,
            rows: vec![],
            seconds: 2.0,
            mem_mib: 256,
            l2_bench: "l2-bench".into(),
            work_dir: "/tmp/x".into(),
            row_timeout: Duration::from_secs(1),
            guest_args: "nvme_core.io_timeout=5".into(),
            bin_dir: "/bin".into(),
            exit_reason_hist: None,
        };
        let c = guest_cmdline(&s, "vda", "P-virtio");
        for want in [
            "nvme_core.io_timeout=5",
            "l2.approaches=vda",
            "l2.pattern=P-virtio",
            "l2.bench_seconds=2",
            "l2.bench_phases=1:read,1:write,32:read,32:write",
            "l2.bench_from_mib=16",
        ] {
            assert!(c.split(' ').any(|w| w == want), "{want} in {c}");
        }
    }
}
