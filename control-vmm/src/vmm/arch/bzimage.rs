//! Direct boot of a Linux bzImage (the 64-bit boot protocol): linux-loader loads the protected
//! mode kernel at its `code32_start`; the VMM fills the zero page (setup header, command line,
//! initramfs, e820 map, RSDP address), writes identity page tables and a flat GDT, and starts
//! the boot vCPU in long mode at `startup_64` (load address + 0x200) with `rsi` = zero page.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::vmm::boot::{write_gdt, write_page_tables, EntryPoint};

/// Errors preparing a Linux boot.
#[derive(Debug, Error)]
pub enum BzImageError {
    #[error("opening {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("loading the bzImage: {0}")]
    Load(linux_loader::loader::Error),
    #[error("the kernel command line: {0}")]
    Cmdline(String),
    #[error("the initramfs ({size} bytes) does not fit in RAM above the kernel")]
    InitrdTooBig { size: u64 },
    #[error("writing the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error("writing boot structures into guest memory: {0}")]
    Write(String),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// A bzImage.
    pub kernel: PathBuf,
    /// An initramfs (cpio, compressed or not), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `startup_64` is 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

fn open(what: &'static str, path: &Path) -> Result<File, BzImageError> {
    File::open(path).map_err(|source| BzImageError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// The e820 map: low RAM, RAM above 1 MiB, and the ECAM window reserved (Linux ignores an
/// MCFG region that is not reserved).
pub fn e820_map(ram_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    vec![
        entry(0, LOW_RAM_END, E820_RAM),
        entry(HIGH_RAM_GPA, ram_bytes - HIGH_RAM_GPA, E820_RAM),
        entry(ECAM_GPA, ECAM_BYTES, E820_RESERVED),
    ]
}

/// Loads kernel, command line and initramfs into `mem` (RAM of `ram_bytes` at GPA 0) and
/// writes the zero page pointing at the RSDP at `rsdp_gpa`. Returns where the boot vCPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    boot: &LinuxBoot,
    rsdp_gpa: u64,
) -> Result<EntryPoint, BzImageError> {
    let write_err = |e: vm_memory::GuestMemoryError| BzImageError::Write(e.to_string());
    let mut kernel = open("kernel", &boot.kernel)?;
    let loaded = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_RAM_GPA)))
        .map_err(BzImageError::Load)?;
    let Some(mut hdr) = loaded.setup_header else {
        return Err(BzImageError::Write(
            "the bzImage loader gave no setup header".into(),
        ));
    };

    let limit = match hdr.cmdline_size as usize {
        0 => CMDLINE_MAX_BYTES,
        n => n.min(CMDLINE_MAX_BYTES),
    };
    let cmdline = Cmdline::try_from(&boot.cmdline, limit)
        .map_err(|e| BzImageError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_GPA), &cmdline)
        .map_err(|e| BzImageError::Cmdline(e.to_string()))?;

    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    hdr.cmdline_size = boot.cmdline.len() as u32;
    if let Some(path) = &boot.initrd {
        let data = std::fs::read(path).map_err(|source| BzImageError::Open {
            what: "initramfs",
            path: path.display().to_string(),
            source,
        })?;
        let size = data.len() as u64;
        // As high as the kernel allows, page-aligned, above the loaded kernel.
        let top = ram_bytes.min(u64::from(hdr.initrd_addr_max) + 1);
        let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;
        let at = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end)
            .ok_or(BzImageError::InitrdTooBig { size })?;
        mem.write_slice(&data, GuestAddress(at))
            .map_err(write_err)?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp_gpa,
        ..Default::default()
    };
    let map = e820_map(ram_bytes);
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_GPA)),
        mem,
    )
    .map_err(BzImageError::ZeroPage)?;

    write_page_tables(mem).map_err(|e| BzImageError::Write(e.to_string()))?;
    write_gdt(mem).map_err(|e| BzImageError::Write(e.to_string()))?;
    Ok(EntryPoint {
        rip: loaded.kernel_load.0 + STARTUP_64_OFFSET,
        rsp: BOOT_STACK_GPA,
        rdi: 0,
        rsi: ZERO_PAGE_GPA,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_keeps_the_hole_below_1m_and_reserves_ecam() {
        let map: Vec<(u64, u64, u32)> = e820_map(256 << 20)
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            map,
            [
                (0, LOW_RAM_END, 1),
                (HIGH_RAM_GPA, (256 << 20) - HIGH_RAM_GPA, 1),
                (ECAM_GPA, ECAM_BYTES, 2)
            ]
        );
        const { assert!(ACPI_GPA >= LOW_RAM_END && ACPI_END <= HIGH_RAM_GPA) };
    }

    #[test]
    fn a_file_that_is_not_a_bzimage_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 8192]).unwrap();
        let boot = LinuxBoot {
            kernel: f.path().into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        assert!(matches!(
            load(&mem, 4 << 20, &boot, ACPI_GPA),
            Err(BzImageError::Load(_))
        ));
    }
}
