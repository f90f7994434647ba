//! The cross-VM PCI device of a driver VM ("splitvmm cross-VM device", 1af4:1130): how dom0
//! shares a guest's memory and doorbells with the driver VM, the KVM analogue of grant
//! mappings and event channels (docs/vmm.md, "The driver VM's devices").
//!
//! - BAR0 (32-bit, 4 KiB): the magic at 0x000, the number of doorbells at 0x004, doorbell n at
//!   0x100 + 4n. A doorbell bound to a guest's call eventfd is a KVM ioeventfd: the driver
//!   VM's write interrupts the guest with no exit to this VMM. A write to an unbound doorbell
//!   exits here and is counted. Read-only at 0x008: how many regions BAR2 maps now (a read
//!   latches the region table at 0x800: entry i at 0x800 + 16i, the region's BAR2 offset then
//!   its length, each 64 bits as two 32-bit words, low first; at most 128 entries). The
//!   driver VM learns from it which bytes of BAR2 are backed (its isolation probe:
//!   docs/driver-vm.md, "What the driver VM can see").
//! - BAR2 (64-bit, prefetchable, `--driver-vm-shm-mib`): the frontends' memory regions, each
//!   a KVM memory slot at BAR2's base + the offset the relay gave it. What is not mapped
//!   exits here: reads are zero, writes are dropped.
//!
//! The function on the bus and the relay share [`CrossVmState`]; both BARs follow the guest
//! when it moves them.

pub mod kvm;
pub mod shm;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::bus::Limiter;
use crate::vmm::pci::config::{ConfigSpace, PciId};
use crate::vmm::pci::{in_window, log_bar_move, BarAllocator, PciDevice, PciSegment};
use kvm::CrossVmKvm;
use shm::MappedRegion;

/// PCI identity: vendor, device, class (memory controller, RAM), revision.
pub const VENDOR_ID: u16 = 0x1af4;
pub const DEVICE_ID: u16 = 0x1130;
pub const CLASS: [u8; 3] = [0x05, 0x00, 0x00];
pub const REVISION: u8 = 1;
/// BAR0's size and registers.
pub const BAR0_BYTES: u64 = 0x1000;
pub const REG_MAGIC: u64 = 0x000;
pub const REG_DOORBELLS: u64 = 0x004;
pub const REG_DOORBELL0: u64 = 0x100;
/// The number of BAR2 regions; reading it latches the table at [`REG_REGION_TABLE`].
pub const REG_REGIONS: u64 = 0x008;
/// The latched region table: entry i at `REG_REGION_TABLE + 16 * i` (offset, length).
pub const REG_REGION_TABLE: u64 = 0x800;
/// Entries the table holds (the rest of BAR0); the count may say more.
pub const REGION_TABLE_ENTRIES: usize = 128;
/// "SVMX", read at BAR0 + 0.
pub const MAGIC: u32 = 0x5356_4d58;
/// Doorbells: 16 channels of up to 16 queues, doorbell = channel * 16 + queue.
pub const DOORBELLS: u32 = 256;
pub const CHANNELS: u16 = 16;
pub const QUEUES_PER_CHANNEL: u32 = 16;
/// KVM memory slots of BAR2's regions (below the 509 of older kernels; RAM is slot 0 and
/// assigned functions' BARs start at 8).
const FIRST_SLOT: u32 = 256;
const SLOTS: u32 = 252;

/// Errors of the cross-VM device.
#[derive(Debug, Error)]
pub enum CrossVmError {
    #[error("doorbell {0} out of range")]
    DoorbellRange(u32),
    #[error("channel {channel} queue {queue}: no doorbell")]
    QueueRange { channel: u16, queue: u32 },
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("memory region at offset {offset:#x} of {len:#x} bytes: not whole pages")]
    RegionAlignment { offset: u64, len: u64 },
    #[error("memory region not sealed against shrinking")]
    Unsealed,
    #[error("memory region at offset {offset:#x} of {len:#x} bytes: past the end of its file ({size:#x} bytes)")]
    RegionBeyondFile { offset: u64, len: u64, size: u64 },
    #[error("mapping a memory region: {0}")]
    Map(String),
    #[error("BAR2 offset {offset:#x} of {len:#x} bytes: outside BAR2 or over another region")]
    Bar2Range { offset: u64, len: u64 },
    #[error("out of KVM memory slots for BAR2")]
    NoSlot,
    #[error("BAR2 size {0} MiB: not a power of two of at least 2 MiB")]
    Bar2Size(u64),
    #[error("{0}")]
    Place(&'static str),
}

