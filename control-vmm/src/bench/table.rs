//! The figures of `splitvmm bench-approaches`: what the guest program printed (`BENCH` lines
//! of `l2-bench`), what the VMM counted over each measured phase (its `round N NAME IO IDLE
//! NET` lines), and the table made of them.

use std::collections::BTreeMap;

use thiserror::Error;

/// Output that does not say what a row needs.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FiguresError {
    #[error("malformed benchmark line: {0}")]
    Malformed(String),
    #[error("the guest measured {guest} phases, the VMM counted {vmm}")]
    Mismatch { guest: usize, vmm: usize },
    #[error("no benchmark line from the guest program")]
    Nothing,
}

/// One phase of the guest program (`BENCH qd=.. requests=.. seconds=.. iops=.. disk-irqs=..
/// op=..`) with what the VMM counted over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub qd: u32,
    pub op: String,
    pub requests: u64,
    pub seconds: f64,
    pub interrupts: u64,
    /// The VMM's counters over the phase (none for native).
    pub counts: BTreeMap<String, u64>,
}

impl Phase {
    /// The workload's name: `QD1 read`.
    pub fn workload(&self) -> String {
        format!("QD{} {}", self.qd, self.op)
    }

    pub fn ops_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// `name` per request.
    pub fn per_op(&self, name: &str) -> f64 {
        self.get(name) as f64 / self.requests.max(1) as f64
    }

    /// Port and MMIO exits that reached the VMM, per request (the phase's end marker, one
    /// MMIO write, included).
    pub fn vmm_exits_per_op(&self) -> f64 {
        ["pio_in", "pio_out", "mmio_read", "mmio_write"]
            .iter()
            .map(|c| self.per_op(c))
            .sum()
    }
}

/// One row of the table: an approach and its phases, in the order the guest ran them.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub approach: String,
    pub phases: Vec<Phase>,
    /// Whether the VMM counted (false: native, no VMM).
    pub counted: bool,
}

/// The `BENCH` lines of a console, in order (carriage returns and other lines ignored).
pub fn guest_phases(console: &str) -> Result<Vec<Phase>, FiguresError> {
    let mut out = Vec::new();
    for line in console.lines().map(|l| l.trim_end_matches('\r')) {
        let Some(rest) = line.strip_prefix("BENCH ") else {
            continue;
        };
        let mut kv = BTreeMap::new();
        for word in rest.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                kv.insert(k, v);
            }
        }
        let bad = || FiguresError::Malformed(line.to_string());
        let num = |k: &str| {
            kv.get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(bad)
        };
        out.push(Phase {
            qd: u32::try_from(num("qd")?).map_err(|_| bad())?,
            op: kv.get("op").map_or("mixed", |v| v).to_string(),
            requests: num("requests")?,
            seconds: kv
                .get("seconds")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(bad)?,
            interrupts: num("disk-irqs")?,
            counts: BTreeMap::new(),
        });
    }
    if out.is_empty() {
        return Err(FiguresError::Nothing);
    }
    Ok(out)
}

/// The VMM's counters over each round's I/O phase (`round N NAME IO IDLE NET` lines of
/// `splitvmm-vmm`'s exit table), by round, in order.
pub fn vmm_rounds(table: &str) -> Vec<BTreeMap<String, u64>> {
    let mut rounds: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
    for line in table.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() != 6 || w[0] != "round" {
            continue;
        }
        let (Ok(n), Ok(io)) = (w[1].parse::<u32>(), w[3].parse::<u64>()) else {
            continue;
        };
        rounds.entry(n).or_default().insert(w[2].to_string(), io);
    }
    // A round may have no nonzero counter line at all; keep the numbering dense.
    let last = rounds.keys().next_back().copied().unwrap_or(0);
    (1..=last)
        .map(|n| rounds.remove(&n).unwrap_or_default())
        .collect()
}

/// The guest's phases of a VMM row with the VMM's counts joined, round by round.
pub fn join(
    mut phases: Vec<Phase>,
    rounds: Vec<BTreeMap<String, u64>>,
) -> Result<Vec<Phase>, FiguresError> {
    if phases.len() != rounds.len() {
        return Err(FiguresError::Mismatch {
            guest: phases.len(),
            vmm: rounds.len(),
        });
    }
    for (p, r) in phases.iter_mut().zip(rounds) {
        p.counts = r;
    }
    Ok(phases)
}

/// Counters shown per request in the table's last column, when nonzero.
const REASONS: &[&str] = &[
    "nvme_doorbell",
    "nvme_register",
    "msix_table_access",
    "virtio_pci_config",
    "virtio_notify_exit",
    "assigned_bar_exit",
    "pci_config_read",
    "pci_config_write",
    "kvm.mmio_exits",
    "kvm.io_exits",
    "kvm.halt_exits",
    "kvm.irq_window_exits",
    "kvm.irq_injections",
    "kvm.insn_emulation",
];

