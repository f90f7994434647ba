//! The thin KVM VMM: one process per guest. It builds the VM (in-kernel irqchip and PIT,
//! memfd-backed RAM and I/O window, 64-bit direct boot of an ELF kernel), emulates COM1 and a
//! virtio-mmio transport whose data path runs guest <-> driver domain through KVM
//! ioeventfd/irqfd, and counts exits. A Linux guest's machine ([`linux`]) boots a bzImage
//! ([`arch`]) on a PCI segment ([`pci`]) with a virtio-pci disk ([`devices`]) whose interrupts
//! are MSI-X irqfds. See docs/vmm.md and docs/architecture.md's module map.

pub mod arch;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod driver_vm;
pub mod exit_reasons;
pub mod exits;
#[cfg(test)]
pub(crate) mod fake_backend;
pub mod kvm_device;
pub mod layout;
pub mod linux;
pub mod machine;
pub mod managed;
pub mod memory;
pub mod pci;
pub mod report;
pub mod serial;
pub mod vcpu;
pub mod vfio;
pub mod vhost_device;
pub mod virtio_mmio;
pub mod wakeups;

pub use machine::{
    run, run_keeping_backend, BlkAttachment, GuestMarkers, Outcome, RingMode, VmConfig, VmError,
    VmReport,
};
