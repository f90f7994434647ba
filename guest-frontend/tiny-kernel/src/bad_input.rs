//! Bad input on purpose: what a buggy or hostile guest does to the machine. Each check expects
//! what hardware gives (all-ones reads from nothing, ignored writes, a device refusing an
//! impossible queue); a check that sees anything else fails with its number.

use crate::mmio::{self, Device};
use crate::platform::{inb, inl, mmio_read32, mmio_write32, outb, BootInfo};

/// A port no device decodes.
const UNKNOWN_PORT: u16 = 0x2f0;
/// Guest-physical address with neither RAM nor a device.
const UNKNOWN_MMIO: u64 = 0xc000_0000;

fn check(ok: bool, n: u32) -> Result<(), u32> {
    if ok {
        Ok(())
    } else {
        Err(n)
    }
}

fn set_queue(dev: &Device, size: u32, desc: u64, avail: u64, used: u64) {
    dev.write(mmio::QUEUE_SEL, 0);
    dev.write(mmio::QUEUE_NUM, size);
    for (reg, v) in [
        (mmio::QUEUE_DESC_LOW, desc),
        (mmio::QUEUE_DRIVER_LOW, avail),
        (mmio::QUEUE_DEVICE_LOW, used),
    ] {
        dev.write(reg, v as u32);
        dev.write(reg + 4, (v >> 32) as u32);
    }
    dev.write(mmio::QUEUE_READY, 1);
}

pub fn run(info: &BootInfo) -> Result<(), u32> {
    check(inb(UNKNOWN_PORT) == 0xff, 1)?;
    check(inl(UNKNOWN_PORT) == 0xffff_ffff, 2)?;
    outb(UNKNOWN_PORT, 0x55);
    crate::platform::outl(UNKNOWN_PORT, 0xdead_beef);
    check(mmio_read32(UNKNOWN_MMIO) == 0xffff_ffff, 3)?;
    mmio_write32(UNKNOWN_MMIO, 0x1234_5678);

    let dev = Device::new(info.mmio_base);
    dev.write(mmio::MAGIC, 0xdead_beef);
    check(dev.read(mmio::MAGIC) == mmio::MAGIC_VALUE, 4)?;
    dev.write(mmio::DEVICE_FEATURES_SEL, 0x1234_5678);
    check(dev.read(mmio::DEVICE_FEATURES) == 0, 5)?;
    dev.negotiate(Some).map_err(|_| 6u32)?;

    let w = info.window_gpa;
    // Not a power of two; larger than the maximum; rings outside the shared window;
    // a misaligned descriptor table: the queue must stay not ready.
    for (n, (size, desc)) in [(3, w), (0x1_0000, w), (64, 0xdead_0000_0000), (64, w + 1)]
        .into_iter()
        .enumerate()
    {
        set_queue(&dev, size, desc, w + 0x1000, w + 0x2000);
        check(dev.read(mmio::QUEUE_READY) == 0, 7 + n as u32)?;
    }
    // A queue that does not exist.
    dev.write(mmio::QUEUE_SEL, 7);
    check(dev.read(mmio::QUEUE_NUM_MAX) == 0, 11)?;
    dev.write(mmio::QUEUE_READY, 1);
    check(dev.read(mmio::QUEUE_READY) == 0, 12)?;
    // Starting without a usable queue: the device asks for a reset.
    check(dev.start().is_err(), 13)?;
    check(dev.read(mmio::STATUS) & mmio::STATUS_NEEDS_RESET != 0, 14)?;
    // A notify for a queue that does not exist, garbage acks, then a reset.
    dev.write(mmio::QUEUE_NOTIFY, 9);
    dev.write(mmio::INTERRUPT_ACK, 0xffff_ffff);
    dev.reset();
    check(dev.read(mmio::STATUS) == 0, 15)?;
    Ok(())
}
