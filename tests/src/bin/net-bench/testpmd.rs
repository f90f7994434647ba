//! Running `dpdk-testpmd` as a peer: a virtio-user frontend or a vhost-user PMD backend in
//! txonly, rxonly or io mode, stopped through its "Press enter to exit" prompt, with its
//! accumulated forward statistics parsed from its output.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary Debian's `dpdk-dev` package ships.
pub const TESTPMD: &str = "dpdk-testpmd";

/// Accumulated forward statistics of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames received.
    pub rx: u64,
    /// Frames sent.
    pub tx: u64,
    /// Frames the PMD failed to send (ring full).
    pub tx_dropped: u64,
}

/// One running testpmd, killed on drop.
pub struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    started: Instant,
}

/// How to run one testpmd.
pub struct Spec<'a> {
    /// Unique `--file-prefix`.
    pub prefix: &'a str,
    /// `--vdev` arguments.
    pub vdevs: &'a [String],
    /// `--forward-mode`.
    pub mode: &'a str,
    /// The forwarding lcore (the main lcore, which only waits for the prompt, is the next one).
    pub fwd_lcore: u32,
    /// Extra application arguments (after `--`).
    pub extra: &'a [String],
}

impl Testpmd {
    /// Start testpmd; its output goes to `<dir>/<prefix>.log`.
    pub fn spawn(dir: &Path, spec: &Spec<'_>) -> std::io::Result<Testpmd> {
        let log = dir.join(format!("{}.log", spec.prefix));
        let out = File::create(&log)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let main = (spec.fwd_lcore + 1) % cores.max(2);
        // stdbuf: testpmd's stdout is a file here, and its prompt must not sit in a buffer.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-o0", "-e0", TESTPMD]);
        cmd.args([
            "--no-pci",
            "--no-huge",
            "-m",
            "512",
            "--log-level=lib.eal:error",
        ])
        .arg(format!("--file-prefix={}", spec.prefix))
        .arg("-l")
        .arg(format!(
            "{},{}",
            main.min(spec.fwd_lcore),
            main.max(spec.fwd_lcore)
        ))
        .arg(format!("--main-lcore={main}"));
        for v in spec.vdevs {
            cmd.arg("--vdev").arg(v);
        }
        cmd.arg("--")
            .arg("--total-num-mbufs=16384")
            .arg(format!("--forward-mode={}", spec.mode))
            .args(spec.extra);
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let mut t = Testpmd {
            stdin: None,
            child,
            log,
            started: Instant::now(),
        };
        t.stdin = t.child.stdin.take();
        Ok(t)
    }

    /// The output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until forwarding runs ("Press enter to exit"), or fail after `timeout`.
    pub fn wait_started(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.contains("Press enter to exit") {
                self.started = Instant::now();
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("testpmd exited ({st}) before forwarding:\n{out}"));
            }
            if Instant::now() > deadline {
                return Err(format!("testpmd did not start forwarding in time:\n{out}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id (stdbuf execs testpmd: it is testpmd's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since forwarding started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stop forwarding, wait for exit (at most `timeout`) and return the statistics.
    pub fn stop(mut self, timeout: Duration) -> Result<Stats, String> {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("testpmd did not exit in time:\n{}", self.output()));
                }
            }
        }
        parse_stats(&self.output()).ok_or_else(|| format!("no statistics in:\n{}", self.output()))
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(name)? + name.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The accumulated statistics (the last RX-/TX-packets lines testpmd prints).
pub fn parse_stats(out: &str) -> Option<Stats> {
    let mut s = None::<Stats>;
    let mut cur = Stats::default();
    for line in out.lines() {
        if let Some(rx) = field(line, "RX-packets:") {
            cur.rx = rx;
        }
        if let Some(tx) = field(line, "TX-packets:") {
            cur.tx = tx;
            cur.tx_dropped = field(line, "TX-dropped:").unwrap_or(0);
            s = Some(cur);
        }
    }
    s
}
