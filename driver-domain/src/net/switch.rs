//! A learning L2 switch between the ports of the driver domain (guests' virtio-net devices and
//! an optional tap uplink), in the role a Linux bridge plays for Xen's netback.
//!
//! - **Source addresses are checked**: a guest's port ([`Switch::attach_guest`]) has one
//!   configured MAC; frames with any other source are dropped and counted (`tx_spoofed`). The
//!   configured MAC is pinned to the port: no other port's frames can move it, and it never
//!   ages. An uplink port ([`Switch::attach`]) carries many hosts and is not checked.
//! - **Learning with ageing**: the source MAC of every accepted frame is bound to its port; an
//!   entry not refreshed for `ageing` is ignored and later swept. The table is bounded in all
//!   (`max_macs`) and per port (`max_macs_per_port`): a port spraying source addresses stops
//!   being learned, not served, and cannot evict other ports' entries.
//! - **Flooding**: broadcast, multicast and unknown unicast go to every port but the source.
//! - **No hairpin**: a frame is never delivered to the port it came from; unicast to a MAC
//!   learned on the source port is dropped (counted as `tx_filtered`).
//! - **Bounded queues, charged to the sender**: each port's inbox holds at most `queue_limit`
//!   frames *per source port*. A guest flooding a peer (or a peer that never refills its RX
//!   ring) fills only its own share: the excess is dropped and counted in the sender's
//!   `tx_dropped`; frames from other ports still get in.
//!
//! Frames move between ports as [`FrameBox`]es from the switch's [`FramePool`]; unicast moves
//! the sender's buffer, flooding copies it once per extra destination.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use log::info;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frame::{format_mac, is_multicast, FrameBox, FramePool, Mac};
use super::switch_port::{add, Inbox, Port, PortCounters};
pub use super::switch_port::{CounterSnapshot, SwitchPort};
use crate::virtio_core::sync;

/// Milliseconds of the coarse monotonic clock (ageing needs no better, and it is read per
/// frame: the coarse clock is a plain vDSO read).
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

/// Index of a port on its switch.
pub type PortId = usize;

/// Switch-wide options.
#[derive(Clone, Debug)]
pub struct SwitchConfig {
    /// A learned MAC entry not refreshed for this long is forgotten.
    pub ageing: Duration,
    /// Frames one source may have queued towards one destination port.
    pub queue_limit: usize,
    /// Frame buffers the switch may allocate in all.
    pub max_frames: usize,
    /// Largest number of learned MAC addresses (pinned guest addresses not included).
    pub max_macs: usize,
    /// Largest number of MAC addresses learned on one port.
    pub max_macs_per_port: usize,
    /// Largest number of ports.
    pub max_ports: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            ageing: Duration::from_secs(300),
            queue_limit: 256,
            max_frames: 16384,
            max_macs: 4096,
            max_macs_per_port: 1024,
            max_ports: 64,
        }
    }
}

/// Errors of the switch.
#[derive(Debug, Error)]
pub enum SwitchError {
    /// Every port slot is taken.
    #[error("the switch already has {0} ports")]
    Full(usize),
    /// The port's wake-up eventfd could not be created.
    #[error("cannot create a port's wake-up eventfd: {0}")]
    Event(#[source] std::io::Error),
}

#[derive(Debug)]
struct MacEntry {
    port: PortId,
    seen_ms: AtomicU64,
    /// A guest port's configured address: never aged, never moved by learning.
    pinned: bool,
}

/// Hashes a MAC address with a per-switch random key: cheaper than SipHash on the per-frame
/// path, and a guest cannot precompute collisions without the key (the table is also bounded).
#[derive(Clone, Debug)]
struct MacHasherBuilder(u64);

impl MacHasherBuilder {
    fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        MacHasherBuilder(RandomState::new().hash_one(0x5eed_u64) | 1)
    }
}

#[derive(Default)]
struct MacHasher {
    key: u64,
    acc: u64,
}

impl std::hash::Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.acc = (self.acc << 8 | u64::from(*b)).rotate_left(3);
        }
    }

    fn finish(&self) -> u64 {
        let x = (self.acc ^ self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }
}

impl std::hash::BuildHasher for MacHasherBuilder {
    type Hasher = MacHasher;

    fn build_hasher(&self) -> MacHasher {
        MacHasher {
            key: self.0,
            acc: 0,
        }
    }
}

#[derive(Debug)]
struct Tables {
    ports: Vec<Option<Arc<Port>>>,
    macs: HashMap<Mac, MacEntry, MacHasherBuilder>,
    /// Learned (unpinned) entries per port, indexed like `ports`.
    learned: Vec<usize>,
}

