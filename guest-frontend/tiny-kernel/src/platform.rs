//! The machine as the splitvmm VMM presents it: port I/O, the COM1 console, the poweroff and
//! phase-marker ports, and the boot-info page. What the VMM and this kernel agree on comes
//! from `guest-abi`; the layout is documented in docs/vmm.md.

use core::arch::asm;

/// COM1 transmit register.
const COM1: u16 = 0x3f8;
pub use guest_abi::boot::{BootInfo, GuestMode, Phase, RING_EVENT_IDX, RING_POLL};
use guest_abi::boot::{
    BOOT_INFO_BYTES, BOOT_INFO_GPA, GUEST_REPORT_OFFSET, GUEST_REPORT_SLOTS, PHASE_PORT,
    POWEROFF_PORT,
};

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

pub fn phase(p: Phase) {
    outb(PHASE_PORT, p as u8);
}

pub fn poweroff(status: u8) -> ! {
    loop {
        outb(POWEROFF_PORT, status);
        // SAFETY: halting with interrupts off only stops this CPU; the VMM already left.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Reads the boot information the VMM wrote at `BOOT_INFO_GPA`; None if there is none.
pub fn read_boot_info() -> Option<BootInfo> {
    let mut page = [0u8; BOOT_INFO_BYTES];
    for (i, b) in page.iter_mut().enumerate() {
        // SAFETY: the boot-info page is ordinary identity-mapped RAM written by the VMM.
        *b = unsafe { core::ptr::read_volatile((BOOT_INFO_GPA as usize + i) as *const u8) };
    }
    BootInfo::decode(&page)
}

/// Guest-side counters the VMM reads back after poweroff; an index beyond the slots is
/// ignored.
pub fn report(index: usize, value: u64) {
    if index >= GUEST_REPORT_SLOTS {
        return;
    }
    let addr = BOOT_INFO_GPA + GUEST_REPORT_OFFSET + 8 * index as u64;
    // SAFETY: the result slots lie in the boot-info page, plain RAM reserved for this.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}
