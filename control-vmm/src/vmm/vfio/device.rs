//! An assigned PCI function (a VF through VFIO) on a Linux guest's bus.
//!
//! - Guest RAM is DMA-mapped in the function's container at IOVA = guest-physical address
//!   before the guest runs ([`super::map_guest_ram`]), so the guest's driver programs
//!   guest-physical addresses and the IOMMU confines the device to the guest's RAM.
//! - Configuration space is virtualised as [`super::config`] says.
//! - Each memory BAR is mmapped from the device and given to KVM as memory slots, so register
//!   and doorbell accesses never exit; only the pages holding the MSI-X table and PBA are left
//!   out, and accesses there reach the VMM (the table and PBA are emulated, anything else on
//!   those pages is passed to the device through the region).
//! - MSI-X: one eventfd per vector, given to VFIO (all vectors at once when the guest enables
//!   MSI-X: the 6.1 kernel cannot add vectors to an enabled set) and bound as KVM irqfds by
//!   [`Msix`] while the vector may deliver: interrupts go device -> host kernel -> KVM -> guest
//!   without the VMM. A masked vector's eventfd keeps its count (the PBA bit).

use std::ptr::NonNull;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vmm_sys_util::eventfd::EventFd;

use super::config::{guest_dword, write_target, Layout, MsixCap, VfioConfigError, WriteTarget};
use super::sys::{RegionInfo, VfioContainer, VfioDevice, VfioGroup, VfioSysError};
use crate::vmm::arch::{PCI_MMIO_BYTES, PCI_MMIO_GPA};
use crate::vmm::bus::Limiter;
use crate::vmm::exits::{Counter, ExitCounters};
use crate::vmm::pci::config::{ConfigSpace, BARS, COMMAND, COMMAND_MEMORY};
use crate::vmm::pci::msix::{IrqWiring, Msix, CONTROL_ENABLE, CONTROL_FUNCTION_MASK};
use crate::vmm::pci::{log_bar_move, BarAllocator, PciDevice};

const PAGE: u64 = 0x1000;

/// Errors assigning a function.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error(transparent)]
    Sys(#[from] VfioSysError),
    #[error("{0}: {1}")]
    Layout(String, VfioConfigError),
    #[error("{name}: BAR{bar} cannot be mmapped (region flags {flags:#x})")]
    NotMappable {
        name: String,
        bar: usize,
        flags: u32,
    },
    #[error("{name}: mmap of BAR{bar}: {source}")]
    Mmap {
        name: String,
        bar: usize,
        source: std::io::Error,
    },
    #[error("{0}: the PCI window has no room for its BARs")]
    WindowFull(String),
    #[error("{0}: creating an MSI-X eventfd: {1}")]
    Eventfd(String, std::io::Error),
}

/// A BAR mapped from the device, and the pages of it that trap to the VMM.
struct MappedBar {
    index: usize,
    region: RegionInfo,
    host: NonNull<u8>,
    size: u64,
    /// Pages (offset, length) left out of the KVM slots: the MSI-X table and PBA.
    traps: Vec<(u64, u64)>,
}

impl MappedBar {
    /// The parts of the BAR given to KVM: (offset, length).
    fn direct_pieces(&self) -> Vec<(u64, u64)> {
        direct_pieces(self.size, &self.traps)
    }
}

/// The parts of `size` bytes outside the sorted `traps` (offset, length).
fn direct_pieces(size: u64, traps: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for &(t, len) in traps {
        if t > at {
            pieces.push((at, t - at));
        }
        at = at.max(t + len);
    }
    if at < size {
        pieces.push((at, size - at));
    }
    pieces
}

