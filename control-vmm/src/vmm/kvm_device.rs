//! `/dev/kvm`, opened once before the VMM is confined: a confined VMM has no `/dev` to open
//! it from, and its uid may not open it anyway (root:kvm 0660 here, 0600 in the lab). Every
//! VM it creates uses a duplicate of this descriptor. Unconfined (run by hand, or in a
//! test), a VMM that did not open it first opens the path as before.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::OnceLock;

use kvm_ioctls::Kvm;

static KVM_DEVICE: OnceLock<OwnedFd> = OnceLock::new();

/// Opens `/dev/kvm` for the VMs this process will create.
pub fn preopen() -> Result<(), kvm_ioctls::Error> {
    let raw = Kvm::open_with_cloexec(true)?;
    // SAFETY: `raw` was just opened by us and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let _ = KVM_DEVICE.set(fd);
    Ok(())
}

/// A KVM system handle: a duplicate of the descriptor [`preopen`] opened, or `/dev/kvm`.
pub(crate) fn open() -> Result<Kvm, kvm_ioctls::Error> {
    match KVM_DEVICE.get() {
        Some(fd) => {
            let dup = fd
                .try_clone()
                .map_err(|e| kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)))?;
            // SAFETY: `dup` is a fresh duplicate of our /dev/kvm descriptor; the Kvm takes it
            // over.
            Ok(unsafe { Kvm::from_raw_fd(dup.into_raw_fd()) })
        }
        None => Kvm::new(),
    }
}
