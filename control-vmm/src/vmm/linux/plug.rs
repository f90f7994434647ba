//! Plugging virtio-pci functions into a Linux guest's PCI bus: each device served by the
//! driver domain gets a BAR0 from the PCI window, one KVM ioeventfd per queue (its notify
//! address, on that queue's kick eventfd), and MSI-X vectors on GSIs of its own. All devices
//! of a VM share one table of GSI routes (`KVM_SET_GSI_ROUTING` replaces the whole table),
//! the window and the GSIs with functions assigned through VFIO ([`Plugger::placement`]).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::arch::{PCI_MMIO_BYTES, PCI_MMIO_GPA};
use crate::vmm::devices::virtio_pci::{
    msix_vectors, notify_offset, NotifyBinder, VirtioPciDevice, BAR0_BYTES,
};
use crate::vmm::exits::ExitCounters;
use crate::vmm::machine::VmError;
use crate::vmm::pci::kvm_routes::{KvmRoutes, IOAPIC_PINS};
use crate::vmm::pci::msix::IrqWiring;
use crate::vmm::pci::BarAllocator;
use crate::vmm::vfio::device::Placement;
use crate::vmm::vhost_device::{VhostDevice, VirtioBackend};

/// A virtio-pci function on a vhost-user session.
pub type PciFunction = VirtioPciDevice<VhostDevice>;

/// What plugging a device needs from the VM: KVM, its routes, the BAR window and the GSIs.
#[derive(Debug)]
pub struct Plugger {
    vm: Arc<VmFd>,
    routes: Arc<KvmRoutes>,
    bars: BarAllocator,
    next_gsi: u32,
    counters: Arc<ExitCounters>,
}

/// Most MSI GSIs handed out (KVM's routing table holds 4096 entries; far fewer are needed).
const GSI_LIMIT: u32 = 1024;
/// First KVM memory slot of assigned functions' BARs (slot 0 is RAM); 18 per function.
const FIRST_BAR_SLOT: u32 = 8;
const BAR_SLOTS_PER_FUNCTION: u32 = 18;

impl Plugger {
    pub fn new(vm: Arc<VmFd>, counters: Arc<ExitCounters>) -> Self {
        Self {
            routes: Arc::new(KvmRoutes::new(Arc::clone(&vm))),
            vm,
            bars: BarAllocator::default(),
            next_gsi: IOAPIC_PINS,
            counters,
        }
    }

    /// Builds the function for `backend`: BAR0 from the window, each queue's notify address a
    /// KVM ioeventfd on its kick eventfd, MSI-X vectors on fresh GSIs. Returns it and its BAR0.
    pub fn function(
        &mut self,
        backend: VhostDevice,
    ) -> Result<(Arc<Mutex<PciFunction>>, u64), VmError> {
        let io = |op: &'static str| move |source| VmError::Io { op, source };
        let bar0 = self
            .bars
            .allocate(u64::from(BAR0_BYTES))
            .ok_or_else(|| VmError::Config("the PCI window is full".into()))?;
        let queues = backend.num_queues();
        let vectors = u32::from(msix_vectors(queues));
        if self.next_gsi + vectors > GSI_LIMIT {
            return Err(VmError::Config("out of MSI GSIs".into()));
        }
        let mut kicks = Vec::with_capacity(queues);
        let mut calls = Vec::with_capacity(queues);
        let mut bound = Vec::with_capacity(queues);
        for q in 0..queues {
            let kick = backend.kick(q)?.try_clone().map_err(io("eventfd"))?;
            self.vm
                .register_ioevent(
                    &kick,
                    &IoEventAddress::Mmio(bar0 + notify_offset(q)),
                    NoDatamatch,
                )
                .map_err(|source| VmError::Setup {
                    op: "KVM_IOEVENTFD (virtio-pci notify)",
                    source,
                })?;
            bound.push(kick.try_clone().map_err(io("eventfd"))?);
            kicks.push(kick);
            calls.push(backend.call(q)?.try_clone().map_err(io("eventfd"))?);
        }
        let binder = notify_binder(&self.vm, bound, bar0);
        let gsi = self.next_gsi;
        self.next_gsi += vectors;
        let dev = VirtioPciDevice::new(
            backend,
            kicks,
            calls,
            bar0 as u32,
            gsi,
            Arc::clone(&self.routes) as _,
            Arc::clone(&self.counters),
        )
        .with_notify_binder(binder);
        Ok((Arc::new(Mutex::new(dev)), bar0))
    }

    /// Where assigned function `index` goes: BARs from the same window, MSI-X vectors on GSIs
    /// after those handed out so far (say how many it took with [`Plugger::took_gsis`]), the
    /// same routes, KVM memory slots of its own.
    pub fn placement(&mut self, index: u32) -> Placement<'_> {
        Placement {
            vm: Arc::clone(&self.vm),
            bars: &mut self.bars,
            gsi_base: self.next_gsi,
            wiring: Arc::clone(&self.routes) as _,
            first_slot: FIRST_BAR_SLOT + index * BAR_SLOTS_PER_FUNCTION,
            counters: Arc::clone(&self.counters),
        }
    }

    /// Places a function the VMM emulates itself (the NVMe controller): `place` gets the BAR
    /// window, the first free GSI, the routes and the exit counters, and returns the function
    /// and how many GSIs from that one it took.
    pub fn emulated<T>(
        &mut self,
        place: impl FnOnce(
            &mut BarAllocator,
            u32,
            Arc<dyn IrqWiring>,
            &Arc<ExitCounters>,
        ) -> Result<(T, u32), VmError>,
    ) -> Result<T, VmError> {
        let wiring = Arc::clone(&self.routes) as Arc<dyn IrqWiring>;
        let (function, vectors) = place(&mut self.bars, self.next_gsi, wiring, &self.counters)?;
        self.took_gsis(vectors)?;
        Ok(function)
    }

    /// An assigned function placed last uses `vectors` GSIs from the next free one.
    pub fn took_gsis(&mut self, vectors: u32) -> Result<(), VmError> {
        if self.next_gsi + vectors > GSI_LIMIT {
            return Err(VmError::Config("out of MSI GSIs".into()));
        }
        self.next_gsi += vectors;
        Ok(())
    }
}

/// Moves the queues' notify ioeventfds (registered at `bar0 + notify_offset(q)`) with BAR0;
/// an address outside the PCI window (a BAR being disabled) leaves them unregistered.
fn notify_binder(vm: &Arc<VmFd>, kicks: Vec<EventFd>, bar0: u64) -> NotifyBinder {
    let vm = Arc::clone(vm);
    let mut bound = Some(bar0);
    NotifyBinder(Box::new(move |to| {
        if let Some(from) = bound.take() {
            for (q, kick) in kicks.iter().enumerate() {
                let at = from + notify_offset(q);
                vm.unregister_ioevent(kick, &IoEventAddress::Mmio(at), NoDatamatch)
                    .map_err(|e| format!("KVM_IOEVENTFD (deassign {at:#x}): {e}"))?;
            }
        }
        let end = to + u64::from(BAR0_BYTES);
        if to >= PCI_MMIO_GPA && end <= PCI_MMIO_GPA + PCI_MMIO_BYTES {
            for (q, kick) in kicks.iter().enumerate() {
                let at = to + notify_offset(q);
                vm.register_ioevent(kick, &IoEventAddress::Mmio(at), NoDatamatch)
                    .map_err(|e| format!("KVM_IOEVENTFD ({at:#x}): {e}"))?;
            }
            bound = Some(to);
        }
        Ok(())
    }))
}
