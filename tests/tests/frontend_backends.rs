//! The process-domain block frontend against two vhost-user-blk backends: one nobody here
//! wrote (qemu-storage-daemon) and splitvmm's own driver domain (`driver-domain serve`).
//! Every test runs against both (`qsd::*` and `dd::*`); each spawns its own backend on a fresh
//! image in a temp dir (see [`backend`]).

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use guest_frontend::process::{
    BlockFrontend, BlockFrontendConfig, BlockOp, ProcessFrontendError, WINDOW_SEALS,
};
use guest_frontend::virtio::{BlkOp, FrontRequestError};
use splitvmm_tests::XorShift;

mod backend {
    use splitvmm_tests::backends::BlkBackendProcess;

    /// A backend on an image in its own temp dir.
    pub struct Backend {
        served: BlkBackendProcess,
        _dir: tempfile::TempDir,
    }

    impl std::ops::Deref for Backend {
        type Target = BlkBackendProcess;
        fn deref(&self) -> &BlkBackendProcess {
            &self.served
        }
    }

    /// Which backend a test runs against.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        Qsd,
        DriverDomain,
    }

    /// Starts the backend `kind` exporting a zero-filled image of `image_bytes` with `queues`
    /// queues. Returns None (after recording the skip of the running test) if it is not
    /// installed (`SPLITVMM_QSD` names another daemon, or a missing one to check the skip).
    pub fn spawn(kind: Kind, image_bytes: u64, queues: u16) -> Option<Backend> {
        let dir = tempfile::tempdir().expect("tempdir");
        let served = match kind {
            Kind::DriverDomain => BlkBackendProcess::driver_domain(
                dir.path(),
                image_bytes,
                &["--queues", &queues.to_string()],
            ),
            Kind::Qsd => {
                let qsd = test_support::require_value(
                    &test_support::test_name(),
                    test_support::peers::qemu_storage_daemon(),
                )?;
                BlkBackendProcess::qemu_storage_daemon(&qsd, dir.path(), image_bytes, queues)
            }
        };
        Some(Backend { served, _dir: dir })
    }
}

use backend::Kind;

const MIB: u64 = 1 << 20;

fn config(event_idx: bool, poll: bool) -> BlockFrontendConfig {
    BlockFrontendConfig {
        event_idx,
        poll,
        timeout: Duration::from_secs(3),
        ..BlockFrontendConfig::default()
    }
}

/// Deterministic, position-dependent test data: every 512-byte sector differs.
fn pattern(seed: u64, sector: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let s = sector + (i / 512) as u64;
            (seed
                .wrapping_mul(31)
                .wrapping_add(s.wrapping_mul(131))
                .wrapping_add((i % 512) as u64 * 7)
                % 251) as u8
        })
        .collect()
}

