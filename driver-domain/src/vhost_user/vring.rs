//! [`Vring`]: one virtqueue as the vhost-user request handler sets it up from the frontend's
//! messages (size, addresses, base, kick/call/err eventfds, enable), on virtio-queue's
//! [`Queue`], shared between the request handler and the worker that serves it.
//!
//! The queue size is checked here: a size that is not a power of two, or above the device's
//! maximum, is refused when the frontend sends it (virtio-queue would keep the old size
//! silently, and the backend would walk a ring of a different size than the frontend's).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio_core::{sync, TransportQueue};

/// Why a vring set-up message is refused.
#[derive(Debug, Error)]
pub enum VringError {
    /// The queue size is not a power of two or above the device's maximum.
    #[error("queue size {0} refused (a power of two up to {1} is needed)")]
    Size(u32, u16),
    /// virtio-queue refused the queue or a ring address (misaligned).
    #[error("refused by virtio-queue: {0}")]
    Queue(virtio_queue::Error),
}

/// The state of one vring, behind the vring's lock.
#[derive(Debug)]
pub struct VringState {
    queue: Queue,
    kick: Option<EventFd>,
    call: Option<EventFd>,
    err: Option<EventFd>,
    enabled: bool,
}

impl VringState {
    /// The virtqueue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The virtqueue, to change.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// The kick eventfd's descriptor, if the frontend sent one.
    pub fn kick_fd(&self) -> Option<RawFd> {
        self.kick.as_ref().map(|k| k.as_raw_fd())
    }

    /// Whether the ring was started (a kick eventfd arrived after its addresses) and enabled.
    pub fn running(&self) -> bool {
        self.queue.ready() && self.enabled
    }
}

/// One virtqueue of a vhost-user session.
#[derive(Debug)]
pub struct Vring {
    state: Mutex<VringState>,
    max_size: u16,
}

/// An eventfd from a descriptor the frontend sent.
fn eventfd(file: File) -> EventFd {
    let fd: OwnedFd = file.into();
    // SAFETY: `fd` is an owned, open descriptor; EventFd takes over its ownership.
    unsafe {
        <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }
}

impl Vring {
    /// A vring of at most `max_size` entries; disabled, not ready, size `max_size`.
    pub fn new(max_size: u16) -> Result<Self, virtio_queue::Error> {
        Ok(Vring {
            state: Mutex::new(VringState {
                queue: Queue::new(max_size)?,
                kick: None,
                call: None,
                err: None,
                enabled: false,
            }),
            max_size,
        })
    }

    /// The vring's state, locked.
    pub fn lock(&self) -> MutexGuard<'_, VringState> {
        sync::lock(&self.state)
    }

    /// SET_VRING_NUM.
    pub fn set_size(&self, num: u32) -> Result<(), VringError> {
        match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= self.max_size => {
                self.lock().queue.set_size(n);
                Ok(())
            }
            _ => Err(VringError::Size(num, self.max_size)),
        }
    }

    /// SET_VRING_ADDR, with guest physical addresses.
    pub fn set_addresses(&self, desc: u64, avail: u64, used: u64) -> Result<(), VringError> {
        let mut s = self.lock();
        let q = &mut s.queue;
        q.try_set_desc_table_address(GuestAddress(desc))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(used)))
            .map_err(VringError::Queue)
    }

    /// Start (`true`, the kick arrived) or stop the ring.
    pub fn set_ready(&self, ready: bool) {
        self.lock().queue.set_ready(ready);
    }

    /// SET_VRING_ENABLE.
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    /// EVENT_IDX negotiated or not.
    pub fn set_event_idx(&self, enabled: bool) {
        self.lock().queue.set_event_idx(enabled);
    }

    /// SET_VRING_BASE.
    pub fn set_next_avail(&self, base: u16) {
        self.lock().queue.set_next_avail(base);
    }

    /// SET_VRING_KICK; returns the descriptor of the kick it replaces.
    pub fn set_kick(&self, file: Option<File>) -> Option<EventFd> {
        std::mem::replace(&mut self.lock().kick, file.map(eventfd))
    }

    /// SET_VRING_CALL.
    pub fn set_call(&self, file: Option<File>) {
        self.lock().call = file.map(eventfd);
    }

    /// SET_VRING_ERR.
    pub fn set_err(&self, file: Option<File>) {
        self.lock().err = file.map(eventfd);
    }

    /// Writes the kick eventfd, as the frontend does (a restarted ring with requests to
    /// resubmit is kicked once so its worker serves them).
    pub fn kick(&self) -> io::Result<()> {
        match &self.lock().kick {
            Some(k) => k.write(1),
            None => Ok(()),
        }
    }

    /// Consumes a pending kick, if any, without blocking (the frontend's eventfd may be
    /// blocking, and another reader may have taken the count).
    pub fn take_kick(&self) -> bool {
        let s = self.lock();
        let Some(k) = &s.kick else { return false };
        let mut pfd = libc::pollfd {
            fd: k.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; the kernel writes only `revents`.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 1 && pfd.revents & libc::POLLIN != 0 && k.read().is_ok()
    }
}

impl TransportQueue for Vring {
    fn with_ready_queue<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
        let mut s = self.lock();
        if !s.running() {
            return None;
        }
        Some(f(&mut s.queue))
    }

    fn signal_driver(&self) -> io::Result<()> {
        match &self.lock().call {
            Some(c) => c.write(1),
            None => Ok(()),
        }
    }
}
