//! `l2-bench DEVICE QD REQUESTS`: 4 KiB O_DIRECT random reads and writes (half each) on a
//! block device through io_uring, QD requests in flight, with completions by interrupt (the
//! ring is not polled). The I/O phase and an idle baseline of the same length (the guest
//! sleeps) are marked on the VMM's phase port (0xf5: 1 I/O start, 2 I/O end, 3 idle start,
//! 4 idle end), where the VMM snapshots its counters and KVM's. Prints one line:
//! `BENCH qd=.. requests=.. seconds=.. iops=.. disk-irqs=..` (the disk's interrupts during the
//! I/O phase, from `/proc/interrupts`).
//!
//! Runs as root in the lab's L2 Linux guest (the phase port needs ioperm); built static
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
const PHASE_PORT: u16 = 0xf5;

/// Marks a measurement phase for the VMM.
fn mark(phase: u8) {
    // SAFETY: `out` to the phase port, which main made accessible with ioperm; the VMM
    // decodes it and nothing else listens there.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") PHASE_PORT, in("al") phase, options(nomem, nostack));
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
    // SAFETY: ioperm on one port for this process; the result is checked.
    if unsafe { libc::ioperm(u64::from(PHASE_PORT), 1, 1) } != 0 {
        return Err(format!("ioperm: {}", std::io::Error::last_os_error()));
    }
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
    mark(1);
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
    mark(2);
    let irqs = disk_interrupts().saturating_sub(irqs_before);
    mark(3);
    std::thread::sleep(io);
    mark(4);
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