fn read_image(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

fn write_read_flush_and_host_view(kind: Kind) {
    let Some(be) = backend::spawn(kind, 8 * MIB, 1) else {
        return;
    };
    let fe = BlockFrontend::connect_path(&be.socket, config(true, false)).unwrap();
    assert_eq!(fe.capacity(), 8 * MIB / 512);
    let seals = fe.window().seals().unwrap();
    assert_eq!(seals & WINDOW_SEALS, WINDOW_SEALS, "window must be sealed");

    // Several extents, including one larger than a bounce buffer (split into chunks).
    let extents = [
        (0u64, 512usize),
        (7, 4096),
        (100, 64 << 10),
        (1000, 200 << 10),
    ];
    for (i, &(sector, len)) in extents.iter().enumerate() {
        fe.write(sector, &pattern(i as u64, sector, len)).unwrap();
    }
    fe.flush().unwrap();
    for (i, &(sector, len)) in extents.iter().enumerate() {
        let want = pattern(i as u64, sector, len);
        let mut got = vec![0u8; len];
        fe.read(sector, &mut got).unwrap();
        assert!(got == want, "read-back mismatch at sector {sector}");
        assert!(
            read_image(&be.image, sector * 512, len) == want,
            "image file mismatch at sector {sector}"
        );
    }
    let id = fe.get_id().unwrap();
    // A NUL-padded printable id: once a NUL appears, only NULs follow.
    let text_len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    assert!(text_len > 0, "empty id");
    assert!(
        id[..text_len].iter().all(|b| b.is_ascii_graphic()),
        "id {id:?}"
    );
    assert!(
        id[text_len..].iter().all(|&b| b == 0),
        "id not NUL-padded: {id:?}"
    );

    let stats = fe.stats().unwrap();
    assert!(stats.bytes_written >= extents.iter().map(|e| e.1 as u64).sum::<u64>());
    assert_eq!(stats.failed, 0);
    let published = stats.requests;
    let bases = fe.shutdown().unwrap();
    assert_eq!(
        bases,
        vec![published as u16],
        "backend stopped at our avail index"
    );
}

fn out_of_range_fails_the_request_not_the_queue(kind: Kind) {
    let Some(be) = backend::spawn(kind, MIB, 1) else {
        return;
    };
    let fe = BlockFrontend::connect_path(&be.socket, config(true, false)).unwrap();
    let cap = fe.capacity();
    let mut buf = vec![0u8; 4096];
    match fe.read(cap, &mut buf) {
        Err(ProcessFrontendError::Request(FrontRequestError::IoError)) => {}
        other => panic!("expected an I/O error past the end, got {other:?}"),
    }
    // Oversized request is refused before reaching the device.
    let big = vec![0u8; 1 << 20];
    let err = fe.queue(0).unwrap().submit(BlockOp::Write {
        sector: 0,
        data: &big,
    });
    assert!(
        matches!(err, Err(ProcessFrontendError::BadRequest(_))),
        "{err:?}"
    );
    // The queue still works.
    fe.write(cap - 8, &pattern(9, cap - 8, 4096)).unwrap();
    fe.read(cap - 8, &mut buf).unwrap();
    assert_eq!(buf, pattern(9, cap - 8, 4096));
    assert_eq!(fe.stats().unwrap().failed, 1);
}

/// Queue depth > 1: many requests in flight, completed in whatever order the backend chooses.
fn batched_workload(
    fe: &BlockFrontend,
    queue: u16,
    base: u64,
    span: u64,
    seed: u64,
    rounds: usize,
) {
    let mut rng = XorShift(seed | 1);
    let mut q = fe.queue(queue).unwrap();
    let depth = q.depth() as u64;
    for round in 0..rounds {
        let batch = 1 + rng.below(depth);
        // Non-overlapping extents of 1..=16 sectors inside [base, base+span).
        let slot = span / batch;
        let mut reqs = Vec::new();
        for i in 0..batch {
            let len = (1 + rng.below(16.min(slot))) as usize * 512;
            let sector = base + i * slot;
            reqs.push((sector, pattern(seed ^ round as u64, sector, len)));
        }
        let mut ids = Vec::new();
        for (sector, data) in &reqs {
            ids.push(
                q.submit(BlockOp::Write {
                    sector: *sector,
                    data,
                })
                .unwrap(),
            );
        }
        let mut done = 0;
        while done < ids.len() {
            done += q
                .complete(|c| {
                    assert_eq!(c.op, BlkOp::Write);
                    c.result.unwrap();
                })
                .unwrap();
        }
        for (sector, data) in &reqs {
            ids.push(
                q.submit(BlockOp::Read {
                    sector: *sector,
                    len: data.len() as u32,
                })
                .unwrap(),
            );
        }
        let reads: Vec<_> = ids.split_off(reqs.len());
        let mut checked = 0;
        while checked < reads.len() {
            checked += q
                .complete(|c| {
                    c.result.unwrap();
                    let k = reads.iter().position(|&id| id == c.id).unwrap();
                    let mut got = vec![0u8; reqs[k].1.len()];
                    assert_eq!(c.copy_data(&mut got).unwrap(), got.len());
                    assert!(
                        got == reqs[k].1,
                        "queue {queue} round {round}: data mismatch"
                    );
                })
                .unwrap();
        }
    }
}

/// Streaming: publish every request on its own as soon as a slot is free, so publishes race
/// with a backend that is busy or just going idle (the EVENT_IDX / NO_NOTIFY decision points).
fn streaming_workload(fe: &BlockFrontend, queue: u16, base: u64, span: u64, requests: u64) {
    let mut q = fe.queue(queue).unwrap();
    let mut expected = std::collections::HashMap::new();
    let (mut issued, mut done) = (0u64, 0u64);
    while done < requests {
        while issued < requests && q.in_flight() < q.depth() {
            let sector = base + (issued % span);
            let data = pattern(issued, sector, 512);
            let id = q
                .submit(BlockOp::Write {
                    sector,
                    data: &data,
                })
                .unwrap();
            q.publish().unwrap();
            expected.insert(id, ());
            issued += 1;
        }
        done += q
            .complete(|c| {
                c.result.unwrap();
                assert!(
                    expected.remove(&c.id).is_some(),
                    "completion for unknown id"
                );
            })
            .unwrap() as u64;
    }
    assert!(expected.is_empty());
}

fn run_batches(kind: Kind, event_idx: bool, poll: bool) {
    let Some(be) = backend::spawn(kind, 16 * MIB, 1) else {
        return;
    };
    let fe = BlockFrontend::connect_path(&be.socket, config(event_idx, poll)).unwrap();
    assert_eq!(fe.event_idx(), event_idx);
    batched_workload(&fe, 0, 0, 4096, 0x5eed, 60);
    let s = fe.stats().unwrap();
    assert_eq!(s.failed, 0);
    assert!(s.kicks_sent > 0);
    if poll {
        assert_eq!(
            s.interrupts, 0,
            "a polling frontend never sleeps on the call eventfd"
        );
    }
    eprintln!("{}: {s:?}", test_support::test_name());
    fe.shutdown().unwrap();
}

/// Ordering stress: one thread per queue, random batch sizes; a lost kick or interrupt makes a
/// wait time out (3 s) and fail the test instead of hanging it.
fn stress(kind: Kind, event_idx: bool) {
    const QUEUES: u16 = 4;
    let Some(be) = backend::spawn(kind, 32 * MIB, QUEUES) else {
        return;
    };
    let cfg = BlockFrontendConfig {
        queues: QUEUES,
        queue_size: 64,
        max_request_bytes: 8192,
        ..config(event_idx, false)
    };
    let fe = BlockFrontend::connect_path(&be.socket, cfg).unwrap();
    std::thread::scope(|s| {
        for q in 0..QUEUES {
            let fe = &fe;
            s.spawn(move || {
                batched_workload(fe, q, u64::from(q) * 8192, 8192, 77 + u64::from(q), 150);
                streaming_workload(fe, q, u64::from(q) * 8192, 8192, 3000);
            });
        }
    });
    let s = fe.stats().unwrap();
    eprintln!("{}: {s:?}", test_support::test_name());
    assert_eq!(s.failed, 0);
    if event_idx {
        // Streaming publishes while the backend is still consuming: with EVENT_IDX its
        // avail_event lags and the driver must skip those kicks.
        assert!(s.kicks_suppressed > 0, "no kick was ever suppressed: {s:?}");
    }
    // QD1 ping-pong on one queue: the window where the backend goes idle just as we publish.
    let mut q = fe.queue(0).unwrap();
    let mut buf = vec![0u8; 512];
    for i in 0..2000u64 {
        let data = pattern(i, i % 64, 512);
        q.write(i % 64, &data).unwrap();
        q.read(i % 64, &mut buf).unwrap();
        assert!(buf == data);
    }
    drop(q);
    fe.shutdown().unwrap();
}

/// SIGSTOP is delivered asynchronously: wait until every thread of `pid` is stopped, so a
/// worker running on another CPU cannot complete a request after the test thinks it stalled.
fn wait_until_stopped(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
                state.is_some_and(|s| s.starts_with('T') || s.starts_with('t'))
            });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backend {pid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stalled_backend_times_out_then_recovers(kind: Kind) {
    let Some(be) = backend::spawn(kind, MIB, 1) else {
        return;
    };
    for poll in [false, true] {
        let cfg = BlockFrontendConfig {
            timeout: Duration::from_millis(300),
            ..config(true, poll)
        };
        let fe = BlockFrontend::connect_path(&be.socket, cfg).unwrap();
        let mut q = fe.queue(0).unwrap();
        // SAFETY: signalling the child process this test started, by its pid.
        assert_eq!(unsafe { libc::kill(be.pid(), libc::SIGSTOP) }, 0);
        wait_until_stopped(be.pid());
        let data = pattern(1, 0, 4096);
        let id = q
            .submit(BlockOp::Write {
                sector: 0,
                data: &data,
            })
            .unwrap();
        let start = std::time::Instant::now();
        let err = q.complete(|_| panic!("a stopped backend completed a request"));
        assert!(
            matches!(err, Err(ProcessFrontendError::Timeout { in_flight: 1, .. })),
            "poll={poll}: {err:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "timeout not honoured"
        );
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(be.pid(), libc::SIGCONT) }, 0);
        // The request was published and kicked before the stall: it completes now.
        let mut seen = None;
        while seen.is_none() {
            q.complete(|c| seen = Some((c.id, c.result))).unwrap();
        }
        assert_eq!(seen, Some((id, Ok(()))));
        drop(q);
        fe.shutdown().unwrap();
    }
}

