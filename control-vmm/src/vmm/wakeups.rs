//! Host threads scheduled in during a measured phase, other than the guest's vCPU threads:
//! what a request costs the host beyond the vCPU that issued it (the VMM's own helper threads,
//! the driver domain's backend threads, or the helper threads of the VMM of a driver VM that
//! serves the guest's disk).
//!
//! Read from `/proc/<pid>/task/<tid>/schedstat`, whose third field is the number of times the
//! thread was scheduled in on a CPU (`sched_info.pcount`: every switch to it, whether it had
//! slept or had been preempted while runnable). A thread that sleeps between requests and is
//! woken for each counts one per wake-up. Counted per thread (by tid) between two snapshots:
//! a thread born during the phase counts all its runs; one that ended during it is missed.
//! Kernel threads (the host's interrupt handlers, workqueues, irqfd injection) are not
//! counted: they belong to no process.

use std::collections::HashMap;
use std::path::Path;

/// Threads of these processes are counted.
#[derive(Debug, Clone, Default)]
pub struct ThreadWatch {
    /// Count this process's threads other than its vCPU threads (named `vcpu<N>`).
    pub own_non_vcpu: bool,
    /// Count every thread of these processes (the driver domain's backend, ...).
    pub others: Vec<u32>,
    /// Count the threads other than vCPU threads of these processes (the VMM of a driver VM
    /// serving this guest: its vCPU runs the backend, its other threads must not run per
    /// request).
    pub peer_vmms: Vec<u32>,
}

/// The counter names in a phase's counts.
pub const VMM_THREAD_RUNS: &str = "host.vmm_thread_runs";
pub const BACKEND_THREAD_RUNS: &str = "host.backend_thread_runs";
pub const PEER_VMM_THREAD_RUNS: &str = "host.peer_vmm_thread_runs";

/// Run counts at one instant, by (counter, tid).
#[derive(Debug, Clone, Default)]
pub struct ThreadRuns(HashMap<(&'static str, u32), u64>);

impl ThreadWatch {
    /// Whether anything is watched.
    pub fn is_empty(&self) -> bool {
        !self.own_non_vcpu && self.others.is_empty() && self.peer_vmms.is_empty()
    }

    /// The run counts of the watched threads now (threads that cannot be read are left out:
    /// they ended).
    pub fn read(&self) -> ThreadRuns {
        let mut runs = ThreadRuns::default();
        if self.own_non_vcpu {
            read_process(
                Path::new("/proc/self/task"),
                VMM_THREAD_RUNS,
                true,
                &mut runs,
            );
        }
        for pid in &self.others {
            let dir = format!("/proc/{pid}/task");
            read_process(Path::new(&dir), BACKEND_THREAD_RUNS, false, &mut runs);
        }
        for pid in &self.peer_vmms {
            let dir = format!("/proc/{pid}/task");
            read_process(Path::new(&dir), PEER_VMM_THREAD_RUNS, true, &mut runs);
        }
        runs
    }
}

impl ThreadRuns {
    /// Per counter: runs between `self` (earlier) and `later`, summed over the threads alive
    /// at `later`. Both counters are always present when `watch` asks for them.
    pub fn delta(&self, later: &ThreadRuns, watch: &ThreadWatch) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut names = Vec::new();
        if watch.own_non_vcpu {
            names.push(VMM_THREAD_RUNS);
        }
        if !watch.others.is_empty() {
            names.push(BACKEND_THREAD_RUNS);
        }
        if !watch.peer_vmms.is_empty() {
            names.push(PEER_VMM_THREAD_RUNS);
        }
        for name in names {
            let sum = later
                .0
                .iter()
                .filter(|((n, _), _)| *n == name)
                .map(|(key, v)| v.saturating_sub(self.0.get(key).copied().unwrap_or(0)))
                .sum();
            out.push((name.to_string(), sum));
        }
        out
    }
}

fn read_process(task_dir: &Path, counter: &'static str, skip_vcpus: bool, runs: &mut ThreadRuns) {
    let Ok(entries) = std::fs::read_dir(task_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if skip_vcpus {
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if is_vcpu_thread(&comm) {
                continue;
            }
        }
        if let Some(n) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| run_count(&s))
        {
            runs.0.insert((counter, tid), n);
        }
    }
}

