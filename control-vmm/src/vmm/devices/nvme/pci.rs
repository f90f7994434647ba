//! The controller as a PCI function (class 01:08:02, NVM Express): BAR0 (16 KiB, 32-bit
//! memory) holds the registers (`0x0`), the doorbells (`0x1000`), the MSI-X table (`0x2000`)
//! and the PBA (`0x3000`). Every access to BAR0 is an MMIO exit to the VMM, counted as
//! `nvme_register`, `nvme_doorbell` or `msix_table_access`: this is full emulation, the first
//! of the three I/O approaches. Interrupts are MSI-X only (no INTx pin, no MSI): each vector
//! is an eventfd the controller writes, bound to its KVM GSI as an irqfd by the shared MSI-X
//! model ([`Msix`]) while the vector may deliver; its count is the pending bit otherwise.
//!
//! Bus mastering off stops the controller's DMA: doorbells are then ignored (counted).

use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::controller::{NvmeController, NvmeStats, MSIX_VECTORS};
use super::io::{Namespace, NamespaceError};
use crate::vmm::exits::{Counter, ExitCounters};
use crate::vmm::pci::config::{ConfigSpace, PciId, COMMAND_BUS_MASTER};
use crate::vmm::pci::msix::{IrqWiring, Msix};
use crate::vmm::pci::{BarAllocator, PciDevice, PciSegment};

/// PCI identity: Red Hat's (QEMU's) vendor id with a device id no Linux NVMe quirk names
/// (QEMU's own controller, 1b36:0010, gets quirks); the class is what the nvme driver binds.
pub const VENDOR: u16 = 0x1b36;
pub const DEVICE: u16 = 0x00f0;
pub const BAR0_BYTES: u32 = 0x4000;
/// Registers and doorbells end here.
const CONTROLLER_BYTES: u64 = 0x2000;
pub const MSIX_TABLE_OFFSET: u64 = 0x2000;
pub const MSIX_PBA_OFFSET: u64 = 0x3000;
const CAP_MSIX: u8 = 0x11;

/// Why an emulated NVMe controller could not be plugged.
#[derive(Debug, Error)]
pub enum NvmePciError {
    #[error("backing file: {0}")]
    Namespace(#[from] NamespaceError),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("the PCI window is full")]
    WindowFull,
    #[error("no free PCI slot")]
    NoSlot,
}

/// The NVMe PCI function.
#[derive(Debug)]
pub struct NvmePci {
    config: ConfigSpace,
    msix_cap: usize,
    msix: Msix,
    controller: NvmeController,
    counters: Arc<ExitCounters>,
}

impl NvmePci {
    /// The function with BAR0 at `bar0` and its vectors on GSIs from `gsi_base`.
    pub fn new(
        mem: GuestMemoryMmap,
        ns: Namespace,
        bar0: u32,
        gsi_base: u32,
        wiring: Arc<dyn IrqWiring>,
        counters: Arc<ExitCounters>,
    ) -> Result<Self, NvmePciError> {
        let id = PciId {
            vendor: VENDOR,
            device: DEVICE,
            class: [0x01, 0x08, 0x02],
            revision: 0,
            subsystem_vendor: VENDOR,
            subsystem: DEVICE,
        };
        let mut config = ConfigSpace::new(id, 0);
        config.add_mem_bar(0, BAR0_BYTES, bar0);
        let mut body = (MSIX_VECTORS - 1).to_le_bytes().to_vec();
        body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(CAP_MSIX, &body, &[0, 0, 0, 0xc0]);
        let mut msix = Msix::new(MSIX_VECTORS, gsi_base, wiring);
        let mut irqs = Vec::new();
        for v in 0..MSIX_VECTORS {
            let efd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(NvmePciError::EventFd)?);
            msix.set_source(v, Some(Arc::clone(&efd)));
            irqs.push(efd);
        }
        Ok(Self {
            config,
            msix_cap,
            msix,
            controller: NvmeController::new(mem, ns, irqs),
            counters,
        })
    }

    pub fn stats(&self) -> NvmeStats {
        self.controller.stats()
    }

    pub fn controller(&self) -> &NvmeController {
        &self.controller
    }
}

impl PciDevice for NvmePci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if let Some(m) = self.config.write(offset, data) {
            crate::vmm::pci::log_bar_move("nvme", m);
        }
        self.msix
            .config_written(&self.config, self.msix_cap, offset);
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        if self
            .msix
            .bar_read((MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET), offset, data)
        {
            self.counters.bump(Counter::MsixTableAccess);
            return;
        }
        match offset {
            o if o < CONTROLLER_BYTES => {
                self.counters.bump(Counter::NvmeRegister);
                self.controller.mmio_read(o, data);
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        if self.msix.bar_write(MSIX_TABLE_OFFSET, offset, data) {
            self.counters.bump(Counter::MsixTableAccess);
            return;
        }
        match offset {
            o if o < super::regs::DOORBELL_OFFSET => {
                self.counters.bump(Counter::NvmeRegister);
                self.controller.mmio_write(o, data);
            }
            o if o < CONTROLLER_BYTES => {
                self.counters.bump(Counter::NvmeDoorbell);
                if self.config.command() & COMMAND_BUS_MASTER == 0 {
                    log::warn!("nvme: doorbell with bus mastering off ignored");
                    return;
                }
                self.controller.mmio_write(o, data);
            }
            o => log::warn!("nvme: write {data:02x?} to BAR0 {o:#x} ignored"),
        }
    }
}

/// Puts an emulated NVMe controller on `pci` with BAR0 from `bars` and MSI-X vectors on
/// GSIs from `gsi_base`; returns it and the GSIs it uses.
pub fn plug(
    pci: &PciSegment,
    bars: &mut BarAllocator,
    controller: (GuestMemoryMmap, Namespace),
    gsi_base: u32,
    wiring: Arc<dyn IrqWiring>,
    counters: &Arc<ExitCounters>,
) -> Result<(Arc<Mutex<NvmePci>>, u32), NvmePciError> {
    let bar0 = bars
        .allocate(u64::from(BAR0_BYTES))
        .ok_or(NvmePciError::WindowFull)?;
    let (mem, ns) = controller;
    let (blocks, writable) = (ns.blocks(), ns.writable());
    // The window is below 4 GiB.
    let dev = NvmePci::new(mem, ns, bar0 as u32, gsi_base, wiring, Arc::clone(counters))?;
    let dev = Arc::new(Mutex::new(dev));
    let slot = pci
        .add(Arc::clone(&dev) as Arc<Mutex<dyn PciDevice>>)
        .ok_or(NvmePciError::NoSlot)?;
    log::info!(
        "emulated NVMe at 00:{slot:02x}.0, BAR0 {bar0:#x}, {blocks} blocks of 512 bytes, {}",
        if writable { "writable" } else { "read-only" }
    );
    Ok((dev, u32::from(MSIX_VECTORS)))
}
