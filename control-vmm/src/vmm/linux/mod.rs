//! A Linux guest's machine: an unmodified bzImage with an initramfs, 1..N vCPUs (one thread
//! each), the in-kernel irqchip and PIT, COM1 on IRQ 4, hardware-reduced ACPI, and a PCI bus
//! with the guest's disks and network interfaces (virtio-pci, MSI-X per queue) served by the
//! driver domain over vhost-user. Linux puts buffers anywhere in its RAM, so the backends see
//! all of it; the caller must have asked for that explicitly (`share_all_ram`). Functions
//! assigned through VFIO ([`crate::vmm::vfio`]) join the bus after the virtio devices, once
//! guest RAM is DMA-mapped for them. A guest's writes to the phase register
//! (`arch::PHASE_MMIO_GPA`) delimit its measurements, whose exits the report counts apart
//! from the boot's. The machine runs until the
//! guest powers off or resets (the ACPI registers end the run loop), or until it is stopped
//! from outside.

pub mod bus;
pub mod console;
pub mod hotplug;
pub mod managed;
pub mod plug;
pub mod reconnect;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::arch::bzimage::{self, LinuxBoot};
use super::arch::{acpi, COM1_IRQ, COM2_IRQ, GED_IRQ, PCI_HOTPLUG_IRQ, RAM_LIMIT};
use super::devices::cross_vm;
use super::devices::nvme::{self, Namespace};
use super::driver_vm::{DriverVm, DriverVmConfig, Tunnel};
use super::exits::{totals, ExitCounters, PhaseCounts, PhaseLog};
use super::machine::{
    create_vm, install_kick_handler, stop_vcpus, wait_for_end, Outcome, VmError, STOP_POLL_LINUX,
};
use super::memory::GuestRam;
use super::pci::PciSegment;
use super::report::totals_lines;
use super::serial::Com1;
use super::vcpu::{self, VcpuContext};
use super::vfio::device::VfioPciDevice;
use super::vfio::{map_guest_ram, AssignedFunctions, Assignment};
use super::vhost_device::{shared_region, VhostDevice};
use super::wakeups::ThreadWatch;
use bus::LinuxBus;
use hotplug::{DeviceKey, Hotplug, HotplugSlot};
use plug::Plugger;

/// Largest number of vCPUs of a Linux guest.
pub const MAX_VCPUS: u8 = 32;

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
    /// The disks and network interfaces, cold-plugged in this order: vhost-user sessions
    /// to the driver domain, connected (their memory table is sent at DRIVER_OK).
    pub devices: Vec<(DeviceKey, VhostDevice)>,
    /// Share all guest RAM with the devices' backends: required with any device, cold- or
    /// hot-plugged (explicit opt-in).
    pub share_all_ram: bool,
    /// Where the machine publishes its PCI hotplug while it runs (managed mode).
    pub hotplug: Option<Arc<HotplugSlot>>,
    /// Appended to the kernel command line (e.g. the interfaces' addresses).
    pub cmdline_extra: String,
    /// Exit accounting: the host's `kvm_exit` histogram by exit reason, read at the guest's
    /// phase marks (see [`crate::vmm::exit_reasons`]).
    pub exit_reason_hist: Option<std::path::PathBuf>,
    /// PCI functions assigned to the guest through VFIO (cold-plugged after the devices).
    pub assigned: Vec<Assignment>,
    /// Where the machine registers them once plugged (for `pci-detach`).
    pub functions: AssignedFunctions,
    /// Emulated NVMe controllers (full emulation), one namespace each, on their backing files.
    pub nvme: Vec<Namespace>,
    /// Host threads whose runs the measured phases count (`host.*`, [`super::wakeups`]).
    pub watch_threads: ThreadWatch,
    /// Make this machine a driver VM: COM2, the cross-VM device and the relay of these
    /// vhost-user sockets ([`crate::vmm::driver_vm`]).
    pub driver_vm: Option<DriverVmConfig>,
    /// Devices whose backend this VMM reaches again by path when it goes away
    /// (`--blk-socket`; [`reconnect`]). Empty for a managed VMM (the toolstack hands it the
    /// new connection).
    pub reconnect: Vec<(DeviceKey, std::path::PathBuf)>,
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
    /// Avail index the first device's backend stopped at (GET_VRING_BASE), if its queue ran.
    pub backend_stopped_at: Option<u32>,
    pub totals: Vec<(&'static str, u64)>,
    /// Counters of the I/O phase the guest marked, if it did.
    pub io: Option<PhaseCounts>,
    /// Requests the guest said its I/O phase made (0: not said).
    pub io_requests: u64,
    pub wall: Duration,
    /// Measurements the guest marked on the phase register: (I/O phase, idle baseline) each.
    pub rounds: Vec<(PhaseCounts, PhaseCounts)>,
}

