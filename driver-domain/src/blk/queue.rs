//! Processing one virtqueue, and a standalone worker thread that serves queues from their kick
//! and call eventfds.
//!
//! [`BlkQueue::process`] drains at most `budget` requests per call, so a worker that serves
//! several queues visits them round-robin and a queue flooded by its driver cannot starve the
//! others. Guest notifications stay disabled while the queue is drained and, with polling, for
//! the whole polling window; they are re-enabled (which re-checks the ring, closing the race
//! with a driver that adds a buffer concurrently) only before going to sleep.

use std::num::Wrapping;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::config::BlkConfig;
use super::disk::BlkDisk;
use super::executor::{execute, ID_LEN};
use super::inflight::{InflightError, InflightQueue};
use super::request::Request;
use crate::virtio_core::counters::DeviceCounters;

/// How long a polling worker spins between two `sched_yield`s.
const YIELD_EVERY: Duration = Duration::from_micros(20);

/// Errors that fail a queue (the device stops serving it until it is reset).
#[derive(Debug, Error)]
pub enum QueueError {
    /// The ring itself is invalid (avail index jumped past the queue size, ring unreadable,
    /// a head index past the queue size).
    #[error("virtqueue {0}: {1}")]
    Ring(u16, virtio_queue::Error),
    /// The in-flight log rejected an index.
    #[error("virtqueue {0}: in-flight log: {1}")]
    Inflight(u16, InflightError),
    /// The queue already failed earlier.
    #[error("virtqueue {0} failed earlier: {1}")]
    Broken(u16, String),
    /// Waiting on the eventfds failed.
    #[error("waiting for a kick failed: {0}")]
    Wait(#[source] nix::Error),
    /// Signalling the driver failed.
    #[error("signalling the driver failed: {0}")]
    Call(#[source] std::io::Error),
}

/// The outcome of one [`BlkQueue::process`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Requests completed.
    pub completed: usize,
    /// The driver must be signalled (call eventfd).
    pub notify: bool,
    /// Call again (after signalling and serving other queues): the budget ran out with
    /// requests still queued, or polling is on and the polling window has not run yet.
    pub more: bool,
}

/// The per-queue state of a block device.
#[derive(Debug)]
pub struct BlkQueue {
    index: u16,
    disk: Arc<BlkDisk>,
    serial: [u8; ID_LEN],
    inflight: InflightQueue,
    budget: usize,
    poll: Duration,
    req: Request,
    broken: Option<String>,
    counters: Arc<DeviceCounters>,
}

impl BlkQueue {
    /// State for queue `index` of a device on `disk`, logging into `inflight`.
    pub fn new(index: u16, disk: Arc<BlkDisk>, cfg: &BlkConfig, inflight: InflightQueue) -> Self {
        let mut serial = [0u8; ID_LEN];
        let s = cfg.serial.as_bytes();
        let n = s.len().min(ID_LEN);
        serial[..n].copy_from_slice(&s[..n]);
        BlkQueue {
            index,
            disk,
            serial,
            inflight,
            budget: cfg.budget.max(1),
            poll: Duration::from_micros(cfg.poll_us),
            req: Request::default(),
            broken: None,
            counters: cfg.counters.clone(),
        }
    }

    /// The in-flight log of this queue.
    pub fn inflight(&self) -> &InflightQueue {
        &self.inflight
    }

    /// Why this queue failed, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Forget an earlier failure (the driver reset the device).
    pub fn reset(&mut self) {
        self.broken = None;
    }

