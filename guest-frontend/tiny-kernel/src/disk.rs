//! The disk check: write a pattern to the first sectors through the virtio-blk device, read it
//! back, verify. Requests are submitted in batches; completions are awaited by interrupt or by
//! polling, as the boot info asks.

use guest_frontend::virtio::blk::negotiate_features;
use guest_frontend::virtio::{
    BlkOp, BlkRequest, BumpAllocator, DmaBuf, DmaMemory, DmaRegion, FrontBlkQueue, Notify,
    QueueAddrs, SplitQueue, VIRTIO_RING_F_EVENT_IDX,
};

use crate::irq;
use crate::mmio::Device;
use crate::platform::{self, print, print_u64, BootInfo};

const QUEUE_SIZE: u16 = 64;
const SECTOR: u32 = 512;
const WORDS: u64 = SECTOR as u64 / 8;
const MAX_BATCH: usize = 16;
/// Largest request, in sectors.
const MAX_SECTORS_PER_REQUEST: u32 = 8;

/// Word `i` of sector `s` of the pattern for `seed` (the host tests check images with the
/// same rule).
pub fn pattern(seed: u64, sector: u64, i: u64) -> u64 {
    sector.wrapping_mul(0x1_0000_0001) ^ i.wrapping_mul(0x9e37_79b9) ^ 0x5356_4d4d ^ seed
}

enum Wait {
    Interrupt,
    Poll,
}

struct Disk {
    dev: Device,
    blk: FrontBlkQueue<DmaRegion>,
    wait: Wait,
    errors: u64,
}

impl Disk {
    /// Publishes, kicks if the device wants it, and reaps `count` completions.
    ///
    /// Interrupt mode is interrupt-driven: the driver asks for an interrupt before it publishes
    /// and sleeps until one arrives, so the figures show the notification path (not a race
    /// between a slow CPU and a fast backend). Interrupts are delivered only inside
    /// [`irq::wait_for_interrupt`], so a completion's interrupt is either taken there or still
    /// pending; sleeping after a reap that left requests outstanding cannot miss a wake-up.
    fn run_batch(&mut self, count: usize) -> bool {
        let interrupts = matches!(self.wait, Wait::Interrupt);
        if interrupts {
            // Nothing is outstanding yet, so nothing can already be pending.
            let _ = self.blk.virtqueue().enable_interrupts();
        }
        if self.blk.publish() == Notify::Kick {
            self.dev.notify();
        }
        let mut done = 0;
        let mut sleep = interrupts;
        loop {
            if sleep {
                let seen = irq::device_irqs();
                while irq::device_irqs() == seen {
                    irq::wait_for_interrupt();
                }
                self.dev.ack_interrupt();
                self.blk.virtqueue().note_interrupt();
            }
            loop {
                match self.blk.complete() {
                    Ok(Some(c)) => {
                        if c.result.is_err() {
                            self.errors += 1;
                        }
                        done += 1;
                    }
                    Ok(None) => break,
                    Err(_) => return false,
                }
            }
            if done >= count {
                return true;
            }
            sleep = if interrupts {
                // Re-arm; if completions slipped in meanwhile, reap them without sleeping.
                !self.blk.virtqueue().enable_interrupts()
            } else {
                core::hint::spin_loop();
                false
            };
        }
    }
}

/// The words of a `sectors`-sector data buffer at device address `addr`, checked to lie in
/// the DMA window (the buffers are 512-byte aligned, so u64 access is aligned).
fn buffer_words(disk: &Disk, addr: u64, sectors: u64) -> Option<*mut u64> {
    let bytes = usize::try_from(sectors * u64::from(SECTOR)).ok()?;
    disk.blk
        .memory()
        .translate(addr, bytes)
        .map(|p| p.as_ptr().cast::<u64>())
}

fn fail(what: &str) -> u8 {
    print("disk check failed: ");
    print(what);
    print("\n");
    platform::STATUS_DISK_FAILED
}

