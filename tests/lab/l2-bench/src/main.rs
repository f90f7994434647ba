//! `l2-bench DEVICE QD REQUESTS`: 4 KiB O_DIRECT random reads and writes (half each) on a
//! block device through io_uring, QD requests in flight, with completions by interrupt (the
//! ring is not polled). The I/O phase and an idle baseline of the same length (the guest
//! sleeps) are marked on the VMM's phase register (a byte at `0xd0000000`, the Linux machine's
//! `arch::PHASE_MMIO_GPA`: 1 I/O start, 2 I/O end, 3 idle start, 4 idle end), where the VMM
//! snapshots its counters and KVM's. Prints one line:
//! `BENCH qd=.. requests=.. seconds=.. iops=.. disk-irqs=..` (the disk's interrupts during the
//! I/O phase, from `/proc/interrupts`).
//!
//! Runs as root in the lab's L2 Linux guest (the phase register is mapped from `/dev/mem`,
//! which `STRICT_DEVMEM` allows there: it is not RAM); built static
//! (`build.sh`) because the guest's initramfs has no C library.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};

const BLOCK: usize = 4096;

/// Interrupts the guest took for the disk's request queues so far (`/proc/interrupts` lines
/// naming `virtio<N>-req`): exact device interrupts, without the timer's.
fn disk_interrupts() -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("-req."))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
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

fn run(device: &str, qd: usize, requests: usize) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| format!("{device}: {e}"))?;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an open descriptor; the result is checked.
    let size = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    let blocks = u64::try_from(size).map_err(|_| "lseek failed")? / BLOCK as u64;
    if blocks == 0 || qd == 0 || qd > 256 {
        return Err(format!("{blocks} blocks, queue depth {qd}"));
    }
    let phases = PhaseRegister::map()?;
    let mut ring = IoUring::new(qd as u32).map_err(|e| format!("io_uring: {e}"))?;
    let buffers: Vec<Block> = (0..qd).map(|i| Block::new(i as u8)).collect();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_offset = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * BLOCK as u64
    };
    let (mut issued, mut done) = (0usize, 0usize);
    let irqs_before = disk_interrupts();
    let started = Instant::now();
    phases.mark(1);
    let submit = |ring: &mut IoUring, slot: usize, n: usize, offset: u64| {
        let buf = buffers[slot].0;
        let sqe = if n.is_multiple_of(2) {
            opcode::Read::new(types::Fd(fd), buf, BLOCK as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Write::new(types::Fd(fd), buf, BLOCK as u32)
                .offset(offset)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the buffer of `slot` stays allocated and unused by anyone else until its
        // completion is reaped below.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full".to_string())
    };
    for slot in 0..qd.min(requests) {
        submit(&mut ring, slot, issued, next_offset())?;
        issued += 1;
    }
    while done < requests {
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
            if issued < requests {
                submit(&mut ring, slot, issued, next_offset())?;
                issued += 1;
            }
        }
    }
    let io = started.elapsed();
    phases.mark(2);
    let irqs = disk_interrupts().saturating_sub(irqs_before);
    phases.mark(3);
    std::thread::sleep(io);
    phases.mark(4);
    let secs = io.as_secs_f64().max(f64::MIN_POSITIVE);
    println!(
        "BENCH qd={qd} requests={requests} seconds={:.3} iops={:.1} disk-irqs={irqs}",
        secs,
        requests as f64 / secs
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, dev, qd, n] => qd
            .parse()
            .ok()
            .zip(n.parse().ok())
            .map(|(q, n)| (dev, q, n)),
        _ => None,
    };
    let Some((device, qd, requests)) = parsed else {
        eprintln!("usage: l2-bench DEVICE QUEUE-DEPTH REQUESTS");
        return ExitCode::from(2);
    };
    match run(device, qd, requests) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
