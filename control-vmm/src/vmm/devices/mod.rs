//! Devices a Linux guest's platform has beyond the tiny guest's (which keeps `vmm::serial` and
//! `vmm::virtio_mmio`): the ACPI power-management registers, the virtio-pci transport, an
//! emulated NVMe controller, and a driver VM's cross-VM device.

pub mod acpi_pm;
pub mod cross_vm;
pub mod nvme;
pub mod virtio_pci;
pub mod virtio_rules;
