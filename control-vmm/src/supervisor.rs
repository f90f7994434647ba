//! Domain processes: started with exactly the descriptors they are handed, and always reaped.
//!
//! A domain process inherits nothing but stdin/stdout/stderr and the descriptors given to
//! [`DomainProcess::spawn`], which appear as fds 3, 4, ... in order. Dropping a
//! [`DomainProcess`] that is still running kills it (SIGTERM, then SIGKILL after a grace
//! period) and waits for it, so every exit path of the toolstack reaps its children. Every
//! domain process is forked by one long-lived thread (see `spawn_from_long_lived_thread`), so
//! its parent-death signal follows the toolstack, not the request that started it. Each
//! process is also watched through a pidfd ([`DomainProcess::pidfd`]): readable once it has
//! exited, so the toolstack notices a death at once (see `host::supervision`).

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use confine::{Plan, SpawnSpec};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::signals;

/// Errors of starting or stopping domain processes.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("starting {name}")]
    Spawn {
        name: String,
        #[source]
        source: confine::spawn::SpawnError,
    },
    #[error("the spawner thread is gone")]
    Spawner,
    #[error("duplicating the output of {name}")]
    Output {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {name}")]
    Wait {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// First descriptor number handed to a child.
pub const FIRST_HANDED_FD: i32 = confine::spawn::FIRST_HANDED_FD;
/// How long a child gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A running domain process.
#[derive(Debug)]
pub struct DomainProcess {
    name: String,
    /// Its pid while it is not reaped.
    pid: Option<libc::pid_t>,
    /// A pidfd for it (readable once it has exited); `None` where the kernel has none.
    pidfd: Option<Arc<OwnedFd>>,
    /// How it ended, once reaped.
    exit: Option<ExitStatus>,
}

/// How a domain process is started: its command line and environment (from a `Command`), where
/// its output goes, and whether it is confined.
#[derive(Debug)]
pub struct Launch {
    pub command: Command,
    /// Standard output and error (inherited when `None`).
    pub output: Option<File>,
    /// Confined: started in its own namespaces with this plan in its environment (the
    /// process applies it at start-up, see the `confine` crate).
    pub confine: Option<Plan>,
    /// A cgroup's `cgroup.procs`, open: the process enters it before it executes.
    pub cgroup: Option<File>,
}

impl Launch {
    /// `command`, unconfined, with inherited output.
    pub fn plain(command: Command) -> Launch {
        Launch {
            command,
            output: None,
            confine: None,
            cgroup: None,
        }
    }
}

/// The environment a child gets: ours, with `command`'s changes.
fn environment(command: &Command) -> Vec<(OsString, OsString)> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (key, value) in command.get_envs() {
        match value {
            Some(v) => env.insert(key.to_owned(), v.to_owned()),
            None => env.remove(key),
        };
    }
    env.into_iter().collect()
}

impl DomainProcess {
    /// Starts `launch` as domain `name`, with `fds` as its descriptors 3, 4, ....
    ///
    /// The toolstack's termination signals are blocked (see [`signals`]); the child gets them
    /// unblocked, and dies with the toolstack if the toolstack dies (PR_SET_PDEATHSIG).
    pub fn spawn(
        name: &str,
        launch: Launch,
        fds: Vec<OwnedFd>,
    ) -> Result<DomainProcess, SupervisorError> {
        let mut env = environment(&launch.command);
        let namespaces = match &launch.confine {
            Some(plan) => {
                env.retain(|(k, _)| k != confine::plan::ENV);
                env.push((confine::plan::ENV.into(), plan.to_env().into()));
                confine::DOMAIN_NAMESPACES
            }
            None => 0,
        };
        let program = std::path::PathBuf::from(launch.command.get_program());
        let args: Vec<OsString> = launch.command.get_args().map(|a| a.to_owned()).collect();
        let output = match launch.output {
            Some(file) => {
                let err = file.try_clone().map_err(|source| SupervisorError::Output {
                    name: name.to_owned(),
                    source,
                })?;
                Some((OwnedFd::from(file), OwnedFd::from(err)))
            }
            None => None,
        };
        let cgroup = launch.cgroup.map(OwnedFd::from);
        let name_owned = name.to_owned();
        let pid = spawn_from_long_lived_thread(Box::new(move || {
            let spec = SpawnSpec {
                program: &program,
                args,
                env,
                output: output.as_ref().map(|(o, e)| (o, e)),
                fds: &fds,
                namespaces,
                unblock: *signals::termination_sigset().as_ref(),
                parent_death_signal: libc::SIGKILL,
                cgroup_procs: cgroup.as_ref(),
            };
            // The parent's copies of `fds` and the output close when this returns.
            confine::spawn(&spec)
        }))?
        .map_err(|source| SupervisorError::Spawn {
            name: name_owned,
            source,
        })?;
        log::info!("started {name} (pid {pid})");
        let pidfd = match open_pidfd(pid) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                log::warn!("{name}: no pidfd ({e}); its death is noticed only when polled");
                None
            }
        };
        Ok(DomainProcess {
            name: name.to_owned(),
            pid: Some(pid),
            pidfd,
            exit: None,
        })
    }

    /// A pidfd of the process: it polls readable once the process has exited (reaped or
    /// not), so a watcher can wait for many processes at once without reaping any.
    pub fn pidfd(&self) -> Option<Arc<OwnedFd>> {
        self.pidfd.clone()
    }

    /// How the process ended, once it has been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid.and_then(|p| u32::try_from(p).ok())
    }

    fn wait_with(&mut self, flags: libc::c_int) -> Result<Option<ExitStatus>, SupervisorError> {
        let Some(pid) = self.pid else {
            return Ok(None);
        };
        let mut status = 0;
        // SAFETY: waits for our own child `pid`; `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EINTR) {
                return Ok(None);
            }
            return Err(SupervisorError::Wait {
                name: self.name.clone(),
                source,
            });
        }
        if rc == 0 {
            return Ok(None);
        }
        self.pid = None;
        let status = ExitStatus::from_raw(status);
        self.exit = Some(status);
        if status.signal() == Some(libc::SIGSYS) {
            log::error!(
                "{} was killed by SIGSYS: it made a system call outside its seccomp allowlist \
                 (the kernel's audit log names it)",
                self.name
            );
        }
        Ok(Some(status))
    }

    /// Returns the exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, SupervisorError> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits until the process exits, at most `timeout`; `None` if it is still running.
    pub fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, SupervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if self.pid.is_none() || Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after a grace period; returns how it ended.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pid = Pid::from_raw(self.pid?);
        let _ = kill(pid, Signal::SIGTERM);
        if let Ok(Some(status)) = self.wait_timeout(TERM_GRACE) {
            return Some(status);
        }
        self.pid?;
        log::warn!("{} ignored SIGTERM; killing it", self.name);
        let _ = kill(pid, Signal::SIGKILL);
        loop {
            match self.wait_with(0) {
                Ok(Some(status)) => return Some(status),
                Ok(None) if self.pid.is_some() => continue,
                _ => return None,
            }
        }
    }
}

