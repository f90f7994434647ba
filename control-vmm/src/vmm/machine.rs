//! A machine's lifetime: build the VM, run its vCPUs, stop on poweroff, reset, error or
//! SIGTERM, quiesce the backend, and report.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::boot::{self, BootInfo};
use super::bus::Bus;
use super::exits::{totals, ExitCounters, PhaseCounts, PhaseLog};
use super::layout::*;
use super::memory::GuestRam;
use super::serial::Com1;
use super::vcpu::{self, VcpuContext, VcpuStop};
use super::vhost_device::{shared_region, SharedRegion, VhostDevice};
use super::virtio_mmio::{VirtioMmioBlk, QUEUE_NOTIFY_OFFSET};

/// Errors building or running a machine (guest behaviour is never one of them).
#[derive(Debug, Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("{op}: {source}")]
    Setup {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM lacks {0}")]
    Capability(&'static str),
    #[error(transparent)]
    Memory(#[from] super::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Backend(#[from] frontend_core::vhost_user::FrontendSessionError),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn setup(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { op, source }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { op, source }
}

/// How the guest waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingMode {
    /// An interrupt per completion the device signals; no suppression.
    Notify,
    /// Interrupts with VIRTIO_RING_F_EVENT_IDX suppression.
    EventIdx,
    /// Busy-polling the used ring, interrupts off.
    Poll,
}

/// What to run.
pub struct VmConfig {
    /// The ELF kernel.
    pub kernel: PathBuf,
    /// RAM in bytes (a multiple of 2 MiB).
    pub ram_bytes: u64,
    /// Number of vCPUs (vCPU 0 boots; the others wait for INIT/SIPI).
    pub vcpus: u8,
    /// What the tiny kernel does.
    pub mode: GuestMode,
    /// The virtio-blk device's backend, if any.
    pub blk: BlkAttachment,
    /// Share all of RAM with the backend, not only the I/O window (explicit opt-in).
    pub share_all_ram: bool,
    /// I/O window size in bytes.
    pub window_bytes: u64,
    pub ring: RingMode,
    /// Disk requests (half writes, half reads) and the batch size.
    pub requests: u32,
    pub batch: u32,
    /// The disk check: pattern seed, verify only, request size, sectors (0: `requests / 2`).
    pub seed: u64,
    pub verify_only: bool,
    pub sectors_per_request: u32,
    pub check_sectors: u32,
    /// Measure an idle baseline as long as the I/O phase.
    pub idle_baseline: bool,
    /// Bytes written into the guest's memory before it boots (none by default).
    pub markers: GuestMarkers,
    /// How long to wait for the backend socket.
    pub connect_timeout: Duration,
    /// Where COM1's output goes.
    pub console: Box<dyn Write + Send>,
    /// Set to stop the machine from outside (e.g. on SIGTERM).
    pub stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("kernel", &self.kernel)
            .field("ram_bytes", &self.ram_bytes)
            .field("mode", &self.mode)
            .field("blk", &self.blk)
            .field("ring", &self.ring)
            .finish_non_exhaustive()
    }
}

/// Marker bytes the VMM writes into the guest's memory before its kernel runs, for the
/// driver VM's isolation test (docs/driver-vm.md, "What the driver VM can see"): `private`
/// in the middle of RAM (untouched by the tiny kernel, which lives at 1 MiB with its stack at
/// the top; RAM is never shared unless `share_all_ram`), `window` at the start of the I/O
/// window's last page (shared with the backend; the kernel allocates from the window's
/// start). Each at most a page; empty: not written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestMarkers {
    pub private: Vec<u8>,
    pub window: Vec<u8>,
}

impl GuestMarkers {
    /// GPAs of the private and the window marker in a machine of `ram_bytes` of RAM and a
    /// window of `window_bytes`.
    pub fn places(ram_bytes: u64, window_bytes: u64) -> (u64, u64) {
        (
            ram_bytes / 2,
            WINDOW_GPA + window_bytes.saturating_sub(4096),
        )
    }

