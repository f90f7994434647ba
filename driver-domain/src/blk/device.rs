//! The virtio-blk backend device: the device ([`BlkBackendDevice`], a [`BackendDevice`] any
//! transport can serve) and the processing of one of its virtqueues ([`BlkBackendQueue`]).
//!
//! [`BlkBackendQueue::process`] drains at most `budget` requests per call, so a worker that
//! serves several queues visits them round-robin ([`crate::virtio_core::serve_queues`]) and a
//! queue flooded by its driver cannot starve the others. Guest notifications stay disabled
//! while the queue is drained and, with polling, for the whole polling window; they are
//! re-enabled (which re-checks the ring, closing the race with a driver that adds a buffer
//! concurrently) only before going to sleep. Queues are spread over at most
//! `min(num_queues, cores)` workers.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

use super::config::{BlkBackendConfig, BlkConfigSpace};
use super::disk::BlkDisk;
use super::inflight::{InflightError, InflightLog, InflightQueue};
use super::request::{execute, Request, ID_LEN};
use crate::virtio_core::counters::DeviceCounters;
use crate::virtio_core::memory::SealPolicy;
use crate::virtio_core::{sync, BackendDevice, QueueFailedEarlier, QueueFailure, QueueProgress};

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
    inflight: InflightQueue,
    budget: usize,
    poll: Duration,
    req: Request,
    failure: QueueFailure,
    counters: Arc<DeviceCounters>,
}

impl BlkBackendQueue {
    /// State for queue `index` of a device on `disk`, logging into `inflight`.
    pub fn new(
        index: u16,
        disk: Arc<BlkDisk>,
        cfg: &BlkBackendConfig,
        inflight: InflightQueue,
    ) -> Self {
        let mut serial = [0u8; ID_LEN];
        let s = cfg.serial.as_bytes();
        let n = s.len().min(ID_LEN);
        serial[..n].copy_from_slice(&s[..n]);
        BlkBackendQueue {
            index,
            disk,
            serial,
            inflight,
            budget: cfg.budget.max(1),
            poll: Duration::from_micros(cfg.poll_us),
            req: Request::default(),
            failure: QueueFailure::new(index),
            counters: cfg.counters.clone(),
        }
    }

    /// The in-flight log of this queue.
    pub fn inflight(&self) -> &InflightQueue {
        &self.inflight
    }

    /// Why this queue failed, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.failure.why()
    }

    /// Forget an earlier failure (the driver reset the device).
    pub fn reset(&mut self) {
        self.failure.clear();
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
                    .map_err(|e| BlkBackendError::Inflight(q, e))?;
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
                    .map_err(|e| BlkBackendError::Inflight(q, e))?;
                queue.add_used(mem, head, written).map_err(ring)?;
                self.inflight
                    .post_complete(head, queue.next_used())
                    .map_err(|e| BlkBackendError::Inflight(q, e))?;
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
    fn poll_for_work<M: GuestMemory>(
        &self,
        queue: &Queue,
        mem: &M,
    ) -> Result<bool, BlkBackendError> {
        let start = Instant::now();
        let deadline = start + self.poll;
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

/// A virtio-blk device on one disk: its queues, configuration space and worker layout.
#[derive(Debug)]
pub struct BlkBackendDevice {
    cfg: BlkBackendConfig,
    features: u64,
    config_space: BlkConfigSpace,
    queues: Vec<Mutex<BlkBackendQueue>>,
    /// Queue indexes served by each worker, in queue order.
    workers: Vec<Vec<usize>>,
    inflight: InflightLog,
}

impl BlkBackendDevice {
    /// A device on `disk` with options `cfg`.
    pub fn new(disk: Arc<BlkDisk>, cfg: BlkBackendConfig) -> Result<Self, BlkBackendError> {
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(BlkBackendError::Config("queues must be 1..=64"));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(BlkBackendError::Config(
                "queue size must be a power of two <= 32768",
            ));
        }
        let log = InflightLog::new(cfg.num_queues, cfg.queue_size)
            .map_err(BlkBackendError::InflightLog)?;
        let mut queues = Vec::new();
        for q in 0..cfg.num_queues {
            let iq = log
                .queue(q)
                .ok_or(BlkBackendError::Config("in-flight log too small"))?;
            queues.push(Mutex::new(BlkBackendQueue::new(q, disk.clone(), &cfg, iq)));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let nworkers = usize::from(cfg.num_queues).min(cores).max(1);
        let mut workers = vec![Vec::new(); nworkers];
        for q in 0..usize::from(cfg.num_queues) {
            workers[q % nworkers].push(q);
        }
        Ok(BlkBackendDevice {
            features: cfg.features(disk.read_only()),
            config_space: BlkConfigSpace::new(&cfg, disk.capacity_sectors()),
            cfg,
            queues,
            workers,
            inflight: log,
        })
    }

    /// The in-flight log of all queues (what GET_INFLIGHT_FD hands to a frontend).
    pub fn inflight_log(&self) -> &InflightLog {
        &self.inflight
    }
}

impl BackendDevice for BlkBackendDevice {
    type QueueError = BlkBackendError;

    fn counters(&self) -> Option<&DeviceCounters> {
        Some(&self.cfg.counters)
    }

    fn name(&self) -> &str {
        "blk"
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space.read(offset, size)
    }

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn seal_policy(&self) -> SealPolicy {
        self.cfg.seal_policy
    }

    fn memory_grant(&self) -> crate::virtio_core::MemoryGrant {
        self.cfg.grant
    }

    fn queue_workers(&self) -> Vec<Vec<usize>> {
        self.workers.clone()
    }

    fn process_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, BlkBackendError> {
        match self.queues.get(index) {
            Some(q) => sync::lock(q).process(queue, mem),
            None => Ok(QueueProgress::default()),
        }
    }

    fn reset_queue(&self, index: usize) {
        if let Some(q) = self.queues.get(index) {
            sync::lock(q).reset();
        }
    }
}
