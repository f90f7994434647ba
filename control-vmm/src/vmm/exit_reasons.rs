//! Exits by hardware reason, which KVM's binary stats do not split (MSR accesses, for one,
//! are only in `exits`): read from a tracefs histogram of the host kernel's `kvm_exit`
//! tracepoint keyed by `exit_reason`, which the benchmark sets up before the guest runs:
//!
//! ```sh
//! echo 'hist:keys=exit_reason' > /sys/kernel/tracing/events/kvm/kvm_exit/trigger
//! splitvmm-vmm --linux ... --exit-reason-hist /sys/kernel/tracing/events/kvm/kvm_exit/hist
//! ```
//!
//! The histogram counts every VM's exits: measure with one VM running. The VMM reads it at the
//! guest's phase marks, as it reads KVM's stats.

use std::path::Path;

/// SVM exit codes (AMD APM vol. 2, appendix C) with the names the exit table uses; Intel's
/// VMX reasons (SDM vol. 3, appendix C) after them. The lab's L1 KVM is kvm-amd.
const SVM_REASONS: [(u32, &str); 9] = [
    (0x060, "intr"),
    (0x061, "nmi"),
    (0x064, "vintr"),
    (0x072, "cpuid"),
    (0x078, "hlt"),
    (0x07b, "ioio"),
    (0x07c, "msr"),
    (0x081, "vmmcall"),
    (0x400, "npf"),
];

/// A reason's name for the exit table (`exit.<name>`).
pub fn reason_name(code: u32) -> String {
    SVM_REASONS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or_else(|| format!("svm_{code:#x}"), |(_, n)| (*n).to_owned())
}

/// Parses a histogram keyed by `exit_reason` (`{ exit_reason:  124 } hitcount:  10` lines);
/// other lines are skipped. Returns (reason, count) pairs.
pub fn parse_hist(text: &str) -> Vec<(u32, u64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("{ exit_reason:")?;
            let (reason, rest) = rest.split_once('}')?;
            let count = rest.trim().strip_prefix("hitcount:")?.trim();
            Some((reason.trim().parse().ok()?, count.parse().ok()?))
        })
        .collect()
}

/// Reads the histogram at `path`; empty if it cannot be read (logged once by the caller).
pub fn read(path: &Path) -> Vec<(u32, u64)> {
    std::fs::read_to_string(path)
        .map(|t| parse_hist(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracefs_histogram_parses_into_reasons_and_counts() {
        let text = "# event histogram\n#\n# trigger info: hist:keys=exit_reason:vals=hitcount\
                    :sort=hitcount:size=2048 [active]\n#\n\n\
                    { exit_reason:        124 } hitcount:         10\n\
                    { exit_reason:       1024 } hitcount:       3456\n\
                    { exit_reason:         x } hitcount:          1\n\n\
                    Totals:\n    Hits: 3466\n    Entries: 2\n    Dropped: 0\n";
        assert_eq!(parse_hist(text), [(124, 10), (1024, 3456)]);
        assert_eq!(reason_name(0x7c), "msr");
        assert_eq!(reason_name(0x400), "npf");
        assert_eq!(reason_name(0x79), "svm_0x79");
    }
}