    /// Writes the markers into `ram`.
    fn write(&self, ram: &GuestRam, ram_bytes: u64, window_bytes: u64) -> Result<(), VmError> {
        let (private, window) = Self::places(ram_bytes, window_bytes);
        for (bytes, gpa, what) in [
            (&self.private, private, "private"),
            (&self.window, window, "window"),
        ] {
            if bytes.is_empty() {
                continue;
            }
            // Clear of the kernel (from 1 MiB) and of the window's first pages.
            if bytes.len() > 4096 || ram_bytes < (8 << 20) || window_bytes < (64 << 10) {
                return Err(VmError::Config(format!(
                    "a {what} marker of {} bytes needs at most 4096 bytes, 8 MiB of RAM and a \
                     window of 64 KiB",
                    bytes.len()
                )));
            }
            ram.mem
                .write_slice(bytes, GuestAddress(gpa))
                .map_err(|e| VmError::Config(format!("writing the {what} marker: {e}")))?;
        }
        Ok(())
    }
}

/// Where the virtio-blk device's backend comes from.
#[derive(Debug, Default)]
pub enum BlkAttachment {
    /// No disk.
    #[default]
    None,
    /// Connect to a vhost-user-blk socket.
    Socket(PathBuf),
    /// A session already set up (e.g. from a previous machine on the same connection).
    Connected(Box<VhostDevice>),
}

/// How the machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off with a status.
    Poweroff(u8),
    /// The guest reset the machine (e.g. a triple fault); the VMM stops instead of rebooting.
    Reset(String),
    /// Stopped from outside (SIGTERM).
    Terminated,
    /// KVM failed.
    Failed(String),
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub outcome: Outcome,
    /// Counter deltas over the guest's I/O phase and its idle baseline.
    pub io: Option<PhaseCounts>,
    pub idle: Option<PhaseCounts>,
    /// VMM counters over the whole run.
    pub totals: Vec<(&'static str, u64)>,
    /// Counters the guest reported in its boot-info page.
    pub guest: [u64; GUEST_REPORT_SLOTS],
    /// Avail index the backend reported when its queue was stopped (GET_VRING_BASE).
    pub backend_stopped_at: Option<u32>,
    pub wall: Duration,
}

