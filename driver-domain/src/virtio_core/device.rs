//! The contract between a backend device core and the transport that carries its queues, and
//! the one scheduler that serves a device's queues for every transport.
//!
//! A device core ([`crate::blk::BlkBackendDevice`], [`crate::net::NetBackendDevice`]) implements
//! [`BackendDevice`]: what it offers (features, configuration space, queues) and how it
//! processes one queue given guest memory and the virtqueue. No transport type crosses this
//! trait. A transport (today the vhost-user adapter in [`crate::vhost_user`]; later this
//! project's own vhost-user request handler, or a driver-domain VM's "memory region plus kick
//! and call signals") owns the virtqueues, the memory table and the signals, exposes each queue
//! as a [`TransportQueue`], and calls [`serve_queues`] when a kick or the device's own
//! [`BackendDevice::wake_event`] fires.
//!
//! Scheduling: the queues one worker serves are visited round-robin; each
//! [`BackendDevice::process_queue`] call handles at most the device's per-queue budget and says
//! whether more work is left, so a queue flooded by its driver cannot starve the others. Each
//! call gets a fresh snapshot of the memory table (the peer may add regions between calls) and
//! is skipped while the current table is refused.

use std::fmt;
use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

use log::{error, warn};
use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::counters::DeviceCounters;
use super::memory::{CheckedMemory, GuestMem, MemoryGrant, SealPolicy};

/// What one [`BackendDevice::process_queue`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueProgress {
    /// Chains completed (requests, transmitted frames, delivered frames).
    pub completed: usize,
    /// The driver must be signalled (its call signal).
    pub notify: bool,
    /// Call again after signalling and serving the other queues: the budget ran out with work
    /// left, or the device's own polling found more.
    pub more: bool,
}

/// A virtio device's backend core, independent of the transport.
///
/// The configuration space is read-only for every device here; transports refuse writes.
pub trait BackendDevice: Send + Sync + 'static {
    /// Why a queue failed (the queue stays failed until [`BackendDevice::reset_queue`]).
    type QueueError: std::error::Error;

    /// A short name for logs ("blk", "net port 3").
    fn name(&self) -> &str;

    /// The virtio feature bits offered (no transport-specific bits).
    fn features(&self) -> u64;

    /// The driver acknowledged `features` (before any queue runs).
    fn ack_features(&self, _features: u64) {}

    /// The bytes `[offset, offset + size)` of the configuration space (shortened, never
    /// padded, where the range runs past its end).
    fn read_config(&self, offset: u32, size: u32) -> Vec<u8>;

    /// Number of virtqueues.
    fn num_queues(&self) -> usize;

    /// Largest queue size the device accepts.
    fn max_queue_size(&self) -> u16;

    /// What to accept from peer memory that cannot be sealed against shrinking.
    fn seal_policy(&self) -> SealPolicy;

    /// The guest memory the peer may share (its memory table must be exactly this).
    fn memory_grant(&self) -> MemoryGrant {
        MemoryGrant::AllRam
    }

    /// The queues each worker serves, in visiting order: one entry per worker.
    fn queue_workers(&self) -> Vec<Vec<usize>>;

    /// Serve queue `index` once: at most the device's budget of chains from `queue`.
    fn process_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, Self::QueueError>;

    /// Forget queue `index`'s state and failure (the driver stopped or reset it).
    fn reset_queue(&self, index: usize);

    /// An event the device raises itself when a queue has work no kick announces (net: the
    /// switch queued frames for the port). The transport waits on it like on a kick, reads it,
    /// and calls [`serve_queues`] for every worker.
    fn wake_event(&self) -> Option<&EventFd> {
        None
    }

    /// How long [`serve_queues`] keeps polling idle queues (with kicks and wake-ups off)
    /// before it sleeps. Zero: no scheduler-level polling (a device may still poll inside
    /// `process_queue`, as blk does per queue).
    fn poll_window(&self) -> Duration {
        Duration::ZERO
    }

    /// Turn kick and wake-up re-arming of idle queues off (`true`, while the scheduler polls)
    /// or back on (`false`, before it sleeps).
    fn set_polling(&self, _on: bool) {}

    /// The peer went away (the session ended); log or reset what outlives it.
    fn disconnected(&self) {}

    /// Where the device counts what it serves; the scheduler adds the interrupts it sends,
    /// the transport the kicks it receives.
    fn counters(&self) -> Option<&DeviceCounters> {
        None
    }

    /// The device's in-flight log, if it keeps one a frontend can hold across a backend
    /// restart (vhost-user INFLIGHT_SHMFD; blk does, net does not).
    fn inflight(&self) -> Option<&dyn InflightTracking> {
        None
    }
}

/// Why an in-flight log was not handed out, taken over or resumed from.
pub type InflightSetupError = Box<dyn std::error::Error + Send + Sync>;

/// In-flight tracking that outlives the backend: the device logs every request it fetched
/// and has not completed in a shared region (the libvhost-user layout of
/// [`crate::blk::inflight`]) that the frontend keeps and hands back to a restarted backend.
pub trait InflightTracking: Send + Sync {
    /// GET_INFLIGHT_FD: a new, zeroed log for `num_queues` queues of `queue_size` entries,
    /// which the device logs into from now on. Returns the log's memfd and length.
    fn new_log(&self, num_queues: u16, queue_size: u16) -> Result<(File, u64), InflightSetupError>;

