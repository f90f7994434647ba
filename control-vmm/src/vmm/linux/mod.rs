//! A Linux guest's machine: an unmodified bzImage with an initramfs, 1..N vCPUs (one thread
//! each), the in-kernel irqchip and PIT, COM1 on IRQ 4, hardware-reduced ACPI, and a PCI bus
//! with, optionally, a virtio-blk disk (virtio-pci, MSI-X) served by the driver domain over
//! vhost-user. Linux puts buffers anywhere in its RAM, so the backend sees all of it; the
//! caller must have asked for that explicitly (`share_all_ram`). Functions assigned through
//! VFIO ([`crate::vmm::vfio`]) join the bus after guest RAM is DMA-mapped for them. A guest's
//! writes to the phase register (`arch::PHASE_MMIO_GPA`) mark its I/O phase, whose exits the
//! report counts apart from the boot's. The machine runs until the
//! guest powers off or resets (the ACPI registers end the run loop), or until it is stopped
//! from outside.

pub mod bus;
pub mod console;
pub mod managed;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::arch::bzimage::{self, LinuxBoot};
use super::arch::{acpi, COM1_IRQ, GED_IRQ, PCI_MMIO_BYTES, PCI_MMIO_GPA, RAM_LIMIT};
use super::devices::nvme::{self, Namespace};
use super::devices::virtio_pci::{
    NotifyBinder, VirtioPciBlk, BAR0_BYTES, MSIX_VECTORS, NOTIFY_OFFSET,
};
use super::exits::{totals, ExitCounters, PhaseCounts, PhaseLog};
use super::machine::{
    create_vm, install_kick_handler, stop_vcpus, wait_for_end, BlkAttachment, Outcome, VmError,
};
use super::memory::GuestRam;
use super::pci::kvm_routes::{KvmRoutes, IOAPIC_PINS};
use super::pci::{BarAllocator, PciSegment};
use super::report::totals_lines;
use super::serial::Com1;
use super::vcpu::{self, VcpuContext};
use super::vfio::device::{Placement, VfioPciDevice};
use super::vfio::{map_guest_ram, AssignedFunctions, Assignment};
use super::vhost_blk::{shared_region, VhostBlk};
use bus::LinuxBus;

/// Largest number of vCPUs of a Linux guest.
pub const MAX_VCPUS: u8 = 32;
/// First KVM memory slot of assigned functions' BARs (slot 0 is RAM); 18 per function.
const FIRST_BAR_SLOT: u32 = 8;
const BAR_SLOTS_PER_FUNCTION: u32 = 18;

/// What to run.
pub struct LinuxVmConfig {
    pub boot: LinuxBoot,
    /// RAM in bytes (a multiple of 2 MiB, below the PCI hole).
    pub ram_bytes: u64,
    pub vcpus: u8,
    /// Where COM1's output goes.
    pub console: Box<dyn Write + Send>,
    /// An interactive console: clients of this socket type into COM1 and see its output
    /// (see [`console`]).
    pub console_socket: Option<UnixListener>,
    /// Set to stop the machine from outside (the guest is not asked).
    pub stop: Arc<AtomicBool>,
    /// Written to press the ACPI power button (the guest's GED interrupt).
    pub power_button: Option<Arc<EventFd>>,
    /// The disk: a vhost-user-blk socket of the driver domain, a session the toolstack's
    /// connection already set up (managed mode), or none.
    pub blk: BlkAttachment,
    /// Share all guest RAM with the disk's backend: required with a disk (explicit opt-in).
    pub share_all_ram: bool,
    /// How long to wait for the backend socket.
    pub connect_timeout: Duration,
    /// PCI functions assigned to the guest through VFIO.
    pub assigned: Vec<Assignment>,
    /// Where the machine registers them once plugged (for `pci-detach`).
    pub functions: AssignedFunctions,
    /// Emulated NVMe controllers (full emulation), one namespace each, on their backing files.
    pub nvme: Vec<Namespace>,
}

impl std::fmt::Debug for LinuxVmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxVmConfig")
            .field("boot", &self.boot)
            .field("ram_bytes", &self.ram_bytes)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

