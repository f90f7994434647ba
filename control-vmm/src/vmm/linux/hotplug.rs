//! PCI hotplug of a running Linux guest, the ACPI way Linux's `acpiphp` drives (the DSDT side
//! is `arch::acpi`): the VMM flags a slot in `PCIU` (a device to check) or `PCID` (a device
//! to eject) and raises the Generic Event Device's hotplug interrupt; the guest's `PSCN`
//! reads both registers (reading clears them) and notifies the slots; on an eject request the
//! guest removes the function's driver (virtio resets the device, which stops the backend's
//! queues) and writes the slot's bit to `B0EJ` from `_EJ0`: only then does the VMM take the
//! function off the bus. A guest that has not let go after a deadline loses the device anyway
//! (logged): the function vanishes from the bus and its queues are stopped.
//!
//! [`SlotTable`] is the bookkeeping (registers, which device is in which slot, pending
//! ejects), without KVM, so unit tests drive it; [`Hotplug`] puts it on a running machine.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::plug::{PciFunction, Plugger};
use crate::vmm::arch::PCI_HOTPLUG_PORT;
use crate::vmm::machine::VmError;
use crate::vmm::pci::{PciDevice, PciSegment, SLOTS};
use crate::vmm::vhost_device::{SharedRegion, VhostDevice, VirtioDeviceType, VringSetup};

/// A device of the guest: its type and xenbus device number.
pub type DeviceKey = (VirtioDeviceType, u32);

/// Register offsets from [`PCI_HOTPLUG_PORT`].
const PCIU: u16 = 0;
const PCID: u16 = 4;
const B0EJ: u16 = 8;

