//! The KVM side of MSI-X: GSI routes and irqfds. KVM_SET_GSI_ROUTING replaces the whole
//! table, so the table kept here always starts with KVM's default routes (GSIs 0..15 to the
//! PIC and the I/O APIC, 16..23 to the I/O APIC) and adds one MSI route per live vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::msix::IrqWiring;

/// I/O APIC pins; MSI GSIs start after them.
pub const IOAPIC_PINS: u32 = 24;

/// GSI routes and irqfds of one VM.
#[derive(Debug)]
pub struct KvmRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routing (what KVM_CREATE_IRQCHIP installs).
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

impl KvmRoutes {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    fn commit(&self, msi: &BTreeMap<u32, (u64, u32)>) -> Result<(), String> {
        let mut entries = default_routes();
        for (&gsi, &(address, data)) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| format!("{e:?}"))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }
}

impl IrqWiring for KvmRoutes {
    fn route_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        msi.insert(gsi, (address, data));
        self.commit(&msi)
    }

    fn unroute(&self, gsi: u32) -> Result<(), String> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        msi.remove(&gsi);
        self.commit(&msi)
    }

    fn attach(&self, source: &EventFd, gsi: u32) -> Result<(), String> {
        self.vm
            .register_irqfd(source, gsi)
            .map_err(|e| format!("KVM_IRQFD: {e}"))
    }

    fn detach(&self, source: &EventFd, gsi: u32) -> Result<(), String> {
        self.vm
            .unregister_irqfd(source, gsi)
            .map_err(|e| format!("KVM_IRQFD (deassign): {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_keeps_every_pic_and_ioapic_route() {
        let r = default_routes();
        assert_eq!(r.len(), 16 + 24);
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| {
                // SAFETY: every entry of the default table is an irqchip route.
                let chip = unsafe { e.u.irqchip };
                (e.gsi, chip.irqchip, chip.pin)
            })
            .collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
    }
}