/// The doorbell of `queue` of `channel`.
pub fn doorbell_index(channel: u16, queue: u32) -> Result<u32, CrossVmError> {
    if channel >= CHANNELS || queue >= QUEUES_PER_CHANNEL {
        return Err(CrossVmError::QueueRange { channel, queue });
    }
    Ok(u32::from(channel) * QUEUES_PER_CHANNEL + queue)
}

#[derive(Debug)]
struct Mapping {
    region: MappedRegion,
    slot: u32,
    /// Whether the slot is in KVM now (BAR2 in the window).
    live: bool,
}

#[derive(Debug)]
struct Inner {
    kvm: Arc<dyn CrossVmKvm>,
    /// Where BAR0 is while its doorbells are registered (None: outside the window).
    bar0: Option<u64>,
    /// Where BAR2 is while its regions are mapped (None: outside the window).
    bar2: Option<u64>,
    bar2_size: u64,
    doorbells: Vec<Option<EventFd>>,
    regions: BTreeMap<u64, Mapping>,
    free_slots: Vec<u32>,
    ignored_doorbells: u64,
}

impl Inner {
    fn doorbell_gpa(bar0: u64, n: u32) -> u64 {
        bar0 + REG_DOORBELL0 + 4 * u64::from(n)
    }

    fn slot_on(&self, offset: u64, m: &Mapping) -> Result<(), kvm_ioctls::Error> {
        let Some(bar2) = self.bar2 else {
            return Ok(());
        };
        // SAFETY: the mapping lives in `m.region` until the slot is removed (unmap_region,
        // move_bar2 and Drop remove the slot before the region goes).
        unsafe {
            self.kvm
                .set_slot(m.slot, bar2 + offset, m.region.len(), m.region.host_addr())
        }
    }

    fn slot_off(&self, m: &Mapping) {
        // SAFETY: removing a slot (size 0) references no memory.
        if let Err(e) = unsafe { self.kvm.set_slot(m.slot, 0, 0, 0) } {
            log::error!("cross-VM device: removing KVM slot {}: {e}", m.slot);
        }
    }

    fn move_bar0(&mut self, to: u64) {
        if let Some(from) = self.bar0.take() {
            for (n, fd) in self.doorbells.iter().enumerate() {
                if let Some(fd) = fd {
                    let gpa = Self::doorbell_gpa(from, n as u32);
                    if let Err(e) = self.kvm.unregister_doorbell(fd, gpa) {
                        log::error!("cross-VM device: doorbell {n} at {gpa:#x}: {e}");
                    }
                }
            }
        }
        if !in_window(to, BAR0_BYTES, false) {
            return;
        }
        for (n, fd) in self.doorbells.iter().enumerate() {
            if let Some(fd) = fd {
                let gpa = Self::doorbell_gpa(to, n as u32);
                if let Err(e) = self.kvm.register_doorbell(fd, gpa) {
                    log::error!("cross-VM device: doorbell {n} at {gpa:#x}: {e}");
                }
            }
        }
        self.bar0 = Some(to);
    }