/// The third field of a `schedstat` line: times scheduled in.
pub fn run_count(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(2)?.parse().ok()
}

/// A vCPU thread of this VMM (`vcpu<N>`, as `comm` shows it).
pub fn is_vcpu_thread(comm: &str) -> bool {
    comm.trim()
        .strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_count_is_the_third_field() {
        assert_eq!(run_count("1234 567 89\n"), Some(89));
        assert_eq!(run_count("1234 567"), None);
        assert_eq!(run_count("a b c"), None);
    }

    #[test]
    fn vcpu_threads_are_told_by_their_name() {
        assert!(is_vcpu_thread("vcpu0\n"));
        assert!(is_vcpu_thread("vcpu31"));
        assert!(!is_vcpu_thread("vcpu"));
        assert!(!is_vcpu_thread("vcpu-stats"));
        assert!(!is_vcpu_thread("splitvmm-vmm"));
    }

    #[test]
    fn a_delta_counts_new_threads_whole_and_old_ones_by_difference() {
        let watch = ThreadWatch {
            own_non_vcpu: true,
            others: vec![1],
            peer_vmms: vec![],
        };
        let mut a = ThreadRuns::default();
        a.0.insert((VMM_THREAD_RUNS, 10), 5);
        a.0.insert((BACKEND_THREAD_RUNS, 20), 100);
        a.0.insert((BACKEND_THREAD_RUNS, 21), 7); // ends during the phase
        let mut b = a.clone();
        b.0.remove(&(BACKEND_THREAD_RUNS, 21));
        b.0.insert((VMM_THREAD_RUNS, 10), 8);
        b.0.insert((BACKEND_THREAD_RUNS, 20), 140);
        b.0.insert((BACKEND_THREAD_RUNS, 22), 3); // born during the phase
        let d = a.delta(&b, &watch);
        assert_eq!(
            d,
            vec![
                (VMM_THREAD_RUNS.to_string(), 3),
                (BACKEND_THREAD_RUNS.to_string(), 43)
            ]
        );
        // Nothing watched: nothing reported.
        assert!(a.delta(&b, &ThreadWatch::default()).is_empty());
    }

    #[test]
    fn this_process_reads_its_own_threads_but_not_vcpus() {
        let watch = ThreadWatch {
            own_non_vcpu: true,
            others: vec![],
            peer_vmms: vec![],
        };
        let before = watch.read();
        if !Path::new("/proc/self/task").exists()
            || std::fs::read_to_string("/proc/self/schedstat").is_err()
        {
            return; // no schedstat in this kernel: nothing to read
        }
        assert!(!before.0.is_empty(), "the test's own thread is counted");
        let t = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(|| {
                for _ in 0..5 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                watch_once()
            })
            .expect("spawn");
        let seen = t.join().expect("join");
        assert!(!seen, "a thread named vcpu7 is not counted");
    }

    #[test]
    fn a_peer_vmm_counts_its_threads_but_not_its_vcpus() {
        // This process as the peer: a thread named vcpu<N> is left out, the others counted.
        let pid = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let vcpu = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() } as u32).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        let vcpu_tid = rx.recv().unwrap();
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() } as u32;
        let watch = ThreadWatch {
            own_non_vcpu: false,
            others: vec![],
            peer_vmms: vec![pid],
        };
        let runs = watch.read();
        assert!(runs.0.contains_key(&(PEER_VMM_THREAD_RUNS, me)));
        assert!(!runs.0.contains_key(&(PEER_VMM_THREAD_RUNS, vcpu_tid)));
        let names: Vec<String> = runs
            .delta(&runs, &watch)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec![PEER_VMM_THREAD_RUNS.to_string()]);
        stop_tx.send(()).unwrap();
        vcpu.join().unwrap();
    }

    /// Whether the calling thread appears in its own process's non-vCPU reading.
    fn watch_once() -> bool {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let watch = ThreadWatch {
            own_non_vcpu: true,
            others: vec![],
            peer_vmms: vec![],
        };
        watch.read().0.contains_key(&(VMM_THREAD_RUNS, tid))
    }
}