/// How a Linux machine ended and what passed through the VMM.
#[derive(Debug, Clone)]
pub struct LinuxReport {
    pub outcome: Outcome,
    /// Avail index the disk's backend stopped at (GET_VRING_BASE), if its queue ran.
    pub backend_stopped_at: Option<u32>,
    pub totals: Vec<(&'static str, u64)>,
    /// Counters of the I/O phase the guest marked, if it did.
    pub io: Option<PhaseCounts>,
    /// Requests the guest said its I/O phase made (0: not said).
    pub io_requests: u64,
    pub wall: Duration,
}

impl LinuxReport {
    /// The table printed at exit.
    pub fn table(&self) -> String {
        format!(
            "splitvmm-vmm: {} after {:.1?}\n{}{}",
            self.outcome,
            self.wall,
            self.io_lines(),
            totals_lines(&self.totals, self.backend_stopped_at)
        )
    }

    /// The guest-marked I/O phase: its nonzero counters and, if the guest said how many
    /// requests it made, the exits per request (VMM: port and MMIO exits to this process;
    /// KVM: every exit, in-kernel ones included).
    fn io_lines(&self) -> String {
        let Some(io) = &self.io else {
            return String::new();
        };
        let nonzero: Vec<String> = io
            .counts
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let mut s = format!("I/O phase {:.1?}: {}\n", io.duration, nonzero.join(" "));
        if self.io_requests != 0 {
            let n = self.io_requests as f64;
            let vmm: u64 = ["pio_in", "pio_out", "mmio_read", "mmio_write"]
                .iter()
                .map(|c| io.get(c))
                .sum();
            s.push_str(&format!(
                "I/O phase per request: requests={} vmm_exits={:.3} kvm_exits={:.3} \
                 (vmm_exits={vmm}, the end marker's write included)\n",
                self.io_requests,
                vmm as f64 / n,
                io.get("kvm.exits") as f64 / n
            ));
        }
        s
    }
}

/// Builds and runs a Linux machine to its end.
pub fn run(cfg: LinuxVmConfig) -> Result<LinuxReport, VmError> {
    let started = Instant::now();
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "{} vCPUs (1..={MAX_VCPUS})",
            cfg.vcpus
        )));
    }
    let (kvm, vm) = create_vm()?;
    let ram = GuestRam::ram_only(cfg.ram_bytes, RAM_LIMIT)?;
    ram.register(&vm)?;
    let counters = Arc::new(ExitCounters::default());

    let eventfd = || {
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
            op: "eventfd",
            source,
        })
    };
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|source| VmError::Setup {
            op: "KVM_IRQFD (COM1)",
            source,
        })?;
    if let Some(button) = &cfg.power_button {
        vm.register_irqfd(button, GED_IRQ)
            .map_err(|source| VmError::Setup {
                op: "KVM_IRQFD (power button)",
                source,
            })?;
    }
    let console_client = console::ConsoleClient::default();
    let com1 = Com1::new(
        serial_irq,
        Box::new(console::ConsoleOutput::new(
            cfg.console,
            console_client.clone(),
        )),
    );
    let vm = Arc::new(vm);
    let mut pci = PciSegment::new(Arc::clone(&counters));
    let mut bars = BarAllocator::default();
    let routes = Arc::new(KvmRoutes::new(Arc::clone(&vm)));
    let backend = match cfg.blk {
        BlkAttachment::None => None,
        BlkAttachment::Socket(path) => {
            Some(VhostBlk::connect(&path, cfg.connect_timeout, Vec::new())?)
        }
        BlkAttachment::Connected(session) => Some(*session),
    };
    let disk = match backend {
        Some(mut backend) => {
            if !cfg.share_all_ram {
                return Err(VmError::Config(
                    "a Linux guest's disk needs all of its RAM shared with the driver domain \
                     (share_all_ram)"
                        .into(),
                ));
            }
            log::warn!(
                "sharing all guest RAM ({} MiB) with the driver domain: Linux puts disk \
                 buffers anywhere in it (explicit opt-in)",
                cfg.ram_bytes >> 20
            );
            if !backend.set_regions(vec![shared_region(&ram.ram)]) {
                return Err(VmError::Config(
                    "the disk's queue is already running".into(),
                ));
            }
            Some(plug_disk(
                &vm, &mut pci, &mut bars, &routes, backend, &counters,
            )?)
        }
        None => None,
    };
    // MSI-X GSIs after the disk's.
    let mut next_gsi = IOAPIC_PINS + u32::from(MSIX_VECTORS);
    for (i, a) in cfg.assigned.into_iter().enumerate() {
        let place = Placement {
            vm: Arc::clone(&vm),
            bars: &mut bars,
            gsi_base: next_gsi,
            wiring: Arc::clone(&routes) as _,
            first_slot: FIRST_BAR_SLOT + i as u32 * BAR_SLOTS_PER_FUNCTION,
            counters: Arc::clone(&counters),
        };
        next_gsi += plug_assigned(&ram, &mut pci, a, place, &cfg.functions)?;
    }
    let mut emulated = Vec::new();
    for ns in cfg.nvme {
        let wiring = Arc::clone(&routes) as _;
        let (dev, gsis) = nvme::plug(
            &mut pci,
            &mut bars,
            (ram.mem.clone(), ns),
            next_gsi,
            wiring,
            &counters,
        )
        .map_err(|e| VmError::Config(format!("emulated NVMe: {e}")))?;
        emulated.push(dev);
        next_gsi += gsis;
    }

    let rsdp =
        acpi::write_tables(&ram.mem, cfg.vcpus).map_err(|e| VmError::Config(e.to_string()))?;
    let entry = bzimage::load(&ram.mem, cfg.ram_bytes, &cfg.boot, rsdp)
        .map_err(|e| VmError::Config(e.to_string()))?;

    let bus = Arc::new(LinuxBus::new(com1, pci, Arc::clone(&counters)));
    let (done_tx, done_rx) = mpsc::channel();
    install_kick_handler()?;
    let halt = Arc::new(AtomicBool::new(false));
    let phases = Arc::new(PhaseLog::default());
    let mut kvm_names = Vec::new();
    let console_thread = match cfg.console_socket {
        Some(listener) => Some(
            console::spawn(
                listener,
                Arc::clone(&bus),
                console_client,
                Arc::clone(&halt),
            )
            .map_err(|source| VmError::Io {
                op: "starting the console thread",
                source,
            })?,
        ),
        None => None,
    };
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = vcpu::create(&kvm, &vm, id, (id == 0).then_some(entry))?;
        if id == 0 {
            kvm_names = vcpu::stats_names(&fd);
        }
        let ctx = VcpuContext {
            bus: Arc::clone(&bus) as Arc<dyn super::bus::ExitBus>,
            counters: Arc::clone(&counters),
            // One log for all vCPUs: a mark snapshots the KVM statistics of the vCPU that
            // wrote it (all of them for a one-vCPU guest).
            phases: Arc::clone(&phases),
            stop: Arc::clone(&halt),
            wake: None,
            done: done_tx.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(id, fd, ctx))
            .map_err(|source| VmError::Io {
                op: "starting a vCPU thread",
                source,
            })?;
        threads.push(t);
    }
    drop(done_tx);

    let outcome = wait_for_end(&done_rx, &cfg.stop);
    halt.store(true, Ordering::SeqCst);
    stop_vcpus(threads);
    if console_thread.is_some_and(|t| t.join().is_err()) {
        log::error!("the console thread panicked");
    }
    // No vCPU runs any more; stop the backend before guest memory goes away.
    let backend_stopped_at =
        disk.and_then(|d| d.lock().unwrap_or_else(|p| p.into_inner()).quiesce());
    let io_requests = bus.io_requests();
    for (i, dev) in emulated.iter().enumerate() {
        let s = dev.lock().unwrap_or_else(|p| p.into_inner()).stats();
        log::info!(
            "emulated NVMe {i}: doorbells={} commands={} reads={} writes={} flushes={} \
             errors={} interrupts={} bad_doorbells={}",
            s.doorbells,
            s.commands,
            s.reads,
            s.writes,
            s.flushes,
            s.errors,
            s.interrupts,
            s.bad_doorbells
        );
    }
    drop(emulated);
    // The bus holds the assigned functions: they are reset and their containers closed (DMA
    // unmapped) here, before guest RAM goes away.
    drop(bus);
    Ok(LinuxReport {
        outcome,
        backend_stopped_at,
        totals: totals(&counters),
        io: phases.report(&kvm_names).0,
        io_requests,
        wall: started.elapsed(),
    })
}

