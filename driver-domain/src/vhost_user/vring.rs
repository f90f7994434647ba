//! [`CheckedVring`]: vhost-user-backend's `VringRwLock` with the queue size checked.
//!
//! Why a wrapper: vhost-user-backend 0.24 checks SET_VRING_NUM only against the range
//! `1..=max_queue_size` and then calls `VringT::set_queue_size`, which returns nothing;
//! virtio-queue refuses a size that is not a power of two by logging and keeping the old
//! size. The frontend would get an acknowledgement for a size nobody uses, and the backend
//! would walk a ring of a different size than the frontend's. The backend trait has no hook
//! for SET_VRING_NUM, so this wrapper remembers a refused size and fails the ring's set-up:
//! SET_VRING_ADDR (which every frontend sends before using a ring) gets an error, which ends
//! the session, and the queue never becomes ready. Everything else is delegated unchanged.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// A vring whose queue size must be a power of two within the device's maximum.
#[derive(Clone)]
pub struct CheckedVring {
    inner: VringRwLock<Mem>,
    max_size: u16,
    /// The frontend asked for a size virtio cannot use; shared by every clone.
    refused: Arc<AtomicBool>,
}

impl CheckedVring {
    /// The wrapped vring.
    pub fn inner(&self) -> &VringRwLock<Mem> {
        &self.inner
    }

    /// Whether the frontend asked for a queue size that was refused.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }
}

impl<'a> VringStateGuard<'a, Mem> for CheckedVring {
    type G = <VringRwLock<Mem> as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for CheckedVring {
    type G = <VringRwLock<Mem> as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for CheckedVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(CheckedVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            max_size: max_queue_size,
            refused: Arc::new(AtomicBool::new(false)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        if self.refused() {
            return Err(VirtQueError::InvalidSize);
        }
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        let ok = num.is_power_of_two() && num <= self.max_size;
        if !ok {
            warn!(
                "vhost-user: queue size {num} refused (a power of two up to {} is needed)",
                self.max_size
            );
        }
        self.refused.store(!ok, Ordering::Release);
        if ok {
            self.inner.set_queue_size(num)
        }
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready && !self.refused())
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