/// Why a device could not be hot-plugged.
#[derive(Debug, Error)]
pub enum HotplugError {
    #[error("the machine is not running")]
    NotRunning,
    #[error("{0} {1} is already plugged")]
    Exists(&'static str, u32),
    #[error("no free PCI slot")]
    NoSlot,
    #[error("a device's queue is already running")]
    Running,
    #[error("the guest's RAM is not shared with the driver domain (share = \"all-ram\")")]
    NotShared,
    #[error("plugging the function")]
    Plug(#[source] VmError),
    #[error("raising the hotplug interrupt")]
    Interrupt(#[source] std::io::Error),
    #[error("resuming on the restarted backend")]
    Resume(#[source] frontend_core::vhost_user::FrontendSessionError),
}

/// Where a detach stands ([`SlotTable::release`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Release<F> {
    /// The device is not (or no longer) on the bus.
    Released,
    /// Eject asked for just now: raise the interrupt.
    Requested,
    /// Asked, the guest has not let go yet.
    Pending,
    /// The deadline passed: the function, taken out of `slot`, to remove by force.
    Overdue { slot: usize, function: F },
}

#[derive(Debug)]
struct Plugged<F> {
    key: DeviceKey,
    function: F,
    /// When the VMM asked the guest to eject it.
    eject_asked: Option<Instant>,
}

/// The hotplug registers and which device is in which slot.
#[derive(Debug)]
pub struct SlotTable<F> {
    up: u32,
    down: u32,
    slots: BTreeMap<usize, Plugged<F>>,
}

impl<F> Default for SlotTable<F> {
    fn default() -> Self {
        Self {
            up: 0,
            down: 0,
            slots: BTreeMap::new(),
        }
    }
}

impl<F> SlotTable<F> {
    /// Records `function` (device `key`) in `slot` (1..32); with `announce`, flags the slot for
    /// a device check.
    pub fn insert(&mut self, slot: usize, key: DeviceKey, function: F, announce: bool) {
        if announce && slot < SLOTS {
            self.up |= 1 << slot;
            self.down &= !(1 << slot);
        }
        self.slots.insert(
            slot,
            Plugged {
                key,
                function,
                eject_asked: None,
            },
        );
    }

    /// Whether device `key` is on the bus.
    pub fn contains(&self, key: DeviceKey) -> bool {
        self.slots.values().any(|p| p.key == key)
    }

    /// Device `key`'s function, if it is on the bus.
    pub fn get(&self, key: DeviceKey) -> Option<&F> {
        self.slots
            .values()
            .find(|p| p.key == key)
            .map(|p| &p.function)
    }

    /// A guest read of the registers (4 bytes at `offset`): `PCIU` and `PCID` clear on read.
    pub fn read(&mut self, offset: u16) -> u32 {
        match offset {
            PCIU => std::mem::take(&mut self.up),
            PCID => std::mem::take(&mut self.down),
            _ => 0,
        }
    }

    /// The guest wrote `mask` to `B0EJ`: takes the functions of those slots out (a bit of an
    /// empty slot is ignored). Returns them with their slot and device.
    pub fn ejected(&mut self, mask: u32) -> Vec<(usize, DeviceKey, F)> {
        let slots: Vec<usize> = self
            .slots
            .keys()
            .copied()
            .filter(|s| *s < 32 && mask & (1 << s) != 0)
            .collect();
        slots
            .into_iter()
            .filter_map(|s| self.slots.remove(&s).map(|p| (s, p.key, p.function)))
            .collect()
    }

    /// Detach of device `key`, asked again on every tick of the walk: the first call flags
    /// its slot for ejection; the guest's `B0EJ` write then takes it off the bus
    /// ([`SlotTable::ejected`]); past `deadline` after the first call it is taken out here.
    pub fn release(&mut self, key: DeviceKey, now: Instant, deadline: Duration) -> Release<F> {
        let Some((&slot, plugged)) = self.slots.iter_mut().find(|(_, p)| p.key == key) else {
            return Release::Released;
        };
        match plugged.eject_asked {
            None => {
                plugged.eject_asked = Some(now);
                if slot < 32 {
                    self.down |= 1 << slot;
                    self.up &= !(1 << slot);
                }
                Release::Requested
            }
            Some(asked) if now.duration_since(asked) < deadline => Release::Pending,
            Some(_) => {
                self.down &= !(1u32.checked_shl(slot as u32).unwrap_or(0));
                match self.slots.remove(&slot) {
                    Some(p) => Release::Overdue {
                        slot,
                        function: p.function,
                    },
                    None => Release::Released,
                }
            }
        }
    }

    /// Takes every function out (the machine ends).
    pub fn drain(&mut self) -> Vec<F> {
        self.up = 0;
        self.down = 0;
        std::mem::take(&mut self.slots)
            .into_values()
            .map(|p| p.function)
            .collect()
    }
}

struct Inner {
    table: SlotTable<Arc<Mutex<PciFunction>>>,
    plugger: Plugger,
    /// What every device's backend sees: all of the guest's RAM (None: the guest's owner did
    /// not agree to share it, so no device can be plugged).
    ram: Option<SharedRegion>,
    /// False once the machine ended: nothing is plugged any more.
    open: bool,
}

/// PCI hotplug of a running machine: the registers the guest reads and writes, and plugging
/// and unplugging for the managed VMM's walk.
pub struct Hotplug {
    inner: Mutex<Inner>,
    pci: Arc<PciSegment>,
    /// Guest memory, to read a ring's used index when a device resumes on a restarted backend.
    mem: GuestMemoryMmap,
    /// Raises the GED's hotplug interrupt (an irqfd on [`crate::vmm::arch::PCI_HOTPLUG_IRQ`]).
    irq: EventFd,
}

impl std::fmt::Debug for Hotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hotplug")
    }
}

/// Where the managed VMM finds the running machine's [`Hotplug`] (None while it does not run).
pub type HotplugSlot = Mutex<Option<Arc<Hotplug>>>;

fn unplug(what: &str, key: DeviceKey, function: &Mutex<PciFunction>) {
    let mut f = function.lock().unwrap_or_else(|p| p.into_inner());
    f.unplug();
    log::info!("{} {}: {what}", key.0.name(), key.1);
}

impl Hotplug {
    pub fn new(
        plugger: Plugger,
        pci: Arc<PciSegment>,
        (mem, ram): (GuestMemoryMmap, Option<SharedRegion>),
        irq: EventFd,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                table: SlotTable::default(),
                plugger,
                ram,
                open: true,
            }),
            pci,
            mem,
            irq,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `device` on the bus as a new virtio-pci function; with `announce` (the guest
    /// runs), tells the guest to check its slot. Returns the slot.
    pub fn plug(
        &self,
        key: DeviceKey,
        mut device: VhostDevice,
        announce: bool,
    ) -> Result<usize, HotplugError> {
        let mut inner = self.lock();
        if !inner.open {
            return Err(HotplugError::NotRunning);
        }
        if inner.table.contains(key) {
            return Err(HotplugError::Exists(key.0.name(), key.1));
        }
        let ram = inner.ram.ok_or(HotplugError::NotShared)?;
        if !device.set_regions(vec![ram]) {
            return Err(HotplugError::Running);
        }
        let (function, bar0) = inner.plugger.function(device).map_err(HotplugError::Plug)?;
        let slot = self
            .pci
            .add(Arc::clone(&function) as Arc<Mutex<dyn PciDevice>>)
            .ok_or(HotplugError::NoSlot)?;
        inner.table.insert(slot, key, function, announce);
        drop(inner);
        log::info!(
            "virtio-{} {} (virtio-pci) at 00:{slot:02x}.0, BAR0 {bar0:#x}{}",
            key.0.name(),
            key.1,
            if announce { ", hot-plugged" } else { "" }
        );
        if announce {
            self.irq.write(1).map_err(HotplugError::Interrupt)?;
        }
        Ok(slot)
    }

    /// Resumes device `key` on `stream`, a connection to the restarted driver domain
    /// ([`VhostDevice::resume`]): each running ring restarts at the used index read here from
    /// the guest's used ring. The function stays on the bus with its rings, KVM bindings and
    /// vectors; the guest sees a delay. Returns None if the device is not on the bus, else
    /// whether the in-flight log was handed back.
    pub fn resume(
        &self,
        key: DeviceKey,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<Option<bool>, HotplugError> {
        let Some(function) = self.lock().table.get(key).cloned() else {
            return Ok(None);
        };
        let mem = &self.mem;
        let mut used_index = |_q: usize, ring: VringSetup| {
            let at = GuestAddress(ring.used)
                .checked_add(2)
                .ok_or_else(|| "used ring at the top".to_owned())?;
            mem.load::<u16>(at, Ordering::Acquire)
                .map_err(|e| e.to_string())
        };
        let mut f = function.lock().unwrap_or_else(|p| p.into_inner());
        f.backend_mut()
            .resume(stream, &mut used_index)
            .map(Some)
            .map_err(HotplugError::Resume)
    }

    /// Detach of device `key`, asked on every tick until it returns true: asks the guest to
    /// eject it, then waits for its `_EJ0`; past `deadline` the function is removed by force
    /// (logged). True at once for a device that is not on the bus.
    pub fn release(&self, key: DeviceKey, deadline: Duration) -> bool {
        let mut inner = self.lock();
        match inner.table.release(key, Instant::now(), deadline) {
            Release::Released => true,
            Release::Pending => false,
            Release::Requested => {
                drop(inner);
                log::info!(
                    "{} {}: asking the guest to eject it (deadline {deadline:?})",
                    key.0.name(),
                    key.1
                );
                if let Err(e) = self.irq.write(1) {
                    log::error!("raising the hotplug interrupt: {e}");
                }
                false
            }
            Release::Overdue { slot, function } => {
                drop(inner);
                log::warn!(
                    "{} {}: the guest did not eject slot {slot} within {deadline:?}; removing it \
                     by force",
                    key.0.name(),
                    key.1
                );
                self.pci.remove(slot);
                unplug("removed by force", key, &function);
                true
            }
        }
    }

    /// Runs `f` with the plugger: functions other than virtio devices (assigned ones, cold-plugged)
    /// take BARs and GSIs from the same allocators.
    pub fn with_plugger<T>(&self, f: impl FnOnce(&mut Plugger) -> T) -> T {
        f(&mut self.lock().plugger)
    }

    /// A guest access to the hotplug registers. Returns false if `port` is not theirs.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some(offset) = Self::offset(port) else {
            return false;
        };
        if data.len() == 4 && offset % 4 == 0 {
            let v = self.lock().table.read(offset);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0xff);
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let Some(offset) = Self::offset(port) else {
            return false;
        };
        match (offset, <[u8; 4]>::try_from(data)) {
            (B0EJ, Ok(v)) => {
                let gone = self.lock().table.ejected(u32::from_le_bytes(v));
                for (slot, key, function) in gone {
                    self.pci.remove(slot);
                    unplug(
                        &format!("ejected by the guest from slot {slot}"),
                        key,
                        &function,
                    );
                }
            }
            _ => log::warn!("write {data:02x?} to hotplug register {offset:#x} ignored"),
        }
        true
    }

