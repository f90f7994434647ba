//! Unit tests of the virtio-pci transport: what a Linux driver does, step by step, against a
//! fake backend and a recorder of GSI routes and irqfds (no /dev/kvm needed).

use super::*;
use crate::vmm::fake_backend::FakeBackend;
use crate::vmm::pci::msix::tests::Recorder;
use crate::vmm::vhost_device::{SharedRegion, VirtioDeviceType};

const RAM: u64 = 256 << 20;
const BAR0: u32 = 0xc000_0000;

type Dev = VirtioPciDevice<FakeBackend>;

fn device_of(kind: VirtioDeviceType) -> (Dev, Arc<Recorder>) {
    let backend = FakeBackend::new(
        kind,
        (1 << 32) | (1 << 9),
        SharedRegion {
            gpa: 0,
            len: RAM,
            fd: -1,
        },
    );
    let rec = Arc::new(Recorder::default());
    let efds = || {
        (0..backend.num_queues())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect::<Vec<_>>()
    };
    let (kicks, calls) = (efds(), efds());
    let d = VirtioPciDevice::new(
        backend,
        kicks,
        calls,
        BAR0,
        24,
        rec.clone(),
        Arc::new(ExitCounters::default()),
    );
    (d, rec)
}

fn device() -> (Dev, Arc<Recorder>) {
    device_of(VirtioDeviceType::Blk)
}

fn cfg_rd(d: &Dev, off: usize) -> u32 {
    d.config().read_dword(off)
}