    fn move_bar2(&mut self, to: u64) {
        for m in self.regions.values_mut() {
            if std::mem::take(&mut m.live) {
                // SAFETY: removing a slot (size 0) references no memory.
                if let Err(e) = unsafe { self.kvm.set_slot(m.slot, 0, 0, 0) } {
                    log::error!("cross-VM device: removing KVM slot {}: {e}", m.slot);
                }
            }
        }
        self.bar2 = in_window(to, self.bar2_size, true).then_some(to);
        let offsets: Vec<u64> = self.regions.keys().copied().collect();
        for offset in offsets {
            let result = self.slot_on(offset, &self.regions[&offset]);
            match result {
                Ok(()) => {
                    if let Some(m) = self.regions.get_mut(&offset) {
                        m.live = self.bar2.is_some();
                    }
                }
                Err(e) => log::error!("cross-VM device: BAR2 region at {offset:#x}: {e}"),
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The slots go before the mappings they point at.
        for m in self.regions.values() {
            if m.live {
                self.slot_off(m);
            }
        }
    }
}

/// What the function on the bus and the relay share: the doorbells bound and the regions
/// mapped, and where the BARs are.
#[derive(Debug)]
pub struct CrossVmState {
    inner: Mutex<Inner>,
}

impl CrossVmState {
    fn new(kvm: Arc<dyn CrossVmKvm>, bar0: u64, bar2: u64, bar2_size: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                kvm,
                bar0: in_window(bar0, BAR0_BYTES, false).then_some(bar0),
                bar2: in_window(bar2, bar2_size, true).then_some(bar2),
                bar2_size,
                doorbells: (0..DOORBELLS).map(|_| None).collect(),
                regions: BTreeMap::new(),
                free_slots: (FIRST_SLOT..FIRST_SLOT + SLOTS).rev().collect(),
                ignored_doorbells: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// BAR2's size.
    pub fn bar2_size(&self) -> u64 {
        self.lock().bar2_size
    }

    /// Binds doorbell `n` to `call` (replacing what was bound).
    pub fn bind_doorbell(&self, n: u32, call: EventFd) -> Result<(), CrossVmError> {
        if n >= DOORBELLS {
            return Err(CrossVmError::DoorbellRange(n));
        }
        self.unbind_doorbell(n);
        let mut inner = self.lock();
        if let Some(bar0) = inner.bar0 {
            inner
                .kvm
                .register_doorbell(&call, Inner::doorbell_gpa(bar0, n))
                .map_err(|source| CrossVmError::Kvm {
                    op: "KVM_IOEVENTFD (doorbell)",
                    source,
                })?;
        }
        inner.doorbells[n as usize] = Some(call);
        Ok(())
    }

    /// Unbinds doorbell `n` (if bound): writes to it exit to the VMM again.
    pub fn unbind_doorbell(&self, n: u32) {
        let mut inner = self.lock();
        let Some(fd) = inner.doorbells.get_mut(n as usize).and_then(Option::take) else {
            return;
        };
        if let Some(bar0) = inner.bar0 {
            let gpa = Inner::doorbell_gpa(bar0, n);
            if let Err(e) = inner.kvm.unregister_doorbell(&fd, gpa) {
                log::error!("cross-VM device: doorbell {n} at {gpa:#x}: {e}");
            }
        }
    }

    /// Whether doorbell `n` is bound.
    pub fn doorbell_bound(&self, n: u32) -> bool {
        self.lock()
            .doorbells
            .get(n as usize)
            .is_some_and(Option::is_some)
    }

    /// Maps `region` at `offset` of BAR2 (a KVM memory slot while BAR2 is in the window).
    pub fn map_region(&self, offset: u64, region: MappedRegion) -> Result<(), CrossVmError> {
        let mut inner = self.lock();
        let len = region.len();
        let range = CrossVmError::Bar2Range { offset, len };
        let end = offset
            .checked_add(len)
            .ok_or(CrossVmError::Bar2Range { offset, len })?;
        if end > inner.bar2_size || !offset.is_multiple_of(shm::PAGE) {
            return Err(range);
        }
        let below = inner.regions.range(..end).next_back();
        if below.is_some_and(|(at, m)| at + m.region.len() > offset) {
            return Err(range);
        }
        let slot = inner.free_slots.pop().ok_or(CrossVmError::NoSlot)?;
        let mut m = Mapping {
            region,
            slot,
            live: false,
        };
        if let Err(source) = inner.slot_on(offset, &m) {
            inner.free_slots.push(slot);
            return Err(CrossVmError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION (BAR2)",
                source,
            });
        }
        m.live = inner.bar2.is_some();
        inner.regions.insert(offset, m);
        Ok(())
    }

    /// Unmaps the region at `offset` of BAR2 (if any): its slot goes, then the mapping.
    pub fn unmap_region(&self, offset: u64) {
        let mut inner = self.lock();
        let Some(m) = inner.regions.remove(&offset) else {
            return;
        };
        if m.live {
            inner.slot_off(&m);
        }
        inner.free_slots.push(m.slot);
    }

    /// Offsets and sizes of the regions mapped.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.lock()
            .regions
            .iter()
            .map(|(at, m)| (*at, m.region.len()))
            .collect()
    }

    /// Writes to unbound doorbells so far.
    pub fn ignored_doorbells(&self) -> u64 {
        self.lock().ignored_doorbells
    }

    /// Reads `buf.len()` bytes at `offset` of the region mapped at `at` (tests look through).
    #[cfg(test)]
    pub fn read_region(&self, at: u64, offset: u64, buf: &mut [u8]) {
        self.lock().regions[&at].region.read(offset, buf);
    }
}

/// The function on the bus.
#[derive(Debug)]
pub struct CrossVmDevice {
    config: ConfigSpace,
    state: Arc<CrossVmState>,
    limiter: Limiter,
    /// The region table as of the last read of [`REG_REGIONS`].
    latched: Vec<(u64, u64)>,
}

impl CrossVmDevice {
    /// The function with BAR0 at `bar0` (32-bit window) and BAR2 of `bar2_size` bytes at
    /// `bar2` (64-bit window).
    pub fn new(kvm: Arc<dyn CrossVmKvm>, bar0: u64, bar2: u64, bar2_size: u64) -> Self {
        let id = PciId {
            vendor: VENDOR_ID,
            device: DEVICE_ID,
            class: CLASS,
            revision: REVISION,
            subsystem_vendor: VENDOR_ID,
            subsystem: DEVICE_ID,
        };
        let mut config = ConfigSpace::new(id, 0);
        config.add_mem_bar(0, BAR0_BYTES as u32, bar0 as u32);
        config.add_mem_bar64(2, bar2_size, bar2, true);
        Self {
            config,
            state: Arc::new(CrossVmState::new(kvm, bar0, bar2, bar2_size)),
            limiter: Limiter::default(),
            latched: Vec::new(),
        }
    }

