//! An assigned function's configuration space as the guest sees it, built from the device's
//! own (VFIO's config region), as real VMMs virtualise it:
//!
//! - identity, class, header type, subsystem and the status register come from the device;
//! - the BARs are the VMM's (sizes and types from the device, addresses from the VMM's window,
//!   moved by the guest in a shadow [`ConfigSpace`]); the expansion ROM is hidden (reads 0);
//! - the command register is the shadow's (I/O, memory, bus master, INTx disable) and every
//!   write of it also goes to the device;
//! - the capability list keeps PCI Express (passed through: reads from the device, writes to
//!   it, so vfio-pci's own filtering applies, an FLR included) and MSI-X (message control
//!   virtualised: the VMM enables the vectors); every other capability (MSI, power
//!   management, vendor-specific, ...) is left out of the chain, and the extended
//!   configuration space reads 0 (no extended capabilities);
//! - the interrupt pin reads 0 (no INTx: the guest uses MSI-X).
//!
//! Pure logic over the device's configuration bytes: the unit tests run it on a made-up
//! function.

use crate::vmm::pci::config::{ConfigSpace, PciId, BARS, COMMAND};

pub const CAP_PCIE: u8 = 0x10;
pub const CAP_MSIX: u8 = 0x11;
const CAP_PTR: usize = 0x34;
const BAR0: usize = 0x10;
const ROM: usize = 0x30;
const INTERRUPT: usize = 0x3c;
/// Bytes of a PCI Express capability (version 2).
const PCIE_CAP_BYTES: usize = 0x3c;
const MSIX_CAP_BYTES: usize = 12;

/// Errors reading an assigned function's layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfioConfigError {
    #[error("header type {0:#x} is not a type 0 (endpoint) header")]
    NotEndpoint(u8),
    #[error("BAR{0} is an I/O BAR (not supported)")]
    IoBar(usize),
    #[error("BAR{bar}: size {size:#x} is not a power of two of at least 4 KiB")]
    BadBarSize { bar: usize, size: u64 },
    #[error("the capability list loops or leaves the configuration header")]
    BadCapabilityList,
    #[error("MSI-X table or PBA in BAR{0}, which the device does not have")]
    MsixBar(usize),
}

/// One memory BAR of the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    pub index: usize,
    pub size: u64,
    pub mem64: bool,
    pub prefetchable: bool,
}

/// The MSI-X capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: usize,
    pub vectors: u16,
    pub table_bar: usize,
    pub table_offset: u64,
    pub pba_bar: usize,
    pub pba_offset: u64,
}

/// What the VMM needs to know of the function, read once at assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub bars: Vec<BarInfo>,
    pub msix: Option<MsixCap>,
    /// Kept capabilities: (id, offset, length), in chain order.
    pub caps: Vec<(u8, usize, usize)>,
}

