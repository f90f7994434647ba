//! vCPUs: CPUID and MSR set-up, and the run loop (one thread per vCPU).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::boot::{entry_regs, initial_fpu, long_mode_sregs, EntryPoint};
use super::bus::{BusEvent, ExitBus};
use super::exits::{Counter, ExitCounters, KvmStats, Phase, PhaseLog};

/// Errors creating a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("building the MSR list")]
    Msrs,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
const CPUID_TSC_DEADLINE_BIT: u32 = 1 << 24;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;

/// Creates vCPU `id`: KVM's supported CPUID with the hypervisor bit (and this vCPU's APIC id),
/// basic MSRs, and for the boot vCPU the 64-bit entry state. Other vCPUs wait for INIT/SIPI in
/// the in-kernel local APIC.
pub fn create(
    kvm_sys: &Kvm,
    vm: &VmFd,
    id: u8,
    entry: Option<EntryPoint>,
) -> Result<VcpuFd, VcpuError> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(kvm("KVM_CREATE_VCPU"))?;
    let mut cpuid = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    // KVM emulates the TSC-deadline timer but does not list it as supported; a Linux guest
    // without the legacy PIT timer (hardware-reduced ACPI) programs its local APIC with it.
    let tsc_deadline = if kvm_sys.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        CPUID_TSC_DEADLINE_BIT
    } else {
        0
    };
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= CPUID_HYPERVISOR_BIT | tsc_deadline;
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MSR_IA32_MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| VcpuError::Msrs)?;
    vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if let Some(entry) = entry {
        let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        long_mode_sregs(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&entry_regs(entry))
            .map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_fpu(&initial_fpu()).map_err(kvm("KVM_SET_FPU"))?;
    }
    Ok(vcpu)
}

/// Why a vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest powered off with this status.
    Poweroff(u8),
    /// The guest reset the machine (triple fault or a reset request).
    Reset(String),
    /// The VMM asked it to stop.
    Stopped,
    /// KVM reported something the VMM cannot continue from.
    Failed(String),
}

/// What a vCPU thread shares with the machine.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    pub bus: Arc<dyn ExitBus>,
    pub counters: Arc<ExitCounters>,
    pub phases: Arc<PhaseLog>,
    pub stop: Arc<AtomicBool>,
    /// Raised (irqfd) after an idle baseline as long as the I/O phase.
    pub wake: Option<Arc<EventFd>>,
    pub done: mpsc::Sender<(u8, VcpuStop)>,
}

/// Runs vCPU `id` until it stops; reports why on `ctx.done`.
pub fn run(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext) {
    let stats = match KvmStats::open(&vcpu) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("vCPU {id}: no KVM binary stats: {e}");
            None
        }
    };
    let why = run_loop(&mut vcpu, &ctx, stats.as_ref());
    // The receiver only disappears when the machine is already gone.
    let _ = ctx.done.send((id, why));
}

/// The KVM stats names of a vCPU (for reports); empty if unavailable.
pub fn stats_names(vcpu: &VcpuFd) -> Vec<String> {
    KvmStats::open(vcpu)
        .map(|s| s.names().to_vec())
        .unwrap_or_default()
}

fn run_loop(vcpu: &mut VcpuFd, ctx: &VcpuContext, stats: Option<&KvmStats>) -> VcpuStop {
    let c = &ctx.counters;
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return VcpuStop::Stopped;
        }
        let event = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                c.bump(Counter::PioIn);
                ctx.bus.pio_in(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                c.bump(Counter::PioOut);
                ctx.bus.pio_out(port, data)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                c.bump(Counter::MmioRead);
                ctx.bus.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                c.bump(Counter::MmioWrite);
                ctx.bus.mmio_write(addr, data)
            }
            Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::Shutdown) => {
                return VcpuStop::Reset("triple fault (KVM_EXIT_SHUTDOWN)".into())
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return VcpuStop::Reset(format!("system event {kind}"))
            }
            Ok(VcpuExit::Hlt) => {
                c.bump(Counter::OtherExit);
                return VcpuStop::Failed("HLT exit with the in-kernel irqchip".into());
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuStop::Failed(format!(
                    "VM entry failed: reason {reason:#x} on cpu {cpu}"
                ))
            }
            Ok(VcpuExit::InternalError) => return internal_error(vcpu),
            Ok(other) => {
                c.bump(Counter::OtherExit);
                return VcpuStop::Failed(format!("unhandled exit {other:?}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => return VcpuStop::Failed(format!("KVM_RUN: {e}")),
        };
        match event {
            Some(BusEvent::Poweroff(status)) => return VcpuStop::Poweroff(status),
            Some(BusEvent::Phase(p)) => on_phase(p, ctx, stats),
            Some(BusEvent::Reset(why)) => return VcpuStop::Reset(why.into()),
            None => {}
        }
    }
}

const KVM_INTERNAL_ERROR_SIMUL_EX: u32 = 2;
const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;

/// KVM_EXIT_INTERNAL_ERROR: an exception while delivering an exception (what hardware turns
/// into a triple fault and a reset) counts as a reset; anything else is a failure.
fn internal_error(vcpu: &mut VcpuFd) -> VcpuStop {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data = &internal.data[..n];
    match internal.suberror {
        KVM_INTERNAL_ERROR_SIMUL_EX | KVM_INTERNAL_ERROR_DELIVERY_EV => VcpuStop::Reset(format!(
            "exception while delivering an exception (KVM internal error {}, data {data:x?})",
            internal.suberror
        )),
        e => VcpuStop::Failed(format!("KVM internal error {e}, data {data:x?}")),
    }
}

fn on_phase(p: Phase, ctx: &VcpuContext, stats: Option<&KvmStats>) {
    ctx.phases.mark(p, &ctx.counters, stats);
    if p != Phase::IdleStart {
        return;
    }
    let Some(wake) = ctx.wake.clone() else {
        return;
    };
    let length = ctx.phases.io_duration().unwrap_or(Duration::from_millis(1));
    let spawned = std::thread::Builder::new()
        .name("idle-baseline".into())
        .spawn(move || {
            std::thread::sleep(length);
            if let Err(e) = wake.write(1) {
                log::error!("idle-baseline wake-up: {e}");
            }
        });
    if let Err(e) = spawned {
        log::error!("starting the idle-baseline timer: {e}");
    }
}
