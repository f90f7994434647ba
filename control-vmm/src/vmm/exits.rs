//! Exit accounting: counters kept by the run loop and the devices, KVM's own per-vCPU binary
//! statistics (KVM_GET_STATS_FD), and snapshots at the guest's phase markers, so the I/O phase
//! can be reported net of an idle baseline of the same length.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Measurement phases the guest marks on the phase port.
pub use guest_abi::boot::Phase;
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use super::wakeups::{ThreadRuns, ThreadWatch};

/// Errors reading KVM statistics.
#[derive(Debug, Error)]
pub enum StatsError {
    #[error("KVM_GET_STATS_FD: {0}")]
    Open(std::io::Error),
    #[error("reading the stats fd: {0}")]
    Read(std::io::Error),
    #[error("malformed stats header")]
    Malformed,
}

/// What the VMM counts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// KVM_EXIT_IO, port reads.
    PioIn,
    /// KVM_EXIT_IO, port writes.
    PioOut,
    /// KVM_EXIT_MMIO, reads.
    MmioRead,
    /// KVM_EXIT_MMIO, writes.
    MmioWrite,
    /// Any other exit reaching user space.
    OtherExit,
    /// virtio-mmio InterruptStatus reads (pass through the VMM).
    VirtioIsrRead,
    /// virtio-mmio InterruptACK writes (pass through the VMM).
    VirtioIsrAck,
    /// QueueNotify writes that missed the ioeventfd and reached the VMM.
    VirtioNotifyExit,
    /// Accesses to ports nothing decodes.
    UnknownPio,
    /// Accesses to guest-physical addresses nothing decodes.
    UnknownMmio,
    /// Bytes written to COM1.
    SerialOut,
    /// PCI configuration reads (0xCFC or ECAM), Linux guests.
    PciConfigRead,
    /// PCI configuration writes.
    PciConfigWrite,
    /// Accesses to a virtio-pci device's common, ISR and device configuration.
    VirtioPciConfig,
    /// MSI-X table and PBA accesses.
    MsixTableAccess,
    /// Accesses to an assigned function's BAR that reached the VMM (outside its MSI-X table
    /// and PBA, on the pages left out of KVM's slots or while its slots are not mapped).
    AssignedBarExit,
    /// Accesses to an emulated NVMe controller's registers (everything below its doorbells).
    NvmeRegister,
    /// Writes to an emulated NVMe controller's doorbells.
    NvmeDoorbell,
}

const COUNTERS: usize = 18;
const COUNTER_NAMES: [&str; COUNTERS] = [
    "pio_in",
    "pio_out",
    "mmio_read",
    "mmio_write",
    "other_exit",
    "virtio_isr_read",
    "virtio_isr_ack",
    "virtio_notify_exit",
    "unknown_pio",
    "unknown_mmio",
    "serial_out",
    "pci_config_read",
    "pci_config_write",
    "virtio_pci_config",
    "msix_table_access",
    "assigned_bar_exit",
    "nvme_register",
    "nvme_doorbell",
];

/// A vCPU's binary statistics file.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    names: Vec<String>,
    /// (byte offset in the data block, index into `names`) of each cumulative scalar counter.
    offsets: Vec<u64>,
    data_offset: u64,
    data_len: usize,
}