/// Installs the handler of [`kick_signal`] (it only interrupts KVM_RUN).
pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(|e| VmError::Io {
        op: "installing the vCPU kick handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts KVM_RUN when a vCPU must stop.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Builds and runs a machine to its end.
pub fn run(cfg: VmConfig) -> Result<VmReport, VmError> {
    run_keeping_backend(cfg).map(|(report, _)| report)
}

/// As [`run`], and gives the (stopped) vhost-user session back for another machine.
pub fn run_keeping_backend(cfg: VmConfig) -> Result<(VmReport, Option<VhostDevice>), VmError> {
    let started = Instant::now();
    if cfg.vcpus == 0 || cfg.vcpus > 8 {
        return Err(VmError::Config(format!("{} vCPUs", cfg.vcpus)));
    }
    let (kvm, vm) = create_vm()?;

    let ram = GuestRam::new(cfg.ram_bytes, WINDOW_GPA, cfg.window_bytes)?;
    ram.register(&vm)?;
    let counters = Arc::new(ExitCounters::default());

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(setup("KVM_IRQFD (COM1)"))?;
    let com1 = Com1::new(serial_irq, cfg.console);

    let virtio = attach_blk(cfg.blk, &ram, cfg.share_all_ram, cfg.connect_timeout)?;
    if let Some(backend) = &virtio {
        vm.register_ioevent(
            backend.kick(0)?,
            &IoEventAddress::Mmio(VIRTIO_MMIO_GPA + QUEUE_NOTIFY_OFFSET),
            0u32,
        )
        .map_err(setup("KVM_IOEVENTFD (queue notify)"))?;
        vm.register_irqfd(backend.call(0)?, VIRTIO_MMIO_IRQ)
            .map_err(setup("KVM_IRQFD (virtio-blk)"))?;
    }
    let virtio = virtio.map(|b| VirtioMmioBlk::new(b, Arc::clone(&counters)));
    let has_virtio = virtio.is_some();
    let wake = if cfg.idle_baseline {
        let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        vm.register_irqfd(&efd, WAKE_IRQ)
            .map_err(setup("KVM_IRQFD (wake-up)"))?;
        Some(Arc::new(efd))
    } else {
        None
    };

    let info = BootInfo {
        mode: cfg.mode,
        mmio_base: if has_virtio { VIRTIO_MMIO_GPA } else { 0 },
        mmio_irq: VIRTIO_MMIO_IRQ,
        ring_flags: match cfg.ring {
            RingMode::Notify => 0,
            RingMode::EventIdx => RING_EVENT_IDX,
            RingMode::Poll => RING_POLL,
        },
        window_gpa: WINDOW_GPA,
        window_len: cfg.window_bytes,
        requests: cfg.requests,
        batch: cfg.batch,
        wake_irq: if wake.is_some() { WAKE_IRQ } else { 0 },
        seed: cfg.seed,
        verify_only: cfg.verify_only,
        sectors_per_request: cfg.sectors_per_request,
        check_sectors: cfg.check_sectors,
    };
    let entry = boot::load(&ram.mem, &cfg.kernel, cfg.ram_bytes, &info)?;
    cfg.markers.write(&ram, cfg.ram_bytes, cfg.window_bytes)?;

    let bus = Arc::new(Bus::new(com1, virtio, Arc::clone(&counters)));
    let phases = Arc::new(PhaseLog::default());
    let (done_tx, done_rx) = mpsc::channel();
    install_kick_handler()?;
    // This machine's own stop flag: `cfg.stop` is the caller's and may outlive the machine.
    let halt = Arc::new(AtomicBool::new(false));
    let mut kvm_names = Vec::new();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = vcpu::create(&kvm, &vm, id, (id == 0).then_some(entry))?;
        if id == 0 {
            kvm_names = vcpu::stats_names(&fd);
        }
        let ctx = VcpuContext {
            bus: Arc::clone(&bus) as Arc<dyn super::bus::ExitBus>,
            counters: Arc::clone(&counters),
            phases: Arc::clone(&phases),
            stop: Arc::clone(&halt),
            wake: wake.clone(),
            done: done_tx.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(id, fd, ctx))
            .map_err(io("starting a vCPU thread"))?;
        threads.push(t);
    }
    drop(done_tx);

    let outcome = wait_for_end(&done_rx, &cfg.stop, STOP_POLL_TINY);
    halt.store(true, Ordering::SeqCst);
    stop_vcpus(threads);

    // No vCPU runs any more; stop the backend before guest memory goes away.
    let backend_stopped_at = bus.virtio().and_then(|mut d| d.quiesce());
    let mut guest = [0u64; GUEST_REPORT_SLOTS];
    for (i, slot) in guest.iter_mut().enumerate() {
        let gpa = BOOT_INFO_GPA + GUEST_REPORT_OFFSET + 8 * i as u64;
        *slot = ram.mem.read_obj(GuestAddress(gpa)).unwrap_or(0);
    }
    let (io_phase, idle) = phases.report(&kvm_names);
    let report = VmReport {
        outcome,
        io: io_phase,
        idle,
        totals: totals(&counters),
        guest,
        backend_stopped_at,
        wall: started.elapsed(),
    };
    // Every vCPU thread has ended, so this is the last reference to the bus.
    let backend = Arc::try_unwrap(bus)
        .ok()
        .and_then(Bus::into_virtio)
        .map(VirtioMmioBlk::into_backend);
    Ok((report, backend))
}

/// Opens KVM and creates a VM with what every machine here needs: the in-kernel irqchip
/// (PIC, I/O APIC, local APICs), PIT2 with a dummy speaker, the TSS address; ioeventfd and
/// irqfd are checked for.
pub(crate) fn create_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = super::kvm_device::open().map_err(VmError::Kvm)?;
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
        (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::Capability(name));
        }
    }
    let vm = kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(setup("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;
    Ok((kvm, vm))
}

/// Connects (or takes over) the disk's vhost-user session and tells it which memory the
/// backend may see: the I/O window, and RAM only on explicit request.
fn attach_blk(
    blk: BlkAttachment,
    ram: &GuestRam,
    share_all_ram: bool,
    timeout: Duration,
) -> Result<Option<VhostDevice>, VmError> {
    let mut regions: Vec<SharedRegion> = ram.window.iter().map(shared_region).collect();
    if share_all_ram {
        log::warn!("sharing all guest RAM with the driver domain (explicit opt-in)");
        regions.push(shared_region(&ram.ram));
    }
    // vhost-user backends expect the memory table sorted by guest-physical address.
    regions.sort_by_key(|r| r.gpa);
    match blk {
        BlkAttachment::None => Ok(None),
        BlkAttachment::Socket(path) => Ok(Some(VhostDevice::connect_blk(&path, timeout, regions)?)),
        BlkAttachment::Connected(mut backend) => {
            if !backend.set_regions(regions) {
                return Err(VmError::Config(
                    "the vhost-user session is still running".into(),
                ));
            }
            Ok(Some(*backend))
        }
    }
}

/// How often the tiny machine's main thread looks at the stop flag.
pub(crate) const STOP_POLL_TINY: Duration = Duration::from_millis(20);
/// How often a Linux machine's main thread looks at it: rarely, as every wake-up is a run of a
/// host thread that is not a vCPU (the driver-VM lab measures them per request); a stop from
/// outside (SIGTERM, the toolstack) takes effect within this.
pub(crate) const STOP_POLL_LINUX: Duration = Duration::from_secs(1);

/// Waits for a vCPU to say how the machine ended, or for `stop` (looked at every `poll`).
pub(crate) fn wait_for_end(
    done: &mpsc::Receiver<(u8, VcpuStop)>,
    stop: &AtomicBool,
    poll: Duration,
) -> Outcome {
    loop {
        match done.recv_timeout(poll) {
            Ok((id, why)) => {
                log::info!("vCPU {id} stopped: {why:?}");
                match why {
                    VcpuStop::Poweroff(s) => return Outcome::Poweroff(s),
                    VcpuStop::Reset(r) => return Outcome::Reset(r),
                    VcpuStop::Failed(f) => return Outcome::Failed(f),
                    VcpuStop::Stopped => return Outcome::Terminated,
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => {
                return Outcome::Terminated
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Outcome::Failed("every vCPU thread ended without a reason".into())
            }
        }
    }
}

/// Interrupts KVM_RUN in every vCPU thread until all have returned.
pub(crate) fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        while !t.is_finished() {
            if let Err(e) = t.kill(kick_signal()) {
                log::warn!("kicking a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn markers_land_in_private_ram_and_in_the_windows_last_page_only() {
        let ram = GuestRam::new(8 << 20, WINDOW_GPA, 1 << 20).unwrap();
        let markers = GuestMarkers {
            private: b"private".to_vec(),
            window: b"shared".to_vec(),
        };
        markers.write(&ram, 8 << 20, 1 << 20).unwrap();
        let (private, window) = GuestMarkers::places(8 << 20, 1 << 20);
        assert_eq!((private, window), (4 << 20, WINDOW_GPA + (1 << 20) - 4096));
        let mut b = [0u8; 7];
        ram.mem.read_slice(&mut b, GuestAddress(private)).unwrap();
        assert_eq!(&b, b"private");
        let mut b = [0u8; 6];
        ram.mem.read_slice(&mut b, GuestAddress(window)).unwrap();
        assert_eq!(&b, b"shared");
        // The window's memfd (what the backend maps) holds the window marker, not the secret.
        let file = &ram.window.as_ref().unwrap().file;
        let mut all = vec![0u8; 1 << 20];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut all, 0).unwrap();
        assert!(all.windows(6).any(|w| w == b"shared"));
        assert!(!all.windows(7).any(|w| w == b"private"));
    }

    #[test]
    fn markers_too_long_or_in_too_small_a_machine_are_refused() {
        let ram = GuestRam::new(4 << 20, WINDOW_GPA, 1 << 20).unwrap();
        let secret = GuestMarkers {
            private: vec![1; 8],
            window: Vec::new(),
        };
        assert!(matches!(
            secret.write(&ram, 4 << 20, 1 << 20),
            Err(VmError::Config(_))
        ));
        let ram = GuestRam::new(8 << 20, WINDOW_GPA, 1 << 20).unwrap();
        let long = GuestMarkers {
            private: Vec::new(),
            window: vec![1; 4097],
        };
        assert!(long.write(&ram, 8 << 20, 1 << 20).is_err());
        GuestMarkers::default()
            .write(&ram, 8 << 20, 1 << 20)
            .unwrap();
    }
}