impl Tables {
    /// Recounts learned entries per port (after a sweep or a detach).
    fn recount(&mut self) {
        self.learned.iter_mut().for_each(|n| *n = 0);
        for e in self.macs.values().filter(|e| !e.pinned) {
            if let Some(n) = self.learned.get_mut(e.port) {
                *n += 1;
            }
        }
    }

    fn learned_on(&self, port: PortId) -> usize {
        self.learned.get(port).copied().unwrap_or(0)
    }

    fn learned_mut(&mut self, port: PortId) -> &mut usize {
        if self.learned.len() <= port {
            self.learned.resize(port + 1, 0);
        }
        &mut self.learned[port]
    }
}

/// The switch. Create it with [`Switch::new`], then [`Switch::attach`] ports.
#[derive(Debug)]
pub struct Switch {
    tables: RwLock<Tables>,
    pool: FramePool,
    cfg: SwitchConfig,
    epoch_ms: u64,
    last_sweep_ms: AtomicU64,
}

/// Per-batch forwarding state: counters (frames, bytes, invalid, dropped, filtered, spoofed)
/// and the source addresses to learn once the read lock is released.
struct Batch<'a> {
    src: &'a Port,
    limit: usize,
    stats: [u64; 6],
    unlearned: [Mac; 4],
    n_unlearned: usize,
}

/// What the switch did with one frame (for tests and tracing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// Queued to one known port.
    Unicast(PortId),
    /// Copied to this many ports (broadcast, multicast or unknown destination).
    Flooded(usize),
    /// Dropped: the destination lives on the source port.
    Filtered,
    /// Dropped: the destination's queue share for the sender was full.
    Dropped,
    /// Dropped: a group source address.
    Invalid,
    /// Dropped: the source address is not the sending guest port's configured MAC.
    Spoofed,
}

impl Switch {
    /// A switch with no ports.
    pub fn new(cfg: SwitchConfig) -> Arc<Switch> {
        Arc::new(Switch {
            tables: RwLock::new(Tables {
                ports: Vec::new(),
                macs: HashMap::with_hasher(MacHasherBuilder::new()),
                learned: Vec::new(),
            }),
            pool: FramePool::new(cfg.max_frames, cfg.queue_limit.min(cfg.max_frames)),
            cfg,
            epoch_ms: coarse_ms(),
            last_sweep_ms: AtomicU64::new(0),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        sync::read(&self.tables)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        sync::write(&self.tables)
    }

    /// Milliseconds since the switch was created, from the coarse monotonic clock (ageing
    /// needs no better, and it is read per frame).
    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.epoch_ms)
    }

    /// The switch's options.
    pub fn config(&self) -> &SwitchConfig {
        &self.cfg
    }

    /// The frame pool (buffer accounting, for tests).
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// Attach a new uplink port named `name`: frames from any source address are accepted
    /// (it carries many hosts); learning on it is bounded by `max_macs_per_port`. Detached
    /// when the returned handle is dropped.
    pub fn attach(self: &Arc<Self>, name: &str) -> Result<SwitchPort, SwitchError> {
        self.attach_port(name, None)
    }

    /// Attach a new guest port named `name` whose frames must come from `mac`: others are
    /// dropped and counted in `tx_spoofed`. `mac` is pinned to the port.
    pub fn attach_guest(self: &Arc<Self>, name: &str, mac: Mac) -> Result<SwitchPort, SwitchError> {
        self.attach_port(name, Some(mac))
    }

