//! `l2-bench DEVICE QD REQUESTS|SECONDSs [op=read|write|mixed] [from-mib=N] [idle=0|1]
//! [marks=0|1]`: 4 KiB O_DIRECT random requests on a block device through io_uring, QD in
//! flight, completions by interrupt (the ring is not polled). A run makes a number of requests
//! or submits for a fixed time and then waits for those in flight; reads, writes, or both
//! alternating (the default); at random 4 KiB-aligned offsets from `from-mib` to the end.
//! The I/O phase and an idle baseline of the same length (the guest sleeps; `idle=0`: none,
//! its marks follow at once) are marked on the VMM's phase register (a byte at `0xd0000000`,
//! the Linux machine's `arch::PHASE_MMIO_GPA`: 1 I/O start, 2 I/O end, 3 idle start, 4 idle
//! end), where the VMM snapshots its counters and KVM's; `marks=0` (outside a guest of the
//! VMM, e.g. natively in the lab VM) marks nothing. Prints one line:
//! `BENCH qd=.. requests=.. seconds=.. iops=.. disk-irqs=.. op=..` (requests completed; the
//! disk's interrupts during the I/O phase, from `/proc/interrupts`: its I/O queue vectors).
//!
//! Runs as root in the lab's L2 Linux guest (the phase register is mapped from `/dev/mem`,
//! which `STRICT_DEVMEM` allows there: it is not RAM) or in the lab VM; built static
//! (`build.sh`) because the guest's initramfs has no C library.

mod args;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::time::Instant;

use args::{Amount, Args};
use io_uring::{opcode, types, IoUring};

const BLOCK: usize = 4096;

/// Interrupts the guest took for `device`'s request queues so far: exact device interrupts,
/// without the timer's.
fn disk_interrupts(device: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    args::disk_interrupts(device, &text)
}
/// The VMM's phase register (guest-physical).
const PHASE_REGISTER: libc::off_t = 0xd000_0000;
const PAGE: usize = 4096;

/// The phase register's page, mapped from `/dev/mem`.
struct PhaseRegister(*mut u8);

impl PhaseRegister {
    fn map() -> Result<Self, String> {
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")
            .map_err(|e| format!("/dev/mem: {e}"))?;
        // SAFETY: a fresh shared mapping of one page of /dev/mem at the register's address;
        // the result is checked. The mapping outlives the descriptor, which may close.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                PHASE_REGISTER,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of /dev/mem at {PHASE_REGISTER:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self(p.cast()))
    }

    /// Marks a measurement phase for the VMM (one byte written at +0: one MMIO exit).
    fn mark(&self, phase: u8) {
        // SAFETY: self.0 is the start of the mapped page; a volatile write so it happens,
        // once, in program order.
        unsafe { std::ptr::write_volatile(self.0, phase) };
    }
}

impl Drop for PhaseRegister {
    fn drop(&mut self) {
        // SAFETY: the page mapped in map(), unmapped once.
        unsafe { libc::munmap(self.0.cast(), PAGE) };
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Block(*mut u8);

impl Block {
    fn layout() -> std::alloc::Layout {
        // 4096 is a power of two and BLOCK a multiple of it: the layout is valid.
        std::alloc::Layout::from_size_align(BLOCK, BLOCK).expect("layout")
    }

    fn new(fill: u8) -> Self {
        // SAFETY: a nonzero-sized layout; the pointer is checked and freed in Drop.
        let p = unsafe { std::alloc::alloc(Self::layout()) };
        assert!(!p.is_null(), "out of memory");
        // SAFETY: p points to BLOCK writable bytes just allocated.
        unsafe { std::ptr::write_bytes(p, fill, BLOCK) };
        Self(p)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with the same layout, freed once.
        unsafe { std::alloc::dealloc(self.0, Self::layout()) };
    }
}

fn run(a: &Args) -> Result<(), String> {
    let device = a.device.as_str();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| format!("{device}: {e}"))?;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an open descriptor; the result is checked.
    let size = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    let size = u64::try_from(size).map_err(|_| "lseek failed")?;
    let first = a.from / BLOCK as u64;
    let blocks = (size / BLOCK as u64).saturating_sub(first);
    if blocks == 0 {
        return Err(format!(
            "{device}: no 4 KiB block from {} MiB",
            a.from >> 20
        ));
    }
    let qd = a.qd;
    let phases = if a.marks {
        Some(PhaseRegister::map()?)
    } else {
        None
    };
    let mark = |p: u8| {
        if let Some(r) = &phases {
            r.mark(p)
        }
    };
    let mut ring = IoUring::new(qd as u32).map_err(|e| format!("io_uring: {e}"))?;
    let buffers: Vec<Block> = (0..qd).map(|i| Block::new(i as u8)).collect();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_offset = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (first + rng % blocks) * BLOCK as u64
    };
    let (mut issued, mut done) = (0usize, 0usize);
    let more = |issued: usize, started: &Instant| match a.amount {
        Amount::Requests(n) => issued < n,
        Amount::Duration(d) => started.elapsed() < d,
    };
    let irqs_before = disk_interrupts(device);
    let started = Instant::now();
    mark(1);
    let submit = |ring: &mut IoUring, slot: usize, n: usize, offset: u64| {
        let buf = buffers[slot].0;
        let sqe = if a.op.is_write(n) {
            opcode::Write::new(types::Fd(fd), buf, BLOCK as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), buf, BLOCK as u32)
                .offset(offset)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the buffer of `slot` stays allocated and unused by anyone else until its
        // completion is reaped below.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full".to_string())
    };
    for slot in 0..qd {
        if !more(issued, &started) {
            break;
        }
        submit(&mut ring, slot, issued, next_offset())?;
        issued += 1;
    }
    while done < issued {
        ring.submit_and_wait(1)
            .map_err(|e| format!("io_uring_enter: {e}"))?;
        let finished: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in finished {
            if res != BLOCK as i32 {
                return Err(format!("request failed: {res}"));
            }
            done += 1;
            if more(issued, &started) {
                submit(&mut ring, slot, issued, next_offset())?;
                issued += 1;
            }
        }
    }
    let io = started.elapsed();
    mark(2);
    let irqs = disk_interrupts(device).saturating_sub(irqs_before);
    mark(3);
    if a.idle {
        std::thread::sleep(io);
    }
    mark(4);
    let secs = io.as_secs_f64().max(f64::MIN_POSITIVE);
    println!(
        "BENCH qd={qd} requests={done} seconds={:.3} iops={:.1} disk-irqs={irqs} op={}",
        secs,
        done as f64 / secs,
        a.op.name()
    );
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = match args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("l2-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
