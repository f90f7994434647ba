//! Port and MMIO dispatch for exits that reach user space: COM1, the poweroff and phase ports,
//! the virtio-mmio device. Anything else reads as all-ones and ignores writes, as an
//! undecoded bus does on hardware; such accesses are counted and logged (rate-limited).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::exits::{Counter, ExitCounters, Phase};
use super::layout::{COM1_PORT, PHASE_PORT, POWEROFF_PORT, VIRTIO_MMIO_BYTES, VIRTIO_MMIO_GPA};
use super::serial::Com1;
use super::virtio_mmio::VirtioMmioBlk;

/// Something the run loop must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEvent {
    /// The guest wrote its exit status to the poweroff port.
    Poweroff(u8),
    /// The guest marked a measurement phase.
    Phase(Phase),
    /// The guest asked for a reset (e.g. the ACPI reset register).
    Reset(&'static str),
}

/// What a vCPU's run loop hands the exits that reach user space to: one implementation per
/// machine kind (the tiny guest's [`Bus`], a Linux guest's platform bus).
pub trait ExitBus: Send + Sync + std::fmt::Debug {
    fn pio_in(&self, port: u16, data: &mut [u8]);
    fn pio_out(&self, port: u16, data: &[u8]) -> Option<BusEvent>;
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<BusEvent>;
}

/// Logs the first few occurrences, then every 1000th.
#[derive(Debug, Default)]
pub struct Limiter(AtomicU64);

impl Limiter {
    pub fn allow(&self) -> bool {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        n < 16 || n.is_multiple_of(1000)
    }
}

/// The devices behind user-space exits.
#[derive(Debug)]
pub struct Bus {
    com1: Mutex<Com1>,
    virtio: Option<Mutex<VirtioMmioBlk>>,
    counters: Arc<ExitCounters>,
    unknown: Limiter,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a device lock leaves plain register state behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bus {
    pub fn new(com1: Com1, virtio: Option<VirtioMmioBlk>, counters: Arc<ExitCounters>) -> Self {
        Self {
            com1: Mutex::new(com1),
            virtio: virtio.map(Mutex::new),
            counters,
            unknown: Limiter::default(),
        }
    }

    /// Takes the virtio device out of the bus (once no vCPU can reach it any more).
    pub fn into_virtio(self) -> Option<VirtioMmioBlk> {
        self.virtio
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// The virtio device, if any.
    pub fn virtio(&self) -> Option<std::sync::MutexGuard<'_, VirtioMmioBlk>> {
        self.virtio.as_ref().map(lock)
    }

    fn com1_offset(port: u16) -> Option<u8> {
        port.checked_sub(COM1_PORT)
            .filter(|o| *o < 8)
            .map(|o| o as u8)
    }

    fn virtio_offset(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(VIRTIO_MMIO_GPA)?;
        (off < VIRTIO_MMIO_BYTES && self.virtio.is_some()).then_some(off)
    }
}

impl ExitBus for Bus {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        if let (Some(off), 1) = (Self::com1_offset(port), data.len()) {
            data[0] = lock(&self.com1).read(off);
            return;
        }
        self.counters.bump(Counter::UnknownPio);
        if self.unknown.allow() {
            log::warn!(
                "guest read {} byte(s) from unknown port {port:#x}",
                data.len()
            );
        }
        data.fill(0xff);
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> Option<BusEvent> {
        match (port, data) {
            (POWEROFF_PORT, [status, ..]) => return Some(BusEvent::Poweroff(*status)),
            (PHASE_PORT, [p, ..]) => {
                let phase = Phase::from_byte(*p);
                if phase.is_none() {
                    log::warn!("guest wrote unknown phase {p}");
                }
                return phase.map(BusEvent::Phase);
            }
            _ => {}
        }
        if let (Some(off), [v]) = (Self::com1_offset(port), data) {
            if off == 0 {
                self.counters.bump(Counter::SerialOut);
            }
            lock(&self.com1).write(off, *v);
            return None;
        }
        self.counters.bump(Counter::UnknownPio);
        if self.unknown.allow() {
            log::warn!("guest wrote {data:02x?} to unknown port {port:#x}; ignored");
        }
        None
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let (Some(off), Some(dev)) = (self.virtio_offset(addr), self.virtio.as_ref()) {
            lock(dev).read(off, data);
            return;
        }
        self.counters.bump(Counter::UnknownMmio);
        if self.unknown.allow() {
            log::warn!(
                "guest read {} byte(s) from unbacked GPA {addr:#x}",
                data.len()
            );
        }
        data.fill(0xff);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<BusEvent> {
        if let (Some(off), Some(dev)) = (self.virtio_offset(addr), self.virtio.as_ref()) {
            lock(dev).write(off, data);
            return None;
        }
        self.counters.bump(Counter::UnknownMmio);
        if self.unknown.allow() {
            log::warn!("guest wrote {data:02x?} to unbacked GPA {addr:#x}; ignored");
        }
        None
    }
}
