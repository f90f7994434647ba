//! Hardware ownership: the driver domain's physical devices.
//!
//! - [`pci`]: PCI functions from sysfs (identity, driver, IOMMU group, SR-IOV state) and
//!   moving a function between drivers with `driver_override` + `drivers_probe`.
//! - [`sriov`]: enabling and disabling VFs of a PF and, for an NVMe PF kept on the kernel
//!   nvme driver, the Virtualization Management sequence that brings VFs online.
//! - [`nvme_admin`]: the NVMe admin passthrough ioctl that sequence uses.
//! - [`vfio`]: functions owned through VFIO (`vfio-ioctls`): config space, BARs, DMA
//!   mapping, interrupts to eventfds, and the device request interrupt.
//! - [`nvme_probe`]: a minimal user-space NVMe driver proving the VFIO path end to end.
//! - [`ops`]: the privileged operations behind VF assignment, as a trait ([`ops::HardwareOps`])
//!   done directly through sysfs or asked of the hardware helper;
//! - [`helper`]: the privileged hardware helper (`splitvmm-hw-helper`) and its client.
//! - [`cli`]: `driver-domain hw ...`.
//!
//! Everything that reads sysfs takes a [`pci::Sysfs`] root, so it is tested against a fake
//! tree; the parts that need a kernel with an IOMMU and SR-IOV run in the lab
//! (`tests/lab/run`, see docs/lab.md).

pub mod cli;
pub mod helper;
pub mod nvme_admin;
pub mod nvme_probe;
pub mod ops;
pub mod pci;
pub mod sriov;
pub mod vfio;