/// Runs the disk check; returns the poweroff status.
pub fn run(info: &BootInfo) -> u8 {
    irq::init();
    let dev = Device::new(info.mmio_base);
    let want_event_idx = info.ring_flags & platform::RING_EVENT_IDX != 0;
    let Ok(features) = dev.negotiate(|f| negotiate_features(f, want_event_idx).ok()) else {
        return fail("feature negotiation");
    };
    let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
    // SAFETY: the I/O window is identity-mapped RAM that only this kernel and the device use.
    let Ok(region) =
        (unsafe { DmaRegion::identity(info.window_gpa as *mut u8, info.window_len as usize) })
    else {
        return fail("window");
    };
    let mut alloc = BumpAllocator::new(&region);
    let addrs = (|| {
        Ok::<_, guest_frontend::virtio::FrontMemoryError>(QueueAddrs {
            desc: alloc.alloc(QueueAddrs::desc_bytes(QUEUE_SIZE), 64)?,
            avail: alloc.alloc(QueueAddrs::avail_bytes(QUEUE_SIZE), 64)?,
            used: alloc.alloc(QueueAddrs::used_bytes(QUEUE_SIZE), 64)?,
        })
    })();
    let Ok(addrs) = addrs else {
        return fail("ring allocation");
    };
    // SAFETY: the rings lie in the window, which stays mapped for the kernel's lifetime and
    // is used by nobody but this queue and the device.
    let Ok(vq) = (unsafe { SplitQueue::new(&region, addrs, QUEUE_SIZE, event_idx) }) else {
        return fail("virtqueue");
    };
    let Ok(blk) = FrontBlkQueue::new(vq, region, &mut alloc) else {
        return fail("request headers");
    };
    let batch = (info.batch as usize).clamp(1, MAX_BATCH);
    let spr = info.sectors_per_request.clamp(1, MAX_SECTORS_PER_REQUEST);
    let buf_len = spr * SECTOR;
    let mut bufs = [DmaBuf { addr: 0, len: 0 }; MAX_BATCH];
    for b in bufs.iter_mut().take(batch) {
        let Ok(addr) = alloc.alloc(buf_len as usize, SECTOR as usize) else {
            return fail("buffer allocation");
        };
        *b = DmaBuf { addr, len: buf_len };
    }
    if dev.setup_queue(QUEUE_SIZE, addrs).is_err() {
        return fail("queue set-up");
    }
    irq::route_pin(info.mmio_irq, irq::VECTOR_DEVICE);
    if dev.start().is_err() {
        return fail("device start");
    }
    let capacity = dev.capacity();
    // Either the sectors the VMM asks to check, or requests/2 single-sector writes.
    let sectors = if info.check_sectors != 0 {
        u64::from(info.check_sectors)
    } else {
        u64::from(info.requests / 2).max(1)
    };
    if capacity < sectors {
        return fail("disk too small");
    }
    let poll = info.ring_flags & platform::RING_POLL != 0;
    let mut disk = Disk {
        dev,
        blk,
        wait: if poll { Wait::Poll } else { Wait::Interrupt },
        errors: 0,
    };
    if poll {
        disk.blk.virtqueue().disable_interrupts();
    }

    let passes: &[bool] = if info.verify_only {
        &[true]
    } else {
        &[false, true]
    };
    let seed = info.seed;
    let mut requests = 0u64;
    platform::phase(platform::Phase::IoStart);
    let mut bad_words = 0u64;
    for &read in passes {
        let mut sector = 0;
        while sector < sectors {
            // (first sector, sectors) of each request in this batch
            let mut spans = [(0u64, 0u64); MAX_BATCH];
            let mut n = 0;
            while n < batch && sector < sectors {
                let len = (sectors - sector).min(u64::from(spr));
                spans[n] = (sector, len);
                sector += len;
                n += 1;
            }
            for (buf, &(first, len)) in bufs.iter().zip(&spans[..n]) {
                if !read {
                    let Some(words) = buffer_words(&disk, buf.addr, len) else {
                        return fail("buffer outside the window");
                    };
                    for w in 0..len * WORDS {
                        let v = pattern(seed, first + w / WORDS, w % WORDS);
                        // SAFETY: `buffer_words` checked that `len * WORDS` words at `words`
                        // lie in the window; the device does not touch a buffer before it is
                        // submitted.
                        unsafe { core::ptr::write_volatile(words.add(w as usize), v.to_le()) };
                    }
                }
                let req = BlkRequest {
                    op: if read { BlkOp::Read } else { BlkOp::Write },
                    sector: first,
                    data: Some(DmaBuf {
                        addr: buf.addr,
                        len: (len * u64::from(SECTOR)) as u32,
                    }),
                };
                if disk.blk.submit(&req, first).is_err() {
                    return fail("submit");
                }
            }
            requests += n as u64;
            if !disk.run_batch(n) {
                return fail("device returned a broken used ring");
            }
            if read {
                for (buf, &(first, len)) in bufs.iter().zip(&spans[..n]) {
                    let Some(words) = buffer_words(&disk, buf.addr, len) else {
                        return fail("buffer outside the window");
                    };
                    for w in 0..len * WORDS {
                        // SAFETY: as for the writes above; the request has completed.
                        let v = u64::from_le(unsafe {
                            core::ptr::read_volatile(words.add(w as usize))
                        });
                        if v != pattern(seed, first + w / WORDS, w % WORDS) {
                            bad_words += 1;
                        }
                    }
                }
            }
        }
    }
    platform::phase(platform::Phase::IoEnd);

    let stats = disk.blk.virtqueue_ref().stats();
    platform::report(0, stats.kicks_sent);
    platform::report(1, stats.kicks_suppressed);
    platform::report(2, irq::device_irqs());
    platform::report(3, stats.completed);
    platform::report(4, requests);
    platform::report(5, bad_words + disk.errors);
    platform::report(6, capacity);

    if info.wake_irq != 0 {
        irq::route_pin(info.wake_irq, irq::VECTOR_WAKE);
        let seen = irq::wake_irqs();
        platform::phase(platform::Phase::IdleStart);
        while irq::wake_irqs() == seen {
            irq::wait_for_interrupt();
        }
        platform::phase(platform::Phase::IdleEnd);
    }

    print("disk: ");
    print_u64(requests);
    print(" requests, ");
    print_u64(stats.kicks_sent);
    print(" kicks, ");
    print_u64(irq::device_irqs());
    print(" interrupts: ");
    if bad_words == 0 && disk.errors == 0 {
        print("verify ok\n");
        platform::STATUS_OK
    } else {
        fail("verify")
    }
}
