//! The exit table the VMM prints when a machine ends.

use std::fmt::Write;

use super::exits::PhaseCounts;
use super::machine::{Outcome, VmReport};

/// Guest-reported counter names (boot-info page slots).
pub const GUEST_COUNTERS: [&str; 7] = [
    "kicks",
    "kicks_suppressed",
    "interrupts",
    "completed",
    "requests",
    "errors",
    "capacity_sectors",
];

/// Per-request figures of the I/O phase (net of the idle baseline where measured).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerRequest {
    pub requests: u64,
    pub kicks: f64,
    pub interrupts: f64,
    /// Exits to the VMM process (port + MMIO), from the run loop.
    pub vmm_exits: f64,
    /// All exits KVM counted (`exits` binary stat), in-kernel ones included.
    pub kvm_exits: f64,
}

fn net(io: &PhaseCounts, idle: Option<&PhaseCounts>, name: &str) -> f64 {
    let base = idle.map_or(0, |i| i.get(name));
    io.get(name) as f64 - base as f64
}

impl VmReport {
    /// Per-request numbers, if the guest ran an I/O phase.
    pub fn per_request(&self) -> Option<PerRequest> {
        let io = self.io.as_ref()?;
        let requests = self.guest[4];
        if requests == 0 {
            return None;
        }
        let n = requests as f64;
        let idle = self.idle.as_ref();
        let vmm = ["pio_in", "pio_out", "mmio_read", "mmio_write"]
            .iter()
            .map(|c| net(io, idle, c))
            .sum::<f64>();
        Some(PerRequest {
            requests,
            kicks: self.guest[0] as f64 / n,
            interrupts: self.guest[2] as f64 / n,
            vmm_exits: vmm / n,
            kvm_exits: net(io, idle, "kvm.exits") / n,
        })
    }

    /// The table printed at exit.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "splitvmm-vmm: {} after {:.1?}", self.outcome, self.wall);
        if let Some(io) = &self.io {
            let idle = self.idle.as_ref();
            let _ = writeln!(
                s,
                "exit accounting: I/O phase {:.1?}, idle baseline {}",
                io.duration,
                idle.map_or("not measured".to_string(), |i| format!(
                    "{:.1?}",
                    i.duration
                ))
            );
            let _ = writeln!(
                s,
                "{:<28} {:>10} {:>10} {:>10}",
                "counter", "io", "idle", "net"
            );
            for (name, v) in &io.counts {
                let b = idle.map_or(0, |i| i.get(name));
                if *v == 0 && b == 0 {
                    continue;
                }
                let _ = writeln!(s, "{name:<28} {v:>10} {b:>10} {:>10}", *v as i64 - b as i64);
            }
        }
        let guest: Vec<String> = GUEST_COUNTERS
            .iter()
            .zip(self.guest)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let _ = writeln!(s, "guest: {}", guest.join(" "));
        if let Some(p) = self.per_request() {
            let _ = writeln!(
                s,
                "per-request: requests={} kicks={:.3} interrupts={:.3} vmm_exits={:.3} kvm_exits={:.3}",
                p.requests, p.kicks, p.interrupts, p.vmm_exits, p.kvm_exits
            );
        }
        s.push_str(&totals_lines(&self.totals, self.backend_stopped_at));
        s
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Poweroff(st) => write!(f, "guest powered off, status {st}"),
            Outcome::Reset(why) => write!(f, "guest reset: {why}; stopped"),
            Outcome::Terminated => f.write_str("terminated"),
            Outcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// The nonzero VMM counters, and where the backend stopped, as the last lines of a table.
pub fn totals_lines(totals: &[(&'static str, u64)], backend_stopped_at: Option<u32>) -> String {
    let mut s = String::new();
    let nonzero: Vec<String> = totals
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    let _ = writeln!(s, "totals: {}", nonzero.join(" "));
    if let Some(b) = backend_stopped_at {
        let _ = writeln!(s, "backend stopped at avail index {b} (GET_VRING_BASE)");
    }
    s
}