    /// SET_INFLIGHT_FD: take over a log the frontend hands back (`file`, `(offset, size)`
    /// of it), after checking its size, seals and headers. The device logs into it from now
    /// on; each queue resumes from it when its ring starts ([`Self::resume_queue`]).
    fn adopt_log(
        &self,
        file: File,
        region: (u64, u64),
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(), InflightSetupError>;

    /// Ring `index` starts on a log taken over: the queue resumes at the ring's used index
    /// plus the requests still in flight, which the device serves first, in the order they
    /// were fetched. Returns how many there are (the transport kicks the ring if any). An
    /// error fails that queue.
    fn resume_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, InflightSetupError>;
}

/// One virtqueue as a transport holds it.
pub trait TransportQueue {
    /// Runs `f` on the queue if the driver made it ready and the transport enabled it.
    fn with_ready_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R>;

    /// Signals the driver that buffers were used (its call signal).
    fn signal_driver(&self) -> io::Result<()>;
}

/// Serves the queues of one worker: `indexes[i]` is the device's index of `queues[i]`.
///
/// With a [`BackendDevice::poll_window`], idle queues are polled until they stayed idle that
/// long; then every queue is visited, and those with more work again, until none has any.
pub fn serve_queues<D: BackendDevice, Q: TransportQueue>(
    device: &D,
    memory: &CheckedMemory,
    indexes: &[usize],
    queues: &[Q],
) {
    let Some(mem) = memory.current() else {
        warn!(
            "{}: queue work before any memory table; ignored",
            device.name()
        );
        return;
    };
    let serve = |index: usize, queue: &Q| serve_one(device, memory, &mem, index, queue);
    let window = device.poll_window();
    if !window.is_zero() {
        device.set_polling(true);
        poll_queues(indexes, queues, window, serve);
        device.set_polling(false);
    }
    let mut pending = vec![true; indexes.len().min(queues.len())];
    while pending.iter().any(|p| *p) {
        for (i, more) in pending.iter_mut().enumerate() {
            if *more {
                *more = serve(indexes[i], &queues[i]).more;
            }
        }
    }
}

/// Passes over every queue until none completed anything for `window`.
fn poll_queues<Q>(
    indexes: &[usize],
    queues: &[Q],
    window: Duration,
    serve: impl Fn(usize, &Q) -> QueueProgress,
) {
    let mut deadline = Instant::now() + window;
    let mut idle_passes = 0u32;
    loop {
        let (mut more, mut worked) = (false, false);
        for (index, queue) in indexes.iter().zip(queues) {
            let p = serve(*index, queue);
            more |= p.more;
            worked |= p.completed > 0;
        }
        if more || worked {
            idle_passes = 0;
            if worked {
                deadline = Instant::now() + window;
            }
            continue;
        }
        // Read the clock only every few idle passes: it costs more than a pass.
        idle_passes += 1;
        if idle_passes & 31 == 0 && Instant::now() >= deadline {
            return;
        }
        std::hint::spin_loop();
    }
}

/// One `process_queue` call on a fresh snapshot of `mem`, and the driver's signal if it wants
/// one. A failed queue reports no progress (the device logged why).
fn serve_one<D: BackendDevice, Q: TransportQueue>(
    device: &D,
    memory: &CheckedMemory,
    mem: &GuestMem,
    index: usize,
    queue: &Q,
) -> QueueProgress {
    // A memory table may be refused while the scheduler runs (polling keeps it busy).
    if !memory.usable() {
        return QueueProgress::default();
    }
    // The snapshot is taken once the queue is held, right before it is processed: a worker
    // that waited for the queue must not serve requests that name regions added meanwhile
    // with the table it saw before.
    let progress = queue
        .with_ready_queue(|q| device.process_queue(index, q, &mem.memory()))
        .and_then(Result::ok)
        .unwrap_or_default();
    if progress.notify {
        match queue.signal_driver() {
            Ok(()) => {
                if let Some(c) = device.counters() {
                    c.add_interrupt();
                }
            }
            Err(e) => warn!(
                "{} queue {index}: cannot signal the driver: {e}",
                device.name()
            ),
        }
    }
    progress
}

/// Why a queue refuses work: it failed earlier and was not reset since.
#[derive(Debug, Error)]
#[error("virtqueue {index} failed earlier: {why}")]
pub struct QueueFailedEarlier {
    /// The queue's index.
    pub index: u16,
    /// The first error.
    pub why: String,
}

/// The "this queue has failed" latch every device queue keeps: the first error of a
/// `process` call is logged and remembered, and every later call is refused until the driver
/// resets the queue.
#[derive(Debug)]
pub struct QueueFailure {
    index: u16,
    why: Option<String>,
}

impl QueueFailure {
    /// A latch for queue `index`, not failed.
    pub fn new(index: u16) -> Self {
        QueueFailure { index, why: None }
    }

    /// Why the queue failed, if it did.
    pub fn why(&self) -> Option<&str> {
        self.why.as_deref()
    }

    /// Forget the failure (the driver reset the queue).
    pub fn clear(&mut self) {
        self.why = None;
    }

    /// `Err` if the queue failed earlier.
    pub fn check(&self) -> Result<(), QueueFailedEarlier> {
        match &self.why {
            None => Ok(()),
            Some(why) => Err(QueueFailedEarlier {
                index: self.index,
                why: why.clone(),
            }),
        }
    }

    /// Passes `r` through; an error fails the queue (logged once, with `device`'s name).
    pub fn latch<T, E: fmt::Display>(&mut self, device: &str, r: Result<T, E>) -> Result<T, E> {
        if let Err(e) = &r {
            error!("{device}: failing queue {}: {e}", self.index);
            self.why = Some(e.to_string());
        }
        r
    }
}
