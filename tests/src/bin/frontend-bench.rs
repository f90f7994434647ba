//! Process-domain block frontend against qemu-storage-daemon: 4 KiB random-read IOPS at QD1 and
//! QD32, interrupt vs polling completion, each as a ratio to an eventfd ping-pong measured in
//! the same run (the floor of one kick + one call between two threads).
//!
//! `cargo run --release -p splitvmm-tests --bin frontend-bench [-- SECONDS]`

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use guest_frontend::process::{BlockFrontend, BlockFrontendConfig, BlockOp, FrontendStats};
use splitvmm_tests::backends::BlkBackendProcess;
use splitvmm_tests::XorShift;
use vmm_sys_util::eventfd::EventFd;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn wait_readable(fd: &EventFd) -> Res<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, 5000) } != 1 {
        return Err("eventfd ping-pong stalled".into());
    }
    fd.read()?;
    Ok(())
}

/// Round trips per second of "write eventfd A; peer wakes, writes eventfd B; wake".
fn eventfd_pingpong(seconds: f64) -> Res<f64> {
    let flags = libc::EFD_NONBLOCK | libc::EFD_CLOEXEC;
    let (ping, pong) = (EventFd::new(flags)?, EventFd::new(flags)?);
    let (ping2, pong2) = (ping.try_clone()?, pong.try_clone()?);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let peer = std::thread::spawn(move || -> Result<(), String> {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            wait_readable(&ping2).map_err(|e| e.to_string())?;
            pong2.write(1).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        ping.write(1)?;
        wait_readable(&pong)?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ping.write(1)?;
    peer.join().map_err(|_| "peer panicked")??;
    Ok(rate)
}

struct Run {
    iops: f64,
    stats: FrontendStats,
}

fn random_reads(sock: &Path, qd: usize, poll: bool, seconds: f64) -> Res<Run> {
    let cfg = BlockFrontendConfig {
        queue_size: 128,
        poll,
        event_idx: true,
        max_request_bytes: 4096,
        window_size: 1 << 20,
        ..BlockFrontendConfig::default()
    };
    let fe = BlockFrontend::connect_path(sock, cfg)?;
    let sectors = fe.capacity() / 8;
    let mut q = fe.queue(0)?;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut next_sector = || rng.below(sectors) * 8;
    let mut done = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        while q.in_flight() < qd {
            q.submit(BlockOp::Read {
                sector: next_sector(),
                len: 4096,
            })?;
        }
        let mut failed = false;
        done += q.complete(|c| failed |= c.result.is_err())? as u64;
        if failed {
            return Err("a read failed".into());
        }
    }
    let iops = done as f64 / start.elapsed().as_secs_f64();
    q.drain()?;
    let stats = q.stats();
    drop(q);
    fe.shutdown()?;
    Ok(Run { iops, stats })
}

fn main() -> Res<()> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2.0);
    let qsd = test_support::peers::qemu_storage_daemon()?;
    let dir = tempfile::tempdir()?;
    let backend = BlkBackendProcess::qemu_storage_daemon(&qsd, dir.path(), 256 << 20, 1);
    let sock = &backend.socket;
    let floor = eventfd_pingpong(seconds)?;
    println!("eventfd ping-pong floor: {floor:.0} round trips/s");
    println!(
        "{:<28} {:>10} {:>8} {:>10} {:>10} {:>9}",
        "4 KiB random reads", "IOPS", "/floor", "kicks/req", "supp/req", "irq/req"
    );
    for (qd, poll) in [(1, false), (1, true), (32, false), (32, true)] {
        let r = random_reads(sock, qd, poll, seconds)?;
        let req = r.stats.requests.max(1) as f64;
        let mode = if poll { "polling" } else { "interrupt" };
        println!(
            "{:<28} {:>10.0} {:>8.2} {:>10.3} {:>10.3} {:>9.3}",
            format!("QD{qd} {mode}"),
            r.iops,
            r.iops / floor,
            r.stats.kicks_sent as f64 / req,
            r.stats.kicks_suppressed as f64 / req,
            r.stats.interrupts as f64 / req,
        );
    }
    Ok(())
}
