//! PCI for a Linux guest: one segment, bus 0, reached through configuration mechanism #1
//! (0xCF8 address latch, 0xCFC..0xCFF data) and ECAM (`arch::ECAM_GPA`), with a host bridge at
//! 00:00.0 and devices at the following slots, function 0 only. BARs are allocated by the VMM
//! from the 32-bit window and decoded here; a function that does not exist reads all-ones.
//! Functions come and go while the guest runs (hotplug): the slot table is behind a lock that
//! config and BAR accesses take only to find the function.

pub mod config;
pub mod kvm_routes;
pub mod msix;

use std::sync::{Arc, Mutex, RwLock};

use config::{BarMove, ConfigSpace, PciId};

use crate::vmm::arch::{
    ECAM_BYTES, ECAM_GPA, PCI_MMIO64_BYTES, PCI_MMIO64_GPA, PCI_MMIO_BYTES, PCI_MMIO_GPA,
};
use crate::vmm::exits::{Counter, ExitCounters};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
/// Slots on bus 0 (slot 0 is the host bridge).
pub const SLOTS: usize = 32;

/// A function on the bus, as its model sees it.
pub trait PciDevice: Send + std::fmt::Debug {
    fn config(&self) -> &ConfigSpace;
    /// A configuration read (after the segment checked its range); an emulated function
    /// answers from [`PciDevice::config`], an assigned one partly from the device.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write (after the segment checked its range).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0: identity only.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        let id = PciId {
            vendor: 0x8086,
            device: 0x0d57,
            class: [0x06, 0x00, 0x00],
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        Self {
            config: ConfigSpace::new(id, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let _ = self.config.write(offset, data);
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// Hands out BAR addresses from the 32-bit window and, for 64-bit BARs, from the 64-bit
/// window above 4 GiB, each aligned to its size.
#[derive(Debug)]
pub struct BarAllocator {
    next: u64,
    next64: u64,
}

impl Default for BarAllocator {
    fn default() -> Self {
        Self {
            next: PCI_MMIO_GPA,
            next64: PCI_MMIO64_GPA,
        }
    }
}

/// The next `size`-aligned `size` bytes at or after `*next` that end within `end`.
fn bump(next: &mut u64, end: u64, size: u64) -> Option<u64> {
    let at = next.checked_next_multiple_of(size)?;
    let stop = at.checked_add(size)?;
    (stop <= end).then(|| {
        *next = stop;
        at
    })
}

impl BarAllocator {
    /// `size` bytes (a power of two) of the 32-bit window, or None when it is full.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        bump(&mut self.next, PCI_MMIO_GPA + PCI_MMIO_BYTES, size)
    }

    /// `size` bytes (a power of two) of the 64-bit window, or None when it is full.
    pub fn allocate_64(&mut self, size: u64) -> Option<u64> {
        bump(&mut self.next64, PCI_MMIO64_GPA + PCI_MMIO64_BYTES, size)
    }
}

/// Whether `base..base + size` lies in the 32-bit PCI window (`wide`: the 64-bit one).
pub fn in_window(base: u64, size: u64, wide: bool) -> bool {
    let (start, len) = if wide {
        (PCI_MMIO64_GPA, PCI_MMIO64_BYTES)
    } else {
        (PCI_MMIO_GPA, PCI_MMIO_BYTES)
    };
    base >= start && base.checked_add(size).is_some_and(|end| end <= start + len)
}

type Slot = Arc<Mutex<dyn PciDevice>>;

fn lock<'a>(
    m: &'a Mutex<dyn PciDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn PciDevice + 'static> {
    // A panic while holding a device lock leaves plain register state behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bus 0 of segment 0.
#[derive(Debug)]
pub struct PciSegment {
    slots: RwLock<Vec<Option<Slot>>>,
    address: Mutex<u32>,
    counters: Arc<ExitCounters>,
}

impl PciSegment {
    /// A bus holding only the host bridge.
    pub fn new(counters: Arc<ExitCounters>) -> Self {
        let mut slots: Vec<Option<Slot>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        Self {
            slots: RwLock::new(slots),
            address: Mutex::new(0),
            counters,
        }
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Slot>>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Plugs `device` into the first free slot; returns the slot.
    pub fn add(&self, device: Slot) -> Option<usize> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let slot = slots.iter().position(Option::is_none)?;
        slots[slot] = Some(device);
        Some(slot)
    }

    /// Takes the function out of `slot` (not the host bridge's); it reads all-ones from then
    /// on. Returns it, if there was one.
    pub fn remove(&self, slot: usize) -> Option<Slot> {
        if slot == 0 {
            return None;
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.get_mut(slot)?.take()
    }

    fn latch(&self) -> u32 {
        *self.address.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn function(&self, bus: u32, slot: u32, function: u32) -> Option<Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots().get(slot as usize)?.clone()
    }

    fn config_read(&self, bus: u32, slot: u32, func: u32, offset: usize, data: &mut [u8]) {
        self.counters.bump(Counter::PciConfigRead);
        match self.function(bus, slot, func) {
            Some(d) => lock(&d).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u32, slot: u32, func: u32, offset: usize, data: &[u8]) {
        self.counters.bump(Counter::PciConfigWrite);
        if let Some(d) = self.function(bus, slot, func) {
            lock(&d).config_write(offset, data);
        }
    }

    /// Configuration mechanism #1. Returns false if `port` is not the bridge's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                data.copy_from_slice(&self.latch().to_le_bytes());
            }
            CONFIG_DATA..=0xcff => {
                let a = self.latch();
                let offset = (a & 0xfc) as usize + usize::from(port - CONFIG_DATA);
                if a & 0x8000_0000 == 0 || offset % 4 + data.len() > 4 {
                    data.fill(0xff);
                } else {
                    self.config_read(
                        (a >> 16) & 0xff,
                        (a >> 11) & 0x1f,
                        (a >> 8) & 7,
                        offset,
                        data,
                    );
                }
            }
            0xcf9..CONFIG_DATA => data.fill(0xff),
            _ => return false,
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS => {
                if let Ok(v) = <[u8; 4]>::try_from(data) {
                    *self.address.lock().unwrap_or_else(|p| p.into_inner()) =
                        u32::from_le_bytes(v) & 0x80ff_fffc;
                }
            }
            CONFIG_DATA..=0xcff => {
                let a = self.latch();
                let offset = (a & 0xfc) as usize + usize::from(port - CONFIG_DATA);
                if a & 0x8000_0000 != 0 && offset % 4 + data.len() <= 4 {
                    self.config_write(
                        (a >> 16) & 0xff,
                        (a >> 11) & 0x1f,
                        (a >> 8) & 7,
                        offset,
                        data,
                    );
                }
            }
            0xcf9..CONFIG_DATA => {}
            _ => return false,
        }
        true
    }

    fn ecam(addr: u64) -> Option<(u32, u32, u32, usize)> {
        let off = addr.checked_sub(ECAM_GPA).filter(|o| *o < ECAM_BYTES)?;
        Some((
            (off >> 20) as u32,
            ((off >> 15) & 0x1f) as u32,
            ((off >> 12) & 7) as u32,
            (off & 0xfff) as usize,
        ))
    }

    fn bar_owner(&self, addr: u64) -> Option<(Slot, usize, u64)> {
        if !in_window(addr, 1, false) && !in_window(addr, 1, true) {
            return None;
        }
        self.slots().iter().flatten().find_map(|d| {
            let (bar, off) = lock(d).config().decode(addr)?;
            Some((Arc::clone(d), bar, off))
        })
    }

    /// ECAM and BAR reads. Returns false if nothing here decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((bus, slot, func, offset)) = Self::ecam(addr) {
            if offset % 4 + data.len() > 4 {
                data.fill(0xff);
            } else {
                self.config_read(bus, slot, func, offset, data);
            }
            return true;
        }
        match self.bar_owner(addr) {
            Some((d, bar, off)) => {
                lock(&d).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((bus, slot, func, offset)) = Self::ecam(addr) {
            if offset % 4 + data.len() <= 4 {
                self.config_write(bus, slot, func, offset, data);
            }
            return true;
        }
        match self.bar_owner(addr) {
            Some((d, bar, off)) => {
                lock(&d).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

/// Logs a BAR the guest moved (the device re-binds what KVM decodes for it).
pub fn log_bar_move(what: &str, m: BarMove) {
    log::info!(
        "{what}: guest moved BAR{} from {:#x} to {:#x}",
        m.bar,
        m.from,
        m.to
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment() -> PciSegment {
        PciSegment::new(Arc::new(ExitCounters::default()))
    }

    fn cf8_read(s: &PciSegment, bdf_reg: u32) -> u32 {
        assert!(s.pio_write(CONFIG_ADDRESS, &(0x8000_0000 | bdf_reg).to_le_bytes()));
        let mut b = [0u8; 4];
        assert!(s.pio_read(CONFIG_DATA, &mut b));
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_through_both_mechanisms_and_empty_slots_read_all_ones() {
        let s = segment();
        assert_eq!(cf8_read(&s, 0), 0x0d57_8086);
        assert_eq!(cf8_read(&s, 8) >> 8, 0x06_0000);
        assert_eq!(cf8_read(&s, 1 << 11), 0xffff_ffff, "slot 1 is empty");
        assert_eq!(cf8_read(&s, 1 << 8), 0xffff_ffff, "function 1");
        assert_eq!(cf8_read(&s, 1 << 16), 0xffff_ffff, "bus 1");
        let mut b = [0u8; 2];
        assert!(s.mmio_read(ECAM_GPA + 2, &mut b));
        assert_eq!(u16::from_le_bytes(b), 0x0d57);
        assert!(s.mmio_read(ECAM_GPA + (3 << 15), &mut b));
        assert_eq!(b, [0xff, 0xff]);
        // Without the enable bit, data reads are all-ones; odd ports are not the bridge's.
        assert!(s.pio_write(CONFIG_ADDRESS, &0u32.to_le_bytes()));
        let mut d = [0u8; 4];
        assert!(s.pio_read(CONFIG_DATA, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!s.pio_read(0xd00, &mut d));
        assert_eq!(s.counters.get(Counter::PciConfigRead), 7);
    }

    #[test]
    fn bars_are_aligned_and_the_window_runs_out() {
        let mut a = BarAllocator::default();
        assert_eq!(a.allocate(0x1000), Some(PCI_MMIO_GPA));
        assert_eq!(a.allocate(0x8000), Some(PCI_MMIO_GPA + 0x8000));
        assert_eq!(a.allocate(PCI_MMIO_BYTES), None);
        assert_eq!(a.allocate_64(1 << 30), Some(PCI_MMIO64_GPA));
        assert_eq!(a.allocate_64(0x1000), Some(PCI_MMIO64_GPA + (1 << 30)));
        assert_eq!(a.allocate_64(1 << 31), Some(PCI_MMIO64_GPA + (1 << 31)));
        assert_eq!(a.allocate_64(PCI_MMIO64_BYTES), None);
        assert!(in_window(PCI_MMIO64_GPA, 1 << 30, true));
        assert!(!in_window(PCI_MMIO64_GPA, 1 << 30, false));
        assert!(!in_window(u64::MAX - 10, 100, true));
    }
}