/// A hostile backend scribbles on the used ring in the shared window (simulated while the real
/// backend is stopped, through the same memory it maps): the frontend fails that queue with an
/// error, never panics or corrupts state, and the other queue keeps working.
fn hostile_used_ring_breaks_only_that_queue(kind: Kind) {
    use guest_frontend::virtio::{BlkError, DmaMemory, FrontQueueError};
    let Some(be) = backend::spawn(kind, MIB, 2) else {
        return;
    };
    let cfg = BlockFrontendConfig {
        queues: 2,
        timeout: Duration::from_millis(500),
        ..config(true, false)
    };
    let fe = BlockFrontend::connect_path(&be.socket, cfg).unwrap();
    let region = fe.window().region();
    let mut q0 = fe.queue(0).unwrap();
    let used = q0.ring_addrs().used;
    // SAFETY: signalling the child process this test started, by its pid.
    assert_eq!(unsafe { libc::kill(be.pid(), libc::SIGSTOP) }, 0);
    let data = pattern(3, 0, 512);
    q0.submit(BlockOp::Write {
        sector: 0,
        data: &data,
    })
    .unwrap();
    q0.publish().unwrap();
    // used.ring[0] = { id: 999, len: 0 }; used.idx = 1.
    region.write_bytes(used + 4, &999u32.to_le_bytes()).unwrap();
    region.write_bytes(used + 8, &0u32.to_le_bytes()).unwrap();
    region.write_bytes(used + 2, &1u16.to_le_bytes()).unwrap();
    let err = q0.complete(|_| panic!("a bogus used element was delivered"));
    assert!(
        matches!(
            err,
            Err(ProcessFrontendError::Blk(BlkError::Queue(
                FrontQueueError::UsedIdOutOfRange { id: 999 }
            )))
        ),
        "{err:?}"
    );
    let again = q0.complete(|_| {});
    assert!(
        matches!(
            again,
            Err(ProcessFrontendError::Blk(BlkError::Queue(
                FrontQueueError::Broken
            )))
        ),
        "{again:?}"
    );
    drop(q0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(be.pid(), libc::SIGCONT) }, 0);
    let mut q1 = fe.queue(1).unwrap();
    let data = pattern(4, 64, 4096);
    q1.write(64, &data).unwrap();
    let mut got = vec![0u8; 4096];
    q1.read(64, &mut got).unwrap();
    assert!(got == data, "queue 1 must be unaffected");
}

