//! Domain processes: started with exactly the descriptors they are handed, and always reaped.
//!
//! A domain process inherits nothing but stdin/stdout/stderr and the descriptors given to
//! [`DomainProcess::spawn`], which appear as fds 3, 4, ... in order. Dropping a
//! [`DomainProcess`] that is still running kills it (SIGTERM, then SIGKILL after a grace
//! period) and waits for it, so every exit path of the toolstack reaps its children. Every
//! domain process is forked by one long-lived thread (see `spawn_from_long_lived_thread`), so
//! its parent-death signal follows the toolstack, not the request that started it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
pub const FIRST_HANDED_FD: RawFd = 3;
/// How long a child gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A running domain process.
#[derive(Debug)]
pub struct DomainProcess {
    name: String,
    child: Option<Child>,
}

impl DomainProcess {
    /// Starts `command` as domain `name`, with `fds` as its descriptors 3, 4, ....
    ///
    /// The toolstack's termination signals are blocked (see [`signals`]); the child gets them
    /// unblocked, and dies with the toolstack if the toolstack dies (PR_SET_PDEATHSIG).
    pub fn spawn(
        name: &str,
        mut command: Command,
        fds: Vec<OwnedFd>,
    ) -> Result<DomainProcess, SupervisorError> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (fcntl, dup2, close_range, prctl, sigprocmask); it allocates
        // nothing (`raw` was built before the fork).
        unsafe {
            command.pre_exec(move || {
                // Move the sources out of the way first, so a source numbered like a target
                // (e.g. source 4 -> target 3 while another source is 3) is not clobbered.
                let mut moved = [0 as RawFd; 16];
                if raw.len() > moved.len() {
                    return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
                }
                for (i, fd) in raw.iter().enumerate() {
                    let copy = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
                    if copy < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    moved[i] = copy;
                }
                for (i, fd) in moved.iter().take(raw.len()).enumerate() {
                    // dup2 clears FD_CLOEXEC on the target, so exactly these survive exec.
                    if libc::dup2(*fd, FIRST_HANDED_FD + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Close everything else, including descriptors inherited without
                // FD_CLOEXEC (a jobserver pipe, say): the domain gets what it is handed.
                let first_unhanded = FIRST_HANDED_FD as libc::c_uint + raw.len() as libc::c_uint;
                if libc::syscall(libc::SYS_close_range, first_unhanded, libc::c_uint::MAX, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                signals::unblock_in_child()
            });
        }
        let child =
            spawn_from_long_lived_thread(command).map_err(|source| SupervisorError::Spawn {
                name: name.to_owned(),
                source,
            })?;
        // The parent's copies close here; the child has its own.
        drop(fds);
        log::info!("started {name} (pid {})", child.id());
        Ok(DomainProcess {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Returns the exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, SupervisorError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Ok(Some(status))
            }
            Ok(None) => Ok(None),
            Err(source) => Err(SupervisorError::Wait {
                name: self.name.clone(),
                source,
            }),
        }
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
            if self.child.is_none() || Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after a grace period; returns how it ended.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = kill(pid, Signal::SIGTERM);
        if let Ok(Some(status)) = self.wait_timeout(TERM_GRACE) {
            return Some(status);
        }
        let child = self.child.as_mut()?;
        log::warn!("{} ignored SIGTERM; killing it", self.name);
        let _ = child.kill();
        let status = child.wait().ok();
        self.child = None;
        status
    }
}

impl Drop for DomainProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// A command to start, and where to send the result.
struct SpawnJob {
    command: Command,
    reply: mpsc::Sender<std::io::Result<Child>>,
}

/// Starts `command` from one thread that lives as long as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: a
/// domain started from a management request's thread would be killed when that request is
/// answered. So every domain process is forked by the same long-lived thread.
fn spawn_from_long_lived_thread(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnJob>>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for mut job in rx {
                    let _ = job.reply.send(job.command.spawn());
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let Some(spawner) = spawner else {
        return Err(std::io::Error::other("the spawner thread could not start"));
    };
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(SpawnJob { command, reply })
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
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
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo three >&3; echo four >&4; ls /proc/self/fd | wc -l >&3");
        let mut p = DomainProcess::spawn("test", cmd, vec![w3.into(), w4.into()]).unwrap();
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
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            DomainProcess::spawn("sleeper", cmd, vec![]).unwrap()
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
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let p = DomainProcess::spawn("sleeper", cmd, vec![]).unwrap();
        let pid = Pid::from_raw(p.pid().unwrap() as i32);
        let started = Instant::now();
        drop(p);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Reaped: the pid no longer names our child.
        assert!(kill(pid, None).is_err());
    }
}