    fn attach_port(
        self: &Arc<Self>,
        name: &str,
        mac: Option<Mac>,
    ) -> Result<SwitchPort, SwitchError> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(SwitchError::Event)?;
        let mut t = self.write();
        let id = match t.ports.iter().position(Option::is_none) {
            Some(i) => i,
            None if t.ports.len() < self.cfg.max_ports => {
                t.ports.push(None);
                t.ports.len() - 1
            }
            None => return Err(SwitchError::Full(self.cfg.max_ports)),
        };
        let port = Arc::new(Port {
            id,
            name: name.to_string(),
            mac,
            inbox: Mutex::new(Inbox {
                frames: VecDeque::with_capacity(self.cfg.queue_limit * 2),
                per_source: Vec::new(),
                closed: false,
            }),
            wake,
            armed: AtomicBool::new(true),
            counters: PortCounters::default(),
        });
        t.ports[id] = Some(port.clone());
        if let Some(mac) = mac {
            let entry = MacEntry {
                port: id,
                seen_ms: AtomicU64::new(self.now_ms()),
                pinned: true,
            };
            if let Some(old) = t.macs.insert(mac, entry) {
                if old.port != id {
                    info!("switch: {} now pinned to port {id}", format_mac(&mac));
                }
                t.recount();
            }
        }
        info!("switch: port {id} ({name}) attached");
        Ok(SwitchPort {
            switch: self.clone(),
            port,
        })
    }

    pub(super) fn detach(&self, port: &Port) {
        let mut t = self.write();
        if let Some(slot) = t.ports.get_mut(port.id) {
            *slot = None;
        }
        t.macs.retain(|_, e| e.port != port.id);
        t.recount();
        drop(t);
        let frames = {
            let mut inbox = port.inbox();
            inbox.closed = true;
            std::mem::take(&mut inbox.frames)
        };
        self.pool.put_all(frames.into_iter().map(|(_, b)| b));
        info!("switch: port {} ({}) detached", port.id, port.name);
    }

    /// The port a MAC address is currently learned on (ignoring aged entries).
    pub fn lookup(&self, mac: &Mac) -> Option<PortId> {
        let now = self.now_ms();
        let t = self.read();
        let e = t.macs.get(mac)?;
        self.fresh(e, now).then_some(e.port)
    }

    /// Number of MAC entries held (fresh or not yet swept).
    pub fn mac_entries(&self) -> usize {
        self.read().macs.len()
    }

    /// Every attached port: id, name, counters.
    pub fn ports(&self) -> Vec<(PortId, String, CounterSnapshot)> {
        self.read()
            .ports
            .iter()
            .flatten()
            .map(|p| (p.id, p.name.clone(), p.counters.snapshot()))
            .collect()
    }

    fn fresh(&self, e: &MacEntry, now: u64) -> bool {
        if e.pinned {
            return true;
        }
        let age = now.saturating_sub(e.seen_ms.load(Ordering::Relaxed));
        u128::from(age) < self.cfg.ageing.as_millis()
    }

    /// Switch `buf`, sent by `src`. Every copy that cannot be queued goes back to the pool.
    pub(super) fn forward(&self, src: &Port, buf: FrameBox) -> Forwarded {
        let mut out = Forwarded::Dropped;
        let mut one = Some(buf);
        self.forward_batch(src, std::iter::from_fn(|| one.take()), None, |f| out = f);
        out
    }

    /// Switch every frame of `frames` (sent by `src`) under one table lock, with one clock
    /// read and one counter update per batch. Buffers that end up unused go to `spare` (the
    /// caller reuses them) or, without it, back to the pool. `each` sees every outcome.
    pub(super) fn forward_batch(
        &self,
        src: &Port,
        frames: impl Iterator<Item = FrameBox>,
        mut spare: Option<&mut Vec<FrameBox>>,
        mut each: impl FnMut(Forwarded),
    ) {
        let now = self.now_ms();
        let mut ctx = Batch {
            src,
            limit: self.cfg.queue_limit,
            stats: [0; 6],
            unlearned: [[0; 6]; 4],
            n_unlearned: 0,
        };
        let t = self.read();
        for buf in frames {
            let (f, unused) = self.forward_one(&t, &mut ctx, buf, now);
            if let Some(b) = unused {
                match spare.as_deref_mut() {
                    Some(v) => v.push(b),
                    None => self.pool.put(b),
                }
            }
            each(f);
        }
        drop(t);
        let c = &src.counters;
        for (counter, n) in [
            (&c.tx_frames, ctx.stats[0]),
            (&c.tx_bytes, ctx.stats[1]),
            (&c.tx_invalid, ctx.stats[2]),
            (&c.tx_dropped, ctx.stats[3]),
            (&c.tx_filtered, ctx.stats[4]),
            (&c.tx_spoofed, ctx.stats[5]),
        ] {
            if n > 0 {
                add(counter, n);
            }
        }
        for mac in &ctx.unlearned[..ctx.n_unlearned] {
            self.learn(*mac, src.id, now);
        }
        if ctx.n_unlearned == 0 && self.sweep_due(now) {
            self.sweep(now);
        }
    }

    /// Forward one frame; returns the outcome and the buffer if nobody took it.
    fn forward_one(
        &self,
        t: &Tables,
        ctx: &mut Batch<'_>,
        buf: FrameBox,
        now: u64,
    ) -> (Forwarded, Option<FrameBox>) {
        let src = ctx.src;
        let (dst_mac, src_mac) = (buf.dst(), buf.src());
        if is_multicast(&src_mac) {
            ctx.stats[2] += 1;
            return (Forwarded::Invalid, Some(buf));
        }
        if src.mac.is_some_and(|m| m != src_mac) {
            ctx.stats[5] += 1;
            return (Forwarded::Spoofed, Some(buf));
        }
        ctx.stats[0] += 1;
        ctx.stats[1] += buf.len() as u64;
        // A guest port's source is its pinned address (checked above): nothing to learn or
        // refresh, no lookup. An uplink's entries are refreshed at most once per millisecond
        // tick, so a stream of frames does not write the shared entry per frame.
        if src.mac.is_none() {
            match t.macs.get(&src_mac) {
                Some(e) if e.port == src.id => {
                    if e.seen_ms.load(Ordering::Relaxed) != now {
                        e.seen_ms.store(now, Ordering::Relaxed);
                    }
                }
                _ => {
                    let known = ctx.unlearned[..ctx.n_unlearned].contains(&src_mac);
                    if !known && ctx.n_unlearned < ctx.unlearned.len() {
                        ctx.unlearned[ctx.n_unlearned] = src_mac;
                        ctx.n_unlearned += 1;
                    }
                }
            }
        }
        let dest = if is_multicast(&dst_mac) {
            None
        } else {
            t.macs
                .get(&dst_mac)
                .filter(|e| self.fresh(e, now))
                .map(|e| e.port)
        };
        match dest {
            Some(d) if d == src.id => {
                ctx.stats[4] += 1;
                (Forwarded::Filtered, Some(buf))
            }
            Some(d) => match t.ports.get(d).and_then(Option::as_ref) {
                Some(p) => match p.enqueue(src.id, buf, ctx.limit) {
                    Ok(()) => (Forwarded::Unicast(d), None),
                    Err(b) => {
                        ctx.stats[3] += 1;
                        (Forwarded::Dropped, Some(b))
                    }
                },
                None => (Forwarded::Dropped, Some(buf)),
            },
            None => self.flood(t, ctx, buf),
        }
    }

    fn flood(
        &self,
        t: &Tables,
        ctx: &mut Batch<'_>,
        buf: FrameBox,
    ) -> (Forwarded, Option<FrameBox>) {
        let src = ctx.src;
        let mut others = t.ports.iter().flatten().filter(|p| p.id != src.id);
        let Some(mut current) = others.next() else {
            return (Forwarded::Flooded(0), Some(buf));
        };
        let mut queued = 0;
        for next in others {
            match self.pool.take_for(buf.len()) {
                Some(mut copy) => {
                    copy.copy_from(&buf);
                    match current.enqueue(src.id, copy, ctx.limit) {
                        Ok(()) => queued += 1,
                        Err(b) => {
                            ctx.stats[3] += 1;
                            self.pool.put(b);
                        }
                    }
                }
                None => ctx.stats[3] += 1,
            }
            current = next;
        }
        let unused = match current.enqueue(src.id, buf, ctx.limit) {
            Ok(()) => {
                queued += 1;
                None
            }
            Err(b) => {
                ctx.stats[3] += 1;
                Some(b)
            }
        };
        if queued == 0 {
            (Forwarded::Dropped, unused)
        } else {
            (Forwarded::Flooded(queued), unused)
        }
    }

    fn sweep_due(&self, now: u64) -> bool {
        now.saturating_sub(self.last_sweep_ms.load(Ordering::Relaxed))
            >= u64::try_from(self.cfg.ageing.as_millis()).unwrap_or(u64::MAX)
    }

    fn sweep(&self, now: u64) {
        let mut t = self.write();
        self.sweep_locked(&mut t, now);
    }

    fn sweep_locked(&self, t: &mut Tables, now: u64) {
        self.last_sweep_ms.store(now, Ordering::Relaxed);
        t.macs.retain(|_, e| self.fresh(e, now));
        t.recount();
    }

    fn learn(&self, mac: Mac, port: PortId, now: u64) {
        let mut t = self.write();
        if self.sweep_due(now) {
            self.sweep_locked(&mut t, now);
        }
        if t.ports.get(port).and_then(Option::as_ref).is_none() {
            return; // detached meanwhile
        }
        let room = t.learned_on(port) < self.cfg.max_macs_per_port;
        let old = match t.macs.get(&mac) {
            // A guest's configured address stays on its port.
            Some(e) if e.pinned => return,
            Some(e) if e.port == port => {
                e.seen_ms.store(now, Ordering::Relaxed);
                return;
            }
            Some(e) => Some(e.port),
            None => None,
        };
        if !room || (old.is_none() && t.macs.len() >= self.cfg.max_macs) {
            return;
        }
        if let Some(old) = old {
            info!("switch: {} moved to port {port}", format_mac(&mac));
            *t.learned_mut(old) = t.learned_on(old).saturating_sub(1);
        }
        *t.learned_mut(port) += 1;
        t.macs.insert(
            mac,
            MacEntry {
                port,
                seen_ms: AtomicU64::new(now),
                pinned: false,
            },
        );
    }
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod tests;
