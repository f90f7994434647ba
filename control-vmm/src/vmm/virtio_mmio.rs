//! virtio-mmio (version 2) transport for one virtio-blk device served by a vhost-user backend.
//!
//! The VMM emulates the register file; the data path bypasses it: QueueNotify is a KVM
//! ioeventfd on the backend's kick eventfd and the device interrupt a KVM irqfd on the
//! backend's call eventfd. InterruptStatus reads and InterruptACK writes do reach the VMM
//! (they are counted). Because completions go straight from the backend to KVM, the VMM cannot
//! know whether an interrupt was a used-buffer notification; while the device runs,
//! InterruptStatus reports "used buffer" (bit 0) and a driver re-checks its rings, as it must
//! anyway. Anything a guest writes is validated: impossible queue sizes or ring addresses
//! outside the memory the backend can see leave the queue not ready; DRIVER_OK without a usable
//! queue sets DEVICE_NEEDS_RESET. Nothing a guest writes fails the VMM.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as STATUS_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as STATUS_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK, VIRTIO_CONFIG_S_FAILED as STATUS_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as STATUS_NEEDS_RESET,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::*;

use super::devices::virtio_rules::{activate, check_queue, status_write, StatusWrite};
use super::exits::{Counter, ExitCounters};
use super::vhost_device::{VhostDevice, VirtioBackend, VringSetup};

/// What the MAGIC register reads: "virt".
const MAGIC_VALUE: u32 = 0x7472_6976;
/// A modern (version 2) virtio-mmio device.
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d4d_5653; // "SVMM"
/// Largest queue the guest may configure.
pub const QUEUE_MAX: u16 = 256;
/// Offset of the queue-notify register, where KVM's ioeventfd sits.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device-specific config space.
const CONFIG: u64 = VIRTIO_MMIO_CONFIG as u64;

#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
    ready: bool,
}

/// The device, over a [`VirtioBackend`] (the vhost-user session by default).
#[derive(Debug)]
pub struct VirtioMmioBlk<B: VirtioBackend = VhostDevice> {
    backend: B,
    counters: Arc<ExitCounters>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queue: QueueRegs,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

impl<B: VirtioBackend> VirtioMmioBlk<B> {
    pub fn new(backend: B, counters: Arc<ExitCounters>) -> Self {
        Self {
            backend,
            counters,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queue: QueueRegs::default(),
        }
    }

    /// The backend connection (its kick and call eventfds are bound in KVM by the machine).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Gives the backend back (after [`VirtioMmioBlk::quiesce`]), e.g. for the next machine.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Stops the backend's queue (GET_VRING_BASE) if it runs. Called on device reset and
    /// before guest memory goes away.
    /// Returns the avail index the backend stopped at, if a queue was running.
    pub fn quiesce(&mut self) -> Option<u32> {
        match self.backend.stop() {
            Ok(Some(base)) => {
                log::info!("virtio-blk: backend stopped at avail index {base}");
                Some(base)
            }
            Ok(None) => None,
            Err(e) => {
                log::error!("virtio-blk: stopping the backend: {e}");
                None
            }
        }
    }

    fn reset(&mut self) {
        let _ = self.quiesce();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queue = QueueRegs::default();
    }

    fn queue_selected(&self) -> bool {
        self.queue_sel == 0
    }

    fn configurable(&self) -> bool {
        self.queue_selected() && !self.queue.ready && self.status & STATUS_DRIVER_OK == 0
    }

    fn queue_valid(&self) -> Result<(), String> {
        let q = &self.queue;
        check_queue(
            self.backend.regions(),
            q.size,
            QUEUE_MAX,
            q.desc,
            q.avail,
            q.used,
        )
    }

    fn set_status(&mut self, value: u32) {
        let unoffered = self.driver_features & !self.backend.device_features();
        match status_write("virtio-blk", self.status, value, unoffered) {
            StatusWrite::Reset => self.reset(),
            StatusWrite::Ignored => {}
            StatusWrite::Set { status, activate } => {
                self.status = if activate {
                    self.activate(status)
                } else {
                    status
                };
            }
        }
    }

    fn activate(&mut self, status: u32) -> u32 {
        let q = self.queue.ready.then_some(VringSetup {
            size: self.queue.size as u16,
            desc: self.queue.desc,
            avail: self.queue.avail,
            used: self.queue.used,
        });
        let features = self.driver_features;
        activate("virtio-blk", &mut self.backend, status, features, &[q])
    }

