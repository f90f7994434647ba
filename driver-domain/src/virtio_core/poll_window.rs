//! How long a queue worker busy-polls an idle queue before it sleeps on its kick: a fixed
//! window (`--poll-us`, for experiments), or an adaptive one as QEMU's iothreads have
//! (`util/aio-posix.c`: `adjust_polling_time`).
//!
//! The adaptive window starts at zero. Each time the queue is woken, the time it slept says
//! what polling would have bought: a sleep longer than the cap means polling would have spun
//! for nothing (the window drops to zero, so an idle backend costs nothing); a sleep shorter
//! than the cap but longer than the window means a longer window would have caught the next
//! request without a sleep and a wake-up, and the window opens to the cap at once. QEMU
//! doubles it instead (from 4 µs); measured here (blk-bench, null device, QD32, pinned) the
//! doubling reached 579k IOPS and the jump 803k: a long sleep now and then resets the window
//! before doubling has caught up with the frontend's round trip. A queue whose requests keep
//! arriving thus polls, one that goes quiet stops, and the spin is never longer than the cap
//! after a sleep that was shorter than it.

use std::time::{Duration, Instant};

/// The default cap of the adaptive window (QEMU's iothread default `poll-max-ns`, 32 µs).
pub const DEFAULT_MAX: Duration = Duration::from_micros(32);

/// A queue's polling window.
#[derive(Debug, Clone)]
pub struct PollWindow {
    window: Duration,
    max: Duration,
    adaptive: bool,
    slept_at: Option<Instant>,
}

impl PollWindow {
    /// Always `window` (zero: never poll).
    pub fn fixed(window: Duration) -> Self {
        PollWindow {
            window,
            max: window,
            adaptive: false,
            slept_at: None,
        }
    }

    /// Adaptive, at most `max` (zero: never poll).
    pub fn adaptive(max: Duration) -> Self {
        PollWindow {
            window: Duration::ZERO,
            max,
            adaptive: !max.is_zero(),
            slept_at: None,
        }
    }

    /// `--poll-us` if non-zero (fixed), else adaptive up to `max_us` (0: no polling).
    pub fn from_config(poll_us: u64, max_us: u64) -> Self {
        if poll_us > 0 {
            Self::fixed(Duration::from_micros(poll_us))
        } else {
            Self::adaptive(Duration::from_micros(max_us))
        }
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The queue goes to sleep on its kick (notifications enabled, nothing to do).
    pub fn sleeping(&mut self) {
        if self.adaptive {
            self.slept_at = Some(Instant::now());
        }
    }

    /// The queue was woken: the window adapts to how long it slept.
    pub fn woken(&mut self) {
        if let Some(since) = self.slept_at.take() {
            self.adapt(since.elapsed());
        }
    }

    fn adapt(&mut self, slept: Duration) {
        if slept > self.max {
            self.window = Duration::ZERO;
        } else if slept > self.window {
            self.window = self.max;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_short_sleep_opens_the_window_to_the_cap_and_a_long_one_closes_it() {
        let mut p = PollWindow::adaptive(32 * US);
        assert_eq!(p.window(), Duration::ZERO);
        p.adapt(3 * US);
        assert_eq!(p.window(), 32 * US);
        // A sleep the window covered leaves it as it is.
        p.adapt(US);
        assert_eq!(p.window(), 32 * US);
        p.adapt(33 * US);
        assert_eq!(p.window(), Duration::ZERO, "past the cap: no polling");
        p.adapt(Duration::from_millis(5));
        assert_eq!(p.window(), Duration::ZERO, "idle: still none");
        p.adapt(31 * US);
        assert_eq!(p.window(), 32 * US);
    }

    #[test]
    fn a_fixed_or_zero_window_never_moves() {
        let mut f = PollWindow::from_config(50, 32);
        f.sleeping();
        f.woken();
        assert_eq!(f.window(), 50 * US);
        let mut off = PollWindow::from_config(0, 0);
        off.sleeping();
        std::thread::sleep(Duration::from_micros(10));
        off.woken();
        assert_eq!(off.window(), Duration::ZERO);
    }

    #[test]
    fn the_sleep_is_measured_from_sleeping_to_woken() {
        let mut p = PollWindow::from_config(0, 32);
        p.sleeping();
        std::thread::sleep(Duration::from_millis(2));
        p.woken();
        assert_eq!(p.window(), Duration::ZERO, "2 ms is past the cap");
        // Woken without having slept (more work in one wake-up): nothing to learn.
        p.woken();
        assert_eq!(p.window(), Duration::ZERO);
    }
}
