//! A queue's reads and writes batched through io_uring: every data request of a pass over the
//! ring goes to the kernel in one `io_uring_enter`, and the pass waits for all of them before
//! it publishes their completions (so no guest buffer is in use after the pass returns, and
//! the memory snapshot it borrowed can go).
//!
//! The ring is created at queue set-up, before the worker's seccomp filter (which allows
//! `io_uring_enter` alone), and locked down before it is enabled: its only operations are
//! READ, WRITE, READV and WRITEV, and no `io_uring_register` call is allowed afterwards.
//! Submissions do not pass through seccomp, so without this a compromised worker could open
//! files or sockets through the ring; with it, it can do what `preadv`/`pwritev` on the
//! descriptors it holds could. The number of io-wq workers is capped too, although nothing
//! is handed to them (below).
//!
//! Every transfer is submitted with `RWF_NOWAIT`, so the kernel does it inline in
//! `io_uring_enter` or fails it with `EAGAIN` (a page-cache miss, a buffered write the file
//! system would block in, as ext4's buffered writes), and nothing is ever handed to an io-wq
//! worker; what failed is redone with `preadv`/`pwritev`, and after a write's `EAGAIN` writes
//! go straight there. Without it, a backend killed (`kill -9`) with writes punted to io-wq
//! workers kept its image's lock for up to 20 ms after it had been reaped (the ring's
//! deferred teardown releasing the requests' references to the image), and a backend
//! restarted at once on the same image found it in use and exited (5 of 8 runs of
//! `frontend_inflight`'s kill-and-restart test, probed with `F_OFD_GETLK` right after the
//! reap; the earlier note of a lock held "more than 10 s" was the test's 10 s wait for a
//! socket the second backend, which had exited, never bound). With it, 30
//! of 30 runs found the image unlocked at the reap (17 of 30 runs of the test failed
//! without it).
//!
//! The image is not a registered file: a ring's registered files are released after its
//! process has gone, by the same deferred ring teardown, and until then the image's open
//! file description and so its lock stay alive. With a plain descriptor and inline transfers
//! only, nothing but the process's descriptor table holds the image.
//!
//! Guest memory is not registered as fixed buffers: that pins every page of the guest
//! (confined domains have no locked-memory allowance) and a descriptor spanning two regions
//! would need the vectored path anyway.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::PtrGuardMut;

use super::request::Transfer;

/// io-wq workers per ring for operations that block (buffered writes on most file systems).
const MAX_UNBOUNDED_WORKERS: u32 = 4;

/// How many failed `io_uring_enter` calls in one pass fail the queue.
const MAX_ENTER_FAILURES: u32 = 100;

/// Errors `io_uring_enter` returns that a retry gets past.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Why a queue has no ring (it then does its I/O with `preadv`/`pwritev`).
#[derive(Debug, Error)]
pub enum DiskRingError {
    /// The kernel refused a step of the set-up (io_uring disabled, too old, or filtered).
    #[error("io_uring {step}: {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// Waiting for completions kept failing.
    #[error("io_uring_enter failed {MAX_ENTER_FAILURES} times in one pass: {0}")]
    Enter(#[source] io::Error),
}

fn setup(step: &'static str) -> impl FnOnce(io::Error) -> DiskRingError {
    move |source| DiskRingError::Setup { step, source }
}

/// A restricted io_uring instance for one queue's transfers on one image.
pub struct DiskRing {
    ring: IoUring,
    /// The image's descriptor (owned by the queue's disk, which outlives the ring's passes).
    image: RawFd,
    entries: usize,
    /// Every transfer's iovecs, back to back (reused across passes).
    iovecs: Vec<libc::iovec>,
    /// A write came back `EAGAIN` (the file system cannot do a buffered write without
    /// blocking, as ext4): writes are no longer sent to the ring, where each would only fail
    /// before its `pwritev`.
    writes_block: bool,
}

impl std::fmt::Debug for DiskRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskRing")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

// SAFETY: the iovecs only hold pointers between `run`'s set-up and its return, while `run`
// holds the guards of the memory they point to; between passes they are stale values nobody
// dereferences. The ring itself is a file descriptor and two mappings owned by this value.
unsafe impl Send for DiskRing {}

impl DiskRing {
    /// A ring for transfers on `file`, at most `entries` per pass.
    pub fn new(file: &File, entries: u32) -> Result<Self, DiskRingError> {
        let entries = entries.max(1).next_power_of_two();
        let ring: IoUring = IoUring::builder()
            .setup_r_disabled()
            .build(entries)
            .map_err(setup("setup"))?;
        let submitter = ring.submitter();
        let mut workers = [0, MAX_UNBOUNDED_WORKERS];
        submitter
            .register_iowq_max_workers(&mut workers)
            .map_err(setup("capping io-wq workers"))?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            // No flags: no links, drains, buffer selection or fixed files.
            Restriction::sqe_flags_allowed(0),
        ];
        submitter
            .register_restrictions(&mut allowed)
            .map_err(setup("restricting"))?;
        submitter
            .register_enable_rings()
            .map_err(setup("enabling"))?;
        Ok(DiskRing {
            ring,
            image: file.as_raw_fd(),
            entries: entries as usize,
            iovecs: Vec::new(),
            writes_block: false,
        })
    }