/// Puts the virtio-blk function on the bus: BAR0 from the window, queue 0's notify address a
/// KVM ioeventfd on the backend's kick eventfd, MSI-X vectors on GSIs after the I/O APIC's.
fn plug_disk(
    vm: &Arc<VmFd>,
    pci: &mut PciSegment,
    bars: &mut BarAllocator,
    routes: &Arc<KvmRoutes>,
    backend: VhostBlk,
    counters: &Arc<ExitCounters>,
) -> Result<Arc<Mutex<VirtioPciBlk<VhostBlk>>>, VmError> {
    let io = |op: &'static str| move |source| VmError::Io { op, source };
    let bar0 = bars
        .allocate(u64::from(BAR0_BYTES))
        .ok_or_else(|| VmError::Config("the PCI window is full".into()))?;
    let kick = backend.kick()?.try_clone().map_err(io("eventfd"))?;
    let call = backend.call()?.try_clone().map_err(io("eventfd"))?;
    vm.register_ioevent(
        &kick,
        &IoEventAddress::Mmio(bar0 + NOTIFY_OFFSET),
        NoDatamatch,
    )
    .map_err(|source| VmError::Setup {
        op: "KVM_IOEVENTFD (virtio-pci notify)",
        source,
    })?;
    let routes = Arc::clone(routes);
    let binder = notify_binder(vm, &kick, bar0 + NOTIFY_OFFSET).map_err(io("eventfd"))?;
    let dev = Arc::new(Mutex::new(
        VirtioPciBlk::new(
            backend,
            kick,
            call,
            bar0 as u32,
            IOAPIC_PINS,
            routes,
            Arc::clone(counters),
        )
        .with_notify_binder(binder),
    ));
    let slot = pci
        .add(Arc::clone(&dev) as Arc<Mutex<dyn super::pci::PciDevice>>)
        .ok_or_else(|| VmError::Config("no free PCI slot".into()))?;
    log::info!("virtio-blk (virtio-pci) at 00:{slot:02x}.0, BAR0 {bar0:#x}");
    Ok(dev)
}