    /// The 32-bit word at `rel` of the latched region table (zero past its entries).
    fn table_word(&self, rel: u64) -> u32 {
        let Some(&(offset, len)) = usize::try_from(rel / 16)
            .ok()
            .and_then(|i| self.latched.get(i))
        else {
            return 0;
        };
        let value = if rel % 16 < 8 { offset } else { len };
        if rel % 8 < 4 {
            value as u32
        } else {
            (value >> 32) as u32
        }
    }

    /// The state the relay shares.
    pub fn state(&self) -> Arc<CrossVmState> {
        Arc::clone(&self.state)
    }
}

impl PciDevice for CrossVmDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let Some(m) = self.config.write(offset, data) else {
            return;
        };
        log_bar_move("cross-VM device", m);
        let mut inner = self.state.lock();
        match m.bar {
            0 => inner.move_bar0(m.to),
            2 => inner.move_bar2(m.to),
            _ => {}
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            // BAR2 where nothing is mapped reads as zero.
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_DOORBELLS => DOORBELLS,
            REG_REGIONS => {
                let mut regions = self.state.regions();
                let count = u32::try_from(regions.len()).unwrap_or(u32::MAX);
                regions.truncate(REGION_TABLE_ENTRIES);
                self.latched = regions;
                count
            }
            o if (REG_REGION_TABLE..BAR0_BYTES).contains(&o) => {
                self.table_word(o - REG_REGION_TABLE)
            }
            _ => 0,
        };
        if data.len() <= 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, _data: &[u8]) {
        if bar != 0 {
            return;
        }
        let n = offset
            .checked_sub(REG_DOORBELL0)
            .map(|o| o / 4)
            .filter(|n| *n < u64::from(DOORBELLS));
        let Some(n) = n else {
            return;
        };
        self.state.lock().ignored_doorbells += 1;
        if self.limiter.allow() {
            log::warn!("cross-VM device: doorbell {n} rung with nothing bound; ignored");
        }
    }
}

/// Puts the cross-VM device on `pci`: BAR0 from the 32-bit window, BAR2 of `bar2_size` bytes
/// (a power of two) from the 64-bit window. Returns the state the relay shares.
pub fn plug(
    pci: &PciSegment,
    bars: &mut BarAllocator,
    kvm: Arc<dyn CrossVmKvm>,
    bar2_size: u64,
) -> Result<Arc<CrossVmState>, CrossVmError> {
    if !bar2_size.is_power_of_two() || bar2_size < (2 << 20) {
        return Err(CrossVmError::Bar2Size(bar2_size >> 20));
    }
    let bar0 = bars
        .allocate(BAR0_BYTES)
        .ok_or(CrossVmError::Place("the 32-bit PCI window is full"))?;
    let bar2 = bars
        .allocate_64(bar2_size)
        .ok_or(CrossVmError::Place("the 64-bit PCI window is full"))?;
    let dev = CrossVmDevice::new(kvm, bar0, bar2, bar2_size);
    let state = dev.state();
    let slot = pci
        .add(Arc::new(Mutex::new(dev)))
        .ok_or(CrossVmError::Place("no free PCI slot"))?;
    log::info!(
        "cross-VM device at 00:{slot:02x}.0: BAR0 {bar0:#x} ({DOORBELLS} doorbells), BAR2 \
         {bar2:#x} ({} MiB shared memory)",
        bar2_size >> 20
    );
    Ok(state)
}

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
pub(crate) mod tests;
