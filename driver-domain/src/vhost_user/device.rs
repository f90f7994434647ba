//! The vhost-user adapter: one generic [`VhostUserDevice`] that puts any [`BackendDevice`]
//! behind `vhost-user-backend`.
//!
//! The adapter only translates: it answers feature and configuration queries from the device
//! (adding the vhost-user PROTOCOL_FEATURES bit), checks every memory table the frontend sends
//! ([`CheckedMemory`]), maps the device's workers onto vhost-user-backend's worker threads, and
//! on a kick, or on the device's own wake event, runs [`serve_queues`] over the worker's vrings.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::vring::CheckedVring;
use crate::virtio_core::{
    serve_queues, sync, BackendDevice, CheckedMemory, GuestMem, TransportQueue,
};

/// One device instance behind one vhost-user connection.
pub struct VhostUserDevice<D: BackendDevice> {
    device: D,
    memory: CheckedMemory,
    /// Device queue indexes served by each worker thread, in vring order.
    workers: Vec<Vec<usize>>,
    /// Each worker's exit event: the consumer goes to vhost-user-backend once (see
    /// [`VhostUserBackend::exit_event`] below), the notifier stays to stop the worker.
    exits: Vec<(Mutex<Option<EventConsumer>>, EventNotifier)>,
    /// Raw descriptors of the consumers handed out, closed when the device goes.
    handed_out: Mutex<Vec<RawFd>>,
    /// Whether the frontend has sent a request (or the session ended): set from the
    /// request handler, waited on by the session's greeting deadline.
    greeted: (Mutex<bool>, Condvar),
}

impl<D: BackendDevice> std::fmt::Debug for VhostUserDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("device", &self.device.name())
            .field("workers", &self.workers)
            .finish()
    }
}

impl<D: BackendDevice> VhostUserDevice<D> {
    /// Wraps `device`; fails only if the workers' exit events cannot be created.
    pub fn new(device: D) -> io::Result<Self> {
        let mut workers = device.queue_workers();
        // vhost-user-backend addresses queues by bit: keep what fits and is a real queue.
        for w in &mut workers {
            w.retain(|q| *q < device.num_queues().min(64));
        }
        workers.retain(|w| !w.is_empty());
        let exits = workers
            .iter()
            .map(|_| {
                let (c, n) =
                    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
                Ok((Mutex::new(Some(c)), n))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(VhostUserDevice {
            device,
            memory: CheckedMemory::default(),
            workers,
            exits,
            handed_out: Mutex::new(Vec::new()),
            greeted: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Records that the frontend spoke (or that the session is over).
    pub fn mark_greeted(&self) {
        let (flag, cv) = &self.greeted;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits until the frontend has spoken or the session ended (true), or `timeout`
    /// passed (false).
    pub fn wait_greeted(&self, timeout: Duration) -> bool {
        let (flag, cv) = &self.greeted;
        let deadline = Instant::now() + timeout;
        let mut greeted = flag.lock().unwrap_or_else(|e| e.into_inner());
        while !*greeted {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            greeted = match cv.wait_timeout(greeted, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// The device served.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The epoll token of the device's wake event: above the queues and the exit event.
    pub fn wake_token(&self) -> u64 {
        self.device.num_queues() as u64 + 1
    }

    /// Stop the worker threads (after the connection ended).
    pub fn stop_workers(&self) {
        for (_, n) in &self.exits {
            let _ = n.notify();
        }
    }
}

impl<D: BackendDevice> Drop for VhostUserDevice<D> {
    fn drop(&mut self) {
        for fd in sync::lock(&self.handed_out).drain(..) {
            // SAFETY: `fd` is an exit-event consumer handed to vhost-user-backend, which gave
            // up ownership with `into_raw_fd()` and never closes it; its worker and epoll are
            // gone (they hold this device), so nothing else refers to the descriptor.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl TransportQueue for CheckedVring {
    fn with_ready_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        if self.refused() {
            return None;
        }
        let mut state = self.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            return None;
        }
        Some(f(state.get_queue_mut()))
    }

    fn signal_driver(&self) -> io::Result<()> {
        self.inner().signal_used_queue()
    }
}

impl<D: BackendDevice> VhostUserBackend for VhostUserDevice<D> {
    type Bitmap = ();
    type Vring = CheckedVring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.max_queue_size())
    }

    fn features(&self) -> u64 {
        // GET_FEATURES is every frontend's first or second request (after SET_OWNER, which
        // reaches no backend hook): the frontend has spoken.
        self.mark_greeted();
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device.ack_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.mark_greeted();
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // virtio-queue tracks EVENT_IDX per queue; vhost-user-backend sets it there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the configuration space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.memory.update(
            mem,
            self.device.memory_grant(),
            self.device.seal_policy(),
            self.device.name(),
        )
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|qs| qs.iter().fold(0u64, |m, q| m | (1u64 << q)))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        let notifier = n.try_clone().ok()?;
        let consumer = c.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        // vhost-user-backend 0.24 (pinned in Cargo.lock) registers the consumer in the
        // worker's epoll with `into_raw_fd()` (event_loop.rs, `VringEpollHandler::new`) and
        // never closes it: one descriptor leaked per worker per session. It is handed out
        // once; the device, which outlives that epoll, closes it on drop.
        sync::lock(&self.handed_out).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.device.reset_queue(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[CheckedVring],
        thread_id: usize,
    ) -> io::Result<()> {
        restrict_worker_thread();
        let woken = u64::from(device_event) == self.wake_token();
        if woken {
            if let Some(wake) = self.device.wake_event() {
                // Consume the wake-up; the counter value does not matter.
                let _ = wake.read();
            }
        } else if usize::from(device_event) >= vrings.len() {
            return Ok(());
        } else if let Some(c) = self.device.counters() {
            c.add_kick();
        }
        if !self.memory.usable() {
            if !woken {
                warn!(
                    "{}: kick ignored, the memory table was refused or is missing",
                    self.device.name()
                );
            }
            return Ok(());
        }
        let Some(indexes) = self.workers.get(thread_id) else {
            return Ok(());
        };
        serve_queues(&self.device, &self.memory, indexes, vrings);
        Ok(())
    }
}

thread_local! {
    /// Whether this worker thread has narrowed its seccomp filter.
    static WORKER_RESTRICTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// In a confined driver domain, narrows the calling queue worker to the backend-worker
/// allowlist the first time it handles an event, before it reads any ring: vhost-user-backend
/// starts these threads, so this is where their own code first runs. A worker that cannot be
/// narrowed ends the process rather than serve unfiltered.
fn restrict_worker_thread() {
    if !confine::is_confined() {
        return;
    }
    WORKER_RESTRICTED.with(|done| {
        if done.get() {
            return;
        }
        if let Err(e) =
            confine::seccomp::restrict_thread(confine::seccomp::ThreadClass::BackendWorker)
        {
            log::error!("narrowing a queue worker's seccomp filter: {e}");
            std::process::exit(1);
        }
        done.set(true);
    });
}
