//! The ring poller: the driver VM's way of noticing a guest's new requests (docs/driver-vm.md,
//! "Interrupts into the driver VM's user space"). The guest's queue notifications end in a KVM
//! ioeventfd on the host that nobody reads, so the driver VM watches each running ring's avail
//! index in BAR2 instead and signals the ring's kick eventfd (the backend's worker sleeps on
//! it, unchanged) whenever the index moves.
//!
//! While anything moved recently the poller spins ([`SPIN`]); then it sleeps, each sleep
//! twice the last, from [`FIRST_SLEEP`] up to [`MAX_SLEEP`]: an idle ring costs about one
//! wake-up per millisecond, a busy one no sleep at all. With no ring to watch it blocks
//! without waking. It counts its wake-ups (returns from a sleep) and the kicks it gave.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::mapping::{page_size, Mapping, MappingError};
use crate::virtio_core::sync;

/// How long the poller spins after it last saw an index move.
pub const SPIN: Duration = Duration::from_micros(50);
/// The first sleep once spinning found nothing.
pub const FIRST_SLEEP: Duration = Duration::from_micros(50);
/// The longest sleep: an idle ring's new request waits at most about this long.
pub const MAX_SLEEP: Duration = Duration::from_millis(1);
/// How often the poller logs its counts while it watches rings.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Why a ring cannot be watched.
#[derive(Debug, Error)]
pub enum PollerError {
    /// The avail index is not within the shared memory (or misaligned).
    #[error("avail index at BAR2 offset {0:#x}: {1}")]
    Map(u64, #[source] MappingError),
    /// The poller's thread could not be started.
    #[error("cannot start the ring poller: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A watched ring: channel and queue.
pub type RingKey = (u16, u32);

/// One watched ring: the page holding its avail index, mapped read-only.
struct Watch {
    page: Mapping,
    at: usize,
    last: u16,
    kick: EventFd,
}

/// What the poller's thread shares with its owner.
#[derive(Default)]
struct Shared {
    watches: Mutex<HashMap<RingKey, Watch>>,
    changed: Condvar,
    stop: AtomicBool,
    wakeups: AtomicU64,
    kicks: AtomicU64,
}

/// Counts of the poller so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PollerCounts {
    /// Returns from a back-off sleep.
    pub wakeups: u64,
    /// Kick eventfds signalled (an avail index moved).
    pub kicks: u64,
}

/// The ring poller and its thread.
pub struct RingPoller {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl RingPoller {
    /// Starts the poller's thread (idle until a ring is watched).
    pub fn start() -> Result<Self, PollerError> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ring-poller".into())
            .spawn(move || run(&s))
            .map_err(PollerError::Spawn)?;
        Ok(RingPoller {
            shared,
            thread: Some(thread),
        })
    }

