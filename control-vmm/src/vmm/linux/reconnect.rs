//! A standalone VMM's disk whose backend goes away (`splitvmm-vmm --blk-socket PATH`): as
//! QEMU's chardev `reconnect`, a thread per such device waits for the connection's end (a
//! hang-up on a duplicate of its socket; it never wakes otherwise), connects to PATH again,
//! retrying while nobody listens or the set-up fails, and resumes the device in place with
//! the in-flight log ([`Hotplug::resume`], the code a managed VMM runs when the toolstack hands
//! it the restarted driver domain's connection). The guest sees slow requests, no error.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::EventFd;

use super::hotplug::{DeviceKey, Hotplug};

/// Pause between two attempts to reach the backend again.
const RETRY: Duration = Duration::from_millis(100);

/// Why a watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectError {
    #[error("the reconnect thread: {0}")]
    Start(#[source] std::io::Error),
}

/// The running watches; stopped (and joined) by [`BackendWatch::stop`].
#[derive(Debug)]
pub struct BackendWatch {
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendWatch {
    /// Watches each `(key, path, peer)`: `peer` a duplicate of the device's connection.
    pub fn start(
        hotplug: &Arc<Hotplug>,
        devices: Vec<(DeviceKey, PathBuf, OwnedFd)>,
    ) -> Result<Self, ReconnectError> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ReconnectError::Start)?);
        let mut threads = Vec::new();
        for (key, path, peer) in devices {
            let (hotplug, stop) = (Arc::clone(hotplug), Arc::clone(&stop));
            let t = std::thread::Builder::new()
                .name(format!("{}{}-reconnect", key.0.name(), key.1))
                .spawn(move || watch(key, &path, peer, &hotplug, &stop))
                .map_err(ReconnectError::Start)?;
            threads.push(t);
        }
        Ok(Self { stop, threads })
    }

    /// Ends the watches.
    pub fn stop(self) {
        // Nobody reads it: it stays readable.
        let _ = self.stop.write(1);
        for t in self.threads {
            if t.join().is_err() {
                log::error!("a backend reconnect thread panicked");
            }
        }
    }
}

/// Waits for `fd` to hang up (true) or for `stop` (false). Raw poll: nix's `PollFlags` has
/// no POLLRDHUP and drops revents it does not know.
fn wait_hangup(fd: BorrowedFd<'_>, stop: &EventFd) -> bool {
    let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two descriptors that outlive the call, through an array of two.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("backend watch: poll: {e}");
            return false;
        }
        if pfd[1].revents != 0 {
            return false;
        }
        if pfd[0].revents & gone != 0 {
            return true;
        }
    }
}

/// Sleeps `d` unless stopped first; false once stopped.
fn pause(d: Duration, stop: &EventFd) -> bool {
    // SAFETY: the eventfd lives as long as `stop`, past this call.
    let wake = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    let mut pfd = [PollFd::new(wake, PollFlags::POLLIN)];
    let ms = u16::try_from(d.as_millis()).unwrap_or(u16::MAX);
    !matches!(poll(&mut pfd, PollTimeout::from(ms)), Ok(n) if n > 0)
}

fn watch(key: DeviceKey, path: &PathBuf, mut peer: OwnedFd, hotplug: &Hotplug, stop: &EventFd) {
    let name = format!("{} {}", key.0.name(), key.1);
    while wait_hangup(peer.as_fd(), stop) {
        let gone = Instant::now();
        log::warn!(
            "{name}: the backend went away; reconnecting to {}",
            path.display()
        );
        let mut tries = 0u32;
        loop {
            if !pause(RETRY, stop) {
                return;
            }
            tries += 1;
            let Ok(stream) = UnixStream::connect(path) else {
                continue;
            };
            let Ok(dup) = stream.try_clone().map(OwnedFd::from) else {
                continue;
            };
            match hotplug.resume(key, stream) {
                Ok(Some(log)) => {
                    log::warn!(
                        "{name}: resumed on the restarted backend ({}) {:.2} s after it went \
                         away ({tries} tries)",
                        if log {
                            "in-flight log handed back"
                        } else {
                            "no in-flight log: rings restarted at their used index"
                        },
                        gone.elapsed().as_secs_f64()
                    );
                    peer = dup;
                    break;
                }
                Ok(None) => return,
                Err(e) => {
                    if tries.is_power_of_two() {
                        log::warn!(
                            "{name}: resuming on {} (try {tries}): {}; retrying",
                            path.display(),
                            chain(&e)
                        );
                    }
                }
            }
        }
    }
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn the_watch_wakes_for_the_peers_end_or_the_stop_not_for_data() {
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        // Data waiting (a reply the session has not read yet) is no end.
        let (mine, mut peer) = UnixStream::pair().unwrap();
        peer.write_all(b"reply").unwrap();
        let watcher = std::thread::spawn(move || wait_hangup(mine.as_fd(), &stop));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!watcher.is_finished(), "woke up for data");
        drop(peer);
        assert!(watcher.join().unwrap(), "the peer's end");
        // The stop ends a wait on a live connection.
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        stop.write(1).unwrap();
        assert!(!wait_hangup(theirs.as_fd(), &stop));
        assert!(
            !pause(Duration::from_secs(5), &stop),
            "a stopped pause is short"
        );
        ours.write_all(b"x").unwrap();
    }
}