fn dword(cfg: &[u8], off: usize) -> u32 {
    cfg.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Layout {
    /// Reads the layout from the first 256 bytes of the device's configuration space and the
    /// sizes of its BAR regions (`bar_sizes[i]`, 0 for none).
    pub fn parse(cfg: &[u8; 256], bar_sizes: [u64; BARS]) -> Result<Self, VfioConfigError> {
        let header = cfg[0x0e] & 0x7f;
        if header != 0 {
            return Err(VfioConfigError::NotEndpoint(header));
        }
        let mut bars = Vec::new();
        let mut i = 0;
        while i < BARS {
            let reg = dword(cfg, BAR0 + 4 * i);
            let size = bar_sizes[i];
            let mem64 = reg & 1 == 0 && (reg >> 1) & 3 == 2;
            if size != 0 {
                if reg & 1 != 0 {
                    return Err(VfioConfigError::IoBar(i));
                }
                if !size.is_power_of_two() || !(0x1000..=1 << 31).contains(&size) {
                    return Err(VfioConfigError::BadBarSize { bar: i, size });
                }
                bars.push(BarInfo {
                    index: i,
                    size,
                    mem64,
                    prefetchable: reg & 8 != 0,
                });
            }
            i += if mem64 { 2 } else { 1 };
        }
        let mut caps = Vec::new();
        let mut msix = None;
        let mut at = usize::from(cfg[CAP_PTR] & 0xfc);
        let mut seen = 0;
        while at != 0 {
            if !(0x40..=0xfc).contains(&at) || seen > 48 {
                return Err(VfioConfigError::BadCapabilityList);
            }
            seen += 1;
            let id = cfg[at];
            let len = match id {
                CAP_PCIE => PCIE_CAP_BYTES,
                CAP_MSIX => MSIX_CAP_BYTES,
                _ => 0,
            };
            if len != 0 && at + len <= 0x100 {
                caps.push((id, at, len));
            }
            if id == CAP_MSIX && at + len <= 0x100 {
                let control = u16::from_le_bytes([cfg[at + 2], cfg[at + 3]]);
                let table = dword(cfg, at + 4);
                let pba = dword(cfg, at + 8);
                let cap = MsixCap {
                    offset: at,
                    vectors: (control & 0x7ff) + 1,
                    table_bar: (table & 7) as usize,
                    table_offset: u64::from(table & !7),
                    pba_bar: (pba & 7) as usize,
                    pba_offset: u64::from(pba & !7),
                };
                for b in [cap.table_bar, cap.pba_bar] {
                    if !bars.iter().any(|x| x.index == b) {
                        return Err(VfioConfigError::MsixBar(b));
                    }
                }
                msix = Some(cap);
            }
            at = usize::from(cfg[at + 1] & 0xfc);
        }
        Ok(Self { bars, msix, caps })
    }

    /// A shadow configuration space holding the BARs at `gpas` (in the order of `bars`) and
    /// the writable command bits.
    pub fn shadow(&self, cfg: &[u8; 256], gpas: &[u32]) -> ConfigSpace {
        let id = PciId {
            vendor: u16::from_le_bytes([cfg[0], cfg[1]]),
            device: u16::from_le_bytes([cfg[2], cfg[3]]),
            class: [cfg[0x0b], cfg[0x0a], cfg[0x09]],
            revision: cfg[0x08],
            subsystem_vendor: u16::from_le_bytes([cfg[0x2c], cfg[0x2d]]),
            subsystem: u16::from_le_bytes([cfg[0x2e], cfg[0x2f]]),
        };
        let mut shadow = ConfigSpace::new(id, 0);
        for (b, gpa) in self.bars.iter().zip(gpas) {
            let mut flags = if b.mem64 { 4 } else { 0 };
            if b.prefetchable {
                flags |= 8;
            }
            shadow.add_mem_bar_typed(b.index, b.size as u32, *gpa, flags);
        }
        shadow
    }

    /// The kept capability holding `offset`, if any.
    pub fn cap_at(&self, offset: usize) -> Option<(u8, usize)> {
        self.caps
            .iter()
            .find(|(_, at, len)| (*at..at + len).contains(&offset))
            .map(|(id, at, _)| (*id, *at))
    }

    /// The next kept capability after the one at `at` (0 at the end).
    fn next_cap(&self, at: usize) -> u8 {
        let i = self.caps.iter().position(|(_, a, _)| *a == at);
        i.and_then(|i| self.caps.get(i + 1))
            .map_or(0, |(_, a, _)| *a as u8)
    }
}

/// Reads the guest's view of the dword at `dw_offset` (a multiple of 4): `device` is that
/// dword read from the device (read only when needed), `msix_control` the virtualised message
/// control.
pub fn guest_dword(
    layout: &Layout,
    shadow: &ConfigSpace,
    dw_offset: usize,
    device: impl FnOnce() -> u32,
    msix_control: u16,
) -> u32 {
    match dw_offset {
        0x00 | 0x08 | 0x0c | 0x28 | 0x2c => device(),
        COMMAND => {
            let status = (device() >> 16) as u16 & !(1 << 4);
            let cap_list = if layout.caps.is_empty() { 0 } else { 1 << 4 };
            u32::from(shadow.command()) | (u32::from(status | cap_list) << 16)
        }
        0x10..=0x27 => shadow.read_dword(dw_offset),
        ROM => 0,
        CAP_PTR => layout.caps.first().map_or(0, |(_, a, _)| *a as u32),
        INTERRUPT => shadow.read_dword(INTERRUPT) & 0xff,
        0x40..=0xfc => {
            let Some((id, at)) = layout.cap_at(dw_offset) else {
                return 0;
            };
            let mut v = device().to_le_bytes();
            if dw_offset == at {
                v[1] = layout.next_cap(at);
            }
            if id == CAP_MSIX && dw_offset == at {
                let c = u16::from_le_bytes([v[2], v[3]]) & 0x7ff;
                let c = c | (msix_control & 0xc000);
                v[2..4].copy_from_slice(&c.to_le_bytes());
            }
            u32::from_le_bytes(v)
        }
        _ => 0,
    }
}

/// What a guest configuration write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteTarget {
    /// The shadow's command register (then the device's).
    Command,
    /// The shadow (BARs, interrupt line).
    Shadow,
    /// MSI-X message control (the capability's upper half).
    MsixControl,
    /// Passed to the device (a kept capability's registers).
    Device,
    /// Dropped (read-only or hidden).
    Dropped,
}