    /// Serve up to `budget` requests from `queue`. An `Err` fails the queue: it is logged
    /// and every later call returns [`QueueError::Broken`] until [`BlkQueue::reset`].
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Progress, QueueError> {
        if let Some(why) = &self.broken {
            return Err(QueueError::Broken(self.index, why.clone()));
        }
        match self.process_inner(queue, mem) {
            Ok(p) => Ok(p),
            Err(e) => {
                error!("blk: failing queue: {e}");
                self.broken = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn process_inner<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Progress, QueueError> {
        let q = self.index;
        let ring = |e| QueueError::Ring(q, e);
        let mut progress = Progress::default();
        'outer: loop {
            queue.disable_notification(mem).map_err(ring)?;
            loop {
                if progress.completed == self.budget {
                    progress.more = true;
                    break 'outer;
                }
                let chain = {
                    let mut it = queue.iter(mem).map_err(ring)?;
                    it.next()
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                self.inflight
                    .set(head)
                    .map_err(|e| QueueError::Inflight(q, e))?;
                let written = match self.req.parse(chain) {
                    Ok(()) => {
                        let done = execute(&self.req, &self.disk, mem, &self.serial);
                        if done.status == super::status::OK {
                            let bytes = self.req.readable_len() + self.req.writable_len();
                            self.counters.add_request(bytes);
                        } else {
                            self.counters.add_error();
                        }
                        done.written
                    }
                    Err(e) => {
                        self.counters.add_error();
                        warn!("blk queue {q}: bad request at head {head}: {e}");
                        match self.req.status {
                            Some(addr) => {
                                let ok = mem.write_obj(super::status::IOERR, addr).is_ok();
                                u32::from(ok)
                            }
                            None => 0,
                        }
                    }
                };
                self.inflight
                    .pre_complete(head)
                    .map_err(|e| QueueError::Inflight(q, e))?;
                queue.add_used(mem, head, written).map_err(ring)?;
                self.inflight
                    .post_complete(head, queue.next_used())
                    .map_err(|e| QueueError::Inflight(q, e))?;
                progress.completed += 1;
            }
            if !self.poll.is_zero() {
                if progress.completed > 0 {
                    // Let the caller signal the driver first; it calls again to poll.
                    progress.more = true;
                    break;
                }
                if self.poll_for_work(queue, mem)? {
                    // Return so the caller takes a fresh memory snapshot (the driver may have
                    // added a region while we polled) and calls again.
                    progress.more = true;
                    break;
                }
            }
            if !queue.enable_notification(mem).map_err(ring)? {
                break;
            }
        }
        if progress.completed > 0 {
            progress.notify = queue.needs_notification(mem).map_err(ring)?;
        }
        Ok(progress)
    }

    /// Spin for the polling window with notifications still disabled; true if work arrived.
    fn poll_for_work<M: GuestMemory>(&self, queue: &Queue, mem: &M) -> Result<bool, QueueError> {
        let start = Instant::now();
        let deadline = start + self.poll;
        let mut next_yield = start + YIELD_EVERY;
        loop {
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(|e| QueueError::Ring(self.index, e))?;
            if avail != Wrapping(queue.next_avail()) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if now >= next_yield {
                // Now and then, let a thread waiting for this CPU run (on a small host it can
                // be the driver we are waiting for); a pure spin would keep it off until the
                // next scheduler tick, a yield on every iteration would give the CPU away.
                std::thread::yield_now();
                next_yield = now + YIELD_EVERY;
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// One queue served by a [`QueueWorker`]: the ring, its eventfds, and the device state.
#[derive(Debug)]
pub struct WorkerQueue {
    /// The virtqueue (already configured and ready).
    pub queue: Queue,
    /// Kick: the driver writes it after adding buffers.
    pub kick: EventFd,
    /// Call: the device writes it after using buffers (when the driver wants to know).
    pub call: EventFd,
    /// The device's per-queue state.
    pub blk: BlkQueue,
}

/// A thread-less worker serving several queues round-robin from their kick eventfds. Spawn
/// it on a thread with [`QueueWorker::run`]. Transport-independent: a process domain, a test
/// or a VM-to-VM wiring hands it memory, queues and eventfds.
#[derive(Debug)]
pub struct QueueWorker {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queues: Vec<WorkerQueue>,
}

impl QueueWorker {
    /// A worker on `mem` with no queues yet.
    pub fn new(mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        QueueWorker {
            mem,
            queues: Vec::new(),
        }
    }

    /// Add a queue to serve.
    pub fn add_queue(&mut self, q: WorkerQueue) {
        self.queues.push(q);
    }

    /// Serve until `stop` is written. A failed queue is logged and no longer served; the
    /// others continue. Returns the queues (with their state) when stopped.
    pub fn run(mut self, stop: &EventFd) -> Result<Vec<WorkerQueue>, QueueError> {
        loop {
            let mut fds: Vec<PollFd> = self
                .queues
                .iter()
                .map(|q| PollFd::new(borrow(&q.kick), PollFlags::POLLIN))
                .collect();
            fds.push(PollFd::new(borrow(stop), PollFlags::POLLIN));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(QueueError::Wait(e)),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            if ready.last().copied().unwrap_or(false) {
                return Ok(self.queues);
            }
            let mut pending: Vec<bool> = Vec::with_capacity(self.queues.len());
            for (q, r) in self.queues.iter().zip(&ready) {
                if *r {
                    // Consume the kick; the counter value does not matter.
                    let _ = q.kick.read();
                }
                pending.push(*r);
            }
            self.serve_round_robin(&mut pending)?;
        }
    }

    fn serve_round_robin(&mut self, pending: &mut [bool]) -> Result<(), QueueError> {
        while pending.iter().any(|p| *p) {
            for (wq, p) in self.queues.iter_mut().zip(pending.iter_mut()) {
                if !*p {
                    continue;
                }
                // A fresh snapshot per call: memory may change between calls.
                let mem = self.mem.memory();
                match wq.blk.process(&mut wq.queue, &*mem) {
                    Ok(prog) => {
                        if prog.notify {
                            wq.call.write(1).map_err(QueueError::Call)?;
                        }
                        *p = prog.more;
                    }
                    Err(_) => *p = false, // logged by process(); the queue stays failed
                }
            }
        }
        Ok(())
    }
}

fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns the descriptor and outlives the returned borrow (same lifetime).
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}
