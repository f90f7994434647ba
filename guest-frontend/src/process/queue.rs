//! One request queue of a process-domain block frontend: bounce buffers in the I/O window,
//! kick/call eventfds, interrupt or polling completion.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::error::ProcessFrontendError;
use super::peer::BackendPeer;
use super::window::IoWindow;
use crate::virtio::{
    BlkOp, BlkRequest, DmaBuf, DmaMemory, DmaRegion, FrontBlkQueue, FrontRequestError, Notify,
    QueueAddrs,
};

/// Identifies a submitted request within its queue until it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u16);

/// A request to submit to a [`BlockFrontendQueue`].
#[derive(Debug, Clone, Copy)]
pub enum BlockOp<'a> {
    /// Read `len` bytes (a multiple of 512) from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Write `data` (a multiple of 512 bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Data, copied into a bounce buffer at submission.
        data: &'a [u8],
    },
    /// Flush the device's write cache.
    Flush,
    /// Read the device id string.
    GetId,
}

/// Counters of a queue (or, summed, of a frontend).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// Requests completed (successfully or not).
    pub requests: u64,
    /// Requests the device failed.
    pub failed: u64,
    /// Bytes read by completed reads.
    pub bytes_read: u64,
    /// Bytes written by completed writes.
    pub bytes_written: u64,
    /// Kicks sent to the backend.
    pub kicks_sent: u64,
    /// Publishes for which the backend suppressed the kick.
    pub kicks_suppressed: u64,
    /// Call-eventfd wake-ups consumed (interrupts).
    pub interrupts: u64,
}

impl FrontendStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &FrontendStats) {
        self.requests += other.requests;
        self.failed += other.failed;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.kicks_sent += other.kicks_sent;
        self.kicks_suppressed += other.kicks_suppressed;
        self.interrupts += other.interrupts;
    }
}

/// A completed request, valid during the completion callback.
#[derive(Debug)]
pub struct BlockFrontendCompletion<'a> {
    /// The id [`BlockFrontendQueue::submit`] returned.
    pub id: RequestId,
    /// The request type.
    pub op: BlkOp,
    /// The device verdict.
    pub result: Result<(), FrontRequestError>,
    region: &'a DmaRegion,
    data: DmaBuf,
}

impl BlockFrontendCompletion<'_> {
    /// Bytes of data the request carried (reads: bytes available to [`BlockFrontendCompletion::copy_data`]).
    pub fn data_len(&self) -> usize {
        match self.op {
            BlkOp::Flush => 0,
            _ => self.data.len as usize,
        }
    }

    /// Copies the request's data out of its bounce buffer into `dst` (for reads and GET_ID);
    /// returns the number of bytes copied.
    pub fn copy_data(&self, dst: &mut [u8]) -> Result<usize, ProcessFrontendError> {
        let n = dst.len().min(self.data_len());
        self.region.read_bytes(self.data.addr, &mut dst[..n])?;
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    op: BlkOp,
    len: u32,
}

/// One virtio-blk queue of a process-domain frontend.
#[derive(Debug)]
pub struct BlockFrontendQueue {
    index: u16,
    blk: FrontBlkQueue<DmaRegion>,
    region: DmaRegion,
    kick: EventFd,
    call: EventFd,
    bounce: Vec<DmaBuf>,
    free_bounce: Vec<u16>,
    pending: Vec<Option<Pending>>,
    unpublished: bool,
    poll: bool,
    timeout: Duration,
    stats: FrontendStats,
    /// The backend's connection (a duplicate), polled while waiting: its end means the
    /// backend is gone, which no completion would ever say.
    peer: Option<BackendPeer>,
    // Keeps the mapping behind `blk` and `region` alive; declared last so it drops last.
    _window: Arc<IoWindow>,
}

