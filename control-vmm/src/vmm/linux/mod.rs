//! A Linux guest's machine: an unmodified bzImage with an initramfs, 1..N vCPUs (one thread
//! each), the in-kernel irqchip and PIT, COM1 on IRQ 4, hardware-reduced ACPI, and a PCI bus.
//! It runs until the guest powers off or resets (the ACPI registers end the run loop), or
//! until it is stopped from outside.

pub mod bus;

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::arch::bzimage::{self, LinuxBoot};
use super::arch::{acpi, COM1_IRQ, GED_IRQ, RAM_LIMIT};
use super::exits::{totals, ExitCounters, PhaseLog};
use super::machine::{create_vm, install_kick_handler, stop_vcpus, wait_for_end, Outcome, VmError};
use super::memory::GuestRam;
use super::pci::PciSegment;
use super::serial::Com1;
use super::vcpu::{self, VcpuContext};
use bus::LinuxBus;

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
    /// Set to stop the machine from outside (the guest is not asked).
    pub stop: Arc<AtomicBool>,
    /// Written to press the ACPI power button (the guest's GED interrupt).
    pub power_button: Option<Arc<EventFd>>,
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
    pub totals: Vec<(&'static str, u64)>,
    pub wall: Duration,
}

impl LinuxReport {
    /// The table printed at exit.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let outcome = match &self.outcome {
            Outcome::Poweroff(st) => format!("guest powered off, status {st}"),
            Outcome::Reset(why) => format!("guest reset: {why}; stopped"),
            Outcome::Terminated => "terminated".to_string(),
            Outcome::Failed(why) => format!("failed: {why}"),
        };
        let _ = writeln!(s, "splitvmm-vmm: {outcome} after {:.1?}", self.wall);
        let totals: Vec<String> = self
            .totals
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let _ = writeln!(s, "totals: {}", totals.join(" "));
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
    let com1 = Com1::new(serial_irq, cfg.console);
    let pci = PciSegment::new(Arc::clone(&counters));

    let rsdp =
        acpi::write_tables(&ram.mem, cfg.vcpus).map_err(|e| VmError::Config(e.to_string()))?;
    let entry = bzimage::load(&ram.mem, cfg.ram_bytes, &cfg.boot, rsdp)
        .map_err(|e| VmError::Config(e.to_string()))?;

    let bus = Arc::new(LinuxBus::new(com1, pci, Arc::clone(&counters)));
    let (done_tx, done_rx) = mpsc::channel();
    install_kick_handler()?;
    let halt = Arc::new(AtomicBool::new(false));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for id in 0..cfg.vcpus {
        let fd = vcpu::create(&kvm, &vm, id, (id == 0).then_some(entry))?;
        let ctx = VcpuContext {
            bus: Arc::clone(&bus) as Arc<dyn super::bus::ExitBus>,
            counters: Arc::clone(&counters),
            phases: Arc::new(PhaseLog::default()),
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
    Ok(LinuxReport {
        outcome,
        totals: totals(&counters),
        wall: started.elapsed(),
    })
}
