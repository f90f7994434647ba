//! One port of the [`Switch`]: its inbox (bounded per source port), its counters, and the
//! [`SwitchPort`] handle its owner (a guest's virtio-net queues or the tap uplink) holds to
//! send frames in and take frames out. Forwarding and learning live in [`super::switch`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::frame::{FrameBox, Mac};
use super::switch::{Forwarded, PortId, Switch};
use crate::virtio_core::sync;

/// Per-port counters, seen from the port's owner (tx: frames it sent into the switch; rx:
/// frames the switch delivered to it).
#[derive(Debug, Default)]
pub struct PortCounters {
    pub(super) tx_frames: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) tx_invalid: AtomicU64,
    pub(super) tx_dropped: AtomicU64,
    pub(super) tx_filtered: AtomicU64,
    pub(super) tx_spoofed: AtomicU64,
    pub(super) rx_frames: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) rx_dropped: AtomicU64,
}

/// A copy of a port's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Frames accepted from the port.
    pub tx_frames: u64,
    /// Bytes accepted from the port.
    pub tx_bytes: u64,
    /// Frames refused as malformed (header, length, source address).
    pub tx_invalid: u64,
    /// Frame copies dropped because the destination's queue share for this port was full.
    pub tx_dropped: u64,
    /// Unicast frames dropped because the destination lives on the source port.
    pub tx_filtered: u64,
    /// Frames dropped because their source address is not the port's configured MAC.
    pub tx_spoofed: u64,
    /// Frames delivered to the port.
    pub rx_frames: u64,
    /// Bytes delivered to the port.
    pub rx_bytes: u64,
    /// Frames dropped at delivery (the port's receive buffers could not hold them).
    pub rx_dropped: u64,
}

pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl PortCounters {
    pub(super) fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            tx_invalid: g(&self.tx_invalid),
            tx_dropped: g(&self.tx_dropped),
            tx_filtered: g(&self.tx_filtered),
            tx_spoofed: g(&self.tx_spoofed),
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            rx_dropped: g(&self.rx_dropped),
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Inbox {
    pub(super) frames: VecDeque<(PortId, FrameBox)>,
    pub(super) per_source: Vec<usize>,
    pub(super) closed: bool,
}

#[derive(Debug)]
pub(super) struct Port {
    pub(super) id: PortId,
    pub(super) name: String,
    /// The only source address the port may send from (`None`: an uplink, unchecked).
    pub(super) mac: Option<Mac>,
    pub(super) inbox: Mutex<Inbox>,
    pub(super) wake: EventFd,
    pub(super) armed: AtomicBool,
    pub(super) counters: PortCounters,
}

impl Port {
    pub(super) fn inbox(&self) -> MutexGuard<'_, Inbox> {
        sync::lock(&self.inbox)
    }

    /// Queue `buf` from `src`; gives it back when `src`'s share is full or the port is gone.
    pub(super) fn enqueue(&self, src: PortId, buf: FrameBox, limit: usize) -> Result<(), FrameBox> {
        {
            let mut inbox = self.inbox();
            if inbox.closed {
                return Err(buf);
            }
            if inbox.per_source.len() <= src {
                inbox.per_source.resize(src + 1, 0);
            }
            if inbox.per_source[src] >= limit {
                return Err(buf);
            }
            inbox.per_source[src] += 1;
            inbox.frames.push_back((src, buf));
        }
        if self.armed.swap(false, Ordering::AcqRel) {
            // A failed write only delays the receiver until its next kick.
            let _ = self.wake.write(1);
        }
        Ok(())
    }
}

/// A port's handle: its owner sends frames into the switch and takes the frames queued for it.
/// Dropping it detaches the port (its queued frames are freed, its MAC entries forgotten).
#[derive(Debug)]
pub struct SwitchPort {
    pub(super) switch: Arc<Switch>,
    pub(super) port: Arc<Port>,
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.switch.detach(&self.port);
    }
}

impl SwitchPort {
    /// This port's id.
    pub fn id(&self) -> PortId {
        self.port.id
    }

    /// This port's name.
    pub fn name(&self) -> &str {
        &self.port.name
    }

    /// The switch this port is attached to.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// A buffer to read a frame into, or `None` if the switch has no buffer left (the caller
    /// drops the frame).
    pub fn take_buffer(&self) -> Option<FrameBox> {
        self.switch.pool().take()
    }

    /// A large buffer (for a segmentation-offload frame), or `None` if none is left.
    pub fn take_large_buffer(&self) -> Option<FrameBox> {
        self.switch.pool().take_large()
    }

    /// Move up to `n` buffers into `out` (one pool lock); returns how many.
    pub fn take_buffers(&self, out: &mut Vec<FrameBox>, n: usize) -> usize {
        self.switch.pool().take_many(out, n)
    }

    /// Give back a buffer that was not sent.
    pub fn recycle(&self, buf: FrameBox) {
        self.switch.pool().put(buf);
    }

    /// Give back delivered buffers.
    pub fn recycle_all(&self, bufs: impl Iterator<Item = FrameBox>) {
        self.switch.pool().put_all(bufs);
    }

    /// Send a frame (already length-checked by the caller) into the switch.
    pub fn transmit(&self, buf: FrameBox) -> Forwarded {
        self.switch.forward(&self.port, buf)
    }

    /// Send every frame of `frames` (drained) into the switch under one lock; buffers nobody
    /// took (dropped, flooded to no port) are pushed to `spare` for reuse.
    pub fn transmit_batch(&self, frames: &mut Vec<FrameBox>, spare: &mut Vec<FrameBox>) {
        self.switch
            .forward_batch(&self.port, frames.drain(..), Some(spare), |_| {});
    }

    /// Count a frame refused before it reached the switch.
    pub fn count_tx_invalid(&self) {
        add(&self.port.counters.tx_invalid, 1);
    }

    /// Count a frame delivered to this port's owner.
    pub fn count_rx(&self, bytes: usize) {
        add(&self.port.counters.rx_frames, 1);
        add(&self.port.counters.rx_bytes, bytes as u64);
    }

    /// Count a frame dropped at delivery.
    pub fn count_rx_dropped(&self) {
        add(&self.port.counters.rx_dropped, 1);
    }

    /// This port's counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.port.counters.snapshot()
    }

    /// Move up to `max` queued frames to `out`; returns how many.
    pub fn receive(&self, out: &mut VecDeque<FrameBox>, max: usize) -> usize {
        let mut inbox = self.port.inbox();
        let n = max.min(inbox.frames.len());
        for _ in 0..n {
            if let Some((src, b)) = inbox.frames.pop_front() {
                if let Some(c) = inbox.per_source.get_mut(src) {
                    *c = c.saturating_sub(1);
                }
                out.push_back(b);
            }
        }
        n
    }

    /// Frames waiting for this port.
    pub fn pending(&self) -> usize {
        self.port.inbox().frames.len()
    }

    /// Ask for a write to [`SwitchPort::wake_fd`] when the next frame arrives. Returns true
    /// if frames are already waiting (the caller keeps draining instead of sleeping).
    pub fn arm(&self) -> bool {
        self.port.armed.store(true, Ordering::Release);
        if self.pending() > 0 {
            self.port.armed.store(false, Ordering::Release);
            return true;
        }
        false
    }

    /// The eventfd written when a frame arrives while the port is armed.
    pub fn wake_fd(&self) -> &EventFd {
        &self.port.wake
    }
}
