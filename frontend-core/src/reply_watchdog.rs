//! A deadline on a vhost-user backend's replies.
//!
//! SO_RCVTIMEO cannot bound a reply: vhost 0.18's `Endpoint::recv_into_iovec_all` treats the
//! timed-out read (EAGAIN) as `SocketRetry` and reads again, forever. Instead a watchdog thread
//! per session shuts the socket down when a guarded call overruns its deadline: the blocked
//! read then sees end-of-file, the call fails, and so does the session (the device), never the
//! process.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    /// When the running call overruns; None while no call runs.
    deadline: Option<Instant>,
    /// The socket was shut down because a call overran.
    fired: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under any panic: every update is one assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Shuts a session's socket down when a guarded call takes longer than its timeout.
#[derive(Debug)]
pub(crate) struct ReplyWatchdog {
    shared: Arc<Shared>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl ReplyWatchdog {
    /// Watches `socket` (a clone of the session's), allowing `timeout` per call.
    pub(crate) fn new(socket: UnixStream, timeout: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || watch(&watched, &socket))?;
        Ok(Self {
            shared,
            timeout,
            thread: Some(thread),
        })
    }

    /// Runs `f` under the deadline; returns its result and whether the deadline fired.
    pub(crate) fn guard<T>(&self, f: impl FnOnce() -> T) -> (T, bool) {
        self.shared.lock().deadline = Some(Instant::now() + self.timeout);
        self.shared.wake.notify_one();
        let out = f();
        let mut state = self.shared.lock();
        state.deadline = None;
        (out, state.fired)
    }
}

fn watch(shared: &Shared, socket: &UnixStream) {
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        state = match state.deadline {
            None => shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    log::error!("vhost-user backend did not answer in time; closing the session");
                    let _ = socket.shutdown(Shutdown::Both);
                    state.fired = true;
                    state.deadline = None;
                    continue;
                }
                shared
                    .wake
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
}

impl Drop for ReplyWatchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
