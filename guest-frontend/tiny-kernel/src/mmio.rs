//! virtio-mmio (version 2) transport, driver side: register access and device initialisation.
//! The register file is `guest-abi`'s, the one the VMM is checked against.

pub use guest_abi::virtio_mmio::*;
use guest_frontend::virtio::QueueAddrs;

use crate::platform::{mmio_read32, mmio_write32};

/// Why a device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    NotVirtio,
    NotBlock,
    FeaturesRefused,
    QueueTooSmall,
    QueueRefused,
    DeviceFailed,
}

/// One virtio-mmio device.
#[derive(Clone, Copy)]
pub struct Device {
    base: u64,
}

impl Device {
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    pub fn read(&self, reg: u64) -> u32 {
        mmio_read32(self.base + reg)
    }

    pub fn write(&self, reg: u64, value: u32) {
        mmio_write32(self.base + reg, value)
    }

    pub fn reset(&self) {
        self.write(STATUS, 0);
    }

    fn set_queue_addrs(&self, addrs: QueueAddrs) {
        self.write(QUEUE_DESC_LOW, addrs.desc as u32);
        self.write(QUEUE_DESC_HIGH, (addrs.desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, addrs.avail as u32);
        self.write(QUEUE_DRIVER_HIGH, (addrs.avail >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, addrs.used as u32);
        self.write(QUEUE_DEVICE_HIGH, (addrs.used >> 32) as u32);
    }

    /// Steps up to FEATURES_OK: checks identity, offers `choose(device features)`.
    /// Returns the accepted feature set.
    pub fn negotiate(&self, choose: impl Fn(u64) -> Option<u64>) -> Result<u64, InitError> {
        if self.read(MAGIC) != MAGIC_VALUE || self.read(VERSION) != VERSION_MODERN {
            return Err(InitError::NotVirtio);
        }
        if self.read(DEVICE_ID) != DEVICE_ID_BLOCK {
            return Err(InitError::NotBlock);
        }
        self.reset();
        self.write(STATUS, STATUS_ACKNOWLEDGE);
        self.write(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(DEVICE_FEATURES));
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read(DEVICE_FEATURES));
        let accepted = choose(low | high << 32).ok_or(InitError::FeaturesRefused)?;
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        let st = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(STATUS, st);
        if self.read(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(InitError::FeaturesRefused);
        }
        Ok(accepted)
    }

    /// Configures queue 0 with `size` entries at `addrs` and marks it ready.
    pub fn setup_queue(&self, size: u16, addrs: QueueAddrs) -> Result<(), InitError> {
        self.write(QUEUE_SEL, 0);
        let max = self.read(QUEUE_NUM_MAX);
        if max < u32::from(size) {
            return Err(InitError::QueueTooSmall);
        }
        self.write(QUEUE_NUM, u32::from(size));
        self.set_queue_addrs(addrs);
        self.write(QUEUE_READY, 1);
        if self.read(QUEUE_READY) != 1 {
            return Err(InitError::QueueRefused);
        }
        Ok(())
    }

    /// Sets DRIVER_OK; fails if the device asks for a reset.
    pub fn start(&self) -> Result<(), InitError> {
        let st = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.write(STATUS, st);
        if self.read(STATUS) & STATUS_NEEDS_RESET != 0 {
            return Err(InitError::DeviceFailed);
        }
        Ok(())
    }

    /// Config space: the 64-bit capacity of a block device.
    pub fn capacity(&self) -> u64 {
        u64::from(self.read(CONFIG)) | u64::from(self.read(CONFIG + 4)) << 32
    }

    /// Kicks queue 0 (a KVM ioeventfd: no exit to the VMM).
    pub fn notify(&self) {
        self.write(QUEUE_NOTIFY, 0);
    }

    /// Reads and acknowledges the interrupt status (two exits to the VMM).
    pub fn ack_interrupt(&self) -> u32 {
        let status = self.read(INTERRUPT_STATUS);
        self.write(INTERRUPT_ACK, status);
        status
    }
}
