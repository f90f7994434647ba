//! Interrupts: an IDT with two device vectors, the local APIC, the I/O APIC and an idle wait.
//!
//! Interrupts are enabled only inside [`wait_for_interrupt`]'s `sti; hlt` pair, so a handler
//! never runs on top of precompiled `core` code (which may use the red zone).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::platform::{mmio_read32, mmio_write32, outb};

/// Vector of the virtio device interrupt.
pub const VECTOR_DEVICE: u8 = 0x30;
/// Vector of the VMM's idle-baseline wake-up interrupt.
pub const VECTOR_WAKE: u8 = 0x31;
const VECTOR_SPURIOUS: u8 = 0xff;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
const LAPIC_TPR: u64 = LAPIC + 0x80;
const IOAPIC: u64 = 0xfec0_0000;
const CODE_SELECTOR: u16 = 0x08;

/// Interrupts taken per vector (written by the handlers).
#[no_mangle]
pub static DEVICE_IRQS: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
pub static WAKE_IRQS: AtomicU64 = AtomicU64::new(0);

// The handlers: count, end of interrupt at the local APIC, return.
global_asm!(
    ".global isr_device",
    "isr_device:",
    "push rax",
    "lock inc qword ptr [rip + DEVICE_IRQS]",
    "mov rax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".global isr_wake",
    "isr_wake:",
    "push rax",
    "lock inc qword ptr [rip + WAKE_IRQS]",
    "mov rax, 0xfee000b0",
    "mov dword ptr [rax], 0",
    "pop rax",
    "iretq",
    ".global isr_spurious",
    "isr_spurious:",
    "iretq",
);

extern "C" {
    fn isr_device();
    fn isr_wake();
    fn isr_spurious();
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

fn set_gate(vector: u8, handler: unsafe extern "C" fn()) {
    let h = handler as usize as u64;
    let low = (h & 0xffff)
        | (u64::from(CODE_SELECTOR) << 16)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | ((h >> 16) & 0xffff) << 48;
    let high = h >> 32;
    // SAFETY: single CPU, interrupts are off while the IDT is written.
    unsafe {
        let idt = &raw mut IDT;
        (*idt).0[2 * vector as usize] = low;
        (*idt).0[2 * vector as usize + 1] = high;
    }
}

fn ioapic_write(reg: u32, value: u32) {
    mmio_write32(IOAPIC, reg);
    mmio_write32(IOAPIC + 0x10, value);
}

/// Routes I/O APIC pin `pin` to `vector` on CPU 0 (edge-triggered, active high).
pub fn route_pin(pin: u32, vector: u8) {
    ioapic_write(0x10 + 2 * pin, u32::from(vector));
    ioapic_write(0x11 + 2 * pin, 0);
}

/// Loads the IDT, masks the legacy PICs and enables the local APIC.
pub fn init() {
    set_gate(VECTOR_DEVICE, isr_device);
    set_gate(VECTOR_WAKE, isr_wake);
    set_gate(VECTOR_SPURIOUS, isr_spurious);
    let mut desc = [0u8; 10];
    desc[0..2].copy_from_slice(&(16u16 * 256 - 1).to_le_bytes());
    desc[2..10].copy_from_slice(&((&raw const IDT) as usize as u64).to_le_bytes());
    // SAFETY: the descriptor points at a static IDT whose gates are valid or not present.
    unsafe { asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack, readonly)) };
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write32(LAPIC_TPR, 0);
    let svr = mmio_read32(LAPIC_SVR);
    mmio_write32(LAPIC_SVR, svr | 0x100 | u32::from(VECTOR_SPURIOUS));
}

/// Sleeps until any interrupt arrives (interrupts are enabled only for the `hlt`).
pub fn wait_for_interrupt() {
    // SAFETY: `sti; hlt` is atomic with respect to interrupts (the STI shadow), so a pending
    // interrupt wakes the `hlt`; the handlers preserve every register they touch.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
}

pub fn device_irqs() -> u64 {
    DEVICE_IRQS.load(Ordering::SeqCst)
}

pub fn wake_irqs() -> u64 {
    WAKE_IRQS.load(Ordering::SeqCst)
}

/// Breaks the machine on purpose: an empty IDT and an invalid opcode make a triple fault.
pub fn triple_fault() -> ! {
    let desc = [0u8; 10];
    // SAFETY: deliberately loading an empty IDT; the next exception escalates to a shutdown,
    // which is the point (the VMM must report it as a reset).
    unsafe { asm!("lidt [{}]", "ud2", in(reg) desc.as_ptr(), options(nostack)) };
    loop {
        core::hint::spin_loop();
    }
}
