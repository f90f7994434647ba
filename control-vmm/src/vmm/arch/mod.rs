//! x86-64 platform of a Linux guest: the guest-physical layout, the bzImage boot (zero page,
//! e820, command line, initramfs) and the ACPI tables (hardware-reduced, as Cloud Hypervisor
//! and Firecracker build them). The tiny guest's own contract stays in `vmm::layout`.

pub mod acpi;
pub mod bzimage;

/// The zero page (`boot_params`) handed to the kernel in `rsi`.
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// Initial stack of the boot vCPU (below the page tables at 0x9000).
pub const BOOT_STACK_GPA: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// Largest command line accepted (the kernel's own limit may be lower).
pub const CMDLINE_MAX_BYTES: usize = 2048;
/// End of conventional memory below 1 MiB (the EBDA starts here on a PC).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// ACPI tables: the RSDP where a legacy scan finds it, the other tables after it.
pub const ACPI_GPA: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// RAM above 1 MiB starts here; the kernel is loaded at its `code32_start` (1 MiB or more).
pub const HIGH_RAM_GPA: u64 = 0x10_0000;

/// The 32-bit PCI memory window (BARs are allocated from it).
pub const PCI_MMIO_GPA: u64 = 0xc000_0000;
pub const PCI_MMIO_BYTES: u64 = 0x1000_0000;
/// The 64-bit PCI memory window, above 4 GiB (64-bit BARs are allocated from it: the
/// cross-VM device's shared-memory BAR of a driver VM, up to tens of GiB). It ends at 64 GiB,
/// within the 36 physical address bits every x86-64 CPU has.
pub const PCI_MMIO64_GPA: u64 = 0x1_0000_0000;
pub const PCI_MMIO64_BYTES: u64 = 0xf_0000_0000;
/// PCI Express enhanced configuration (ECAM) for bus 0: 32 devices x 8 functions x 4 KiB.
pub const ECAM_GPA: u64 = 0xe000_0000;
pub const ECAM_BYTES: u64 = 1 << 20;
/// The phase register (a measurement aid, after the tiny guest's phase port, which a Linux
/// guest cannot reach: its kernel has no `/dev/port`): a byte written at +0 marks a
/// [`guest_abi::boot::Phase`] (`devmem 0xd0000000 8 1`), a 32-bit value written at +8 is the
/// number of requests the guest's I/O phase made. Reads return all-ones.
pub const PHASE_MMIO_GPA: u64 = 0xd000_0000;
/// Guest RAM ends below the PCI hole.
pub const RAM_LIMIT: u64 = PCI_MMIO_GPA;

/// ACPI fixed-hardware replacements (hardware-reduced ACPI): the sleep control register
/// (SLP_TYP << 2 | SLP_EN), the sleep status register, and the reset register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
pub const RESET_PORT: u16 = 0x602;
/// Value the guest writes to [`RESET_PORT`] to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 (soft off), as the DSDT's `_S5_` package says.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The Generic Event Device's interrupt (I/O APIC pin): raised for the power button.
pub const GED_IRQ: u32 = 6;
/// The Generic Event Device's second interrupt: raised when PCI slots changed (hotplug).
pub const PCI_HOTPLUG_IRQ: u32 = 7;
/// The PCI hotplug registers (ACPI, as `acpiphp` drives them): slots with a device to check
/// (`PCIU`, read clears), slots whose device the VMM asks the guest to eject (`PCID`, read
/// clears), and `B0EJ`, where the guest's `_EJ0` writes the slots it has let go of.
pub const PCI_HOTPLUG_PORT: u16 = 0x610;
pub const PCI_HOTPLUG_BYTES: u16 = 12;
/// The 16550 UART's I/O APIC pin (COM1).
pub const COM1_IRQ: u32 = 4;
/// COM2, the driver VM's tunnel to dom0 (`vmm::driver_vm`), and its I/O APIC pin.
pub const COM2_PORT: u16 = 0x2f8;
pub const COM2_IRQ: u32 = 3;
/// First I/O APIC pin used for PCI INTx routing in `_PRT` (pins 16..23).
pub const PCI_INTX_GSI_BASE: u32 = 16;
