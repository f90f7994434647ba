//! Port and MMIO dispatch of a Linux guest's platform: COM1 (and a driver VM's COM2), the ACPI power-management
//! registers, the phase register a measurement in the guest marks its phases on
//! (`arch::PHASE_MMIO_GPA`), the PCI hotplug registers, and the PCI segment (configuration mechanism #1 at
//! 0xCF8/0xCFC, ECAM, BARs).
//! Anything else reads as all-ones and ignores writes, counted and logged (rate-limited).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::vmm::arch::COM2_PORT;
use crate::vmm::arch::PHASE_MMIO_GPA;
use crate::vmm::bus::{lock, BusEvent, ExitBus, Limiter};
use crate::vmm::devices::acpi_pm;
use crate::vmm::driver_vm::com2::TunnelUart;
use crate::vmm::exits::{Counter, ExitCounters, Phase};
use crate::vmm::layout::COM1_PORT;
use crate::vmm::pci::PciSegment;
use crate::vmm::serial::Com1;

use super::hotplug::Hotplug;

/// The devices behind a Linux guest's user-space exits.
#[derive(Debug)]
pub struct LinuxBus {
    com1: Mutex<Com1>,
    /// A driver VM's COM2, the tunnel to dom0's relay.
    com2: Option<Arc<Mutex<TunnelUart>>>,
    pci: Arc<PciSegment>,
    hotplug: Arc<Hotplug>,
    counters: Arc<ExitCounters>,
    unknown: Limiter,
    io_requests: AtomicU64,
}

impl LinuxBus {
    pub fn new(
        com1: Com1,
        pci: Arc<PciSegment>,
        hotplug: Arc<Hotplug>,
        counters: Arc<ExitCounters>,
    ) -> Self {
        Self {
            com1: Mutex::new(com1),
            com2: None,
            pci,
            hotplug,
            counters,
            unknown: Limiter::default(),
            io_requests: AtomicU64::new(0),
        }
    }

    /// With a driver VM's COM2.
    pub fn with_com2(mut self, com2: Arc<Mutex<TunnelUart>>) -> Self {
        self.com2 = Some(com2);
        self
    }

    /// Console input for COM1; returns how many bytes the receive FIFO took.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        lock(&self.com1).enqueue_input(bytes)
    }

    /// The PCI segment (to stop its devices when the machine ends).
    pub fn pci(&self) -> &PciSegment {
        &self.pci
    }

    /// Requests the guest said its I/O phase made (the phase register at +8).
    pub fn io_requests(&self) -> u64 {
        self.io_requests.load(Ordering::Relaxed)
    }

    fn com1_offset(port: u16) -> Option<u8> {
        port.checked_sub(COM1_PORT)
            .filter(|o| *o < 8)
            .map(|o| o as u8)
    }

    /// COM2 and the register at `port`, if this machine has it and `port` is its.
    fn com2_at(&self, port: u16) -> Option<(&Mutex<TunnelUart>, u8)> {
        let off = port.checked_sub(COM2_PORT).filter(|o| *o < 8)?;
        Some((self.com2.as_deref()?, off as u8))
    }

    fn unknown(&self, what: std::fmt::Arguments<'_>, counter: Counter) {
        self.counters.bump(counter);
        if self.unknown.allow() {
            log::warn!("{what}");
        }
    }
}

impl ExitBus for LinuxBus {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        if let (Some(off), 1) = (Self::com1_offset(port), data.len()) {
            data[0] = lock(&self.com1).read(off);
        } else if let (Some((com2, off)), 1) = (self.com2_at(port), data.len()) {
            data[0] = lock(com2).read(off);
        } else if acpi_pm::decodes(port) {
            acpi_pm::read(port, data);
        } else if !self.pci.pio_read(port, data) && !self.hotplug.pio_read(port, data) {
            self.unknown(
                format_args!(
                    "guest read {} byte(s) from unknown port {port:#x}",
                    data.len()
                ),
                Counter::UnknownPio,
            );
            data.fill(0xff);
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> Option<BusEvent> {
        if let (Some(off), [v]) = (Self::com1_offset(port), data) {
            if off == 0 {
                self.counters.bump(Counter::SerialOut);
            }
            lock(&self.com1).write(off, *v);
        } else if let (Some((com2, off)), [v]) = (self.com2_at(port), data) {
            lock(com2).write(off, *v);
        } else if acpi_pm::decodes(port) {
            return acpi_pm::write(port, data);
        } else if !self.pci.pio_write(port, data) && !self.hotplug.pio_write(port, data) {
            self.unknown(
                format_args!("guest wrote {data:02x?} to unknown port {port:#x}; ignored"),
                Counter::UnknownPio,
            );
        }
        None
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            self.unknown(
                format_args!(
                    "guest read {} byte(s) from unbacked GPA {addr:#x}",
                    data.len()
                ),
                Counter::UnknownMmio,
            );
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<BusEvent> {
        match (addr.checked_sub(PHASE_MMIO_GPA), data) {
            (Some(0), [b]) => return Phase::from_byte(*b).map(BusEvent::Phase),
            (Some(8), [a, b, c, d]) => {
                let n = u32::from_le_bytes([*a, *b, *c, *d]);
                self.io_requests.store(u64::from(n), Ordering::Relaxed);
                return None;
            }
            _ => {}
        }
        if !self.pci.mmio_write(addr, data) {
            self.unknown(
                format_args!("guest wrote {data:02x?} to unbacked GPA {addr:#x}; ignored"),
                Counter::UnknownMmio,
            );
        }
        None
    }
}