    /// MMIO read at `offset` into `data` (little-endian).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            let cfg = self.backend.config();
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset - CONFIG)
                    .ok()
                    .and_then(|o| cfg.get(o + i))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            log::warn!(
                "virtio-blk: {}-byte read of register {offset:#x}",
                data.len()
            );
            data.fill(0xff);
            return;
        }
        let v = match u32::try_from(offset).unwrap_or(u32::MAX) {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_BLOCK,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.backend.device_features() as u32,
                1 => (self.backend.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if self.queue_selected() => u32::from(QUEUE_MAX),
            VIRTIO_MMIO_QUEUE_READY if self.queue_selected() => u32::from(self.queue.ready),
            VIRTIO_MMIO_INTERRUPT_STATUS => {
                self.counters.bump(Counter::VirtioIsrRead);
                if self.backend.running() {
                    VIRTIO_MMIO_INT_VRING
                } else {
                    0
                }
            }
            VIRTIO_MMIO_STATUS => self.status,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// MMIO write at `offset` of `data` (little-endian).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-blk: {}-byte write to {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(raw);
        match u32::try_from(offset).unwrap_or(u32::MAX) {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    s => log::warn!("virtio-blk: driver features word {s} ignored"),
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if self.configurable() => self.queue.size = v,
            VIRTIO_MMIO_QUEUE_DESC_LOW if self.configurable() => set_low(&mut self.queue.desc, v),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if self.configurable() => set_high(&mut self.queue.desc, v),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if self.configurable() => set_low(&mut self.queue.avail, v),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if self.configurable() => {
                set_high(&mut self.queue.avail, v)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if self.configurable() => set_low(&mut self.queue.used, v),
            VIRTIO_MMIO_QUEUE_USED_HIGH if self.configurable() => set_high(&mut self.queue.used, v),
            VIRTIO_MMIO_QUEUE_READY if self.queue_selected() => self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // The ioeventfd matches queue 0; anything reaching here names no queue.
                self.counters.bump(Counter::VirtioNotifyExit);
                log::warn!("virtio-blk: notify for nonexistent queue {v} ignored");
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.counters.bump(Counter::VirtioIsrAck),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => log::warn!(
                "virtio-blk: write {v:#x} to {offset:#x} ignored (read-only, unknown or not now)"
            ),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        match (v, self.queue.ready) {
            (1, false) if self.status & STATUS_DRIVER_OK == 0 => match self.queue_valid() {
                Ok(()) => self.queue.ready = true,
                Err(why) => log::warn!("virtio-blk: queue 0 not ready: {why}"),
            },
            (0, true) if !self.backend.running() => self.queue.ready = false,
            _ => log::warn!(
                "virtio-blk: QueueReady={v} ignored in state {:#x}",
                self.status
            ),
        }
    }

    /// Whether the driver gave up on the device (FAILED status).
    pub fn failed(&self) -> bool {
        self.status & STATUS_FAILED != 0
    }

    /// Status bits the device considers set (for diagnostics).
    pub fn status(&self) -> u32 {
        self.status
            & (STATUS_ACKNOWLEDGE
                | STATUS_DRIVER
                | STATUS_DRIVER_OK
                | STATUS_FEATURES_OK
                | STATUS_NEEDS_RESET
                | STATUS_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::fake_backend::FakeBackend;
    use crate::vmm::vhost_device::{SharedRegion, VirtioDeviceType};

    fn r(offset: u32) -> u64 {
        u64::from(offset)
    }

    const WINDOW: u64 = 0x4000_0000;

    fn device() -> VirtioMmioBlk<FakeBackend> {
        let backend = FakeBackend::new(
            VirtioDeviceType::Blk,
            (1 << 32) | (1 << 29) | (1 << 9),
            SharedRegion {
                gpa: WINDOW,
                len: 1 << 20,
                fd: -1,
            },
        );
        VirtioMmioBlk::new(backend, Arc::new(ExitCounters::default()))
    }

    fn rd(d: &mut VirtioMmioBlk<FakeBackend>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &mut VirtioMmioBlk<FakeBackend>, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    fn negotiate(d: &mut VirtioMmioBlk<FakeBackend>) {
        wr(d, r(VIRTIO_MMIO_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(d, r(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1);
        wr(d, r(VIRTIO_MMIO_DRIVER_FEATURES), 1);
        wr(
            d,
            r(VIRTIO_MMIO_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn set_queue(d: &mut VirtioMmioBlk<FakeBackend>, size: u32, desc: u64) {
        wr(d, r(VIRTIO_MMIO_QUEUE_SEL), 0);
        wr(d, r(VIRTIO_MMIO_QUEUE_NUM), size);
        wr(d, r(VIRTIO_MMIO_QUEUE_DESC_LOW), desc as u32);
        wr(d, r(VIRTIO_MMIO_QUEUE_DESC_HIGH), (desc >> 32) as u32);
        wr(d, r(VIRTIO_MMIO_QUEUE_AVAIL_LOW), (WINDOW + 0x1000) as u32);
        wr(d, r(VIRTIO_MMIO_QUEUE_USED_LOW), (WINDOW + 0x2000) as u32);
        wr(d, r(VIRTIO_MMIO_QUEUE_READY), 1);
    }

    const RUNNING: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identity_features_and_config() {
        let mut d = device();
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_MAGIC_VALUE)), MAGIC_VALUE);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_VERSION)), 2);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_DEVICE_ID)), 2);
        wr(&mut d, r(VIRTIO_MMIO_DEVICE_FEATURES_SEL), 1);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_DEVICE_FEATURES)), 1);
        wr(&mut d, r(VIRTIO_MMIO_DEVICE_FEATURES_SEL), 0x1234);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_DEVICE_FEATURES)), 0);
        assert_eq!(rd(&mut d, CONFIG), 0x800);
        // Beyond the config space reads as zero; a read-only register ignores writes.
        assert_eq!(rd(&mut d, CONFIG + 0x400), 0);
        wr(&mut d, r(VIRTIO_MMIO_MAGIC_VALUE), 0);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_MAGIC_VALUE)), MAGIC_VALUE);
    }

    #[test]
    fn a_valid_queue_starts_the_backend_and_reset_stops_it() {
        let mut d = device();
        negotiate(&mut d);
        set_queue(&mut d, 64, WINDOW);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_QUEUE_READY)), 1);
        wr(&mut d, r(VIRTIO_MMIO_STATUS), RUNNING);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_STATUS)), RUNNING);
        let (features, q) = d.backend().started[0];
        assert_eq!(features, 1 << 32);
        assert_eq!(q.size, 64);
        assert_eq!(q.desc, WINDOW);
        // Queue registers are frozen while the device runs.
        wr(&mut d, r(VIRTIO_MMIO_QUEUE_NUM), 8);
        wr(&mut d, r(VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_STATUS)), 0);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_QUEUE_READY)), 0);
        assert!(!d.backend().running);
        assert_eq!(d.backend().started.len(), 1);
    }

    #[test]
    fn impossible_queues_stay_not_ready_and_driver_ok_needs_reset() {
        let mut d = device();
        negotiate(&mut d);
        for (size, desc) in [
            (0, WINDOW),
            (3, WINDOW),
            (512, WINDOW),
            (u32::MAX, WINDOW),
            (64, WINDOW + 8),
            (64, 0),
            (64, WINDOW + (1 << 20) - 0x100),
            (64, u64::MAX - 15),
        ] {
            set_queue(&mut d, size, desc);
            assert_eq!(
                rd(&mut d, r(VIRTIO_MMIO_QUEUE_READY)),
                0,
                "size {size} desc {desc:#x}"
            );
        }
        wr(&mut d, r(VIRTIO_MMIO_QUEUE_SEL), 3);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_QUEUE_NUM_MAX)), 0);
        wr(&mut d, r(VIRTIO_MMIO_STATUS), RUNNING);
        assert_ne!(rd(&mut d, r(VIRTIO_MMIO_STATUS)) & STATUS_NEEDS_RESET, 0);
        assert!(d.backend().started.is_empty());
    }

    #[test]
    fn unoffered_features_are_refused() {
        let mut d = device();
        wr(
            &mut d,
            r(VIRTIO_MMIO_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
        );
        wr(&mut d, r(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 0);
        wr(&mut d, r(VIRTIO_MMIO_DRIVER_FEATURES), 1 << 5);
        wr(
            &mut d,
            r(VIRTIO_MMIO_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_STATUS)) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn interrupt_status_and_acks_are_counted_and_odd_widths_are_harmless() {
        let mut d = device();
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_INTERRUPT_STATUS)), 0);
        wr(&mut d, r(VIRTIO_MMIO_INTERRUPT_ACK), 1);
        assert_eq!(d.counters.get(Counter::VirtioIsrRead), 1);
        assert_eq!(d.counters.get(Counter::VirtioIsrAck), 1);
        let mut b = [0u8; 2];
        d.read(r(VIRTIO_MMIO_STATUS), &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.write(r(VIRTIO_MMIO_STATUS), &[1]);
        assert_eq!(rd(&mut d, r(VIRTIO_MMIO_STATUS)), 0);
        wr(&mut d, r(VIRTIO_MMIO_QUEUE_NOTIFY), 5);
        assert_eq!(d.counters.get(Counter::VirtioNotifyExit), 1);
    }
}