impl Drop for MappedBar {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map_bar`; KVM's slots on it are removed first
        // (`VfioPciDevice::drop`).
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.size as usize) };
    }
}

struct MsixState {
    cap: MsixCap,
    model: Msix,
    fds: Vec<Arc<EventFd>>,
    /// Enable and function-mask bits as the guest wrote them.
    control: u16,
    /// Whether VFIO has the vectors enabled on the device.
    on_device: bool,
}

/// What an assigned function holds of the host while it is assigned.
struct Live {
    device: VfioDevice,
    bars: Vec<MappedBar>,
    // Kept open while assigned; the container holds the DMA mappings and closes last.
    _group: VfioGroup,
    _container: VfioContainer,
}

/// An assigned function. [`VfioPciDevice::release`] (or dropping it) removes its KVM slots,
/// disables its interrupts, resets it and closes its descriptors (container last, which drops
/// the DMA mappings); a released function reads all-ones, as a removed one does.
pub struct VfioPciDevice {
    name: String,
    config_region: RegionInfo,
    layout: Layout,
    shadow: ConfigSpace,
    msix: Option<MsixState>,
    /// None once released.
    live: Option<Live>,
    vm: Arc<VmFd>,
    first_slot: u32,
    /// KVM slots currently mapped: (slot, gpa).
    mapped: Vec<(u32, u64)>,
    counters: Arc<ExitCounters>,
    limiter: Limiter,
}

// SAFETY: the raw pointers are mmaps of the device's BARs, used only to hand their addresses
// to KVM; nothing else in the struct is tied to a thread.
unsafe impl Send for VfioPciDevice {}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("name", &self.name)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Where the assigned function's resources come from.
pub struct Placement<'a> {
    pub vm: Arc<VmFd>,
    pub bars: &'a mut BarAllocator,
    /// First GSI of its MSI-X vectors.
    pub gsi_base: u32,
    pub wiring: Arc<dyn IrqWiring>,
    /// First KVM memory slot for its BARs (up to 3 per BAR).
    pub first_slot: u32,
    pub counters: Arc<ExitCounters>,
}

fn map_bar(
    name: &str,
    device: &VfioDevice,
    index: usize,
    size: u64,
) -> Result<(RegionInfo, NonNull<u8>), AssignError> {
    let region = device.region(index as u32)?;
    if region.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || region.size < size {
        return Err(AssignError::NotMappable {
            name: name.into(),
            bar: index,
            flags: region.flags,
        });
    }
    // SAFETY: a new shared mapping of the device's region; the kernel checks offset and size.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            device.raw_fd(),
            region.offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(AssignError::Mmap {
            name: name.into(),
            bar: index,
            source: std::io::Error::last_os_error(),
        });
    }
    let host = NonNull::new(p.cast()).ok_or_else(|| AssignError::Mmap {
        name: name.into(),
        bar: index,
        source: std::io::Error::other("mmap returned null"),
    })?;
    Ok((region, host))
}

/// Page-aligned (offset, length) covering `len` bytes at `offset`.
fn pages(offset: u64, len: u64) -> (u64, u64) {
    let start = offset & !(PAGE - 1);
    (start, (offset + len).next_multiple_of(PAGE) - start)
}

impl VfioPciDevice {
    /// Assigns function `name` of `group` (already attached to `container`, guest RAM
    /// already DMA-mapped): reads its layout, places its BARs, maps them, prepares MSI-X.
    pub fn new(
        name: &str,
        container: VfioContainer,
        group: VfioGroup,
        place: Placement<'_>,
    ) -> Result<Self, AssignError> {
        let device = group.device(name)?;
        if let Err(e) = device.reset() {
            log::warn!("{name}: reset before assignment: {e}");
        }
        let config_region = device.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cfg = [0u8; 256];
        device.read(&config_region, 0, &mut cfg)?;
        let mut sizes = [0u64; BARS];
        for (i, s) in sizes.iter_mut().enumerate() {
            *s = device.region(i as u32)?.size;
        }
        let layout = Layout::parse(&cfg, sizes).map_err(|e| AssignError::Layout(name.into(), e))?;
        let mut gpas = Vec::new();
        let mut bars = Vec::new();
        for b in &layout.bars {
            let gpa = place
                .bars
                .allocate(b.size)
                .ok_or_else(|| AssignError::WindowFull(name.into()))?;
            gpas.push(gpa as u32);
            let (region, host) = map_bar(name, &device, b.index, b.size)?;
            let mut traps = Vec::new();
            if let Some(m) = &layout.msix {
                let v = u64::from(m.vectors);
                if m.table_bar == b.index {
                    traps.push(pages(m.table_offset, v * 16));
                }
                if m.pba_bar == b.index {
                    traps.push(pages(m.pba_offset, v.div_ceil(64) * 8));
                }
            }
            traps.sort_unstable();
            bars.push(MappedBar {
                index: b.index,
                region,
                host,
                size: b.size,
                traps,
            });
        }
        let shadow = layout.shadow(&cfg, &gpas);
        let msix = match layout.msix {
            Some(cap) => {
                let mut model = Msix::new(cap.vectors, place.gsi_base, place.wiring);
                let mut fds = Vec::new();
                for v in 0..cap.vectors {
                    let fd = Arc::new(
                        EventFd::new(libc::EFD_NONBLOCK)
                            .map_err(|e| AssignError::Eventfd(name.into(), e))?,
                    );
                    model.set_source(v, Some(Arc::clone(&fd)));
                    fds.push(fd);
                }
                Some(MsixState {
                    cap,
                    model,
                    fds,
                    control: 0,
                    on_device: false,
                })
            }
            None => None,
        };
        for (b, gpa) in bars.iter().zip(&gpas) {
            log::info!(
                "{name}: BAR{} {:#x} bytes at {gpa:#x}, KVM slots for {:x?}, trapped {:x?}",
                b.index,
                b.size,
                b.direct_pieces(),
                b.traps
            );
        }
        Ok(Self {
            name: name.into(),
            config_region,
            layout,
            shadow,
            msix,
            live: Some(Live {
                device,
                bars,
                _group: group,
                _container: container,
            }),
            vm: place.vm,
            first_slot: place.first_slot,
            mapped: Vec::new(),
            counters: place.counters,
            limiter: Limiter::default(),
        })
    }

    /// How many MSI-X vectors (GSIs) it uses.
    pub fn vectors(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| m.cap.vectors)
    }

    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), kvm_ioctls::Error> {
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host + size` is a live mmap of the device's BAR owned by `self`,
        // removed from KVM (size 0) before it is unmapped.
        unsafe { self.vm.set_user_memory_region(desc) }
    }

    /// Makes KVM's slots follow the BAR addresses and the memory-decoding bit.
    fn sync_slots(&mut self) {
        for (slot, gpa) in std::mem::take(&mut self.mapped) {
            if let Err(e) = self.set_slot(slot, gpa, 0, 0) {
                log::error!("{}: removing KVM slot {slot}: {e}", self.name);
            }
        }
        let Some(live) = self.live.as_ref() else {
            return;
        };
        if self.shadow.command() & COMMAND_MEMORY == 0 {
            return;
        }
        let window = PCI_MMIO_GPA..PCI_MMIO_GPA + PCI_MMIO_BYTES;
        let mut slot = self.first_slot;
        let mut mapped = Vec::new();
        for b in &live.bars {
            let Some((base, _)) = self.shadow.bar(b.index) else {
                continue;
            };
            let fits = window.contains(&base) && base + b.size <= window.end;
            for (off, len) in b.direct_pieces() {
                let this = slot;
                slot += 1;
                if !fits {
                    continue;
                }
                let host = b.host.as_ptr() as u64 + off;
                match self.set_slot(this, base + off, len, host) {
                    Ok(()) => mapped.push((this, base + off)),
                    Err(e) => log::error!(
                        "{}: KVM slot {this} for BAR{} at {:#x}: {e}",
                        self.name,
                        b.index,
                        base + off
                    ),
                }
            }
        }
        self.mapped = mapped;
    }

    fn set_msix_control(&mut self, control: u16) {
        let name = self.name.clone();
        let (Some(m), Some(live)) = (self.msix.as_mut(), self.live.as_ref()) else {
            return;
        };
        let control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        let enable = control & CONTROL_ENABLE != 0;
        m.model.set_control(control);
        if enable && !m.on_device {
            let fds: Vec<i32> = m
                .fds
                .iter()
                .map(|f| std::os::fd::AsRawFd::as_raw_fd(&**f))
                .collect();
            match live.device.enable_irqs(VFIO_PCI_MSIX_IRQ_INDEX, &fds) {
                Ok(()) => {
                    m.on_device = true;
                    log::info!("{name}: MSI-X enabled, {} vectors on irqfds", fds.len());
                }
                Err(e) => log::error!("{name}: enabling MSI-X: {e}"),
            }
        } else if !enable && m.on_device {
            if let Err(e) = live.device.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX) {
                log::error!("{name}: disabling MSI-X: {e}");
            }
            m.on_device = false;
        }
        m.control = control;
    }

    fn device_dword(&self, dw: usize) -> u32 {
        let mut b = [0u8; 4];
        let Some(device) = self.device() else {
            return 0xffff_ffff;
        };
        match device.read(&self.config_region, dw as u64, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                if self.limiter.allow() {
                    log::warn!("{}: configuration read: {e}", self.name);
                }
                0xffff_ffff
            }
        }
    }

    /// Which emulated structure holds `off` of BAR `bar`: Some(true) the table, Some(false)
    /// the PBA, None neither.
    fn msix_part(&self, bar: usize, off: u64) -> Option<(bool, u64)> {
        let m = &self.msix.as_ref()?.cap;
        let v = u64::from(m.vectors);
        if bar == m.table_bar && (m.table_offset..m.table_offset + v * 16).contains(&off) {
            return Some((true, off - m.table_offset));
        }
        let pba = v.div_ceil(64) * 8;
        if bar == m.pba_bar && (m.pba_offset..m.pba_offset + pba).contains(&off) {
            return Some((false, off - m.pba_offset));
        }
        None
    }

    fn device(&self) -> Option<&VfioDevice> {
        self.live.as_ref().map(|l| &l.device)
    }

    /// The device and the region of BAR `bar`, while assigned.
    fn region_of(&self, bar: usize) -> Option<(&VfioDevice, &RegionInfo)> {
        let live = self.live.as_ref()?;
        let b = live.bars.iter().find(|b| b.index == bar)?;
        Some((&live.device, &b.region))
    }

    /// Whether the function is still assigned (not released).
    pub fn is_assigned(&self) -> bool {
        self.live.is_some()
    }

    /// Lets the function go, the guest running or not (after `pci-detach` the guest sees a
    /// surprise removal): KVM slots removed, interrupts disabled and unbound, the function
    /// reset, its descriptors closed (the container last: the DMA mappings go). From then on
    /// it reads all-ones and decodes nothing, as a removed function does.
    pub fn release(&mut self) {
        let Some(live) = self.live.take() else {
            return;
        };
        for (slot, gpa) in std::mem::take(&mut self.mapped) {
            let _ = self.set_slot(slot, gpa, 0, 0);
        }
        let _ = self.shadow.write(COMMAND, &[0, 0]);
        if let Some(m) = self.msix.as_mut() {
            m.model.set_control(0);
            m.model.clear_sources();
            if m.on_device {
                let _ = live.device.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX);
                m.on_device = false;
            }
        }
        match live.device.reset() {
            Ok(()) => log::info!("{}: reset at the end of the assignment", self.name),
            Err(e) => log::warn!("{}: reset at the end of the assignment: {e}", self.name),
        }
        drop(live);
        log::info!("{}: released (its descriptors closed)", self.name);
    }
}

