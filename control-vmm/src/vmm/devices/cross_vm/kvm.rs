//! What the cross-VM device asks of KVM, behind a trait so that its tests and the relay's run
//! without `/dev/kvm`: doorbells are ioeventfds, shared memory is memory slots.

use std::fmt::Debug;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// KVM operations of the cross-VM device.
pub trait CrossVmKvm: Send + Sync + Debug {
    /// Binds `call` to writes of any size and value at `gpa` (a KVM ioeventfd).
    fn register_doorbell(&self, call: &EventFd, gpa: u64) -> Result<(), kvm_ioctls::Error>;
    /// Undoes [`CrossVmKvm::register_doorbell`].
    fn unregister_doorbell(&self, call: &EventFd, gpa: u64) -> Result<(), kvm_ioctls::Error>;
    /// Sets memory slot `slot` to `size` bytes at `gpa` backed by `host` (size 0 removes it).
    ///
    /// # Safety
    /// `host..host + size` must stay mapped until the slot is removed.
    unsafe fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl CrossVmKvm for VmFd {
    fn register_doorbell(&self, call: &EventFd, gpa: u64) -> Result<(), kvm_ioctls::Error> {
        self.register_ioevent(call, &IoEventAddress::Mmio(gpa), NoDatamatch)
    }

    fn unregister_doorbell(&self, call: &EventFd, gpa: u64) -> Result<(), kvm_ioctls::Error> {
        self.unregister_ioevent(call, &IoEventAddress::Mmio(gpa), NoDatamatch)
    }

    unsafe fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the caller keeps `host..host + size` mapped until the slot is removed.
        unsafe { self.set_user_memory_region(desc) }
    }
}

#[cfg(test)]
pub mod fake {
    //! A KVM that records what it is asked (for the device's and the relay's tests).

    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    use super::*;

    /// What the fake holds now.
    #[derive(Debug, Default)]
    pub struct FakeKvmState {
        /// gpa -> the bound eventfd (a duplicate: compare with [`same_eventfd`]).
        pub doorbells: BTreeMap<u64, EventFd>,
        /// slot -> (gpa, size, host).
        pub slots: BTreeMap<u32, (u64, u64, u64)>,
        /// Every call, in order, for tests of moves.
        pub log: Vec<String>,
    }

    #[derive(Debug, Default)]
    pub struct FakeKvm(pub Mutex<FakeKvmState>);

    impl FakeKvm {
        pub fn state(&self) -> std::sync::MutexGuard<'_, FakeKvmState> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    /// Whether two eventfds are one: a write to `a` is seen on `b`.
    pub fn same_eventfd(a: &EventFd, b: &EventFd) -> bool {
        while b.read().is_ok() {}
        a.write(1).is_ok() && b.read().is_ok_and(|v| v == 1)
    }

    impl CrossVmKvm for FakeKvm {
        fn register_doorbell(&self, call: &EventFd, gpa: u64) -> Result<(), kvm_ioctls::Error> {
            // KVM takes nothing but an eventfd.
            let link = std::fs::read_link(format!("/proc/self/fd/{}", call.as_raw_fd()));
            if !link.is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventfd]") {
                return Err(kvm_ioctls::Error::new(libc::EINVAL));
            }
            let mut s = self.state();
            if s.doorbells.contains_key(&gpa) {
                return Err(kvm_ioctls::Error::new(libc::EEXIST));
            }
            let dup = call
                .try_clone()
                .map_err(|_| kvm_ioctls::Error::new(libc::EBADF))?;
            s.doorbells.insert(gpa, dup);
            s.log.push(format!("ioeventfd {gpa:#x}"));
            Ok(())
        }

        fn unregister_doorbell(&self, _: &EventFd, gpa: u64) -> Result<(), kvm_ioctls::Error> {
            let mut s = self.state();
            s.doorbells
                .remove(&gpa)
                .ok_or(kvm_ioctls::Error::new(libc::ENOENT))?;
            s.log.push(format!("deassign {gpa:#x}"));
            Ok(())
        }

        unsafe fn set_slot(
            &self,
            slot: u32,
            gpa: u64,
            size: u64,
            host: u64,
        ) -> Result<(), kvm_ioctls::Error> {
            let mut s = self.state();
            if size == 0 {
                s.slots.remove(&slot);
                s.log.push(format!("slot {slot} removed"));
            } else {
                s.slots.insert(slot, (gpa, size, host));
                s.log.push(format!("slot {slot} at {gpa:#x}"));
            }
            Ok(())
        }
    }
}