impl BlockFrontendQueue {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        index: u16,
        blk: FrontBlkQueue<DmaRegion>,
        window: Arc<IoWindow>,
        kick: EventFd,
        call: EventFd,
        bounce: Vec<DmaBuf>,
        poll: bool,
        timeout: Duration,
    ) -> Self {
        let n = bounce.len();
        let mut q = Self {
            index,
            blk,
            region: window.region(),
            kick,
            call,
            free_bounce: (0..n as u16).rev().collect(),
            pending: vec![None; n],
            bounce,
            unpublished: false,
            poll,
            timeout,
            stats: FrontendStats::default(),
            peer: None,
            _window: window,
        };
        // Interrupts are requested only while the driver sleeps (see `wait`).
        q.blk.virtqueue().disable_interrupts();
        q
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }
    /// Device-visible (GPA) addresses of this queue's rings inside the I/O window.
    pub fn ring_addrs(&self) -> QueueAddrs {
        self.blk.virtqueue_ref().addrs()
    }
    /// Largest data transfer of one request (the bounce buffer size).
    pub fn max_request_bytes(&self) -> u32 {
        self.bounce.first().map_or(0, |b| b.len)
    }
    /// Requests that can be in flight at once.
    pub fn depth(&self) -> usize {
        self.bounce.len()
    }
    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.bounce.len() - self.free_bounce.len()
    }
    /// Counters of this queue.
    pub fn stats(&self) -> FrontendStats {
        let mut s = self.stats;
        let q = self.blk.virtqueue_ref().stats();
        s.kicks_sent = q.kicks_sent;
        s.kicks_suppressed = q.kicks_suppressed;
        s.interrupts = q.interrupts;
        s
    }

    /// Adds a request to the ring (copying write data into a bounce buffer). It reaches the
    /// device at the next [`BlockFrontendQueue::publish`] or wait.
    pub fn submit(&mut self, op: BlockOp<'_>) -> Result<RequestId, ProcessFrontendError> {
        let max = self.max_request_bytes();
        let (blk_op, sector, len) = match op {
            BlockOp::Read { sector, len } => (BlkOp::Read, sector, len),
            BlockOp::Write { sector, data } => {
                let len = u32::try_from(data.len()).map_err(|_| {
                    ProcessFrontendError::BadRequest(format!("{} bytes is too large", data.len()))
                })?;
                (BlkOp::Write, sector, len)
            }
            BlockOp::Flush => (BlkOp::Flush, 0, 0),
            BlockOp::GetId => (BlkOp::GetId, 0, crate::virtio::blk::BLK_ID_BYTES as u32),
        };
        if len > max {
            return Err(ProcessFrontendError::BadRequest(format!(
                "{len} bytes exceeds the {max}-byte bounce buffer"
            )));
        }
        let slot = *self
            .free_bounce
            .last()
            .ok_or(ProcessFrontendError::QueueFull(self.index))?;
        let buf = DmaBuf {
            addr: self.bounce[slot as usize].addr,
            len,
        };
        match op {
            BlockOp::Write { data, .. } => self.region.write_bytes(buf.addr, data)?,
            // The device may write fewer bytes than the buffer holds (a NUL-terminated id):
            // never let stale bounce contents pass for device data.
            BlockOp::GetId => self.region.write_bytes(buf.addr, &[0u8; 20])?,
            _ => {}
        }
        let req = BlkRequest {
            op: blk_op,
            sector,
            data: (blk_op != BlkOp::Flush).then_some(buf),
        };
        match self.blk.submit(&req, u64::from(slot)) {
            Ok(()) => {}
            Err(crate::virtio::BlkError::Queue(crate::virtio::FrontQueueError::Full)) => {
                return Err(ProcessFrontendError::QueueFull(self.index))
            }
            Err(e) => return Err(e.into()),
        }
        self.free_bounce.pop();
        self.pending[slot as usize] = Some(Pending { op: blk_op, len });
        self.unpublished = true;
        Ok(RequestId(slot))
    }

    /// Makes submitted requests visible to the backend and kicks it if it asked to be kicked.
    pub fn publish(&mut self) -> Result<(), ProcessFrontendError> {
        if !self.unpublished {
            return Ok(());
        }
        self.unpublished = false;
        if self.blk.publish() == Notify::Kick {
            self.kick
                .write(1)
                .map_err(|source| ProcessFrontendError::Io {
                    op: "kick eventfd write",
                    source,
                })?;
        }
        Ok(())
    }

    fn reap(
        &mut self,
        f: &mut dyn FnMut(BlockFrontendCompletion<'_>),
    ) -> Result<usize, ProcessFrontendError> {
        let mut n = 0;
        while let Some(c) = self.blk.complete()? {
            // Tokens are bounce-slot indices this queue handed out; a completion for anything
            // else would mean the virtqueue driver returned a chain we never added.
            let slot = c.token as usize;
            let pending = self
                .pending
                .get_mut(slot)
                .and_then(Option::take)
                .ok_or_else(|| {
                    ProcessFrontendError::BadRequest(format!("stray completion {slot}"))
                })?;
            self.stats.requests += 1;
            match (c.result, pending.op) {
                (Err(_), _) => self.stats.failed += 1,
                (Ok(()), BlkOp::Read) => self.stats.bytes_read += u64::from(pending.len),
                (Ok(()), BlkOp::Write) => self.stats.bytes_written += u64::from(pending.len),
                _ => {}
            }
            f(BlockFrontendCompletion {
                id: RequestId(slot as u16),
                op: pending.op,
                result: c.result,
                region: &self.region,
                data: DmaBuf {
                    addr: self.bounce[slot].addr,
                    len: pending.len,
                },
            });
            self.free_bounce.push(slot as u16);
            n += 1;
        }
        Ok(n)
    }

    /// Publishes pending submissions, then waits (up to the configured timeout) until at least
    /// one request completes and hands every available completion to `f`. Returns how many.
    pub fn complete(
        &mut self,
        mut f: impl FnMut(BlockFrontendCompletion<'_>),
    ) -> Result<usize, ProcessFrontendError> {
        self.publish()?;
        if self.in_flight() == 0 {
            return Ok(0);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let n = self.reap(&mut f)?;
            if n > 0 {
                return Ok(n);
            }
            if self.poll {
                self.spin_until_used(deadline)?;
            } else {
                self.sleep_until_used(deadline)?;
            }
        }
    }

    /// Watches `peer`, the backend's connection, while waiting for completions.
    pub(super) fn set_peer(&mut self, peer: BackendPeer) {
        self.peer = Some(peer);
    }

    /// Starts over on a new session with a restarted backend: every request in flight is
    /// re-posted from avail index 0, oldest first, and published (see
    /// [`crate::virtio::SplitQueue::restart`]). Returns how many. Only before the new backend
    /// is told the ring: it may read (and complete into) the ring as soon as it has it.
    pub(super) fn restart(&mut self) -> Result<u16, ProcessFrontendError> {
        let n = self.blk.virtqueue().restart();
        self.unpublished = n > 0;
        self.publish()?;
        Ok(n)
    }

    fn backend_gone(&self) -> ProcessFrontendError {
        ProcessFrontendError::BackendGone {
            queue: self.index,
            in_flight: self.in_flight(),
        }
    }

    /// Whether the backend's connection has ended, judging by poll's `revents` for it.
    fn peer_ended(&self, revents: libc::c_short) -> bool {
        self.peer.as_ref().is_some_and(|p| p.ended(revents))
    }

    /// Polls the backend's connection without waiting.
    fn peer_gone_now(&self) -> bool {
        self.peer.as_ref().is_some_and(BackendPeer::gone_now)
    }

    fn timeout_error(&self) -> ProcessFrontendError {
        ProcessFrontendError::Timeout {
            queue: self.index,
            in_flight: self.in_flight(),
            timeout_ms: self.timeout.as_millis(),
        }
    }

    fn spin_until_used(&mut self, deadline: Instant) -> Result<(), ProcessFrontendError> {
        loop {
            for _ in 0..4096 {
                if self.blk.virtqueue_ref().has_used() {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
            if self.peer_gone_now() {
                return Err(self.backend_gone());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error());
            }
        }
    }

    fn sleep_until_used(&mut self, deadline: Instant) -> Result<(), ProcessFrontendError> {
        let vq = self.blk.virtqueue();
        if vq.enable_interrupts() {
            vq.disable_interrupts();
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let peer = self.peer.as_ref().map_or(-1, BackendPeer::raw);
        // A negative descriptor is ignored by poll: without a peer, only the call eventfd.
        let mut pfds = [
            libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: peer,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = i32::try_from(remaining.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfds` is a valid pollfd array of length 2 for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        if r > 0 && pfds[0].revents == 0 && self.peer_ended(pfds[1].revents) {
            self.blk.virtqueue().disable_interrupts();
            return Err(self.backend_gone());
        }
        let vq = self.blk.virtqueue();
        vq.disable_interrupts();
        if r < 0 {
            let source = std::io::Error::last_os_error();
            if source.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(ProcessFrontendError::Io {
                op: "poll call eventfd",
                source,
            });
        }
        if r == 0 {
            // One last look: the completion may have landed without a notification only if the
            // device broke the protocol; report the timeout either way, it is a bug to find.
            return Err(self.timeout_error());
        }
        match self.call.read() {
            Ok(_) => vq.note_interrupt(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(ProcessFrontendError::Io {
                    op: "call eventfd read",
                    source,
                })
            }
        }
        Ok(())
    }

    /// Waits for and reaps every request in flight, failing on the first device error after
    /// all have completed.
    pub fn drain(&mut self) -> Result<(), ProcessFrontendError> {
        let mut first_err = None;
        while self.in_flight() > 0 {
            self.complete(|c| {
                if let (Err(e), None) = (c.result, &first_err) {
                    first_err = Some(e);
                }
            })?;
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }

    fn chunked(
        &mut self,
        sector: u64,
        total: usize,
        mut submit: impl FnMut(
            &mut Self,
            u64,
            std::ops::Range<usize>,
        ) -> Result<RequestId, ProcessFrontendError>,
        mut done: impl FnMut(&BlockFrontendCompletion<'_>, usize) -> Result<(), ProcessFrontendError>,
    ) -> Result<(), ProcessFrontendError> {
        self.require_idle()?;
        let chunk = self.max_request_bytes() as usize;
        if chunk == 0 || !total.is_multiple_of(512) {
            return Err(ProcessFrontendError::BadRequest(format!(
                "length {total} is not a multiple of 512"
            )));
        }
        let mut offsets = vec![0usize; self.depth()];
        let mut next = 0usize;
        let mut result = Ok(());
        while (next < total && result.is_ok()) || self.in_flight() > 0 {
            while next < total && result.is_ok() && !self.free_bounce.is_empty() {
                let end = (next + chunk).min(total);
                match submit(self, sector + (next / 512) as u64, next..end) {
                    Ok(id) => offsets[id.0 as usize] = next,
                    Err(ProcessFrontendError::QueueFull(_)) => break,
                    Err(e) => result = Err(e),
                }
                next = end;
            }
            let mut cb_err = None;
            self.complete(|c| {
                let r = c
                    .result
                    .map_err(ProcessFrontendError::from)
                    .and_then(|()| done(&c, offsets[c.id.0 as usize]));
                if let Err(e) = r {
                    cb_err.get_or_insert(e);
                }
            })?;
            if let (Some(e), true) = (cb_err, result.is_ok()) {
                result = Err(e);
            }
        }
        result
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`, split into as many concurrent
    /// requests as needed.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), ProcessFrontendError> {
        let total = buf.len();
        self.chunked(
            sector,
            total,
            |q, s, r| {
                q.submit(BlockOp::Read {
                    sector: s,
                    len: r.len() as u32,
                })
            },
            |c, off| {
                let end = off + c.data_len();
                let dst = buf.get_mut(off..end).ok_or_else(|| {
                    ProcessFrontendError::BadRequest("completion outside the buffer".into())
                })?;
                c.copy_data(dst).map(|_| ())
            },
        )
    }

    /// Writes `data` (a multiple of 512 bytes) at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), ProcessFrontendError> {
        self.chunked(
            sector,
            data.len(),
            |q, s, r| {
                q.submit(BlockOp::Write {
                    sector: s,
                    data: &data[r],
                })
            },
            |_, _| Ok(()),
        )
    }

    /// The synchronous helpers reap every completion of the queue; with requests of the
    /// batched API in flight they would swallow those completions, so they refuse to run.
    fn require_idle(&self) -> Result<(), ProcessFrontendError> {
        if self.in_flight() > 0 {
            return Err(ProcessFrontendError::BadRequest(format!(
                "synchronous call with {} batched requests in flight",
                self.in_flight()
            )));
        }
        Ok(())
    }

    fn single(&mut self, op: BlockOp<'_>, out: &mut [u8]) -> Result<(), ProcessFrontendError> {
        self.require_idle()?;
        let id = self.submit(op)?;
        let mut result = None;
        while result.is_none() {
            self.complete(|c| {
                if c.id == id {
                    result = Some(
                        c.result
                            .map_err(ProcessFrontendError::from)
                            .and_then(|()| c.copy_data(out).map(|_| ())),
                    );
                }
            })?;
        }
        result.unwrap_or(Ok(()))
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), ProcessFrontendError> {
        self.single(BlockOp::Flush, &mut [])
    }

    /// Reads the device id string (up to 20 bytes, NUL-padded).
    pub fn get_id(&mut self) -> Result<[u8; 20], ProcessFrontendError> {
        let mut id = [0u8; 20];
        self.single(BlockOp::GetId, &mut id)?;
        Ok(id)
    }
}
