//! The cross-VM device on a fake KVM: BAR0's registers and doorbells, BAR2's regions, moves.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

use super::kvm::fake::{same_eventfd, FakeKvm};
use super::*;
use crate::vmm::arch::{PCI_MMIO64_GPA, PCI_MMIO_GPA};
use crate::vmm::pci::config::COMMAND;

const BAR0: u64 = PCI_MMIO_GPA + 0x4000;
const BAR2: u64 = PCI_MMIO64_GPA + (1 << 30);
const BAR2_SIZE: u64 = 1 << 30;

fn device() -> (CrossVmDevice, Arc<FakeKvm>) {
    let kvm = Arc::new(FakeKvm::default());
    let dev = CrossVmDevice::new(Arc::clone(&kvm) as _, BAR0, BAR2, BAR2_SIZE);
    (dev, kvm)
}

fn read32(dev: &mut CrossVmDevice, bar: usize, offset: u64) -> u32 {
    let mut b = [0xaa; 4];
    dev.bar_read(bar, offset, &mut b);
    u32::from_le_bytes(b)
}

fn cfg32(dev: &CrossVmDevice, offset: usize) -> u32 {
    let mut b = [0; 4];
    dev.config().read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// A memfd of `len` bytes filled with `byte`, sealed against shrinking if `seal`.
pub fn memfd(len: u64, byte: u8, seal: bool) -> std::fs::File {
    let name = c"cross-vm-test";
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(&vec![byte; len as usize]).unwrap();
    if seal {
        // SAFETY: F_ADD_SEALS on our own memfd.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
    }
    f
}

#[test]
fn identity_and_bar0_registers() {
    let (mut dev, _) = device();
    assert_eq!(cfg32(&dev, 0), 0x1130_1af4);
    assert_eq!(cfg32(&dev, 8), 0x0500_0001, "class 05 00 00, revision 1");
    assert_eq!(cfg32(&dev, 0x10), BAR0 as u32, "BAR0: 32-bit memory");
    assert_eq!(
        cfg32(&dev, 0x18),
        (BAR2 as u32) | 0xc,
        "BAR2: 64-bit prefetchable"
    );
    assert_eq!(cfg32(&dev, 0x1c), (BAR2 >> 32) as u32);
    assert_eq!(read32(&mut dev, 0, 0), MAGIC);
    assert_eq!(read32(&mut dev, 0, 4), DOORBELLS);
    assert_eq!(read32(&mut dev, 0, 0x100), 0, "doorbells read zero");
    assert_eq!(read32(&mut dev, 0, 0xffc), 0);
    assert_eq!(
        read32(&mut dev, 2, 0x1234_5000),
        0,
        "unmapped BAR2 reads zero"
    );
    let mut two = [0xaa; 2];
    dev.bar_read(0, 0, &mut two);
    assert_eq!(u16::from_le_bytes(two), 0x4d58, "the magic's low half");
}

#[test]
fn doorbells_bind_as_ioeventfds_and_unbound_writes_are_counted() {
    let (mut dev, kvm) = device();
    let state = dev.state();
    dev.bar_write(0, 0x100 + 4 * 17, &1u32.to_le_bytes());
    dev.bar_write(0, 0x100 + 4 * 255, &1u32.to_le_bytes());
    dev.bar_write(0, 0x100 + 4 * 256, &1u32.to_le_bytes());
    dev.bar_write(0, 0x0, &1u32.to_le_bytes());
    dev.bar_write(2, 0x100, &1u32.to_le_bytes());
    assert_eq!(
        state.ignored_doorbells(),
        2,
        "doorbells 17 and 255; the rest is no doorbell"
    );

    let call = eventfd();
    state.bind_doorbell(17, call.try_clone().unwrap()).unwrap();
    assert!(state.doorbell_bound(17));
    {
        let k = kvm.state();
        let bound = &k.doorbells[&(BAR0 + 0x100 + 4 * 17)];
        assert!(same_eventfd(bound, &call));
        assert_eq!(k.doorbells.len(), 1);
    }
    // Rebinding replaces; unbinding removes.
    let other = eventfd();
    state.bind_doorbell(17, other.try_clone().unwrap()).unwrap();
    assert!(same_eventfd(
        &kvm.state().doorbells[&(BAR0 + 0x144)],
        &other
    ));
    state.unbind_doorbell(17);
    assert!(kvm.state().doorbells.is_empty());
    assert!(!state.doorbell_bound(17));
    assert!(matches!(
        state.bind_doorbell(256, eventfd()),
        Err(CrossVmError::DoorbellRange(256))
    ));
    assert_eq!(doorbell_index(2, 3).unwrap(), 35);
    assert!(doorbell_index(16, 0).is_err() && doorbell_index(0, 16).is_err());
}

#[test]
fn doorbells_follow_bar0_and_leave_kvm_outside_the_window() {
    let (mut dev, kvm) = device();
    let state = dev.state();
    state.bind_doorbell(0, eventfd()).unwrap();
    state.bind_doorbell(5, eventfd()).unwrap();
    let to = PCI_MMIO_GPA + 0x8000;
    dev.config_write(0x10, &(to as u32).to_le_bytes());
    let at: Vec<u64> = kvm.state().doorbells.keys().copied().collect();
    assert_eq!(at, vec![to + 0x100, to + 0x114]);
    // Sizing is no move.
    dev.config_write(0x10, &u32::MAX.to_le_bytes());
    dev.config_write(0x10, &(to as u32).to_le_bytes());
    assert_eq!(kvm.state().doorbells.len(), 2);
    // Out of the window (a BAR being disabled): unregistered; a binding made meanwhile is
    // registered once BAR0 is back.
    dev.config_write(0x10, &0x1000u32.to_le_bytes());
    assert!(kvm.state().doorbells.is_empty());
    state.bind_doorbell(9, eventfd()).unwrap();
    assert!(kvm.state().doorbells.is_empty());
    dev.config_write(0x10, &(BAR0 as u32).to_le_bytes());
    let at: Vec<u64> = kvm.state().doorbells.keys().copied().collect();
    assert_eq!(at, vec![BAR0 + 0x100, BAR0 + 0x114, BAR0 + 0x124]);
}

#[test]
fn regions_are_memory_slots_at_bar2_plus_offset_and_follow_moves() {
    let (mut dev, kvm) = device();
    let state = dev.state();
    let region = shm::MappedRegion::map(memfd(0x4000, 0x5a, true), 0x1000, 0x2000).unwrap();
    let host = region.host_addr();
    state.map_region(0x20_0000, region).unwrap();
    let slots = kvm.state().slots.clone();
    assert_eq!(slots.len(), 1);
    let (slot, (gpa, size, h)) = slots.iter().next().map(|(s, v)| (*s, *v)).unwrap();
    assert_eq!((gpa, size, h), (BAR2 + 0x20_0000, 0x2000, host));
    let mut b = [0u8; 4];
    state.read_region(0x20_0000, 0x1ffc, &mut b);
    assert_eq!(b, [0x5a; 4], "the mapping is the memfd's");

    // Overlaps, misalignment and the end of BAR2 are refused.
    let more = |len| shm::MappedRegion::map(memfd(len, 0, true), 0, len).unwrap();
    assert!(state.map_region(0x20_1000, more(0x1000)).is_err());
    assert!(state.map_region(0x1f_f000, more(0x2000)).is_err());
    assert!(state.map_region(0x800, more(0x1000)).is_err());
    assert!(state.map_region(BAR2_SIZE - 0x1000, more(0x2000)).is_err());
    state.map_region(0x1f_f000, more(0x1000)).unwrap();
    state.map_region(0x20_2000, more(0x1000)).unwrap();
    assert_eq!(kvm.state().slots.len(), 3);

    // A move of BAR2 (upper half then lower half): every slot follows.
    let to = PCI_MMIO64_GPA + (4 << 30);
    dev.config_write(0x1c, &((to >> 32) as u32).to_le_bytes());
    dev.config_write(0x18, &(to as u32 | 0xc).to_le_bytes());
    let gpas: Vec<u64> = kvm.state().slots.values().map(|v| v.0).collect();
    let mut gpas = gpas;
    gpas.sort();
    assert_eq!(gpas, vec![to + 0x1f_f000, to + 0x20_0000, to + 0x20_2000]);
    assert_eq!(kvm.state().slots[&slot].0, to + 0x20_0000);

    state.unmap_region(0x20_0000);
    assert!(!kvm.state().slots.contains_key(&slot));
    assert_eq!(
        state.regions(),
        vec![(0x1f_f000, 0x1000), (0x20_2000, 0x1000)]
    );
    // Its slot is free again.
    state.map_region(0x40_0000, more(0x1000)).unwrap();
    assert!(kvm.state().slots.contains_key(&slot));
    // Memory decoding on: BAR2 decodes at its new address.
    dev.config_write(COMMAND, &2u16.to_le_bytes());
    assert_eq!(dev.config().decode(to + 0x10), Some((2, 0x10)));
}

#[test]
fn only_sealed_memory_that_holds_the_region_is_mapped() {
    assert!(matches!(
        shm::MappedRegion::map(memfd(0x2000, 0, false), 0, 0x2000),
        Err(CrossVmError::Unsealed)
    ));
    assert!(matches!(
        shm::MappedRegion::map(memfd(0x2000, 0, true), 0x1000, 0x2000),
        Err(CrossVmError::RegionBeyondFile { .. })
    ));
    assert!(matches!(
        shm::MappedRegion::map(memfd(0x2000, 0, true), 0x800, 0x1000),
        Err(CrossVmError::RegionAlignment { .. })
    ));
    assert!(matches!(
        shm::MappedRegion::map(memfd(0x2000, 0, true), 0, 0x1800),
        Err(CrossVmError::RegionAlignment { .. })
    ));
    assert!(matches!(
        shm::MappedRegion::map(memfd(0x2000, 0, true), u64::MAX - 0xfff, 0x1000),
        Err(CrossVmError::RegionBeyondFile { .. })
    ));
}

#[test]
fn plugging_takes_bars_from_both_windows() {
    let pci = PciSegment::new(Arc::new(crate::vmm::exits::ExitCounters::default()));
    let mut bars = BarAllocator::default();
    let kvm = Arc::new(FakeKvm::default());
    assert!(matches!(
        plug(&pci, &mut bars, Arc::clone(&kvm) as _, 3 << 20),
        Err(CrossVmError::Bar2Size(3))
    ));
    let state = plug(&pci, &mut bars, kvm as _, 1 << 30).unwrap();
    assert_eq!(state.bar2_size(), 1 << 30);
    // The function answers at slot 1 through ECAM.
    let mut id = [0u8; 4];
    assert!(pci.mmio_read(crate::vmm::arch::ECAM_GPA + (1 << 15), &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x1130_1af4);
}

#[test]
fn the_region_table_in_bar0_lists_what_bar2_maps_as_of_the_count_read() {
    // 8 GiB of BAR2: offsets with a high word.
    let kvm = Arc::new(FakeKvm::default());
    let mut dev = CrossVmDevice::new(
        kvm as _,
        BAR0,
        PCI_MMIO64_GPA.next_multiple_of(8 << 30),
        8 << 30,
    );
    let state = dev.state();
    assert_eq!(read32(&mut dev, 0, REG_REGIONS), 0);
    assert_eq!(read32(&mut dev, 0, REG_REGION_TABLE), 0, "no entry");
    let region = |len| shm::MappedRegion::map(memfd(len, 0, true), 0, len).unwrap();
    state.map_region(0x1_2345_6000, region(0x3000)).unwrap();
    state.map_region(0x1000, region(0x1000)).unwrap();
    assert_eq!(
        read32(&mut dev, 0, REG_REGION_TABLE + 16),
        0,
        "not latched yet"
    );
    assert_eq!(read32(&mut dev, 0, REG_REGIONS), 2);
    let entry = |dev: &mut CrossVmDevice, i: u64| {
        let at = REG_REGION_TABLE + 16 * i;
        let word = |dev: &mut CrossVmDevice, o| u64::from(read32(dev, 0, at + o));
        (
            word(dev, 0) | word(dev, 4) << 32,
            word(dev, 8) | word(dev, 12) << 32,
        )
    };
    assert_eq!(entry(&mut dev, 0), (0x1000, 0x1000), "in offset order");
    assert_eq!(entry(&mut dev, 1), (0x1_2345_6000, 0x3000));
    assert_eq!(entry(&mut dev, 2), (0, 0));
    // The table stays as latched until the count is read again.
    state.unmap_region(0x1000);
    assert_eq!(entry(&mut dev, 0), (0x1000, 0x1000));
    assert_eq!(read32(&mut dev, 0, REG_REGIONS), 1);
    assert_eq!(entry(&mut dev, 0), (0x1_2345_6000, 0x3000));
    assert_eq!(entry(&mut dev, 1), (0, 0));
    assert_eq!(read32(&mut dev, 0, 0xffc), 0, "the last entry: empty");
}
