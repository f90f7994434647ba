//! The queue workers of one vhost-user session: one thread per entry of the device's
//! [`crate::virtio_core::BackendDevice::queue_workers`], each waiting in its own epoll on the
//! kick eventfds of its vrings, the device's wake event and an exit event, and serving its
//! queues with [`crate::virtio_core::serve_queues`] when one fires.
//!
//! The request handler adds and removes kicks ([`Worker::watch_kick`],
//! [`Worker::unwatch_kick`]) as rings start, stop and are enabled; a worker only reads. In a
//! confined driver domain a worker narrows its seccomp filter to the backend-worker
//! allowlist before it first reads a ring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, warn};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::VhostUserDevice;
use super::vring::Vring;
use crate::virtio_core::BackendDevice;

/// Epoll token of the exit event.
const EXIT: u64 = u64::MAX;
/// Epoll token of the device's wake event.
const WAKE: u64 = u64::MAX - 1;

/// Errors of starting or steering a worker.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// Creating the epoll or the exit event failed.
    #[error("cannot create the worker's epoll or exit event: {0}")]
    Create(#[source] io::Error),
    /// Adding or removing a descriptor failed.
    #[error("epoll_ctl: {0}")]
    Watch(#[source] io::Error),
    /// The thread could not be started.
    #[error("cannot start a queue worker: {0}")]
    Spawn(#[source] io::Error),
}

/// One worker's epoll and exit event, shared with its thread.
pub struct Worker {
    epoll: Epoll,
    exit: EventFd,
}

impl Worker {
    /// Watches `fd`, the kick of the session's vring `queue`.
    pub fn watch_kick(&self, fd: RawFd, queue: usize) -> Result<(), WorkerError> {
        let ev = EpollEvent::new(EventSet::IN, queue as u64);
        match self.epoll.ctl(ControlOperation::Add, fd, ev) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(WorkerError::Watch(e)),
            _ => Ok(()),
        }
    }

    /// Stops watching `fd` (not watched: nothing to do).
    pub fn unwatch_kick(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// The running workers of one session.
pub struct Workers {
    workers: Vec<Arc<Worker>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per worker of `device`; `vrings` are all of the session's vrings.
    pub fn start<D: BackendDevice>(
        device: &Arc<VhostUserDevice<D>>,
        vrings: &[Arc<Vring>],
    ) -> Result<Self, WorkerError> {
        let mut workers = Workers {
            workers: Vec::new(),
            threads: Vec::new(),
        };
        for queues in device.workers() {
            let epoll = Epoll::new().map_err(WorkerError::Create)?;
            let exit = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Create)?;
            let watch = |fd: RawFd, token| {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .map_err(WorkerError::Create)
            };
            watch(exit.as_raw_fd(), EXIT)?;
            if let Some(wake) = device.device().wake_event() {
                watch(wake.as_raw_fd(), WAKE)?;
            }
            let worker = Arc::new(Worker { epoll, exit });
            let mine: Vec<Arc<Vring>> = queues
                .iter()
                .filter_map(|q| vrings.get(*q).cloned())
                .collect();
            let (w, d, qs) = (worker.clone(), device.clone(), queues.clone());
            let thread = std::thread::Builder::new()
                .name("vring_worker".into())
                .spawn(move || run(&w, &d, &qs, &mine))
                .map_err(WorkerError::Spawn)?;
            workers.workers.push(worker);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The worker serving `queue` (by the device's layout), if any.
    pub fn for_queue<D: BackendDevice>(
        &self,
        device: &VhostUserDevice<D>,
        queue: usize,
    ) -> Option<&Worker> {
        let w = device.workers().iter().position(|qs| qs.contains(&queue))?;
        self.workers.get(w).map(|w| &**w)
    }

    /// Stops every worker and waits for it.
    pub fn stop(&mut self) {
        for w in &self.workers {
            let _ = w.exit.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One worker's loop: wait, consume what fired, serve the worker's queues.
fn run<D: BackendDevice>(
    worker: &Worker,
    device: &VhostUserDevice<D>,
    queues: &[usize],
    vrings: &[Arc<Vring>],
) {
    if confine::is_confined() {
        if let Err(e) =
            confine::seccomp::restrict_thread(confine::seccomp::ThreadClass::BackendWorker)
        {
            error!("narrowing a queue worker's seccomp filter: {e}");
            std::process::exit(1);
        }
    }
    let mut events = vec![EpollEvent::default(); vrings.len() + 2];
    loop {
        let n = match worker.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("{}: queue worker stopped: {e}", device.device().name());
                return;
            }
        };
        let (mut woken, mut kicked) = (false, false);
        for ev in &events[..n] {
            match ev.data() {
                EXIT => return,
                WAKE => {
                    if let Some(wake) = device.device().wake_event() {
                        // Consume the wake-up; the counter value does not matter.
                        let _ = wake.read();
                    }
                    woken = true;
                }
                q => {
                    let pos = queues.iter().position(|i| *i as u64 == q);
                    if let Some(v) = pos.and_then(|p| vrings.get(p)) {
                        if v.take_kick() {
                            kicked = true;
                            if let Some(c) = device.device().counters() {
                                c.add_kick();
                            }
                        }
                    }
                }
            }
        }
        if woken || kicked {
            device.serve(queues, vrings, !woken);
        }
    }
}
