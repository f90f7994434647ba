//! The virtio-mmio (version 2) register file, as the driver in a guest kernel reaches it
//! (virtio 1.2, section 4.2.2). Offsets are from the device's base address.

pub const MAGIC: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;

/// What the MAGIC register reads: "virt".
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The VERSION register of a modern (non-legacy) device.
pub const VERSION_MODERN: u32 = 2;
/// DEVICE_ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// Device status bits (virtio 1.2, section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// INTERRUPT_STATUS bit: a used buffer notification.
pub const INT_USED_BUFFER: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config as cfg;
    use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
    use virtio_bindings::virtio_mmio as vb;

    #[test]
    fn offsets_and_bits_are_virtios() {
        for (ours, theirs) in [
            (MAGIC, vb::VIRTIO_MMIO_MAGIC_VALUE),
            (VERSION, vb::VIRTIO_MMIO_VERSION),
            (DEVICE_ID, vb::VIRTIO_MMIO_DEVICE_ID),
            (VENDOR_ID, vb::VIRTIO_MMIO_VENDOR_ID),
            (DEVICE_FEATURES, vb::VIRTIO_MMIO_DEVICE_FEATURES),
            (DEVICE_FEATURES_SEL, vb::VIRTIO_MMIO_DEVICE_FEATURES_SEL),
            (DRIVER_FEATURES, vb::VIRTIO_MMIO_DRIVER_FEATURES),
            (DRIVER_FEATURES_SEL, vb::VIRTIO_MMIO_DRIVER_FEATURES_SEL),
            (QUEUE_SEL, vb::VIRTIO_MMIO_QUEUE_SEL),
            (QUEUE_NUM_MAX, vb::VIRTIO_MMIO_QUEUE_NUM_MAX),
            (QUEUE_NUM, vb::VIRTIO_MMIO_QUEUE_NUM),
            (QUEUE_READY, vb::VIRTIO_MMIO_QUEUE_READY),
            (QUEUE_NOTIFY, vb::VIRTIO_MMIO_QUEUE_NOTIFY),
            (INTERRUPT_STATUS, vb::VIRTIO_MMIO_INTERRUPT_STATUS),
            (INTERRUPT_ACK, vb::VIRTIO_MMIO_INTERRUPT_ACK),
            (STATUS, vb::VIRTIO_MMIO_STATUS),
            (QUEUE_DESC_LOW, vb::VIRTIO_MMIO_QUEUE_DESC_LOW),
            (QUEUE_DESC_HIGH, vb::VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (QUEUE_DRIVER_LOW, vb::VIRTIO_MMIO_QUEUE_AVAIL_LOW),
            (QUEUE_DRIVER_HIGH, vb::VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (QUEUE_DEVICE_LOW, vb::VIRTIO_MMIO_QUEUE_USED_LOW),
            (QUEUE_DEVICE_HIGH, vb::VIRTIO_MMIO_QUEUE_USED_HIGH),
            (CONFIG_GENERATION, vb::VIRTIO_MMIO_CONFIG_GENERATION),
            (CONFIG, vb::VIRTIO_MMIO_CONFIG),
        ] {
            assert_eq!(ours, u64::from(theirs), "offset {ours:#x}");
        }
        for (ours, theirs) in [
            (STATUS_ACKNOWLEDGE, cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (STATUS_DRIVER, cfg::VIRTIO_CONFIG_S_DRIVER),
            (STATUS_DRIVER_OK, cfg::VIRTIO_CONFIG_S_DRIVER_OK),
            (STATUS_FEATURES_OK, cfg::VIRTIO_CONFIG_S_FEATURES_OK),
            (STATUS_NEEDS_RESET, cfg::VIRTIO_CONFIG_S_NEEDS_RESET),
            (STATUS_FAILED, cfg::VIRTIO_CONFIG_S_FAILED),
            (INT_USED_BUFFER, vb::VIRTIO_MMIO_INT_VRING),
            (DEVICE_ID_BLOCK, VIRTIO_ID_BLOCK),
        ] {
            assert_eq!(ours, theirs);
        }
    }
}
