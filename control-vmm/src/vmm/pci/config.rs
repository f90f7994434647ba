//! A PCI function's configuration space (type 0 header, 4 KiB for ECAM): registers with
//! per-bit write masks, memory BARs that answer sizing (all-ones written, size mask read
//! back; 32-bit, or 64-bit over two registers), and a capability list. What a guest writes to read-only bits is dropped, as on
//! hardware; reads beyond the header and capabilities are zero.

/// Dwords of configuration space (4 KiB).
pub const CONFIG_DWORDS: usize = 1024;
pub const COMMAND: usize = 0x04;
pub const STATUS_CAP_LIST: u32 = 1 << 20;
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const BAR0: usize = 0x10;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAP: usize = 0x40;
pub const BARS: usize = 6;

/// Identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass, programming interface.
    pub class: [u8; 3],
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A BAR whose address changed (the guest moved it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub from: u64,
    pub to: u64,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: Box<[u32; CONFIG_DWORDS]>,
    wmask: Box<[u32; CONFIG_DWORDS]>,
    bar_sizes: [u64; BARS],
    /// Each BAR's address as last programmed (sizing writes aside).
    bar_addrs: [u64; BARS],
    /// Registers that are the upper half of the 64-bit BAR below them.
    upper_half: [bool; BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("id", &format_args!("{:#010x}", self.regs[0]))
            .field("bar_sizes", &self.bar_sizes)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A type 0 header with `id`; the command register's I/O, memory, bus-master and
    /// INTx-disable bits and the interrupt line are writable.
    pub fn new(id: PciId, header_type: u8) -> Self {
        let mut regs = Box::new([0u32; CONFIG_DWORDS]);
        let mut wmask = Box::new([0u32; CONFIG_DWORDS]);
        regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        regs[2] = u32::from(id.revision)
            | (u32::from(id.class[2]) << 8)
            | (u32::from(id.class[1]) << 16)
            | (u32::from(id.class[0]) << 24);
        regs[3] = u32::from(header_type) << 16;
        regs[11] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        wmask[COMMAND / 4] =
            u32::from(COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        wmask[INTERRUPT_LINE / 4] = 0xff;
        Self {
            regs,
            wmask,
            bar_sizes: [0; BARS],
            bar_addrs: [0; BARS],
            upper_half: [false; BARS],
            last_cap: None,
            next_cap: FIRST_CAP,
        }
    }

    /// Declares BAR `bar` as 32-bit, non-prefetchable memory of `size` bytes (a power of two,
    /// at least 4 KiB) at `gpa` (size-aligned).
    pub fn add_mem_bar(&mut self, bar: usize, size: u32, gpa: u32) {
        self.add_mem_bar_typed(bar, size, gpa, 0);
    }

    /// As [`ConfigSpace::add_mem_bar`] with the BAR's read-only type bits `flags` (bit 2:
    /// 64-bit, bit 3: prefetchable). A 64-bit BAR's upper half (the next register) reads 0
    /// and ignores writes: the VMM places BARs below 4 GiB.
    pub fn add_mem_bar_typed(&mut self, bar: usize, size: u32, gpa: u32, flags: u32) {
        assert!(bar < BARS && size.is_power_of_two() && size >= 0x1000 && flags & !0xc == 0);
        assert!(gpa.is_multiple_of(size));
        self.bar_sizes[bar] = u64::from(size);
        self.bar_addrs[bar] = u64::from(gpa);
        self.regs[BAR0 / 4 + bar] = gpa | flags;
        self.wmask[BAR0 / 4 + bar] = !(size - 1);
    }

    /// Declares BARs `bar` and `bar + 1` as one 64-bit memory BAR of `size` bytes (a power of
    /// two, at least 4 KiB) at `gpa` (size-aligned), prefetchable if asked. Both halves are
    /// writable: the guest may move it anywhere in the 64-bit space.
    pub fn add_mem_bar64(&mut self, bar: usize, size: u64, gpa: u64, prefetchable: bool) {
        assert!(bar + 1 < BARS && size.is_power_of_two() && size >= 0x1000);
        assert!(gpa.is_multiple_of(size));
        let mask = !(size - 1);
        self.bar_sizes[bar] = size;
        self.bar_addrs[bar] = gpa;
        self.upper_half[bar + 1] = true;
        let flags = 4 | if prefetchable { 8 } else { 0 };
        self.regs[BAR0 / 4 + bar] = gpa as u32 | flags;
        self.wmask[BAR0 / 4 + bar] = mask as u32 & !0xf;
        self.regs[BAR0 / 4 + bar + 1] = (gpa >> 32) as u32;
        self.wmask[BAR0 / 4 + bar + 1] = (mask >> 32) as u32;
    }

    /// Appends a capability (`body` without its ID and next-pointer bytes); `wmask` gives the
    /// writable bits of the whole capability, ID and pointer bytes included. Returns its
    /// offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> usize {
        let at = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(at + len <= 0x100, "capabilities fit in the first 256 bytes");
        let mut bytes = vec![id, 0];
        bytes.extend_from_slice(body);
        bytes.resize(len, 0);
        let mut mask = wmask.to_vec();
        mask.resize(len, 0);
        for (i, (b, m)) in bytes.chunks(4).zip(mask.chunks(4)).enumerate() {
            let dw = at / 4 + i;
            self.regs[dw] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            self.wmask[dw] = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, at as u8),
            None => self.set_byte(CAP_PTR, at as u8),
        }
        self.regs[COMMAND / 4] |= STATUS_CAP_LIST;
        self.last_cap = Some(at);
        self.next_cap = at + len;
        at
    }

    fn set_byte(&mut self, offset: usize, v: u8) {
        let shift = 8 * (offset % 4);
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(v) << shift);
    }

    /// The dword at `offset` (rounded down to 4).
    pub fn read_dword(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(0xffff_ffff)
    }

    /// Reads `data.len()` bytes at `offset` (1, 2 or 4, not crossing a dword).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let dw = self.read_dword(offset).to_le_bytes();
        let start = offset % 4;
        for (i, b) in data.iter_mut().enumerate() {
            *b = dw.get(start + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes `data` at `offset` through the write masks. Returns the BAR that moved, if any.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        let dw = offset / 4;
        let start = offset % 4;
        if dw >= CONFIG_DWORDS || start + data.len() > 4 || data.is_empty() {
            return None;
        }
        let mut value = 0u32;
        let mut touched = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (8 * (start + i));
            touched |= 0xff << (8 * (start + i));
        }
        let mask = self.wmask[dw] & touched;
        let old = self.regs[dw];
        self.regs[dw] = (old & !mask) | (value & mask);
        let reg = dw.checked_sub(BAR0 / 4).filter(|b| *b < BARS)?;
        // All-ones is a sizing probe, not an address; the guest writes the address back.
        if self.regs[dw] & self.wmask[dw] == self.wmask[dw] && self.wmask[dw] != 0 {
            return None;
        }
        let bar = if self.upper_half[reg] { reg - 1 } else { reg };
        if self.bar_sizes[bar] == 0 {
            return None;
        }
        let new = self.bar_address(bar);
        if new == self.bar_addrs[bar] {
            return None;
        }
        let from = std::mem::replace(&mut self.bar_addrs[bar], new);
        Some(BarMove { bar, from, to: new })
    }

    /// BAR `bar`'s address as its register(s) hold it now.
    fn bar_address(&self, bar: usize) -> u64 {
        let low = u64::from(self.regs[BAR0 / 4 + bar] & !0xf);
        if bar + 1 < BARS && self.upper_half[bar + 1] {
            low | u64::from(self.regs[BAR0 / 4 + bar + 1]) << 32
        } else {
            low
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND / 4] as u16
    }

    /// BAR `bar`'s current address and size, if it is a BAR.
    pub fn bar(&self, bar: usize) -> Option<(u64, u64)> {
        let size = *self.bar_sizes.get(bar)?;
        (size != 0).then(|| (self.bar_address(bar), size))
    }

    /// Which BAR decodes `addr` (memory decoding on), and the offset into it.
    pub fn decode(&self, addr: u64) -> Option<(usize, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        (0..BARS).find_map(|b| {
            let (base, size) = self.bar(b)?;
            let off = addr.checked_sub(base)?;
            (base != 0 && off < size).then_some((b, off))
        })
    }

    /// Direct access for the device model (capabilities it owns).
    pub fn raw_dword(&self, dw: usize) -> u32 {
        self.regs[dw]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let id = PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: [0x01, 0x00, 0x00],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        let mut c = ConfigSpace::new(id, 0);
        c.add_mem_bar(0, 0x8000, 0xc000_0000);
        c
    }

    fn rd(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(c: &mut ConfigSpace, off: usize, v: u32) -> Option<BarMove> {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = space();
        assert_eq!(rd(&c, 0), 0x1042_1af4);
        assert_eq!(rd(&c, 8), 0x0100_0001);
        wr(&mut c, 0, 0);
        wr(&mut c, 8, 0xffff_ffff);
        assert_eq!(rd(&c, 0), 0x1042_1af4);
        assert_eq!(rd(&c, 8), 0x0100_0001);
        let mut b = [0u8; 2];
        c.read(2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1042);
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut c = space();
        assert_eq!(rd(&c, 0x10), 0xc000_0000);
        // Sizing: all-ones in, size mask out, no move reported; then the address back.
        assert_eq!(wr(&mut c, 0x10, 0xffff_ffff), None);
        assert_eq!(rd(&c, 0x10), !(0x8000 - 1));
        assert_eq!(wr(&mut c, 0x10, 0xc000_0000), None, "restored after sizing");
        // A misaligned address is truncated to the BAR's alignment.
        let m = wr(&mut c, 0x10, 0xd000_1234).unwrap();
        assert_eq!((m.bar, m.from, m.to), (0, 0xc000_0000, 0xd000_0000));
        // Unimplemented BARs read zero whatever is written.
        wr(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(rd(&c, 0x14), 0);
    }

    #[test]
    fn a_64_bit_bar_sizes_and_moves_over_both_registers() {
        let mut c = space();
        c.add_mem_bar64(2, 1 << 30, 0x1_4000_0000, true);
        assert_eq!(rd(&c, 0x18), 0x4000_000c, "64-bit, prefetchable");
        assert_eq!(rd(&c, 0x1c), 1);
        assert_eq!(c.bar(2), Some((0x1_4000_0000, 1 << 30)));
        assert_eq!(c.bar(3), None, "the upper half is no BAR of its own");
        // Linux's sizing: each half in turn, all-ones then the old value back.
        assert_eq!(wr(&mut c, 0x18, 0xffff_ffff), None);
        assert_eq!(rd(&c, 0x18), 0xc000_000c);
        assert_eq!(wr(&mut c, 0x18, 0x4000_0000), None);
        assert_eq!(wr(&mut c, 0x1c, 0xffff_ffff), None);
        assert_eq!(rd(&c, 0x1c), 0xffff_ffff);
        assert_eq!(wr(&mut c, 0x1c, 1), None);
        assert_eq!(c.bar(2), Some((0x1_4000_0000, 1 << 30)));
        // A move: the upper half, then the lower one.
        let m = wr(&mut c, 0x1c, 2).unwrap();
        assert_eq!((m.bar, m.from, m.to), (2, 0x1_4000_0000, 0x2_4000_0000));
        let m = wr(&mut c, 0x18, 0x8000_0000).unwrap();
        assert_eq!((m.bar, m.from, m.to), (2, 0x2_4000_0000, 0x2_8000_0000));
        wr(&mut c, COMMAND, u32::from(COMMAND_MEMORY));
        assert_eq!(c.decode(0x2_8000_1000), Some((2, 0x1000)));
        assert_eq!(c.decode(0x2_4000_1000), None);
    }

    #[test]
    fn decoding_follows_the_command_register() {
        let mut c = space();
        assert_eq!(c.decode(0xc000_0010), None);
        wr(&mut c, COMMAND, u32::from(COMMAND_MEMORY | 0x8000));
        assert_eq!(c.command(), COMMAND_MEMORY, "only writable bits stick");
        assert_eq!(c.decode(0xc000_0010), Some((0, 0x10)));
        assert_eq!(c.decode(0xc000_8000), None);
    }

    #[test]
    fn capabilities_chain_and_keep_their_write_masks() {
        let mut c = space();
        let a = c.add_capability(0x09, &[4, 1, 2], &[]);
        let b = c.add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0, 0, 0xc0]);
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(rd(&c, 4) & STATUS_CAP_LIST, 0);
        assert_eq!(rd(&c, 0x34) & 0xff, 0x40);
        assert_eq!((rd(&c, 0x40) >> 8) & 0xff, 0x48);
        assert_eq!(rd(&c, 0x48) & 0xffff, 0x11);
        wr(&mut c, 0x48, 0xffff_ffff);
        assert_eq!(rd(&c, 0x48), 0xc000_0011);
        // Out of range accesses are harmless.
        assert_eq!(c.write(0x1000, &[1]), None);
        assert_eq!(c.write(0x3, &[1, 2]), None);
        assert_eq!(c.read_dword(0x2000), 0xffff_ffff);
    }
}
