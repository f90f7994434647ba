//! Process-domain block frontend against qemu-storage-daemon: 4 KiB random-read IOPS at QD1 and
//! QD32, interrupt vs polling completion, each as a ratio to an eventfd ping-pong measured in
//! the same run (the floor of one kick + one call between two threads).
//!
//! `cargo run --release -p splitvmm-guest-frontend --example frontend-bench [-- SECONDS]`

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest_frontend::process::{BlockFrontend, BlockFrontendConfig, BlockOp, FrontendStats};
use vmm_sys_util::eventfd::EventFd;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Qsd(Child);
impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_qsd(dir: &Path, image_bytes: u64) -> Res<(Qsd, std::path::PathBuf)> {
    let image = dir.join("bench.img");
    let sock = dir.join("bench.sock");
    std::fs::File::create(&image)?.set_len(image_bytes)?;
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let qsd = Qsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err("qemu-storage-daemon socket never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((qsd, sock))
}

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
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_sector = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % sectors) * 8
    };
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
    let dir = tempfile::tempdir()?;
    let (_qsd, sock) = spawn_qsd(dir.path(), 256 << 20)?;
    let floor = eventfd_pingpong(seconds)?;
    println!("eventfd ping-pong floor: {floor:.0} round trips/s");
    println!(
        "{:<28} {:>10} {:>8} {:>10} {:>10} {:>9}",
        "4 KiB random reads", "IOPS", "/floor", "kicks/req", "supp/req", "irq/req"
    );
    for (qd, poll) in [(1, false), (1, true), (32, false), (32, true)] {
        let r = random_reads(&sock, qd, poll, seconds)?;
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