    /// How many transfers one pass takes.
    pub fn capacity(&self) -> usize {
        self.entries
    }

    /// Does every transfer of `ops` (at most [`DiskRing::capacity`]) and waits for all of
    /// them; `results[i]` is the byte count or `-errno` of `ops[i]` (`-ECANCELED` for one
    /// past the capacity). An error means the kernel kept refusing to wait: the queue must
    /// fail, as a transfer may still be running.
    pub fn run<B: BitmapSlice>(
        &mut self,
        ops: &[&Transfer<'_, B>],
        results: &mut Vec<i32>,
    ) -> Result<(), DiskRingError> {
        results.clear();
        results.resize(ops.len(), -libc::ECANCELED);
        if ops.is_empty() {
            return Ok(());
        }
        // The guards keep every buffer valid until the last completion is reaped.
        let mut guards: Vec<PtrGuardMut> = Vec::new();
        self.iovecs.clear();
        for op in ops {
            for s in &op.bufs {
                let g = s.ptr_guard_mut();
                self.iovecs.push(libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: s.len(),
                });
                guards.push(g);
            }
        }
        let mut submitted = 0usize;
        let mut first_iovec = 0usize;
        for (i, op) in ops.iter().enumerate() {
            let n = op.bufs.len();
            let iovs = &self.iovecs[first_iovec..first_iovec + n];
            first_iovec += n;
            if op.write && self.writes_block {
                // Left at ECANCELED: the caller writes it with pwritev.
                continue;
            }
            let entry = prepare(self.image, op.write, iovs, op.offset).user_data(i as u64);
            // SAFETY: the entry's buffers (or iovec array) stay valid until its completion is
            // reaped below: the iovecs live in `self.iovecs`, untouched until this call
            // returns, and point into memory whose guards are held in `guards` until then.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // Full (more ops than the capacity): the caller's contract was broken; what
                // does not fit fails with ECANCELED and is redone synchronously.
                break;
            }
            submitted += 1;
        }
        let mut reaped = 0usize;
        let mut failures = 0u32;
        while reaped < submitted {
            match self.ring.submit_and_wait(submitted - reaped) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    // The kernel may own some of the entries: waiting for them is the only
                    // way to have no transfer into guest memory after the pass. A ring that
                    // keeps failing fails the queue, which then publishes nothing more.
                    failures += 1;
                    if failures >= MAX_ENTER_FAILURES {
                        return Err(DiskRingError::Enter(e));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            for cqe in self.ring.completion() {
                let i = cqe.user_data() as usize;
                if let Some(r) = results.get_mut(i) {
                    *r = cqe.result();
                }
                if cqe.result() == -libc::EAGAIN
                    && ops.get(i).is_some_and(|op| op.write)
                    && !self.writes_block
                {
                    log::info!(
                        "blk: a buffered write would block on this file system; writes use \
                         pwritev from now on"
                    );
                    self.writes_block = true;
                }
                reaped += 1;
            }
        }
        drop(guards);
        for (op, r) in ops.iter().zip(results.iter()) {
            if !op.write && *r > 0 {
                super::disk::mark_dirty(&op.bufs);
            }
        }
        Ok(())
    }
}

/// The submission of one transfer on `image`, with `RWF_NOWAIT`: a transfer the kernel cannot
/// do at once (a page-cache miss, a buffered write the file system would block in) fails
/// with `EAGAIN` and is redone with `preadv`/`pwritev`, instead of being handed to an io-wq
/// worker that would go on holding the image after a `kill -9`.
fn prepare(image: RawFd, write: bool, iovs: &[libc::iovec], offset: u64) -> squeue::Entry {
    let file = types::Fd(image);
    let nowait = libc::RWF_NOWAIT;
    match (write, iovs) {
        // One buffer (a 4 KiB request, mostly): no iovec array for the kernel to copy in.
        (false, [one]) => opcode::Read::new(file, one.iov_base.cast(), one.iov_len as u32)
            .offset(offset)
            .rw_flags(nowait)
            .build(),
        (true, [one]) => opcode::Write::new(file, one.iov_base.cast(), one.iov_len as u32)
            .offset(offset)
            .rw_flags(nowait)
            .build(),
        (false, _) => opcode::Readv::new(file, iovs.as_ptr(), iovs.len() as u32)
            .offset(offset)
            .rw_flags(nowait)
            .build(),
        (true, _) => opcode::Writev::new(file, iovs.as_ptr(), iovs.len() as u32)
            .offset(offset)
            .rw_flags(nowait)
            .build(),
    }
}