/// Every test, once per backend.
macro_rules! against_both_backends {
    ($($name:ident => |$kind:ident| $body:expr;)*) => {
        mod qsd {
            use super::*;
            $(#[test] fn $name() { let $kind = Kind::Qsd; $body })*
        }
        mod dd {
            use super::*;
            $(#[test] fn $name() { let $kind = Kind::DriverDomain; $body })*
        }
    };
}

against_both_backends! {
    write_read_flush_and_host_view => |kind| super::write_read_flush_and_host_view(kind);
    out_of_range_fails_the_request_not_the_queue => |kind| super::out_of_range_fails_the_request_not_the_queue(kind);
    batches_event_idx_interrupts => |kind| run_batches(kind, true, false);
    batches_no_event_idx_interrupts => |kind| run_batches(kind, false, false);
    batches_event_idx_polling => |kind| run_batches(kind, true, true);
    batches_no_event_idx_polling => |kind| run_batches(kind, false, true);
    stress_multiqueue_event_idx => |kind| stress(kind, true);
    stress_multiqueue_no_event_idx => |kind| stress(kind, false);
    stalled_backend_times_out_then_recovers => |kind| super::stalled_backend_times_out_then_recovers(kind);
    hostile_used_ring_breaks_only_that_queue => |kind| super::hostile_used_ring_breaks_only_that_queue(kind);
}

/// A session asked for one queue and allowed more (`max_queues`) runs as many as the backend
/// serves, up to that maximum (a Linux guest's disk gets as many request queues as the
/// driver domain serves); without the allowance it runs exactly what it asked for.
#[test]
fn a_session_grows_to_the_queues_the_backend_serves_up_to_its_maximum() {
    use frontend_core::vhost_user::{ConfigSpace, DeviceSpec, FrontendSession};
    for kind in [Kind::DriverDomain, Kind::Qsd] {
        for (served, max_queues, runs) in [(1u16, 16u16, 1usize), (4, 16, 4), (4, 2, 2), (4, 0, 1)]
        {
            let Some(be) = backend::spawn(kind, MIB, served) else {
                return;
            };
            let spec = DeviceSpec {
                queues: 1,
                max_queues,
                config: ConfigSpace::Required { bytes: 36 },
                reply_timeout: Some(Duration::from_secs(5)),
                inflight: false,
            };
            let session =
                FrontendSession::connect_path(&be.socket, Duration::from_secs(5), spec).unwrap();
            assert_eq!(
                session.num_queues(),
                runs,
                "{kind:?}: backend serves {served}, up to {max_queues} allowed"
            );
            assert!(session.kick(runs - 1).is_ok() && session.kick(runs).is_err());
        }
    }
}
