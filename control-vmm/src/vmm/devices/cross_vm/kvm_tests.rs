//! The cross-VM device on a real KVM: a tiny VM (64 KiB of RAM, one vCPU in flat 32-bit
//! protected mode, three instructions) rings a bound doorbell (the eventfd fires with no exit)
//! and an unbound one (an MMIO exit the device counts); BAR2's regions are real memory slots
//! that follow a move.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::tests::memfd;
use super::*;
use crate::vmm::arch::{PCI_MMIO64_GPA, PCI_MMIO_GPA};

const RAM: usize = 0x1_0000;
const CODE: u64 = 0x1000;

/// `mov dword [addr], value`.
fn store(addr: u32, value: u32) -> Vec<u8> {
    let mut b = vec![0xc7, 0x05];
    b.extend_from_slice(&addr.to_le_bytes());
    b.extend_from_slice(&value.to_le_bytes());
    b
}

fn flat_protected_mode(vcpu: &kvm_ioctls::VcpuFd) {
    let mut s = vcpu.get_sregs().unwrap();
    let seg = |selector, type_| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x8, 0xb);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = seg(0x10, 0x3);
    }
    s.cr0 |= 1;
    vcpu.set_sregs(&s).unwrap();
    let mut r = vcpu.get_regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    vcpu.set_regs(&r).unwrap();
}

#[test]
fn kvm_rings_bound_doorbells_without_an_exit_and_maps_bar2_slots() {
    let test = "kvm_rings_bound_doorbells_without_an_exit_and_maps_bar2_slots";
    if !test_support::require(test, test_support::peers::kvm()) {
        return;
    }
    let vm: Arc<VmFd> = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
    vm.set_tss_address(0xfffb_d000).unwrap();
    let ram = memfd(RAM as u64, 0xf4, true);
    let ram = shm::MappedRegion::map(ram, 0, RAM as u64).unwrap();
    let desc = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: `ram` stays mapped until the end of the test, after the VM is gone.
    unsafe { vm.set_user_memory_region(desc) }.unwrap();

    let bar0 = PCI_MMIO_GPA + 0x3000;
    let bar2 = PCI_MMIO64_GPA + (1 << 30);
    let mut dev = CrossVmDevice::new(Arc::clone(&vm) as _, bar0, bar2, 1 << 30);
    let state = dev.state();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    state.bind_doorbell(1, call.try_clone().unwrap()).unwrap();
    // KVM takes only an eventfd.
    let file = memfd(0x1000, 0, true);
    // SAFETY: the memfd's descriptor is given up to the EventFd wrapper.
    let not_eventfd = unsafe {
        use std::os::fd::{FromRawFd, IntoRawFd};
        EventFd::from_raw_fd(file.into_raw_fd())
    };
    assert!(state.bind_doorbell(3, not_eventfd).is_err());

    let mut code = store(bar0 as u32 + 0x104, 1);
    code.extend(store(bar0 as u32 + 0x108, 2));
    code.push(0xf4);
    // SAFETY: the code goes into the VM's RAM mapping, inside its bounds, before the vCPU runs.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            (ram.host_addr() + CODE) as *mut u8,
            code.len(),
        )
    };
    let mut vcpu = vm.create_vcpu(0).unwrap();
    flat_protected_mode(&vcpu);
    let mut exits = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::MmioWrite(addr, data) => {
                exits.push(addr);
                if let Some(off) = addr.checked_sub(bar0).filter(|o| *o < BAR0_BYTES) {
                    dev.bar_write(0, off, data);
                }
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(exits, vec![bar0 + 0x108], "only the unbound doorbell exits");
    assert_eq!(
        call.read().unwrap(),
        1,
        "the bound doorbell signalled its eventfd"
    );
    assert_eq!(state.ignored_doorbells(), 1);

    // BAR2: real memory slots, moved with the BAR and removed at unmap.
    let region = shm::MappedRegion::map(memfd(0x20_0000, 0, true), 0, 0x20_0000).unwrap();
    state.map_region(0x20_0000, region).unwrap();
    let region = shm::MappedRegion::map(memfd(0x1000, 0, true), 0, 0x1000).unwrap();
    state.map_region(0, region).unwrap();
    let to = PCI_MMIO64_GPA + (2 << 30);
    dev.config_write(0x1c, &((to >> 32) as u32).to_le_bytes());
    dev.config_write(0x18, &(to as u32).to_le_bytes());
    assert_eq!(state.regions(), vec![(0, 0x1000), (0x20_0000, 0x20_0000)]);
    state.unmap_region(0);
    state.unmap_region(0x20_0000);
    // A slot at the region's old place would overlap a new one here if it had stayed.
    let region = shm::MappedRegion::map(memfd(0x40_0000, 0, true), 0, 0x40_0000).unwrap();
    state.map_region(0, region).unwrap();
    state.unbind_doorbell(1);
    drop(dev);
    drop(state);
    drop(vcpu);
}