    /// Watches the avail index at `idx_offset` of `shm` (BAR2) for ring `key`, signalling
    /// `kick` when it moves; replaces an earlier watch of `key`. The kick is signalled once
    /// now: requests the guest added before the watch began are announced too.
    pub fn watch(
        &self,
        key: RingKey,
        shm: &File,
        idx_offset: u64,
        kick: EventFd,
    ) -> Result<(), PollerError> {
        let page = page_size();
        let base = idx_offset - idx_offset % page;
        let map = |e| PollerError::Map(idx_offset, e);
        let mapping = Mapping::new(shm, base, page as usize, false).map_err(map)?;
        let at = (idx_offset - base) as usize;
        let last = mapping.read_u16(at).map_err(map)?;
        let _ = kick.write(1);
        self.shared.kicks.fetch_add(1, Ordering::Relaxed);
        sync::lock(&self.shared.watches).insert(
            key,
            Watch {
                page: mapping,
                at,
                last,
                kick,
            },
        );
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Stops watching ring `key` (not watched: nothing to do).
    pub fn unwatch(&self, key: RingKey) {
        sync::lock(&self.shared.watches).remove(&key);
    }

    /// Stops watching every ring of `channel`.
    pub fn unwatch_channel(&self, channel: u16) {
        sync::lock(&self.shared.watches).retain(|(c, _), _| *c != channel);
    }

    /// Rings watched now.
    pub fn watched(&self) -> usize {
        sync::lock(&self.shared.watches).len()
    }

    /// The counts so far.
    pub fn counts(&self) -> PollerCounts {
        counts(&self.shared)
    }
}

impl Drop for RingPoller {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One pass over the watched rings: signals the kick of each whose avail index moved.
/// Returns how many moved.
fn pass(shared: &Shared, watches: &mut HashMap<RingKey, Watch>) -> usize {
    let mut moved = 0;
    for (key, w) in watches.iter_mut() {
        let idx = match w.page.read_u16(w.at) {
            Ok(i) => i,
            Err(e) => {
                warn!("ring poller: channel {} queue {}: {e}", key.0, key.1);
                continue;
            }
        };
        if idx != w.last {
            w.last = idx;
            moved += 1;
            if let Err(e) = w.kick.write(1) {
                warn!("ring poller: channel {} queue {}: kick: {e}", key.0, key.1);
            }
        }
    }
    shared.kicks.fetch_add(moved as u64, Ordering::Relaxed);
    moved
}

fn counts(shared: &Shared) -> PollerCounts {
    PollerCounts {
        wakeups: shared.wakeups.load(Ordering::Relaxed),
        kicks: shared.kicks.load(Ordering::Relaxed),
    }
}

/// The poller's thread.
fn run(shared: &Shared) {
    let mut last_activity = Instant::now();
    let mut sleep = FIRST_SLEEP;
    let mut report = (Instant::now(), PollerCounts::default());
    loop {
        let mut watches = sync::lock(&shared.watches);
        while watches.is_empty() && !shared.stop.load(Ordering::Acquire) {
            // Nothing to poll: block until a ring is watched (no wake-ups).
            watches = shared
                .changed
                .wait(watches)
                .unwrap_or_else(|e| e.into_inner());
            last_activity = Instant::now();
            sleep = FIRST_SLEEP;
            // The counts are reported over time spent watching, not blocked.
            report = (Instant::now(), counts(shared));
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let moved = pass(shared, &mut watches);
        let rings = watches.len();
        drop(watches);
        let now = Instant::now();
        if moved > 0 {
            last_activity = now;
            sleep = FIRST_SLEEP;
            continue;
        }
        if now.duration_since(last_activity) < SPIN {
            std::hint::spin_loop();
            continue;
        }
        std::thread::sleep(sleep);
        shared.wakeups.fetch_add(1, Ordering::Relaxed);
        sleep = (sleep * 2).min(MAX_SLEEP);
        if report.0.elapsed() >= REPORT_EVERY {
            let now = counts(shared);
            let secs = report.0.elapsed().as_secs_f64();
            info!(
                "ring poller: {rings} ring(s), {} wake-ups and {} kicks in {secs:.1} s",
                now.wakeups - report.1.wakeups,
                now.kicks - report.1.kicks
            );
            report = (Instant::now(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::FileExt;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Waits up to 5 s for `kick` to be signalled; returns its count.
    fn wait_kick(kick: &EventFd) -> Option<u64> {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(n) = kick.read() {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    fn shm() -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * 4096).unwrap();
        f
    }

    #[test]
    fn a_moving_avail_index_signals_the_kick() {
        let shm = shm();
        let poller = RingPoller::start().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // The avail ring at 0x2100: its index at 0x2102.
        poller
            .watch((0, 0), &shm, 0x2102, kick.try_clone().unwrap())
            .unwrap();
        assert_eq!(wait_kick(&kick), Some(1), "one kick when the watch begins");
        assert_eq!(kick.read().ok(), None);
        shm.write_all_at(&1u16.to_le_bytes(), 0x2102).unwrap();
        assert!(wait_kick(&kick).is_some(), "the index moved: a kick");
        // Writes elsewhere in the page are not the index.
        shm.write_all_at(&7u16.to_le_bytes(), 0x2104).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(kick.read().ok(), None);
        shm.write_all_at(&2u16.to_le_bytes(), 0x2102).unwrap();
        assert!(wait_kick(&kick).is_some());
        assert!(poller.counts().kicks >= 3);
    }

    #[test]
    fn an_idle_watched_ring_wakes_the_poller_and_no_ring_does_not() {
        let shm = shm();
        let poller = RingPoller::start().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(poller.counts().wakeups, 0, "nothing watched: no wake-ups");
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        poller.watch((1, 0), &shm, 0x102, kick).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while poller.counts().wakeups < 3 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(poller.counts().wakeups >= 3, "idle: it backs off to sleeps");
        poller.unwatch_channel(1);
        assert_eq!(poller.watched(), 0);
        std::thread::sleep(Duration::from_millis(20));
        let before = poller.counts().wakeups;
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            poller.counts().wakeups,
            before,
            "unwatched: it blocks again"
        );
    }

    #[test]
    fn an_index_outside_the_shared_memory_is_refused() {
        let shm = shm();
        let poller = RingPoller::start().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(matches!(
            poller.watch((0, 0), &shm, 4 * 4096 + 2, kick.try_clone().unwrap()),
            Err(PollerError::Map(..))
        ));
        assert!(matches!(
            poller.watch((0, 0), &shm, 0x103, kick),
            Err(PollerError::Map(..))
        ));
        assert_eq!(poller.watched(), 0);
    }
}
