//! [`VhostUserDevice`]: any [`BackendDevice`] as the vhost-user request handler
//! ([`super::handler`]) and its queue workers ([`super::worker`]) see it.
//!
//! It answers feature and configuration queries from the device (adding the vhost-user
//! PROTOCOL_FEATURES bit, and INFLIGHT_SHMFD for a device that keeps an in-flight log),
//! checks every memory table the frontend sends ([`CheckedMemory`]), says which queues each
//! worker serves, and on a kick or the device's own wake event runs [`serve_queues`] over a
//! worker's vrings.

use std::io;
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::virtio_core::{serve_queues, BackendDevice, CheckedMemory, GuestMem, TransportQueue};

/// One device instance behind one vhost-user connection.
pub struct VhostUserDevice<D: BackendDevice> {
    device: D,
    memory: CheckedMemory,
    /// Device queue indexes served by each worker thread, in vring order.
    workers: Vec<Vec<usize>>,
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
    /// Wraps `device` (the `io::Result` is kept for callers; nothing here fails today).
    pub fn new(device: D) -> io::Result<Self> {
        let mut workers = device.queue_workers();
        // Keep what is a real queue.
        for w in &mut workers {
            w.retain(|q| *q < device.num_queues());
        }
        workers.retain(|w| !w.is_empty());
        Ok(VhostUserDevice {
            device,
            memory: CheckedMemory::default(),
            workers,
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

    /// The queues each worker serves, in visiting order.
    pub fn workers(&self) -> &[Vec<usize>] {
        &self.workers
    }

    /// The memory table and its verdict.
    pub fn memory(&self) -> &CheckedMemory {
        &self.memory
    }

    /// GET_FEATURES: the device's features and PROTOCOL_FEATURES. Every frontend's first or
    /// second request (after SET_OWNER): the frontend has spoken.
    pub fn features(&self) -> u64 {
        self.mark_greeted();
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// SET_FEATURES (the PROTOCOL_FEATURES bit removed).
    pub fn acked_features(&self, features: u64) {
        self.device
            .ack_features(features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
    }

    /// GET_PROTOCOL_FEATURES.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.mark_greeted();
        let mut f = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.device.inflight().is_some() {
            f |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        f
    }

    /// Checks a memory table before it is installed: a refused one stops the device (until a
    /// good one arrives) and must not be installed.
    pub fn precheck_memory(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        self.memory.precheck(
            mem,
            self.device.memory_grant(),
            self.device.seal_policy(),
            self.device.name(),
        )
    }

    /// A new memory table (installed already): checked against the device's grant and seal
    /// policy; a refused table stops the device until a good one arrives.
    pub fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.memory.update(
            mem,
            self.device.memory_grant(),
            self.device.seal_policy(),
            self.device.name(),
        )
    }

    /// Serves `queues` (device indexes) on `vrings` (the same queues' vrings, in order) after
    /// a kick (`kicked`) or a wake-up of the device.
    pub fn serve<Q: TransportQueue>(&self, queues: &[usize], vrings: &[Q], kicked: bool) {
        if !self.memory.usable() {
            if kicked {
                warn!(
                    "{}: kick ignored, the memory table was refused or is missing",
                    self.device.name()
                );
            }
            return;
        }
        serve_queues(&self.device, &self.memory, queues, vrings);
    }
}

impl<T: TransportQueue> TransportQueue for Arc<T> {
    fn with_ready_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        self.deref().with_ready_queue(f)
    }

    fn signal_driver(&self) -> io::Result<()> {
        self.deref().signal_driver()
    }
}
