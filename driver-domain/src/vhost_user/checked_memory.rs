//! The guest memory table of one vhost-user session, checked before any queue touches it.
//!
//! vhost-user-backend installs a new table before the device sees it, so each device keeps
//! its own view here: the table, and whether it passed [`check_guest_memory`]. A refused table
//! stops the device (queues are not served) until a good one arrives.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;

use log::{error, warn};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::virtio_core::memory::{check_guest_memory, SealPolicy, SealState};

/// Guest memory as vhost-user-backend hands it to a device.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The current memory table and its verdict.
pub struct CheckedMemory {
    mem: RwLock<Option<GuestMem>>,
    usable: AtomicBool,
    /// Unsealed regions in the current table (to log changes only).
    unsealed: AtomicUsize,
}

impl Default for CheckedMemory {
    fn default() -> Self {
        CheckedMemory {
            mem: RwLock::new(None),
            usable: AtomicBool::new(false),
            unsealed: AtomicUsize::new(0),
        }
    }
}

impl CheckedMemory {
    /// The current table, if any.
    pub fn current(&self) -> Option<GuestMem> {
        match self.mem.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether the current table passed its check (queues may be served).
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Takes a new table from the frontend and checks it; `device` names the device in logs.
    pub fn update(&self, mem: GuestMem, policy: SealPolicy, device: &str) -> io::Result<()> {
        let checked = check_guest_memory(&*mem.memory(), policy);
        let mut slot = match self.mem.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *slot = Some(mem);
        match checked {
            Ok(states) => {
                let unsealed = states.iter().filter(|s| **s == SealState::Unsealed).count();
                if self.unsealed.swap(unsealed, Ordering::AcqRel) != unsealed && unsealed > 0 {
                    warn!(
                        "{device}: {unsealed} shared memory region(s) cannot be sealed against \
                         shrinking; a frontend that truncates them can fault this backend"
                    );
                }
                self.usable.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // The library has already installed the table; refuse to touch it.
                self.usable.store(false, Ordering::Release);
                error!("{device}: refusing the memory table, device stopped: {e}");
                Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
            }
        }
    }
}
