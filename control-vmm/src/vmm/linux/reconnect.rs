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

use nix::errno::Errno;
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

/// Waits for `fd` to hang up (true) or for `stop` (false).
fn wait_hangup(fd: BorrowedFd<'_>, stop: &EventFd) -> bool {
    loop {
        // SAFETY: the eventfd lives as long as `stop`, past this call.
        let wake = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
        let mut pfd = [
            PollFd::new(fd, rdhup()),
            PollFd::new(wake, PollFlags::POLLIN),
        ];
        match poll(&mut pfd, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("backend watch: poll: {e}");
                return false;
            }
        }
        if pfd[1].revents().is_some_and(|r| !r.is_empty()) {
            return false;
        }
        let gone = rdhup() | PollFlags::POLLHUP | PollFlags::POLLERR;
        if pfd[0].revents().is_some_and(|r| r.intersects(gone)) {
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
        log::warn!("{name}: the backend went away; reconnecting to {}", path.display());
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
                        log::warn!("{name}: resuming on {}: {e}; retrying", path.display());
                    }
                }
            }
        }
    }
}

/// POLLRDHUP (the peer closed its end; nix has no constant for it).
fn rdhup() -> PollFlags {
    PollFlags::from_bits_retain(libc::POLLRDHUP)
}
