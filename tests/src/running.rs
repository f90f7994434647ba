//! Driving `splitvmm` from tests: the CLI, a `splitvmm up --stay` host started and waited for
//! until it serves (stopped when dropped, so no host outlives a failed test), and the
//! processes it started.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{wait_for, workspace_bin, UpStay};

/// `splitvmm`, with the domain binaries it starts built.
pub fn splitvmm() -> Command {
    workspace_bin("driver-domain");
    workspace_bin("process-guest");
    Command::new(workspace_bin("splitvmm"))
}

/// Runs `cmd`, echoing its output to the test's log.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running a command");
    eprintln!(
        "{cmd:?}\n--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running `splitvmm up CONFIG --stay` (stopped when dropped, see [`UpStay`]).
pub struct RunningHost {
    up: UpStay,
    store: PathBuf,
    /// What it printed until it said it is up.
    pub startup: String,
    /// Reads (and keeps) what it prints after that, so it never blocks on a full pipe.
    rest: Option<JoinHandle<String>>,
}

impl RunningHost {
    /// Starts `splitvmm up config --stay` (plus `args`) and waits until it serves;
    /// `store` is its store socket. Panics if it ends first.
    pub fn start(config: &Path, store: &Path, args: &[&str]) -> RunningHost {
        Self::start_from(
            splitvmm().arg("up").arg(config).arg("--stay").args(args),
            store,
        )
    }

    /// As [`RunningHost::start`], from a prepared `splitvmm up ... --stay` command.
    pub fn start_from(cmd: &mut Command, store: &Path) -> RunningHost {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning splitvmm up");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut host = RunningHost {
            up: UpStay(child),
            store: store.to_owned(),
            startup: String::new(),
            rest: None,
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
        host.rest = Some(std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .fold(String::new(), |all, l| all + &l + "\n")
        }));
        host
    }

    /// What it printed after it said it is up; waits for it to close its output (call it
    /// once it has exited).
    pub fn output_after_startup(&mut self) -> String {
        self.rest
            .take()
            .and_then(|rest| rest.join().ok())
            .unwrap_or_default()
    }

    /// Runs `splitvmm ARGS --store <its store>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    /// `splitvmm ARGS --store <its store>`, to spawn.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = splitvmm();
        cmd.args(args).arg("--store").arg(&self.store);
        cmd
    }

    /// Sends `signal` and waits for the exit status (at most 30 s).
    pub fn stop(&mut self, signal: Signal) -> Option<ExitStatus> {
        let _ = kill(Pid::from_raw(self.up.0.id() as i32), signal);
        if wait_for(&mut self.up.0, Duration::from_secs(30)) {
            self.up.0.try_wait().ok().flatten()
        } else {
            None
        }
    }

    /// Runs `splitvmm ARGS --store <its store>` and asserts it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?} failed");
        out
    }

    /// Process id of `splitvmm up`.
    pub fn pid(&self) -> u32 {
        self.up.0.id()
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit; true if it did.
    pub fn shut_down(&mut self, timeout: Duration) -> bool {
        if matches!(self.up.0.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.up.0.id() as i32), Signal::SIGTERM);
        }
        wait_for(&mut self.up.0, timeout)
    }
}

/// Lines of each domain log shown when a test using the host fails.
const LOG_TAIL_LINES: usize = 40;

impl Drop for RunningHost {
    /// A failing test shows the end of every domain's log (`<run_dir>/logs/*.log`, the run
    /// directory holding the store socket) before the host is stopped and its directory goes.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(logs) = self.store.parent().map(|run| run.join("logs")) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&logs) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!("--- last {} lines of {}", tail.len(), file.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// (pid, command name) of the processes whose parent is `parent`, zombies left out.
pub fn children_of(parent: u32) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        if fields.next() == Some(&parent.to_string()) && state != Some("Z") {
            found.push((pid, comm));
        }
    }
    found
}

/// The child of `parent` whose command line has the argument `arg` (a guest's `--name`).
pub fn child_with_arg(parent: u32, arg: &str) -> Option<i32> {
    children_of(parent)
        .into_iter()
        .map(|(pid, _)| pid)
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
                .unwrap_or(false)
        })
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