impl PciDevice for VfioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.shadow
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.live.is_none() {
            data.fill(0xff);
            return;
        }
        let dw = offset & !3;
        let control = self.msix.as_ref().map_or(0, |m| m.control);
        let v = if dw < 0x100 {
            guest_dword(
                &self.layout,
                &self.shadow,
                dw,
                || self.device_dword(dw),
                control,
            )
        } else {
            0
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset % 4 + i).copied().unwrap_or(0xff);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.live.is_none() {
            return;
        }
        match write_target(&self.layout, offset, data.len()) {
            WriteTarget::Command => {
                let before = self.shadow.command();
                let _ = self.shadow.write(offset, data);
                let now = self.shadow.command();
                let written = self
                    .device()
                    .map(|d| d.write(&self.config_region, 4, &now.to_le_bytes()));
                if let Some(Err(e)) = written {
                    log::error!("{}: command register: {e}", self.name);
                }
                if (before ^ now) & COMMAND_MEMORY != 0 {
                    self.sync_slots();
                }
            }
            WriteTarget::Shadow => {
                if let Some(m) = self.shadow.write(offset, data) {
                    log_bar_move(&self.name, m);
                    self.sync_slots();
                }
            }
            WriteTarget::MsixControl => {
                let Some(at) = self.msix.as_ref().map(|m| m.cap.offset) else {
                    return;
                };
                let control = self.msix.as_ref().map_or(0, |m| m.control);
                let mut dw = (u32::from(control) << 16).to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    if let Some(slot) = dw.get_mut(offset - at + i) {
                        *slot = *b;
                    }
                }
                self.set_msix_control(u16::from_le_bytes([dw[2], dw[3]]));
            }
            WriteTarget::Device => {
                let written = self
                    .device()
                    .map(|d| d.write(&self.config_region, offset as u64, data));
                if let Some(Err(e)) = written {
                    log::warn!("{}: configuration write at {offset:#x}: {e}", self.name);
                }
            }
            WriteTarget::Dropped => {
                if self.limiter.allow() {
                    log::info!(
                        "{}: guest wrote {data:02x?} to configuration offset {offset:#x}; ignored",
                        self.name
                    );
                }
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_part(bar, offset) {
            Some((table, off)) => {
                self.counters.bump(Counter::MsixTableAccess);
                if let Some(m) = &self.msix {
                    if table {
                        m.model.table_read(off, data);
                    } else {
                        m.model.pba_read(off, data);
                    }
                }
            }
            None => {
                self.counters.bump(Counter::AssignedBarExit);
                let r = self.region_of(bar).map(|(d, r)| d.read(r, offset, data));
                if !matches!(r, Some(Ok(()))) {
                    data.fill(0xff);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_part(bar, offset) {
            Some((true, off)) => {
                self.counters.bump(Counter::MsixTableAccess);
                if let Some(m) = self.msix.as_mut() {
                    m.model.table_write(off, data);
                }
            }
            Some((false, _)) => {
                self.counters.bump(Counter::MsixTableAccess);
                if self.limiter.allow() {
                    log::info!("{}: write to the MSI-X PBA ignored", self.name);
                }
            }
            None => {
                self.counters.bump(Counter::AssignedBarExit);
                if let Some((d, r)) = self.region_of(bar) {
                    if let Err(e) = d.write(r, offset, data) {
                        log::warn!("{}: BAR{bar} write at {offset:#x}: {e}", self.name);
                    }
                }
            }
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_pages_are_cut_out_of_the_kvm_slots() {
        // The lab's NVMe VF: registers, then the table page, then the PBA page.
        let traps = [pages(0x2000, 16), pages(0x3000, 8)];
        assert_eq!(traps, [(0x2000, 0x1000), (0x3000, 0x1000)]);
        assert_eq!(direct_pieces(0x4000, &traps), [(0, 0x2000)]);
        // A table in the middle of a BAR, spanning two pages, with the PBA on its last page.
        let traps = [pages(0x1f00, 0x200), pages(0x2100, 8)];
        assert_eq!(
            direct_pieces(0x8000, &traps),
            [(0, 0x1000), (0x3000, 0x5000)]
        );
        assert_eq!(direct_pieces(0x1000, &[]), [(0, 0x1000)]);
    }
}
