//! 64-bit direct boot: the ELF kernel loaded with linux-loader, identity page tables, a flat
//! GDT, the boot-info page, and the vCPU registers for long mode.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use guest_abi::boot::BootInfo;

use super::layout::*;

/// Errors preparing the boot.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("opening kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("loading ELF kernel: {0}")]
    Load(linux_loader::loader::Error),
    #[error("kernel entry {0:#x} is outside RAM")]
    Entry(u64),
    #[error("writing boot structures into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    pub rip: u64,
    pub rsp: u64,
    /// First and second argument registers (the tiny kernel's boot info; Linux's zero page).
    pub rdi: u64,
    pub rsi: u64,
}

/// Loads the ELF kernel and writes page tables, GDT and boot info. `ram_end` bounds RAM.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    ram_end: u64,
    info: &BootInfo,
) -> Result<EntryPoint, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::Open {
        path: kernel.display().to_string(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_MIN_GPA)))
        .map_err(BootError::Load)?;
    let entry = loaded.kernel_load.0;
    if !(KERNEL_MIN_GPA..ram_end).contains(&entry) {
        return Err(BootError::Entry(entry));
    }
    write_page_tables(mem)?;
    write_gdt(mem)?;
    mem.write_slice(&info.encode(), GuestAddress(BOOT_INFO_GPA))
        .map_err(BootError::Write)?;
    // The stack grows down from the top of RAM; -8 gives the SysV entry alignment.
    Ok(EntryPoint {
        rip: entry,
        rsp: ram_end - 8,
        rdi: BOOT_INFO_GPA,
        rsi: 0,
    })
}

pub(crate) fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |v: u64, gpa: u64| {
        mem.write_obj(v, GuestAddress(gpa))
            .map_err(BootError::Write)
    };
    w(PDPT_GPA | PRESENT_RW, PML4_GPA)?;
    let dirs = IDENTITY_MAP_BYTES >> 30;
    for d in 0..dirs {
        w((PD_GPA + d * 0x1000) | PRESENT_RW, PDPT_GPA + 8 * d)?;
        for e in 0..512u64 {
            let addr = (d << 30) | (e << 21);
            w(addr | PRESENT_RW | HUGE, PD_GPA + d * 0x1000 + 8 * e)?;
        }
    }
    Ok(())
}

const GDT: [u64; 3] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // 0x10: data, DPL 0
];

pub(crate) fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_GPA + 8 * i as u64))
            .map_err(BootError::Write)?;
    }
    Ok(())
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode: paging on, PAE, EFER.LME/LMA, SSE usable (the kernel is ordinary x86-64 code).
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let code = segment(0x08, true);
    let data = segment(0x10, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (8 * GDT.len() - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers at entry: interrupts off, the stack set.
pub fn entry_regs(entry: EntryPoint) -> kvm_regs {
    kvm_regs {
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: 0,
        rdi: entry.rdi,
        rsi: entry.rsi,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87/SSE state as after FNINIT, with MXCSR's default (all exceptions masked).
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn page_tables_map_four_gib_one_to_one() {
        let mem = ram();
        write_page_tables(&mem).unwrap();
        let rd = |gpa: u64| mem.read_obj::<u64>(GuestAddress(gpa)).unwrap();
        assert_eq!(rd(PML4_GPA), PDPT_GPA | 3);
        for d in 0..4 {
            assert_eq!(rd(PDPT_GPA + 8 * d), (PD_GPA + 0x1000 * d) | 3);
        }
        // The virtio-mmio window (3.25 GiB) and the last 2 MiB page.
        let e = VIRTIO_MMIO_GPA >> 21;
        assert_eq!(rd(PD_GPA + 8 * e), VIRTIO_MMIO_GPA | 0x83);
        assert_eq!(rd(PD_GPA + 3 * 0x1000 + 8 * 511), 0xffe0_0000 | 0x83);
        assert!(mem.address_in_range(GuestAddress(PD_GPA + 4 * 0x1000 - 1)));
    }

    #[test]
    fn long_mode_state() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr3, PML4_GPA);
        assert_ne!(s.cr0 & (1 << 31), 0, "paging");
        assert_ne!(s.efer & (1 << 10), 0, "LMA");
        assert_eq!((s.cs.l, s.cs.selector, s.ss.selector), (1, 0x08, 0x10));
    }
}