impl LinuxReport {
    /// The table printed at exit: the rounds the guest measured (counter, I/O phase, idle
    /// baseline of the same length, net), then the totals.
    pub fn table(&self) -> String {
        let mut s = format!("splitvmm-vmm: {} after {:.1?}\n", self.outcome, self.wall);
        s.push_str(&self.io_lines());
        for (i, (io, idle)) in self.rounds.iter().enumerate() {
            s.push_str(&format!(
                "round {}: I/O phase {:.3?}, idle baseline {:.3?}\n",
                i + 1,
                io.duration,
                idle.duration
            ));
            for (name, v) in &io.counts {
                let b = idle.get(name);
                if *v != 0 || b != 0 {
                    s.push_str(&format!(
                        "round {} {name:<28} {v:>10} {b:>10} {:>10}\n",
                        i + 1,
                        *v as i64 - b as i64
                    ));
                }
            }
        }
        s.push_str(&totals_lines(&self.totals, self.backend_stopped_at));
        s
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
    let ram_name = match cfg.driver_vm {
        Some(_) => "splitvmm-driver-vm-ram",
        None => "splitvmm-ram",
    };
    let ram = GuestRam::ram_only(cfg.ram_bytes, RAM_LIMIT, ram_name)?;
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
    // With a console socket the log is the domain's, shared with this VMM's log lines: the
    // guest's output goes to it a line at a time (see `console::ConsoleSink`).
    let console_sink = console::ConsoleSink::new(cfg.console, cfg.console_socket.is_some());
    let com1 = Com1::new(serial_irq, Box::new(console_sink.output()));
    let hotplug_irq = eventfd()?;
    vm.register_irqfd(&hotplug_irq, PCI_HOTPLUG_IRQ)
        .map_err(|source| VmError::Setup {
            op: "KVM_IRQFD (PCI hotplug)",
            source,
        })?;
    let vm = Arc::new(vm);
    let pci = Arc::new(PciSegment::new(Arc::clone(&counters)));
    if !cfg.devices.is_empty() && !cfg.share_all_ram {
        return Err(VmError::Config(
            "a Linux guest's devices need all of its RAM shared with the driver domain \
             (share_all_ram)"
                .into(),
        ));
    }
    if cfg.share_all_ram {
        log::warn!(
            "sharing all guest RAM ({} MiB) with the driver domain: Linux puts disk and \
             network buffers anywhere in it (explicit opt-in)",
            cfg.ram_bytes >> 20
        );
    }
    let plugger = Plugger::new(Arc::clone(&vm), Arc::clone(&counters));
    let hotplug = Arc::new(Hotplug::new(
        plugger,
        Arc::clone(&pci),
        (
            ram.mem.clone(),
            cfg.share_all_ram.then(|| shared_region(&ram.ram)),
        ),
        hotplug_irq,
    ));
    let mut watched = Vec::new();
    for (key, path) in cfg.reconnect {
        if let Some((_, device)) = cfg.devices.iter().find(|(k, _)| *k == key) {
            let peer = device
                .peer()
                .map_err(|e| VmError::Config(format!("{} {}: {e}", key.0.name(), key.1)))?;
            watched.push((key, path, peer));
        }
    }
    for (key, device) in cfg.devices {
        hotplug
            .plug(key, device, false)
            .map_err(|e| VmError::Config(format!("{} {}: {e}", key.0.name(), key.1)))?;
    }
    for (i, a) in cfg.assigned.into_iter().enumerate() {
        hotplug.with_plugger(|plugger| {
            plug_assigned(&ram, &pci, plugger, i as u32, a, &cfg.functions)
        })?;
    }
    let mut emulated = Vec::new();
    for ns in cfg.nvme {
        let dev = hotplug.with_plugger(|plugger| {
            plugger.emulated(|bars, gsi_base, wiring, counters| {
                nvme::plug(
                    &pci,
                    bars,
                    (ram.mem.clone(), ns),
                    gsi_base,
                    wiring,
                    counters,
                )
                .map_err(|e| VmError::Config(format!("emulated NVMe: {e}")))
            })
        })?;
        emulated.push(dev);
    }

    // A driver VM: COM2 for the tunnel and the cross-VM device, last on the bus.
    let driver_vm = match cfg.driver_vm {
        Some(dvm) => {
            let com2_irq = eventfd()?;
            vm.register_irqfd(&com2_irq, COM2_IRQ)
                .map_err(|source| VmError::Setup {
                    op: "KVM_IRQFD (COM2)",
                    source,
                })?;
            let tunnel = Tunnel::new(com2_irq).map_err(|e| VmError::Config(e.to_string()))?;
            let kvm = Arc::clone(&vm) as Arc<dyn cross_vm::kvm::CrossVmKvm>;
            let shm_bytes = dvm.shm_bytes;
            let state = hotplug.with_plugger(|plugger| {
                plugger.emulated(|bars, _, _, _| {
                    cross_vm::plug(&pci, bars, kvm, shm_bytes)
                        .map(|state| (state, 0))
                        .map_err(|e| VmError::Config(format!("cross-VM device: {e}")))
                })
            })?;
            Some((dvm, tunnel, state))
        }
        None => None,
    };
    let rsdp = acpi::write_tables(&ram.mem, cfg.vcpus, driver_vm.is_some())
        .map_err(|e| VmError::Config(e.to_string()))?;
    let mut boot = cfg.boot;
    if !cfg.cmdline_extra.is_empty() {
        boot.cmdline = format!("{} {}", boot.cmdline, cfg.cmdline_extra);
    }
    let entry = bzimage::load(&ram.mem, cfg.ram_bytes, &boot, rsdp)
        .map_err(|e| VmError::Config(e.to_string()))?;

    let mut bus = LinuxBus::new(com1, pci, Arc::clone(&hotplug), Arc::clone(&counters));
    if let Some((_, tunnel, _)) = &driver_vm {
        bus = bus.with_com2(Arc::clone(&tunnel.uart));
    }
    let bus = Arc::new(bus);
    let (done_tx, done_rx) = mpsc::channel();
    install_kick_handler()?;
    let halt = Arc::new(AtomicBool::new(false));
    let mut kvm_names = Vec::new();
    let console_thread = match cfg.console_socket {
        Some(listener) => Some(
            console::spawn(listener, Arc::clone(&bus), console_sink, Arc::clone(&halt)).map_err(
                |source| VmError::Io {
                    op: "starting the console thread",
                    source,
                },
            )?,
        ),
        None => None,
    };
    let relay = match driver_vm {
        Some((dvm, tunnel, state)) => Some(
            DriverVm::start(dvm, tunnel, state, Arc::clone(&halt))
                .map_err(|e| VmError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let watch = reconnect::BackendWatch::start(&hotplug, watched)
        .map_err(|e| VmError::Config(e.to_string()))?;
    let phases = Arc::new(
        PhaseLog::in_rounds(cfg.exit_reason_hist.clone()).with_threads(cfg.watch_threads.clone()),
    );
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
    if let Some(slot) = &cfg.hotplug {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&hotplug));
    }

    let outcome = wait_for_end(&done_rx, &cfg.stop, STOP_POLL_LINUX);
    if let Some(slot) = &cfg.hotplug {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    halt.store(true, Ordering::SeqCst);
    stop_vcpus(threads);
    if console_thread.is_some_and(|t| t.join().is_err()) {
        log::error!("the console thread panicked");
    }
    // The relay's channels close (CLOSE is not heard any more) and free their BAR2 mappings.
    if let Some(relay) = relay {
        relay.join();
    }
    watch.stop();
    // No vCPU runs any more; stop the backends before guest memory goes away.
    let mut backend_stopped_at = None;
    for (i, f) in hotplug.close().iter().enumerate() {
        let stopped = f.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        if i == 0 {
            backend_stopped_at = stopped;
        }
    }
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
    drop(hotplug);
    Ok(LinuxReport {
        outcome,
        backend_stopped_at,
        totals: totals(&counters),
        io: phases.report(&kvm_names).0,
        io_requests,
        wall: started.elapsed(),
        rounds: phases.rounds(),
    })
}

/// Assigns a function: its group attached to a fresh container, all guest RAM DMA-mapped at
/// IOVA = GPA, the function on the bus with BARs from the window and MSI-X GSIs after those
/// handed out so far. `index` picks its KVM memory slots.
fn plug_assigned(
    ram: &GuestRam,
    pci: &PciSegment,
    plugger: &mut Plugger,
    index: u32,
    assignment: Assignment,
    functions: &AssignedFunctions,
) -> Result<(), VmError> {
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
    let dev = VfioPciDevice::new(&bdf, container, group, plugger.placement(index))
        .map_err(|e| fail(e.to_string()))?;
    let vectors = dev.vectors();
    plugger.took_gsis(u32::from(vectors))?;
    let dev = Arc::new(Mutex::new(dev));
    functions.add(&bdf, Arc::clone(&dev));
    let slot = pci
        .add(dev)
        .ok_or_else(|| VmError::Config("no free PCI slot".into()))?;
    log::info!("{bdf}: assigned at 00:{slot:02x}.0, {vectors} MSI-X vectors");
    Ok(())
}
