//! The processing of one virtqueue of the virtio-blk backend ([`BlkBackendQueue`]) and the
//! errors of the block backend ([`BlkBackendError`]).
//!
//! [`BlkBackendQueue::process`] drains at most `budget` requests per call, so a worker that
//! serves several queues visits them round-robin ([`crate::virtio_core::serve_queues`]) and a
//! queue flooded by its driver cannot starve the others. Guest notifications stay disabled
//! while the queue is drained and, with polling, for the whole polling window; they are
//! re-enabled (which re-checks the ring, closing the race with a driver that adds a buffer
//! concurrently) only before going to sleep.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::config::BlkBackendConfig;
use super::disk::BlkDisk;
use super::inflight::{InflightError, InflightQueue};
use super::request::{complete, execute, prepare_transfer, Request, RequestType, Transfer, ID_LEN};
use super::uring::{DiskRing, DiskRingError};
use crate::virtio_core::counters::DeviceCounters;
use crate::virtio_core::poll_window::PollWindow;
use crate::virtio_core::{QueueFailedEarlier, QueueFailure, QueueProgress};

/// How long a polling worker spins between two `sched_yield`s.
const YIELD_EVERY: Duration = Duration::from_micros(20);

/// Errors of the block backend: an unusable configuration, or a failed queue (the device
/// stops serving that queue until it is reset).
#[derive(Debug, Error)]
pub enum BlkBackendError {
    /// The configuration is unusable.
    #[error("invalid block device configuration: {0}")]
    Config(&'static str),
    /// The in-flight log could not be created.
    #[error("in-flight log: {0}")]
    InflightLog(#[source] InflightError),
    /// The ring itself is invalid (avail index jumped past the queue size, ring unreadable,
    /// a head index past the queue size).
    #[error("virtqueue {0}: {1}")]
    Ring(u16, virtio_queue::Error),
    /// The in-flight log rejected an index.
    #[error("virtqueue {0}: in-flight log: {1}")]
    Inflight(u16, InflightError),
    /// The in-flight log handed back names a request the ring cannot hold.
    #[error("virtqueue {0}: in-flight log names head {1}, past the ring's {2} entries")]
    InflightHead(u16, u16, u16),
    /// The queue's io_uring kept failing (a transfer may still be running: nothing more is
    /// published on this queue).
    #[error("virtqueue {0}: {1}")]
    Uring(u16, DiskRingError),
    /// The requests to resubmit could not be set up.
    #[error("virtqueue {0}: resubmitting in-flight requests: {1}")]
    Resubmit(u16, String),
    /// GET/SET_INFLIGHT_FD asked for a shape the device cannot serve.
    #[error("in-flight log for {0} queue(s) of {1} refused: {2} queue(s) of at most {3} here")]
    InflightShape(u16, u16, usize, u16),
    /// The queue already failed earlier.
    #[error(transparent)]
    Broken(#[from] QueueFailedEarlier),
}

/// The per-queue state of a block device.
#[derive(Debug)]
pub struct BlkBackendQueue {
    index: u16,
    disk: Arc<BlkDisk>,
    serial: [u8; ID_LEN],
    /// Where fetched requests are logged until completed: only once a frontend asked for a
    /// log (GET_INFLIGHT_FD) or handed one back (SET_INFLIGHT_FD); a log nobody holds would
    /// be three stores per request for no one.
    inflight: Option<InflightQueue>,
    /// Heads found in flight in a log taken over, to serve before the avail ring, in fetch
    /// order (see [`BlkBackendQueue::resume`]).
    resubmit: VecDeque<u16>,
    budget: usize,
    poll: PollWindow,
    req: Request,
    /// The queue's batched I/O, if the disk is a file and the kernel gave a ring.
    ring: Option<DiskRing>,
    /// The requests of the pass being batched, and their results.
    batch_reqs: Vec<Request>,
    batch_results: Vec<i32>,
    /// Completions of the current `process` call whose signal was decided already (see
    /// [`BlkBackendQueue::driver_waits`]).
    checked: usize,
    failure: QueueFailure,
    counters: Arc<DeviceCounters>,
}

impl BlkBackendQueue {
    /// State for queue `index` of a device on `disk`, logging into `inflight` if given.
    pub fn new(
        index: u16,
        disk: Arc<BlkDisk>,
        cfg: &BlkBackendConfig,
        inflight: Option<InflightQueue>,
    ) -> Self {
        let mut serial = [0u8; ID_LEN];
        let s = cfg.serial.as_bytes();
        let n = s.len().min(ID_LEN);
        serial[..n].copy_from_slice(&s[..n]);
        let budget = cfg.budget.max(1);
        // An O_DIRECT image (cache = none) goes through bounce buffers with preadv/pwritev.
        let ring = match disk.file() {
            Some(file) if cfg.io_uring && disk.direct_block_size().is_none() => {
                match DiskRing::new(file, u32::try_from(budget).unwrap_or(u32::MAX)) {
                    Ok(r) => Some(r).filter(|r| r.capacity() >= budget),
                    Err(e) => {
                        if index == 0 {
                            warn!("blk: no io_uring ({e}); one preadv/pwritev per request");
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        BlkBackendQueue {
            index,
            disk,
            serial,
            inflight,
            resubmit: VecDeque::new(),
            budget,
            poll: PollWindow::from_config(cfg.poll_us, cfg.poll_max_us),
            req: Request::default(),
            ring,
            batch_reqs: Vec::new(),
            batch_results: Vec::new(),
            checked: 0,
            failure: QueueFailure::new(index),
            counters: cfg.counters.clone(),
        }
    }

    /// Whether this queue batches its reads and writes through io_uring.
    pub fn batched_io(&self) -> bool {
        self.ring.is_some()
    }

    /// The in-flight log of this queue.
    pub fn inflight(&self) -> Option<&InflightQueue> {
        self.inflight.as_ref()
    }

    /// Why this queue failed, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.failure.why()
    }

    /// Forget an earlier failure (the driver reset the device).
    pub fn reset(&mut self) {
        self.failure.clear();
    }

    /// Log into `inflight` from now on (a log handed out or taken over); nothing is left to
    /// resubmit from the previous one.
    pub fn set_inflight(&mut self, inflight: InflightQueue) {
        self.inflight = Some(inflight);
        self.resubmit.clear();
    }

    /// The ring starts on a log taken over (SET_INFLIGHT_FD): as libvhost-user's
    /// `vu_check_queue_inflights`, the queue goes on at the ring's used index plus the
    /// requests still in flight, and those are served first, in fetch (counter) order.
    /// Returns how many. An error (a log naming heads the ring cannot hold) fails the queue.
    pub fn resume<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<usize, BlkBackendError> {
        let r = self.resume_inner(queue, mem);
        self.failure.latch("blk", r)
    }

    fn resume_inner<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<usize, BlkBackendError> {
        let q = self.index;
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(|e| BlkBackendError::Ring(q, e))?;
        let Some(log) = self.inflight.as_mut() else {
            // No log taken over: nothing to resubmit.
            return Ok(0);
        };
        let heads = log
            .recover(used.0)
            .map_err(|e| BlkBackendError::Inflight(q, e))?;
        let size = queue.size();
        if let Some(h) = heads.iter().find(|h| **h >= size) {
            return Err(BlkBackendError::InflightHead(q, *h, size));
        }
        // Unique heads below the ring size: the count fits a u16.
        let count =
            u16::try_from(heads.len()).map_err(|_| BlkBackendError::InflightHead(q, size, size))?;
        queue.set_next_used(used.0);
        queue.set_next_avail(used.0.wrapping_add(count));
        log::debug!(
            "blk queue {q}: resume: used {}, avail ring at {}, heads {heads:?}",
            used.0,
            queue
                .avail_idx(mem, Ordering::Acquire)
                .map(|w| w.0)
                .unwrap_or(0)
        );
        if count > 0 {
            info!("blk queue {q}: resubmitting {count} request(s) in flight at the restart");
        }
        self.resubmit = heads.into();
        Ok(usize::from(count))
    }

    /// Serves the requests left to resubmit (see [`BlkBackendQueue::resume`]) before any new
    /// one. virtio-queue builds a descriptor chain only from an avail ring, so the heads are
    /// laid out as one in a scratch page above guest memory that only this walk sees; the
    /// chains are read from the guest's descriptor table and executed against guest memory
    /// alone (a descriptor naming the scratch page fails its request).
    pub fn resubmit_pending(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, BlkBackendError> {
        self.failure.check()?;
        if self.resubmit.is_empty() {
            return Ok(QueueProgress::default());
        }
        let r = self.resubmit_inner(queue, mem);
        self.failure.latch("blk", r)
    }

    fn resubmit_inner(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, BlkBackendError> {
        let q = self.index;
        let heads: Vec<u16> = self.resubmit.drain(..).collect();
        let (with_scratch, mut replay) = super::resubmit::replay_queue(queue, mem, &heads)
            .map_err(|e| BlkBackendError::Resubmit(q, e.to_string()))?;
        let mut progress = QueueProgress::default();
        let chains: Vec<_> = replay
            .iter(&with_scratch)
            .map_err(|e| BlkBackendError::Ring(q, e))?
            .collect();
        for chain in chains {
            self.serve_chain(chain, queue, mem)?;
            progress.completed += 1;
        }
        // Always signalled: whether the dead backend signalled what it completed last is
        // unknown, and with EVENT_IDX a missed interrupt is never made up for.
        queue
            .needs_notification(mem)
            .map_err(|e| BlkBackendError::Ring(q, e))?;
        progress.notify = true;
        log::debug!(
            "blk queue {q}: resubmitted {heads:?}: {} done, used {}, notify {}",
            progress.completed,
            queue.next_used(),
            progress.notify
        );
        Ok(progress)
    }

    /// Parses and executes one fetched chain (logged in flight already) against `mem`, and
    /// publishes its completion, clearing it from the log around the used-ring update.
    fn serve_chain<C, M>(
        &mut self,
        chain: DescriptorChain<C>,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<(), BlkBackendError>
    where
        C: Deref + Clone,
        C::Target: GuestMemory,
        M: GuestMemory,
    {
        let head = chain.head_index();
        let written = match self.req.parse(chain) {
            Ok(()) => {
                let done = execute(&self.req, &self.disk, mem, &self.serial);
                self.count(done.status, &self.req);
                done.written
            }
            Err(e) => self.refuse(head, &e, self.req.status, mem),
        };
        self.publish(head, written, queue, mem)
    }

    /// Counts a finished request.
    fn count(&self, status: u8, req: &Request) {
        if status == super::status::OK {
            self.counters
                .add_request(req.readable_len() + req.writable_len());
        } else {
            self.counters.add_error();
        }
    }

    /// A chain that is no request: IOERR where it shows a status byte; the bytes written.
    fn refuse<M: GuestMemory>(
        &self,
        head: u16,
        e: &dyn std::fmt::Display,
        status: Option<GuestAddress>,
        mem: &M,
    ) -> u32 {
        self.counters.add_error();
        warn!("blk queue {}: bad request at head {head}: {e}", self.index);
        match status {
            Some(addr) => u32::from(mem.write_obj(super::status::IOERR, addr).is_ok()),
            None => 0,
        }
    }

    /// Publishes the completion of `head`, clearing it from the log around the used-ring
    /// update.
    fn publish<M: GuestMemory>(
        &mut self,
        head: u16,
        written: u32,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<(), BlkBackendError> {
        let q = self.index;
        if let Some(log) = self.inflight.as_mut() {
            log.pre_complete(head)
                .map_err(|e| BlkBackendError::Inflight(q, e))?;
        }
        queue
            .add_used(mem, head, written)
            .map_err(|e| BlkBackendError::Ring(q, e))?;
        if let Some(log) = self.inflight.as_mut() {
            log.post_complete(head, queue.next_used())
                .map_err(|e| BlkBackendError::Inflight(q, e))?;
        }
        Ok(())
    }

    /// Serve up to `budget` requests from `queue`. An `Err` fails the queue: it is logged
    /// and every later call returns [`BlkBackendError::Broken`] until
    /// [`BlkBackendQueue::reset`].
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, BlkBackendError> {
        self.failure.check()?;
        let r = self.process_inner(queue, mem);
        self.failure.latch("blk", r)
    }

    fn process_inner<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, BlkBackendError> {
        let q = self.index;
        let ring = |e| BlkBackendError::Ring(q, e);
        let mut progress = QueueProgress::default();
        self.checked = 0;
        self.poll.woken();
        loop {
            queue.disable_notification(mem).map_err(ring)?;
            if self.serve_available(queue, mem, &mut progress)? {
                progress.more = true;
                break;
            }
            if !self.poll.window().is_zero() {
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
                // Asleep until the next kick.
                self.poll.sleeping();
                break;
            }
        }
        if progress.completed > 0 && !progress.notify {
            progress.notify = queue.needs_notification(mem).map_err(ring)?;
        }
        Ok(progress)
    }

    /// With EVENT_IDX, whether the driver waits for what this pass published so far and
    /// should hear of it now: the pass then ends, the caller signals the driver at once and
    /// calls again for the rest of the ring. Checked once the completions not yet checked are
    /// at least as many as the requests still waiting in the ring, so that the driver reaps
    /// and posts one half of what is in flight while the queue serves the other half (the two
    /// sides overlap instead of taking turns over whole batches) at no more than about two
    /// signals per ring's worth. Without EVENT_IDX every completion asks for a signal: the
    /// driver is signalled at the end of the pass instead.
    fn driver_waits<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        progress: &mut QueueProgress,
    ) -> Result<bool, BlkBackendError> {
        let unchecked = progress.completed - self.checked;
        if !queue.event_idx_enabled() || unchecked == 0 {
            return Ok(false);
        }
        if unchecked < self.waiting(queue, mem)? {
            return Ok(false);
        }
        self.checked = progress.completed;
        let waits = queue
            .needs_notification(mem)
            .map_err(|e| BlkBackendError::Ring(self.index, e))?;
        progress.notify |= waits;
        Ok(waits)
    }

    /// How many requests the avail ring holds that were not fetched yet.
    fn waiting<M: GuestMemory>(&self, queue: &Queue, mem: &M) -> Result<usize, BlkBackendError> {
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| BlkBackendError::Ring(self.index, e))?;
        Ok(usize::from((avail - Wrapping(queue.next_avail())).0))
    }

    /// Serves what the avail ring holds, up to the budget; true if the pass ends early (the
    /// budget ran out, or [`Self::driver_waits`] for what was published). With a
    /// ring, the reads and writes among them go to the kernel together (in the order they
    /// came, each batch before any other kind of request, so a FLUSH follows the writes that
    /// came before it); the others are served one by one.
    fn serve_available<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        progress: &mut QueueProgress,
    ) -> Result<bool, BlkBackendError> {
        let q = self.index;
        let mut batch: Vec<(usize, Transfer<'_, BS<'_, M::Bitmap>>)> = Vec::new();
        loop {
            if progress.completed == self.budget {
                self.run_batch(&mut batch, queue, mem)?;
                return Ok(true);
            }
            let chain = {
                let mut it = queue.iter(mem).map_err(|e| BlkBackendError::Ring(q, e))?;
                it.next()
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if let Some(log) = self.inflight.as_mut() {
                log.set(head).map_err(|e| BlkBackendError::Inflight(q, e))?;
            }
            progress.completed += 1;
            if self.ring.is_none() {
                self.serve_chain(chain, queue, mem)?;
                if self.driver_waits(queue, mem, progress)? {
                    return Ok(true);
                }
                continue;
            }
            let slot = batch.len();
            if self.batch_reqs.len() <= slot {
                self.batch_reqs.resize_with(slot + 1, Request::default);
            }
            let req = &mut self.batch_reqs[slot];
            if let Err(e) = req.parse(chain) {
                let status = req.status;
                let written = self.refuse(head, &e, status, mem);
                self.publish(head, written, queue, mem)?;
                continue;
            }
            let req = &self.batch_reqs[slot];
            if !matches!(req.kind, RequestType::In | RequestType::Out) {
                self.run_batch(&mut batch, queue, mem)?;
                let req = &self.batch_reqs[slot];
                let done = execute(req, &self.disk, mem, &self.serial);
                self.count(done.status, req);
                self.publish(head, done.written, queue, mem)?;
                continue;
            }
            match prepare_transfer(req, &self.disk, mem) {
                Ok(t) => {
                    batch.push((slot, t));
                    // Half of what is in flight batched: send it, so that the driver can
                    // hear of it while the other half is fetched (see `driver_waits`).
                    if queue.event_idx_enabled() && batch.len() >= self.waiting(queue, mem)? {
                        self.run_batch(&mut batch, queue, mem)?;
                        if self.driver_waits(queue, mem, progress)? {
                            return Ok(true);
                        }
                    }
                }
                Err(st) => {
                    let done = complete(req, mem, st, 0);
                    self.count(done.status, req);
                    self.publish(head, done.written, queue, mem)?;
                }
            }
        }
        self.run_batch(&mut batch, queue, mem)?;
        self.driver_waits(queue, mem, progress)
    }

    /// Does the batched transfers and publishes their completions (in the order they came).
    /// A transfer the ring did not finish (an error, a short count) is done again with
    /// `preadv`/`pwritev`, whose outcome stands.
    fn run_batch<M: GuestMemory>(
        &mut self,
        batch: &mut Vec<(usize, Transfer<'_, BS<'_, M::Bitmap>>)>,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<(), BlkBackendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let q = self.index;
        // One transfer alone goes straight to preadv/pwritev: an io_uring round trip costs
        // more than the one system call it would replace (blk-bench, QD1: 0.82x).
        let alone = batch.len() == 1;
        if let (Some(ring), false) = (self.ring.as_mut(), alone) {
            let ops: Vec<&Transfer<'_, _>> = batch.iter().map(|(_, t)| t).collect();
            ring.run(&ops, &mut self.batch_results)
                .map_err(|e| BlkBackendError::Uring(q, e))?;
        } else {
            self.batch_results.clear();
            self.batch_results.resize(batch.len(), -libc::ECANCELED);
        }
        for (i, (slot, t)) in batch.drain(..).enumerate() {
            let req = &self.batch_reqs[slot];
            let result = self
                .batch_results
                .get(i)
                .copied()
                .unwrap_or(-libc::ECANCELED);
            let done = if u64::try_from(result).is_ok_and(|n| n == t.len) {
                complete(req, mem, super::status::OK, t.written())
            } else if alone {
                execute(req, &self.disk, mem, &self.serial)
            } else {
                log::debug!(
                    "blk queue {q}: head {} {:?}: io_uring gave {result}; done again with preadv/pwritev",
                    req.head,
                    req.kind
                );
                execute(req, &self.disk, mem, &self.serial)
            };
            self.count(done.status, req);
            let head = req.head;
            self.publish(head, done.written, queue, mem)?;
        }
        Ok(())
    }

    /// Spin for the polling window with notifications still disabled; true if work arrived.
    fn poll_for_work<M: GuestMemory>(
        &self,
        queue: &Queue,
        mem: &M,
    ) -> Result<bool, BlkBackendError> {
        let start = Instant::now();
        let deadline = start + self.poll.window();
        let mut next_yield = start + YIELD_EVERY;
        loop {
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(|e| BlkBackendError::Ring(self.index, e))?;
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