const KVM_STATS_TYPE_MASK: u32 = 0xf;
const KVM_STATS_TYPE_CUMULATIVE: u32 = 0;

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl KvmStats {
    /// Opens and indexes the statistics of `vcpu`.
    pub fn open(vcpu: &VcpuFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(StatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd the kernel just gave us.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let field = |i: usize| u32_at(&header, 4 * i).ok_or(StatsError::Malformed);
        let name_size = field(1)? as usize;
        let num_desc = field(2)? as usize;
        let desc_offset = u64::from(field(4)?);
        let data_offset = u64::from(field(5)?);
        if num_desc > 4096 || name_size > 256 {
            return Err(StatsError::Malformed);
        }
        let desc_len = 16 + name_size;
        let mut descs = vec![0u8; desc_len * num_desc];
        file.read_exact_at(&mut descs, desc_offset)
            .map_err(StatsError::Read)?;
        let mut names = Vec::new();
        let mut offsets = Vec::new();
        let mut data_len = 0usize;
        for d in descs.chunks_exact(desc_len) {
            let flags = u32_at(d, 0).ok_or(StatsError::Malformed)?;
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u32_at(d, 8).ok_or(StatsError::Malformed)? as usize;
            data_len = data_len.max(offset + 8 * size);
            if flags & KVM_STATS_TYPE_MASK != KVM_STATS_TYPE_CUMULATIVE || size != 1 {
                continue;
            }
            let raw = &d[16..];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
            offsets.push(offset as u64);
        }
        Ok(Self {
            file,
            names,
            offsets,
            data_offset,
            data_len,
        })
    }

    /// Names of the counters [`KvmStats::read`] returns, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Current values of the cumulative counters.
    pub fn read(&self) -> Result<Vec<u64>, StatsError> {
        let mut data = vec![0u8; self.data_len];
        self.file
            .read_exact_at(&mut data, self.data_offset)
            .map_err(StatsError::Read)?;
        Ok(self
            .offsets
            .iter()
            .map(|&o| {
                let o = o as usize;
                data.get(o..o + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0)
            })
            .collect())
    }

    /// The raw fd (for diagnostics).
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// The VMM's counters, shared by the vCPU threads and the devices.
#[derive(Debug, Default)]
pub struct ExitCounters {
    values: [AtomicU64; COUNTERS],
}

impl ExitCounters {
    pub fn bump(&self, c: Counter) {
        self.values[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> [u64; COUNTERS] {
        std::array::from_fn(|i| self.values[i].load(Ordering::Relaxed))
    }
}

/// All counters at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    vmm: [u64; COUNTERS],
    kvm: Vec<u64>,
    /// Exits by hardware reason, if a histogram is read ([`super::exit_reasons`]).
    reasons: Vec<(u32, u64)>,
    /// Run counts of the watched host threads ([`super::wakeups`]).
    threads: ThreadRuns,
}

/// Counter deltas of one phase.
#[derive(Debug, Clone, Default)]
pub struct PhaseCounts {
    pub duration: Duration,
    /// (name, value): the VMM's counters, then KVM's (prefixed `kvm.`).
    pub counts: Vec<(String, u64)>,
}

impl PhaseCounts {
    pub fn get(&self, name: &str) -> u64 {
        self.counts
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// Snapshots taken at the guest's phase markers.
#[derive(Debug, Default)]
pub struct PhaseLog {
    marks: Mutex<[Option<Snapshot>; 5]>,
    /// A guest that measures several times (a Linux guest's benchmark): each completed round
    /// (I/O, then idle) is kept here and the marks start afresh.
    in_rounds: bool,
    rounds: Mutex<Vec<(PhaseCounts, PhaseCounts)>>,
    /// The exit-reason histogram to read at each mark.
    hist: Option<std::path::PathBuf>,
    /// Host threads whose runs are counted at each mark.
    threads: ThreadWatch,
}

impl PhaseLog {
    /// A log that keeps every round the guest measures, reading `hist` at each mark.
    pub fn in_rounds(hist: Option<std::path::PathBuf>) -> Self {
        Self {
            in_rounds: true,
            hist,
            ..Self::default()
        }
    }

    /// Also counts the runs of these host threads at each mark (`host.*` counters).
    pub fn with_threads(mut self, watch: ThreadWatch) -> Self {
        self.threads = watch;
        self
    }

    /// After the idle baseline ended: keeps the round, if this log keeps rounds and the round
    /// is complete, and clears the marks for the next one.
    pub fn end_round(&self, kvm_names: &[String]) {
        if !self.in_rounds {
            return;
        }
        if let (Some(io), Some(idle)) = self.report(kvm_names) {
            log::info!(
                "measured round: I/O {:.1?}, idle {:.1?}",
                io.duration,
                idle.duration
            );
            if let Ok(mut r) = self.rounds.lock() {
                r.push((io, idle));
            }
        }
        if let Ok(mut m) = self.marks.lock() {
            *m = Default::default();
        }
    }

    /// The rounds kept so far: (I/O phase, idle baseline).
    pub fn rounds(&self) -> Vec<(PhaseCounts, PhaseCounts)> {
        self.rounds.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Records a snapshot for `phase` (the first mark of each phase counts).
    pub fn mark(&self, phase: Phase, counters: &ExitCounters, kvm: Option<&KvmStats>) {
        let snap = Snapshot {
            at: Instant::now(),
            vmm: counters.snapshot(),
            kvm: kvm.and_then(|k| k.read().ok()).unwrap_or_default(),
            reasons: self
                .hist
                .as_deref()
                .map(super::exit_reasons::read)
                .unwrap_or_default(),
            threads: self.threads.read(),
        };
        if let Ok(mut m) = self.marks.lock() {
            m[phase as usize].get_or_insert(snap);
        }
    }

    /// Length of the I/O phase, once it has ended.
    pub fn io_duration(&self) -> Option<Duration> {
        let m = self.marks.lock().ok()?;
        let (a, b) = (m[1].as_ref()?, m[2].as_ref()?);
        Some(b.at.duration_since(a.at))
    }

    fn delta(&self, from: Phase, to: Phase, kvm_names: &[String]) -> Option<PhaseCounts> {
        let m = self.marks.lock().ok()?;
        let (a, b) = (m[from as usize].as_ref()?, m[to as usize].as_ref()?);
        let mut counts: Vec<(String, u64)> = COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), b.vmm[i].saturating_sub(a.vmm[i])))
            .collect();
        for (i, n) in kvm_names.iter().enumerate() {
            let (x, y) = (a.kvm.get(i).copied(), b.kvm.get(i).copied());
            if let (Some(x), Some(y)) = (x, y) {
                counts.push((format!("kvm.{n}"), y.saturating_sub(x)));
            }
        }
        for (reason, y) in &b.reasons {
            let x = a
                .reasons
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, v)| *v);
            let name = super::exit_reasons::reason_name(*reason);
            counts.push((format!("exit.{name}"), y.saturating_sub(x)));
        }
        counts.extend(a.threads.delta(&b.threads, &self.threads));
        Some(PhaseCounts {
            duration: b.at.duration_since(a.at),
            counts,
        })
    }

    /// The I/O phase and the idle baseline, if the guest marked them.
    pub fn report(&self, kvm_names: &[String]) -> (Option<PhaseCounts>, Option<PhaseCounts>) {
        (
            self.delta(Phase::IoStart, Phase::IoEnd, kvm_names),
            self.delta(Phase::IdleStart, Phase::IdleEnd, kvm_names),
        )
    }
}

/// Total VMM counters (whole run) as (name, value).
pub fn totals(counters: &ExitCounters) -> Vec<(&'static str, u64)> {
    let s = counters.snapshot();
    COUNTER_NAMES.iter().copied().zip(s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_in_rounds_keeps_each_complete_round_and_starts_afresh() {
        let log = PhaseLog::in_rounds(None);
        let counters = ExitCounters::default();
        for round in 1..=2u64 {
            log.mark(Phase::IoStart, &counters, None);
            for _ in 0..round * 10 {
                counters.bump(Counter::MmioWrite);
            }
            log.mark(Phase::IoEnd, &counters, None);
            log.mark(Phase::IdleStart, &counters, None);
            counters.bump(Counter::MmioWrite);
            log.mark(Phase::IdleEnd, &counters, None);
            log.end_round(&[]);
        }
        // An I/O phase without its idle baseline is not a round.
        log.mark(Phase::IoStart, &counters, None);
        log.mark(Phase::IoEnd, &counters, None);
        log.end_round(&[]);
        let rounds = log.rounds();
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].0.get("mmio_write"), 10);
        assert_eq!(rounds[1].0.get("mmio_write"), 20);
        assert_eq!(rounds[1].1.get("mmio_write"), 1);
    }

    #[test]
    fn a_log_for_one_measurement_keeps_its_first_marks() {
        let log = PhaseLog::default();
        let counters = ExitCounters::default();
        log.mark(Phase::IoStart, &counters, None);
        counters.bump(Counter::PioOut);
        log.mark(Phase::IoEnd, &counters, None);
        log.end_round(&[]);
        counters.bump(Counter::PioOut);
        log.mark(Phase::IoEnd, &counters, None);
        let (io, idle) = log.report(&[]);
        assert_eq!(io.map(|p| p.get("pio_out")), Some(1));
        assert!(idle.is_none());
        assert!(log.rounds().is_empty());
    }
}