    fn offset(port: u16) -> Option<u16> {
        port.checked_sub(PCI_HOTPLUG_PORT)
            .filter(|o| *o < crate::vmm::arch::PCI_HOTPLUG_BYTES)
    }

    /// The machine ends: nothing is plugged any more; returns every function on the bus (to
    /// stop their backends before guest memory goes away).
    pub fn close(&self) -> Vec<Arc<Mutex<PciFunction>>> {
        let mut inner = self.lock();
        inner.open = false;
        inner.table.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLK: DeviceKey = (VirtioDeviceType::Blk, 51728);
    const NET: DeviceKey = (VirtioDeviceType::Net, 0);

    #[test]
    fn a_hot_added_slot_is_announced_once_and_a_cold_one_never() {
        let mut t = SlotTable::default();
        t.insert(1, BLK, "disk", false);
        t.insert(3, NET, "nic", true);
        assert_eq!(t.read(PCIU), 1 << 3);
        assert_eq!(t.read(PCIU), 0, "reading clears");
        assert_eq!(t.read(PCID), 0);
        assert_eq!(t.read(B0EJ), 0);
        assert!(t.contains(NET) && t.contains(BLK));
    }

    #[test]
    fn detach_asks_once_waits_for_the_guest_and_its_eject_takes_the_function_out() {
        let mut t = SlotTable::default();
        t.insert(2, BLK, "disk", false);
        let t0 = Instant::now();
        let deadline = Duration::from_secs(10);
        assert_eq!(t.release(BLK, t0, deadline), Release::Requested);
        assert_eq!(t.read(PCID), 1 << 2);
        assert_eq!(
            t.release(BLK, t0 + Duration::from_secs(1), deadline),
            Release::Pending
        );
        // An eject of an empty slot changes nothing; the right one takes the disk out.
        assert!(t.ejected(1 << 5).is_empty());
        assert_eq!(t.ejected(1 << 2), [(2, BLK, "disk")]);
        assert_eq!(
            t.release(BLK, t0 + Duration::from_secs(2), deadline),
            Release::Released
        );
        assert!(!t.contains(BLK));
    }

    #[test]
    fn a_guest_that_never_ejects_loses_the_device_after_the_deadline() {
        let mut t = SlotTable::default();
        t.insert(4, NET, "nic", false);
        let t0 = Instant::now();
        let deadline = Duration::from_secs(10);
        assert_eq!(t.release(NET, t0, deadline), Release::Requested);
        assert_eq!(
            t.release(NET, t0 + Duration::from_secs(9), deadline),
            Release::Pending
        );
        assert_eq!(
            t.release(NET, t0 + Duration::from_secs(10), deadline),
            Release::Overdue {
                slot: 4,
                function: "nic"
            }
        );
        assert!(!t.contains(NET));
        assert_eq!(t.read(PCID), 0, "the request is withdrawn");
        // A late eject from the guest finds nothing.
        assert!(t.ejected(1 << 4).is_empty());
        assert_eq!(
            t.release(NET, t0 + Duration::from_secs(11), deadline),
            Release::Released
        );
    }

    #[test]
    fn a_device_that_is_not_plugged_is_released_at_once_and_drain_empties_the_bus() {
        let mut t: SlotTable<&str> = SlotTable::default();
        assert_eq!(
            t.release(NET, Instant::now(), Duration::ZERO),
            Release::Released
        );
        t.insert(1, BLK, "disk", true);
        t.insert(2, NET, "nic", true);
        assert_eq!(t.drain(), ["disk", "nic"]);
        assert_eq!(t.read(PCIU), 0);
    }
}
