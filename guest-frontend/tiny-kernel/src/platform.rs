//! The machine as the splitvmm VMM presents it: port I/O, the COM1 console, the poweroff and
//! phase-marker ports, and the boot-info page. The layout is documented in docs/vmm.md and
//! mirrored by control-vmm/src/vmm/layout.rs.

use core::arch::asm;

/// COM1 transmit register.
const COM1: u16 = 0x3f8;
/// Writing a byte here powers the machine off with that byte as the exit status.
const POWEROFF_PORT: u16 = 0xf4;
/// Writing a phase number here lets the VMM snapshot its exit counters.
const PHASE_PORT: u16 = 0xf5;

/// Exit status: all checks passed.
pub const STATUS_OK: u8 = 0;
/// Exit status: the disk check failed.
pub const STATUS_DISK_FAILED: u8 = 1;
/// Exit status: the bad-input checks saw something a device must not do.
pub const STATUS_BAD_INPUT_FAILED: u8 = 2;
/// Exit status: the boot info is missing or unknown.
pub const STATUS_NO_BOOT_INFO: u8 = 4;
/// Exit status: a Rust panic.
pub const STATUS_PANIC: u8 = 0x7f;

/// Phase markers.
pub const PHASE_IO_START: u8 = 1;
pub const PHASE_IO_END: u8 = 2;
pub const PHASE_IDLE_START: u8 = 3;
pub const PHASE_IDLE_END: u8 = 4;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects on this machine; the VMM or KVM handles it.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, preserves_flags)) }
    v
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) }
    v
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Reads a 32-bit MMIO register.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: every address this kernel touches is identity-mapped (the VMM maps 0..4 GiB);
    // device registers are emulated by the VMM, unknown ones read as all-ones.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Prints on the COM1 console (the emulated 8250 accepts a byte whenever written).
pub fn print(s: &str) {
    for b in s.bytes() {
        outb(COM1, b);
    }
}

/// Prints `v` in decimal.
pub fn print_u64(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        outb(COM1, b);
    }
}

pub fn phase(p: u8) {
    outb(PHASE_PORT, p);
}

pub fn poweroff(status: u8) -> ! {
    loop {
        outb(POWEROFF_PORT, status);
        // SAFETY: halting with interrupts off only stops this CPU; the VMM already left.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// The boot information the VMM writes at [`BOOT_INFO_GPA`].
pub const BOOT_INFO_GPA: u64 = 0x7000;
const BOOT_INFO_MAGIC: u64 = 0x4f46_4e49_4d4d_5653; // "SVMMINFO"

pub const MODE_HELLO: u32 = 0;
pub const MODE_DISK: u32 = 1;
pub const MODE_TRIPLE_FAULT: u32 = 2;
pub const MODE_BAD_INPUT: u32 = 3;
pub const MODE_HALT: u32 = 4;

pub const RING_EVENT_IDX: u32 = 1;
pub const RING_POLL: u32 = 2;

#[derive(Clone, Copy)]
pub struct BootInfo {
    pub mode: u32,
    pub mmio_base: u64,
    pub mmio_irq: u32,
    pub ring_flags: u32,
    pub window_gpa: u64,
    pub window_len: u64,
    pub requests: u32,
    pub batch: u32,
    pub wake_irq: u32,
    pub seed: u64,
    pub verify_only: bool,
    pub sectors_per_request: u32,
    pub check_sectors: u32,
}

fn rd64(off: u64) -> u64 {
    // SAFETY: the boot-info page is ordinary identity-mapped RAM written by the VMM.
    unsafe { core::ptr::read_volatile((BOOT_INFO_GPA + off) as *const u64) }
}

fn rd32(off: u64) -> u32 {
    // SAFETY: as for `rd64`.
    unsafe { core::ptr::read_volatile((BOOT_INFO_GPA + off) as *const u32) }
}

impl BootInfo {
    pub fn read() -> Option<Self> {
        if rd64(0) != BOOT_INFO_MAGIC || rd32(8) != 1 {
            return None;
        }
        Some(Self {
            mode: rd32(0x0c),
            mmio_base: rd64(0x10),
            mmio_irq: rd32(0x18),
            ring_flags: rd32(0x1c),
            window_gpa: rd64(0x20),
            window_len: rd64(0x28),
            requests: rd32(0x30),
            batch: rd32(0x34),
            wake_irq: rd32(0x38),
            seed: rd64(0x40),
            verify_only: rd32(0x48) != 0,
            sectors_per_request: rd32(0x4c),
            check_sectors: rd32(0x50),
        })
    }
}

/// Guest-side counters the VMM reads back after poweroff (boot-info page + 0x100).
pub fn report(index: u64, value: u64) {
    // SAFETY: the result slots lie in the boot-info page, plain RAM reserved for this.
    unsafe { core::ptr::write_volatile((BOOT_INFO_GPA + 0x100 + 8 * index) as *mut u64, value) }
}
