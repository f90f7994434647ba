//! A `splitvmm up --stay` for tests: started, waited for until it manages its host, and
//! stopped (SIGTERM, then SIGKILL) if the test fails half-way, so no host outlives a test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::workspace_bin;

/// `splitvmm`, with the binaries `up` starts built.
pub fn splitvmm() -> Command {
    workspace_bin("driver-domain");
    workspace_bin("process-guest");
    Command::new(workspace_bin("splitvmm"))
}

/// Runs `cmd`, echoing what it printed (for a failing test's log).
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running a command");
    eprintln!(
        "{cmd:?} -> {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits until `child` exits, at most `timeout`; its status, or `None` if it still runs.
pub fn wait_for(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Pids of the processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if after.split_whitespace().nth(1) == Some(&parent.to_string()) {
            pids.push(pid);
        }
    }
    pids
}

/// The child of `parent` whose command line contains `needle` (a guest's `--name`).
pub fn child_with_arg(parent: u32, needle: &str) -> Option<i32> {
    children_of(parent).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
            .unwrap_or(false)
    })
}

/// A running `splitvmm up HOST --stay`.
pub struct StayingHost {
    pub child: Child,
    /// Its run directory.
    pub run_dir: PathBuf,
    /// What it printed up to "host is up".
    pub startup: String,
}

impl StayingHost {
    /// Starts `splitvmm up config --stay` with run directory `run_dir` and waits until it
    /// serves management requests.
    pub fn start(config: &Path, run_dir: &Path) -> StayingHost {
        Self::start_with(splitvmm().arg("up").arg(config).arg("--stay"), run_dir)
    }

    /// As [`StayingHost::start`], from a prepared command.
    pub fn start_with(cmd: &mut Command, run_dir: &Path) -> StayingHost {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("starting up");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut host = StayingHost {
            child,
            run_dir: run_dir.to_owned(),
            startup: String::new(),
        };
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                _ => panic!("splitvmm up ended early:\n{}", host.startup),
            };
            host.startup.push_str(&line);
            host.startup.push('\n');
            if line.contains("host is up") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(|l| eprintln!("up: {}", l.unwrap_or_default())));
        host
    }

    /// A `splitvmm` command aimed at this host through its run directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = splitvmm();
        cmd.arg("--run-dir").arg(&self.run_dir).args(args);
        cmd
    }

    /// Runs a `splitvmm` command against this host.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    /// Sends `signal` and waits for the exit status.
    pub fn stop(&mut self, signal: Signal) -> Option<ExitStatus> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        wait_for(&mut self.child, Duration::from_secs(30))
    }
}

impl Drop for StayingHost {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            wait_for(&mut self.child, Duration::from_secs(20));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A standalone `splitvmm store`, killed and reaped when dropped.
pub struct StoreProcess(pub Child);

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `splitvmm store --socket socket` and waits until it listens.
pub fn start_store(socket: &Path) -> StoreProcess {
    let child = Command::new(workspace_bin("splitvmm"))
        .arg("store")
        .arg("--socket")
        .arg(socket)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting splitvmm store");
    let store = StoreProcess(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "store never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    store
}