fn rd(d: &mut Dev, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr(d: &mut Dev, off: u64, len: usize, v: u64) {
    d.bar_write(0, off, &v.to_le_bytes()[..len]);
}

/// Feature negotiation and queue 0 at `desc` with `size` entries; returns the status read.
fn bring_up(d: &mut Dev, size: u16, desc: u64) -> u64 {
    use common::*;
    wr(d, DEVICE_STATUS, 1, 1 | 2);
    wr(d, DRIVER_FEATURE_SELECT, 4, 1);
    wr(d, DRIVER_FEATURE, 4, 1);
    wr(d, DEVICE_STATUS, 1, 1 | 2 | 8);
    wr(d, QUEUE_SELECT, 2, 0);
    wr(d, QUEUE_SIZE, 2, size.into());
    wr(d, QUEUE_DESC, 4, desc & 0xffff_ffff);
    wr(d, QUEUE_DESC + 4, 4, desc >> 32);
    wr(d, QUEUE_DRIVER, 4, 0x10_1000);
    wr(d, QUEUE_DEVICE, 4, 0x10_2000);
    wr(d, QUEUE_MSIX_VECTOR, 2, 1);
    wr(d, QUEUE_ENABLE, 2, 1);
    wr(d, DEVICE_STATUS, 1, 1 | 2 | 8 | 4);
    rd(d, DEVICE_STATUS, 1)
}

#[test]
fn identity_bar_and_capabilities_as_linux_reads_them() {
    let (d, _) = device();
    assert_eq!(cfg_rd(&d, 0), 0x1042_1af4);
    assert_eq!(cfg_rd(&d, 0x10), BAR0);
    assert_eq!(cfg_rd(&d, 0x2c) >> 16, 0x40, "subsystem id");
    let mut types = Vec::new();
    let mut at = (cfg_rd(&d, 0x34) & 0xff) as usize;
    while at != 0 {
        let head = cfg_rd(&d, at);
        match head & 0xff {
            0x09 => {
                let cfg_type = (head >> 24) as u8;
                let offset = cfg_rd(&d, at + 8);
                types.push((cfg_type, offset));
                if cfg_type == CFG_NOTIFY {
                    assert_eq!(cfg_rd(&d, at + 16), NOTIFY_MULTIPLIER);
                }
            }
            0x11 => {
                assert_eq!(
                    head >> 16,
                    u32::from(msix_vectors(1) - 1),
                    "table size, disabled"
                );
                assert_eq!(cfg_rd(&d, at + 4), MSIX_TABLE_OFFSET as u32, "BIR 0");
                assert_eq!(cfg_rd(&d, at + 8), MSIX_PBA_OFFSET as u32);
            }
            other => panic!("unexpected capability {other:#x}"),
        }
        at = ((head >> 8) & 0xff) as usize;
    }
    assert_eq!(
        types,
        [
            (CFG_COMMON, COMMON_OFFSET as u32),
            (CFG_NOTIFY, NOTIFY_OFFSET as u32),
            (CFG_ISR, ISR_OFFSET as u32),
            (CFG_DEVICE, DEVICE_OFFSET as u32)
        ]
    );
}

#[test]
fn a_driver_brings_the_queue_up_and_a_reset_stops_the_backend() {
    let (mut d, _) = device();
    // Features: the backend's.
    wr(&mut d, common::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(rd(&mut d, common::DEVICE_FEATURE, 4), 1);
    wr(&mut d, common::DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(rd(&mut d, common::DEVICE_FEATURE, 4), 1 << 9);
    assert_eq!(rd(&mut d, common::NUM_QUEUES, 2), 1);
    assert_eq!(rd(&mut d, common::QUEUE_SIZE, 2), u64::from(QUEUE_MAX));
    assert_eq!(
        rd(&mut d, DEVICE_OFFSET, 4),
        0x800,
        "capacity from the backend"
    );
    let status = bring_up(&mut d, 128, 0x10_0000);
    assert_eq!(status, 0xf);
    assert_eq!(rd(&mut d, common::QUEUE_ENABLE, 2), 1);
    assert_eq!(rd(&mut d, common::QUEUE_MSIX_VECTOR, 2), 1);
    assert_eq!(rd(&mut d, common::QUEUE_DESC, 4), 0x10_0000);
    let (features, q) = d.backend().started[0];
    assert_eq!(features, 1 << 32);
    assert_eq!(
        (q.size, q.desc, q.avail, q.used),
        (128, 0x10_0000, 0x10_1000, 0x10_2000)
    );
    // Frozen while running.
    wr(&mut d, common::QUEUE_SIZE, 2, 8);
    assert_eq!(rd(&mut d, common::QUEUE_SIZE, 2), 128);
    wr(&mut d, common::DEVICE_STATUS, 1, 0);
    assert_eq!(rd(&mut d, common::DEVICE_STATUS, 1), 0);
    assert!(!d.backend().running);
    assert_eq!(rd(&mut d, common::QUEUE_ENABLE, 2), 0);
    assert_eq!(
        rd(&mut d, common::QUEUE_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR)
    );
}

#[test]
fn impossible_queues_stay_disabled_and_driver_ok_needs_reset() {
    for (size, desc) in [
        (0u16, 0x10_0000u64),
        (3, 0x10_0000),
        (512, 0x10_0000),
        (128, 0x10_0008),
        (128, RAM - 0x100),
        (128, u64::MAX - 15),
    ] {
        let (mut d, _) = device();
        let status = bring_up(&mut d, size, desc);
        assert_eq!(
            rd(&mut d, common::QUEUE_ENABLE, 2),
            0,
            "size {size} desc {desc:#x}"
        );
        assert_ne!(
            status & u64::from(super::super::virtio_rules::STATUS_NEEDS_RESET),
            0
        );
        assert!(d.backend().started.is_empty());
    }
}

#[test]
fn msix_follows_the_capability_and_the_table_and_bad_accesses_are_harmless() {
    let (mut d, rec) = device();
    bring_up(&mut d, 64, 0x10_0000);
    // Program vector 1 and unmask it: still nothing, MSI-X is disabled.
    let entry = MSIX_TABLE_OFFSET + 16;
    wr(&mut d, entry, 8, 0xfee0_0000);
    wr(&mut d, entry + 8, 4, 0x4022);
    wr(&mut d, entry + 12, 4, 0);
    assert!(rec.attached.lock().unwrap().is_empty());
    // Enable through the capability's message control (bit 15 of the first dword).
    let cap = d.msix_cap;
    d.config_write(cap + 2, &0x8000u16.to_le_bytes());
    assert_eq!(*rec.attached.lock().unwrap(), [25], "vector 1 = GSI 24 + 1");
    assert_eq!(*rec.routes.lock().unwrap(), [(25, 0xfee0_0000, 0x4022)]);
    // Function mask: unbound; the call eventfd's count shows in the PBA.
    d.config_write(cap + 2, &0xc000u16.to_le_bytes());
    assert!(rec.attached.lock().unwrap().is_empty());
    d.calls[0].write(1).unwrap();
    assert_eq!(rd(&mut d, MSIX_PBA_OFFSET, 8), 0b10);
    d.config_write(cap + 2, &0x8000u16.to_le_bytes());
    assert_eq!(*rec.attached.lock().unwrap(), [25]);
    // The guest cannot change the table size or enable bits it does not own.
    d.config_write(cap, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(
        cfg_rd(&d, cap) >> 16,
        0xc000 | u32::from(msix_vectors(1) - 1)
    );
    // Garbage: odd widths, unknown offsets, a notify naming another queue.
    assert_eq!(rd(&mut d, common::DEVICE_STATUS, 4), u64::from(u32::MAX));
    wr(&mut d, common::NUM_QUEUES, 2, 7);
    assert_eq!(rd(&mut d, common::NUM_QUEUES, 2), 1);
    wr(&mut d, common::QUEUE_SELECT, 2, 5);
    assert_eq!(rd(&mut d, common::QUEUE_SIZE, 2), 0);
    wr(&mut d, common::QUEUE_MSIX_VECTOR, 2, 1);
    wr(&mut d, 0x7000, 4, 1);
    wr(&mut d, NOTIFY_OFFSET, 2, 3);
    assert_eq!(d.counters.get(Counter::VirtioNotifyExit), 1);
    assert_eq!(d.kicks[0].read().ok(), None, "not forwarded");
    wr(&mut d, NOTIFY_OFFSET, 2, 0);
    assert_eq!(
        d.kicks[0].read().ok(),
        Some(1),
        "queue 0's notify forwarded"
    );
    assert!(d.counters.get(Counter::MsixTableAccess) >= 4);
}

#[test]
fn moving_bar0_moves_the_notify_ioeventfd_but_sizing_does_not() {
    let (d, _) = device();
    let moves = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&moves);
    let mut d = d.with_notify_binder(NotifyBinder(Box::new(move |to| {
        seen.lock().unwrap().push(to);
        Ok(())
    })));
    d.config_write(0x10, &u32::MAX.to_le_bytes());
    d.config_write(0x10, &BAR0.to_le_bytes());
    assert!(
        moves.lock().unwrap().is_empty(),
        "sizing and restoring is not a move"
    );
    d.config_write(0x10, &0xc001_0000u32.to_le_bytes());
    assert_eq!(*moves.lock().unwrap(), [0xc001_0000]);
}

#[test]
fn a_network_function_has_two_queues_each_with_its_notify_address_and_vector() {
    use common::*;
    let (mut d, rec) = device_of(VirtioDeviceType::Net);
    assert_eq!(cfg_rd(&d, 0), 0x1041_1af4, "virtio-net, modern");
    assert_eq!(cfg_rd(&d, 8) >> 8, 0x02_0000, "network controller");
    assert_eq!(rd(&mut d, NUM_QUEUES, 2), 2);
    wr(&mut d, DEVICE_STATUS, 1, 1 | 2);
    wr(&mut d, DRIVER_FEATURE_SELECT, 4, 1);
    wr(&mut d, DRIVER_FEATURE, 4, 1);
    wr(&mut d, DEVICE_STATUS, 1, 1 | 2 | 8);
    for q in 0..2u64 {
        wr(&mut d, QUEUE_SELECT, 2, q);
        assert_eq!(rd(&mut d, QUEUE_NOTIFY_OFF, 2), q);
        wr(&mut d, QUEUE_SIZE, 2, 64);
        wr(&mut d, QUEUE_DESC, 4, 0x10_0000 + q * 0x1_0000);
        wr(&mut d, QUEUE_DRIVER, 4, 0x10_4000 + q * 0x1_0000);
        wr(&mut d, QUEUE_DEVICE, 4, 0x10_8000 + q * 0x1_0000);
        wr(&mut d, QUEUE_MSIX_VECTOR, 2, q + 1);
        assert_eq!(rd(&mut d, QUEUE_MSIX_VECTOR, 2), q + 1);
        wr(&mut d, QUEUE_ENABLE, 2, 1);
    }
    // A third queue does not exist; a vector another queue has is refused.
    wr(&mut d, QUEUE_SELECT, 2, 2);
    assert_eq!(rd(&mut d, QUEUE_SIZE, 2), 0);
    wr(&mut d, QUEUE_SELECT, 2, 1);
    wr(&mut d, QUEUE_MSIX_VECTOR, 2, 1);
    assert_eq!(rd(&mut d, QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    wr(&mut d, QUEUE_MSIX_VECTOR, 2, 2);
    wr(&mut d, DEVICE_STATUS, 1, 1 | 2 | 8 | 4);
    assert_eq!(rd(&mut d, DEVICE_STATUS, 1), 0xf);
    assert_eq!(d.backend().enabled, [vec![true, true]]);
    // Each queue's vector is its own GSI with its own call eventfd.
    let entry = |v: u64| MSIX_TABLE_OFFSET + 16 * v;
    for v in 1..3 {
        wr(&mut d, entry(v), 8, 0xfee0_0000);
        wr(&mut d, entry(v) + 8, 4, 0x4020 + v);
        wr(&mut d, entry(v) + 12, 4, 0);
    }
    let cap = d.msix_cap;
    d.config_write(cap + 2, &0x8000u16.to_le_bytes());
    let mut attached = rec.attached.lock().unwrap().clone();
    attached.sort_unstable();
    assert_eq!(attached, [25, 26]);
    // Notifies that miss the ioeventfds are forwarded to the right queue's kick.
    wr(&mut d, notify_offset(1), 2, 1);
    assert_eq!(d.kicks[1].read().ok(), Some(1));
    assert_eq!(d.kicks[0].read().ok(), None);
    wr(&mut d, notify_offset(1), 2, 0);
    assert_eq!(
        d.kicks[0].read().ok(),
        None,
        "queue 0 named at queue 1's address"
    );
}
