//! The guest-physical layout of a splitvmm tiny VM, and the contract with the guest kernel
//! (mirrored by `guest-frontend/tiny-kernel/src/platform.rs`; documented in docs/vmm.md).

/// GDT (null, 64-bit code 0x08, data 0x10).
pub const GDT_GPA: u64 = 0x500;
/// Boot information page the VMM fills in (see [`BootInfo`](super::boot::BootInfo)).
pub const BOOT_INFO_GPA: u64 = 0x7000;
/// Offset, within the boot-info page, of the counters the guest reports back.
pub const GUEST_REPORT_OFFSET: u64 = 0x100;
/// Number of guest-reported counters.
pub const GUEST_REPORT_SLOTS: usize = 7;
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

/// A byte written here powers the guest off with that byte as its status.
pub const POWEROFF_PORT: u16 = 0xf4;
/// A byte written here marks a measurement phase (see [`Phase`](super::exits::Phase)).
pub const PHASE_PORT: u16 = 0xf5;

/// In-kernel devices: the guest reaches them without exits to the VMM.
pub const IOAPIC_GPA: u64 = 0xfec0_0000;
pub const LAPIC_GPA: u64 = 0xfee0_0000;

/// Boot-info modes: what the tiny kernel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GuestMode {
    /// Say hello and power off.
    Hello = 0,
    /// Write and verify a pattern on the virtio-blk disk.
    Disk = 1,
    /// Triple-fault on purpose.
    TripleFault = 2,
    /// Garbage to ports, MMIO and the virtio registers; then the disk check.
    BadInput = 3,
    /// Sleep forever with interrupts enabled (for stop-from-outside tests).
    Halt = 4,
}

/// Boot-info ring flag: negotiate VIRTIO_RING_F_EVENT_IDX.
pub const RING_EVENT_IDX: u32 = 1;
/// Boot-info ring flag: busy-poll the used ring, interrupts off.
pub const RING_POLL: u32 = 2;
