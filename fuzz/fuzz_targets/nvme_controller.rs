//! Fuzz the emulated NVMe controller as a hostile guest drives it: the input is a list of
//! 8-byte operations, each a register write, a doorbell write or a write of guest memory
//! (where the queues and PRP lists live), with an optional well-formed enable to get past
//! CC.EN. Commands come from what the input wrote into the admin submission queue. Nothing
//! may panic, whatever the guest writes.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

use control_vmm::vmm::devices::nvme::{Namespace, NvmeController};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 * 1024;

/// One backing file per fuzzing process (64 KiB, writable), unlinked at once: each run
/// gets a duplicate of the descriptor (the controller uses pread/pwrite only).
fn image() -> &'static std::fs::File {
    static FILE: OnceLock<std::fs::File> = OnceLock::new();
    FILE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("splitvmm-nvme-fuzz-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(64 * 1024).unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let file = image().try_clone().unwrap();
    let ns = Namespace::new(file, true).unwrap();
    let irqs = (0..9)
        .map(|_| Arc::new(EventFd::new(libc_nonblock()).unwrap()))
        .collect();
    let mut c = NvmeController::new(mem.clone(), ns, irqs);
    for op in data.chunks_exact(8) {
        let v = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        let at = u16::from_le_bytes([op[2], op[3]]);
        match op[0] % 4 {
            0 => c.mmio_write(u64::from(op[1] & 0x3f) & !3, &v.to_le_bytes()),
            1 => c.mmio_write(
                0x1000 + (u64::from(at) * 4) % 0x1000,
                &(v % 64).to_le_bytes(),
            ),
            2 => {
                let _ = mem.write_obj(v, GuestAddress((u64::from(at) * 4) % MEM as u64));
            }
            _ => {
                c.mmio_write(0x24, &0x000f_000fu32.to_le_bytes());
                c.mmio_write(0x28, &0u64.to_le_bytes());
                c.mmio_write(0x30, &0x1000u64.to_le_bytes());
                c.mmio_write(0x14, &0x0046_0001u32.to_le_bytes());
            }
        }
        let mut b = [0u8; 4];
        c.mmio_read(u64::from(op[1] & 0x3f) & !3, &mut b);
    }
});

/// EFD_NONBLOCK without a libc dependency of this crate.
fn libc_nonblock() -> i32 {
    0o4000
}