/// Where a write of `len` bytes at `offset` (not crossing a dword) goes.
pub fn write_target(layout: &Layout, offset: usize, len: usize) -> WriteTarget {
    let dw = offset & !3;
    match dw {
        COMMAND if offset < COMMAND + 2 => WriteTarget::Command,
        0x10..=0x27 | INTERRUPT if dw != INTERRUPT || offset == INTERRUPT => WriteTarget::Shadow,
        0x40..=0xfc => match layout.cap_at(offset) {
            // The ID and next pointer are read-only; message control is ours.
            Some((CAP_MSIX, at)) if offset + len > at + 2 && offset < at + 4 => {
                WriteTarget::MsixControl
            }
            Some((CAP_PCIE, at)) if offset >= at + 2 => WriteTarget::Device,
            _ => WriteTarget::Dropped,
        },
        _ => WriteTarget::Dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up NVMe VF: 64-bit BAR0 of 16 KiB, capabilities PM (0x40) -> MSI-X (0x50) ->
    /// PCIe (0x60) -> vendor-specific (0xa0).
    fn function() -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&0x0010_1b36u32.to_le_bytes());
        c[6] = 0x10;
        c[8..12].copy_from_slice(&0x0108_0202u32.to_le_bytes());
        c[0x10] = 0x04;
        c[0x2c..0x30].copy_from_slice(&0x1100_1af4u32.to_le_bytes());
        c[0x34] = 0x40;
        c[0x40] = 0x01;
        c[0x41] = 0x50;
        c[0x50] = CAP_MSIX;
        c[0x51] = 0x60;
        c[0x52..0x54].copy_from_slice(&7u16.to_le_bytes()); // 8 vectors
        c[0x54..0x58].copy_from_slice(&0x2000u32.to_le_bytes());
        c[0x58..0x5c].copy_from_slice(&0x3000u32.to_le_bytes());
        c[0x60] = CAP_PCIE;
        c[0x61] = 0xa0;
        c[0x68] = 0x10; // device control
        c[0xa0] = 0x09;
        c
    }

    fn sizes() -> [u64; BARS] {
        [0x4000, 0, 0, 0, 0, 0]
    }

    #[test]
    fn layout_keeps_msix_and_pcie_and_sizes_a_64_bit_bar() {
        let l = Layout::parse(&function(), sizes()).unwrap();
        assert_eq!(
            l.bars,
            [BarInfo {
                index: 0,
                size: 0x4000,
                mem64: true,
                prefetchable: false
            }]
        );
        let m = l.msix.unwrap();
        assert_eq!((m.offset, m.vectors, m.table_bar), (0x50, 8, 0));
        assert_eq!((m.table_offset, m.pba_offset), (0x2000, 0x3000));
        assert_eq!(l.caps, [(CAP_MSIX, 0x50, 12), (CAP_PCIE, 0x60, 0x3c)]);
    }

    #[test]
    fn guest_view_hides_other_capabilities_rom_and_intx() {
        let cfg = function();
        let l = Layout::parse(&cfg, sizes()).unwrap();
        let mut shadow = l.shadow(&cfg, &[0xc000_0000]);
        let rd = |shadow: &ConfigSpace, off: usize, ctl: u16| {
            guest_dword(&l, shadow, off, || dword(&cfg, off), ctl)
        };
        assert_eq!(rd(&shadow, 0, 0), 0x0010_1b36);
        assert_eq!(rd(&shadow, CAP_PTR, 0), 0x50, "PM left out of the chain");
        assert_eq!(rd(&shadow, 0x50, 0) & 0xff00, 0x6000, "MSI-X -> PCIe");
        assert_eq!(rd(&shadow, 0x60, 0) & 0xff00, 0, "PCIe ends the chain");
        assert_eq!(rd(&shadow, 0x50, 0x8000) >> 16, 0x8007, "enable is virtual");
        assert_eq!(rd(&shadow, 0x68, 0), 0x10, "PCIe registers pass through");
        assert_eq!(rd(&shadow, 0xa0, 0), 0, "vendor capability hidden");
        assert_eq!(rd(&shadow, 0x40, 0), 0, "PM hidden");
        assert_eq!(rd(&shadow, ROM, 0), 0);
        assert_eq!(rd(&shadow, 0x104, 0), 0, "no extended capabilities");
        assert_ne!(rd(&shadow, COMMAND, 0) & (1 << 20), 0, "capability list");
        // BAR0 is 64-bit at the VMM's address; sizing answers the size; BAR1 (upper) is 0.
        assert_eq!(rd(&shadow, 0x10, 0), 0xc000_0004);
        assert_eq!(shadow.write(0x10, &[0xff; 4]), None);
        assert_eq!(rd(&shadow, 0x10, 0), 0xffff_c004);
        shadow.write(0x14, &[0xff; 4]);
        assert_eq!(rd(&shadow, 0x14, 0), 0);
        let m = shadow.write(0x10, &0xc001_0000u32.to_le_bytes()).unwrap();
        assert_eq!((m.from, m.to), (0xc000_0000, 0xc001_0000));
        assert_eq!(rd(&shadow, 0x10, 0), 0xc001_0004);
    }

    #[test]
    fn writes_go_where_real_vmms_send_them() {
        let l = Layout::parse(&function(), sizes()).unwrap();
        assert_eq!(write_target(&l, COMMAND, 2), WriteTarget::Command);
        assert_eq!(
            write_target(&l, COMMAND + 2, 2),
            WriteTarget::Dropped,
            "status"
        );
        assert_eq!(write_target(&l, 0x10, 4), WriteTarget::Shadow);
        assert_eq!(write_target(&l, 0x3d, 1), WriteTarget::Dropped, "pin");
        assert_eq!(write_target(&l, 0x52, 2), WriteTarget::MsixControl);
        assert_eq!(write_target(&l, 0x50, 4), WriteTarget::MsixControl);
        assert_eq!(
            write_target(&l, 0x54, 4),
            WriteTarget::Dropped,
            "table offset"
        );
        assert_eq!(
            write_target(&l, 0x68, 2),
            WriteTarget::Device,
            "PCIe control"
        );
        assert_eq!(
            write_target(&l, 0x60, 2),
            WriteTarget::Dropped,
            "cap header"
        );
        assert_eq!(write_target(&l, 0x40, 4), WriteTarget::Dropped, "hidden PM");
        assert_eq!(write_target(&l, 0x00, 4), WriteTarget::Dropped, "identity");
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut c = function();
        c[0x10] = 1;
        assert_eq!(Layout::parse(&c, sizes()), Err(VfioConfigError::IoBar(0)));
        let mut c = function();
        c[0x51] = 0x50;
        assert_eq!(
            Layout::parse(&c, sizes()),
            Err(VfioConfigError::BadCapabilityList)
        );
        let mut c = function();
        c[0x54] = 2; // table in BAR2
        assert_eq!(Layout::parse(&c, sizes()), Err(VfioConfigError::MsixBar(2)));
        assert!(matches!(
            Layout::parse(&function(), [0x3000, 0, 0, 0, 0, 0]),
            Err(VfioConfigError::BadBarSize { .. })
        ));
    }
}
