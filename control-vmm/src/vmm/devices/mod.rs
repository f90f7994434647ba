//! Devices a Linux guest's platform has beyond the tiny guest's (which keeps `vmm::serial` and
//! `vmm::virtio_mmio`): the ACPI power-management registers, the virtio-pci transport and an emulated NVMe controller.

pub mod acpi_pm;
pub mod nvme;
pub mod virtio_pci;
pub mod virtio_rules;