/// The markdown table: one line per row and workload, % of native for the same workload.
pub fn render(rows: &[Row]) -> String {
    let native: BTreeMap<String, f64> = rows
        .iter()
        .filter(|r| r.approach == "native")
        .flat_map(|r| r.phases.iter().map(|p| (p.workload(), p.ops_per_second())))
        .collect();
    let mut s = String::from(
        "| approach | workload | requests | ops/s | % of native | exits to the VMM / op | \
         KVM exits / op | interrupts / op | host thread runs / op (VMM + backend) | per op by reason |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for row in rows {
        for p in &row.phases {
            let ops = p.ops_per_second();
            let share = native
                .get(&p.workload())
                .filter(|n| **n > 0.0)
                .map_or("-".to_string(), |n| format!("{:.0}%", 100.0 * ops / n));
            let (vmm, kvm, threads, reasons) = if row.counted {
                let vmm_t = p.per_op(crate::vmm::wakeups::VMM_THREAD_RUNS);
                let be_t = p.per_op(crate::vmm::wakeups::BACKEND_THREAD_RUNS);
                let reasons: Vec<String> = REASONS
                    .iter()
                    .chain(exit_reason_names(p).iter())
                    .filter(|c| p.get(c) != 0)
                    .map(|c| format!("{c}={:.2}", p.per_op(c)))
                    .collect();
                (
                    format!("{:.3}", p.vmm_exits_per_op()),
                    format!("{:.2}", p.per_op("kvm.exits")),
                    format!("{:.2} ({vmm_t:.2} + {be_t:.2})", vmm_t + be_t),
                    if reasons.is_empty() {
                        "-".to_string()
                    } else {
                        reasons.join(" ")
                    },
                )
            } else {
                ("-".into(), "-".into(), "-".into(), "-".into())
            };
            s.push_str(&format!(
                "| {} | {} | {} | {ops:.0} | {share} | {vmm} | {kvm} | {:.2} | {threads} | {reasons} |\n",
                row.approach,
                p.workload(),
                p.requests,
                p.interrupts as f64 / p.requests.max(1) as f64,
            ));
        }
    }
    s
}

/// Exits by hardware reason (`exit.*`, when the VMM read the host's histogram).
fn exit_reason_names(p: &Phase) -> Vec<&str> {
    p.counts
        .keys()
        .filter(|k| k.starts_with("exit."))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "L2-BENCH-DEVICE nvme0n1 driver nvme\r\n\
        BENCH qd=1 requests=200 seconds=2.000 iops=100.0 disk-irqs=200 op=read\r\n\
        some kernel line\n\
        BENCH qd=32 requests=640 seconds=2.000 iops=320.0 disk-irqs=80 op=write\n";

    const VMM: &str = "splitvmm-vmm: powered off (exit 0) after 20.0s\n\
        round 1: I/O phase 2.000s, idle baseline 1.000ms\n\
        round 1 mmio_write                        401          3        398\n\
        round 1 nvme_doorbell                     400          0        400\n\
        round 1 kvm.exits                         900          5        895\n\
        round 1 host.vmm_thread_runs               10          0         10\n\
        round 2: I/O phase 2.000s, idle baseline 1.000ms\n\
        round 2 mmio_write                        700          3        697\n\
        round 2 nvme_doorbell                     699          0        699\n\
        total mmio_write 5000\n";

    #[test]
    fn guest_lines_and_vmm_rounds_join_in_order() {
        let phases = join(guest_phases(CONSOLE).unwrap(), vmm_rounds(VMM)).unwrap();
        assert_eq!(phases.len(), 2);
        assert_eq!(phases[0].workload(), "QD1 read");
        assert_eq!(phases[0].get("nvme_doorbell"), 400);
        assert_eq!(phases[0].per_op("nvme_doorbell"), 2.0);
        assert!((phases[0].vmm_exits_per_op() - 2.005).abs() < 1e-9);
        assert_eq!(phases[1].op, "write");
        assert_eq!(phases[1].get("kvm.exits"), 0);
        assert_eq!(phases[1].ops_per_second(), 320.0);
    }

    #[test]
    fn a_count_mismatch_or_a_bad_line_is_an_error() {
        let one_round = "round 1 mmio_write 1 0 1\n";
        assert_eq!(
            join(guest_phases(CONSOLE).unwrap(), vmm_rounds(one_round)),
            Err(FiguresError::Mismatch { guest: 2, vmm: 1 })
        );
        assert!(matches!(
            guest_phases("BENCH qd=x requests=1 seconds=1 disk-irqs=0\n"),
            Err(FiguresError::Malformed(_))
        ));
        assert_eq!(guest_phases("nothing\n"), Err(FiguresError::Nothing));
    }

    #[test]
    fn a_round_without_counter_lines_keeps_its_place() {
        let r = vmm_rounds("round 2 mmio_write 5 0 5\n");
        assert_eq!(r.len(), 2);
        assert!(r[0].is_empty());
        assert_eq!(r[1].get("mmio_write"), Some(&5));
    }

    #[test]
    fn the_table_compares_each_workload_with_native() {
        let vmm = Row {
            approach: "emulated".into(),
            phases: join(guest_phases(CONSOLE).unwrap(), vmm_rounds(VMM)).unwrap(),
            counted: true,
        };
        let native = Row {
            approach: "native".into(),
            phases: guest_phases(
                "BENCH qd=1 requests=1000 seconds=2.000 iops=500.0 disk-irqs=1000 op=read\n",
            )
            .unwrap(),
            counted: false,
        };
        let t = render(&[vmm, native]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(
            lines[2].starts_with("| emulated | QD1 read | 200 | 100 | 20% | 2.005 | 4.50 | 1.00 | 0.05 (0.05 + 0.00) | nvme_doorbell=2.00 "),
            "{}",
            lines[2]
        );
        // No native figure for QD32 write: no share.
        assert!(
            lines[3].contains("| QD32 write | 640 | 320 | - |"),
            "{}",
            lines[3]
        );
        assert_eq!(
            lines[4],
            "| native | QD1 read | 1000 | 500 | 100% | - | - | 1.00 | - | - |"
        );
    }
}
