//! What the bench binaries (`blk-bench`, `net-bench`) read from outside the processes they
//! measure: CPU time from `/proc/<pid>/stat`, the load average, the machine's idle share, and
//! the statistics over rounds (median and spread).

/// CPU seconds (user + system, every thread) process `pid` has used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // The fields after the command name (in parentheses, which may contain spaces).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks(11) + ticks(12)) / if hz > 0 { hz as f64 } else { 100.0 }
}

/// The one-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg gives them ("?" if unreadable).
pub fn load_averages_text() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU time counters of the whole machine (busy, idle), from `/proc/stat`.
fn machine_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = f.get(3).copied().unwrap_or(0);
    let busy = f.iter().take(8).sum::<u64>().saturating_sub(idle);
    (busy, idle)
}

/// Wait (at most `max`) until the machine was at least `min_idle` idle over half a second, so
/// a measurement does not start in the middle of somebody else's build; returns the idle
/// fraction seen last.
pub fn wait_idle(min_idle: f64, max: std::time::Duration) -> f64 {
    let deadline = std::time::Instant::now() + max;
    loop {
        let (b0, i0) = machine_cpu();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let (b1, i1) = machine_cpu();
        let (busy, idle) = (b1.saturating_sub(b0), i1.saturating_sub(i0));
        let frac = idle as f64 / (busy + idle).max(1) as f64;
        if frac >= min_idle || std::time::Instant::now() >= deadline {
            return frac;
        }
    }
}

/// The median of `v` (NaNs ignored; NaN if nothing is left).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The lowest and highest of `v` (NaNs ignored).
pub fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .filter(|x| !x.is_nan())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![f64::NAN]).is_nan());
        assert_eq!(spread(&[2.0, f64::NAN, 5.0, 1.0]), (1.0, 5.0));
    }
}