/// Moves the notify ioeventfd (registered at `at`) with BAR0; an address outside the PCI
/// window (a BAR being disabled) leaves it unregistered.
fn notify_binder(vm: &Arc<VmFd>, kick: &EventFd, at: u64) -> std::io::Result<NotifyBinder> {
    let vm = Arc::clone(vm);
    let kick = kick.try_clone()?;
    let mut bound = Some(at);
    Ok(NotifyBinder(Box::new(move |to| {
        if let Some(from) = bound.take() {
            vm.unregister_ioevent(&kick, &IoEventAddress::Mmio(from), NoDatamatch)
                .map_err(|e| format!("KVM_IOEVENTFD (deassign {from:#x}): {e}"))?;
        }
        if (PCI_MMIO_GPA..PCI_MMIO_GPA + PCI_MMIO_BYTES).contains(&to) {
            vm.register_ioevent(&kick, &IoEventAddress::Mmio(to), NoDatamatch)
                .map_err(|e| format!("KVM_IOEVENTFD ({to:#x}): {e}"))?;
            bound = Some(to);
        }
        Ok(())
    })))
}

/// Assigns a function: its group attached to a fresh container, all guest RAM DMA-mapped at
/// IOVA = GPA, the function on the bus. Returns the GSIs its MSI-X vectors use.
fn plug_assigned(
    ram: &GuestRam,
    pci: &mut PciSegment,
    assignment: Assignment,
    place: Placement<'_>,
    functions: &AssignedFunctions,
) -> Result<u32, VmError> {
    let fail = |e: String| VmError::Config(format!("assigning a PCI function: {e}"));
    let (bdf, container, group) = assignment.open().map_err(|e| fail(e.to_string()))?;
    use vm_memory::GuestMemoryBackend;
    let host = ram
        .mem
        .get_host_address(vm_memory::GuestAddress(0))
        .map_err(|e| fail(e.to_string()))? as u64;
    // SAFETY: RAM stays mapped until `run` returns, after the bus (which owns the device and
    // with it the container) is dropped.
    unsafe { map_guest_ram(&container, host, ram.ram.len) }.map_err(|e| fail(e.to_string()))?;
    log::info!(
        "{bdf}: guest RAM ({} MiB) DMA-mapped at IOVA = GPA 0",
        ram.ram.len >> 20
    );
    let dev = VfioPciDevice::new(&bdf, container, group, place).map_err(|e| fail(e.to_string()))?;
    let vectors = u32::from(dev.vectors());
    let dev = Arc::new(Mutex::new(dev));
    functions.add(&bdf, Arc::clone(&dev));
    let slot = pci
        .add(dev)
        .ok_or_else(|| VmError::Config("no free PCI slot".into()))?;
    log::info!("{bdf}: assigned at 00:{slot:02x}.0, {vectors} MSI-X vectors");
    Ok(vectors)
}
