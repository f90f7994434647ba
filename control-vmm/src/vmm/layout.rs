//! The guest-physical layout of a splitvmm tiny VM (documented in docs/vmm.md). What the guest
//! kernel must agree on (the boot-info page, its ports and modes) comes from `guest-abi`.

pub use guest_abi::boot::{
    GuestMode, BOOT_INFO_GPA, GUEST_REPORT_OFFSET, GUEST_REPORT_SLOTS, PHASE_PORT, POWEROFF_PORT,
    RING_EVENT_IDX, RING_POLL,
};

/// GDT (null, 64-bit code 0x08, data 0x10).
pub const GDT_GPA: u64 = 0x500;
/// Page tables: PML4, PDPT and four page directories (2 MiB pages) mapping 0..4 GiB 1:1.
pub const PML4_GPA: u64 = 0x9000;
pub const PDPT_GPA: u64 = 0xa000;
pub const PD_GPA: u64 = 0xb000;
/// Lowest address an ELF segment may be loaded at.
pub const KERNEL_MIN_GPA: u64 = 0x10_0000;
/// Identity-mapped span.
pub const IDENTITY_MAP_BYTES: u64 = 4 << 30;

/// The I/O window: the only guest memory shared with the driver domain by default.
pub const WINDOW_GPA: u64 = 0x4000_0000;
/// Default I/O window size.
pub const WINDOW_DEFAULT_BYTES: u64 = 1 << 20;

/// The virtio-mmio device and its I/O APIC pin.
pub const VIRTIO_MMIO_GPA: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_BYTES: u64 = 0x1000;
pub const VIRTIO_MMIO_IRQ: u32 = 5;
/// I/O APIC pin of the idle-baseline wake-up interrupt.
pub const WAKE_IRQ: u32 = 6;

/// COM1 (8250 UART) and its I/O APIC pin.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// In-kernel devices: the guest reaches them without exits to the VMM.
pub const IOAPIC_GPA: u64 = 0xfec0_0000;
pub const LAPIC_GPA: u64 = 0xfee0_0000;