impl Drop for DomainProcess {
    fn drop(&mut self) {
        if self.pid.is_some() {
            self.stop();
        }
    }
}

/// `pidfd_open(pid)`: called right after the spawn, before anyone reaps the child, so the
/// pid cannot have been reused.
fn open_pidfd(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

type SpawnResult = Result<libc::pid_t, confine::spawn::SpawnError>;

/// A start to run, and where to send the result.
struct SpawnJob {
    start: Box<dyn FnOnce() -> SpawnResult + Send>,
    reply: mpsc::Sender<SpawnResult>,
}

/// Runs `start` on one thread that lives as long as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: a
/// domain started from a management request's thread would be killed when that request is
/// answered. So every domain process is forked by the same long-lived thread.
fn spawn_from_long_lived_thread(
    start: Box<dyn FnOnce() -> SpawnResult + Send>,
) -> Result<SpawnResult, SupervisorError> {
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnJob>>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for job in rx {
                    let _ = job.reply.send((job.start)());
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let Some(spawner) = spawner else {
        return Err(SupervisorError::Spawner);
    };
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(SpawnJob { start, reply })
        .map_err(|_| SupervisorError::Spawner)?;
    result.recv().map_err(|_| SupervisorError::Spawner)
}

/// A short description of how a process ended, for tables and logs.
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn handed_fds_arrive_as_3_and_4_and_nothing_else_leaks() {
        let (mut r3, w3) = std::io::pipe().unwrap();
        let (mut r4, w4) = std::io::pipe().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("echo three >&3; echo four >&4; ls /proc/self/fd | wc -l >&3");
        let mut p =
            DomainProcess::spawn("test", Launch::plain(cmd), vec![w3.into(), w4.into()]).unwrap();
        let status = p.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert!(status.success());
        let mut three = String::new();
        r3.read_to_string(&mut three).unwrap();
        let mut four = String::new();
        r4.read_to_string(&mut four).unwrap();
        assert_eq!(four, "four\n");
        let mut lines = three.lines();
        assert_eq!(lines.next(), Some("three"));
        // 0, 1, 2, 3, 4 and the directory fd `ls` opens: nothing else was inherited.
        assert_eq!(lines.next().map(str::trim), Some("6"));
    }

    #[test]
    fn a_process_started_from_a_short_lived_thread_outlives_it() {
        let p = std::thread::spawn(|| {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("60");
            DomainProcess::spawn("sleeper", Launch::plain(cmd), vec![]).unwrap()
        })
        .join()
        .unwrap();
        // The thread that asked is gone; the parent-death signal must not have fired.
        let mut p = p;
        assert!(p
            .wait_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none());
        assert!(p.stop().is_some());
    }

    #[test]
    fn dropping_a_running_process_reaps_it() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("60");
        let p = DomainProcess::spawn("sleeper", Launch::plain(cmd), vec![]).unwrap();
        let pid = Pid::from_raw(p.pid().unwrap() as i32);
        let started = Instant::now();
        drop(p);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Reaped: the pid no longer names our child.
        assert!(kill(pid, None).is_err());
    }

    #[test]
    fn the_pidfd_becomes_readable_when_the_process_dies_and_the_status_is_kept() {
        use std::os::fd::AsRawFd;
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("60");
        let mut p = DomainProcess::spawn("sleeper", Launch::plain(cmd), vec![]).unwrap();
        let pidfd = p.pidfd().expect("a pidfd");
        let readable = |ms| {
            let mut pfd = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
        };
        assert!(!readable(100), "readable while the process runs");
        kill(Pid::from_raw(p.pid().unwrap() as i32), Signal::SIGKILL).unwrap();
        assert!(readable(5000), "not readable after SIGKILL");
        let status = p.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(
            p.exit_status().and_then(|s| s.signal()),
            Some(libc::SIGKILL)
        );
        assert!(readable(0), "a reaped process's pidfd stays readable");
    }
}
