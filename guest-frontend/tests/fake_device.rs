//! The virtio core against a fake virtio-blk device written here: the device runs on another
//! thread over the same memory and honours (or, in the hostile tests, abuses) the split-ring
//! protocol. Notifications are modelled by doorbells with timeouts, so a lost kick or interrupt
//! fails a test instead of hanging it.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_frontend::virtio::{
    vring_need_event, BlkOp, BlkRequest, BumpAllocator, DmaBuf, DmaMemory, DmaRegion,
    FrontBlkQueue, FrontQueueError, Notify, QueueAddrs, SplitQueue,
};

const BASE: u64 = 0x4000_0000;
const MEM: usize = 1 << 20;
const DISK_SECTORS: u64 = 256;
const WAIT: Duration = Duration::from_secs(2);

/// Page-aligned heap memory standing in for guest RAM.
struct Ram {
    ptr: *mut u8,
    layout: Layout,
}
// SAFETY: plain heap memory; shared only through DmaRegion (volatile/atomic accesses).
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}
impl Ram {
    fn new() -> Self {
        let layout = Layout::from_size_align(MEM, 4096).unwrap();
        // SAFETY: non-zero size layout.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }
    fn region(&self) -> DmaRegion {
        // SAFETY: the Ram outlives every region in these tests (held in an Arc by both sides).
        unsafe { DmaRegion::new(self.ptr, BASE, MEM) }.unwrap()
    }
}
impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// A notification line: a counter plus a condition variable.
#[derive(Default)]
struct Doorbell {
    count: Mutex<u64>,
    cv: Condvar,
    /// Rings ever (never consumed).
    rung: AtomicU64,
}
impl Doorbell {
    fn ring(&self) {
        *self.count.lock().unwrap() += 1;
        self.rung.fetch_add(1, Ordering::SeqCst);
        self.cv.notify_all();
    }
    /// How many times it was rung in all.
    fn rung(&self) -> u64 {
        self.rung.load(Ordering::SeqCst)
    }
    /// Waits for at least one ring; consumes all. False on timeout.
    fn wait(&self, timeout: Duration) -> bool {
        let g = self.count.lock().unwrap();
        let (mut g, _) = self.cv.wait_timeout_while(g, timeout, |c| *c == 0).unwrap();
        let got = *g > 0;
        *g = 0;
        got
    }
}

fn u16_at(mem: &DmaRegion, addr: u64) -> &AtomicU16 {
    let p = mem.translate(addr, 2).unwrap();
    // SAFETY: inside the test RAM, 2-byte aligned ring fields, accessed atomically by both sides.
    unsafe { &*(p.as_ptr() as *const AtomicU16) }
}
fn read_u32(mem: &DmaRegion, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    mem.read_bytes(addr, &mut b).unwrap();
    u32::from_le_bytes(b)
}
fn read_u64(mem: &DmaRegion, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read_bytes(addr, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Device-side behaviour knobs.
#[derive(Clone, Default)]
struct DeviceMode {
    /// Spin this many iterations per request (makes the device "busy" while the driver
    /// publishes, so suppression paths run).
    work_spins: u32,
    /// If set, the device touches no ring until this is rung (the test controls when it
    /// sees the requests, and so what it sees: the interleaving is fixed).
    gate: Option<Arc<Doorbell>>,
}

/// A fake virtio-blk device with a RAM disk, on its own thread.
struct FakeBlk {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl FakeBlk {
    #[allow(clippy::too_many_arguments)]
    fn start(
        mem: DmaRegion,
        addrs: QueueAddrs,
        size: u16,
        event_idx: bool,
        kick: Arc<Doorbell>,
        irq: Arc<Doorbell>,
        mode: DeviceMode,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut disk = vec![0u8; (DISK_SECTORS * 512) as usize];
            let avail_idx = u16_at(&mem, addrs.avail + 2);
            let avail_flags = u16_at(&mem, addrs.avail);
            let used_event = u16_at(&mem, addrs.avail + 4 + 2 * u64::from(size));
            let used_flags = u16_at(&mem, addrs.used);
            let used_idx = u16_at(&mem, addrs.used + 2);
            let avail_event = u16_at(&mem, addrs.used + 4 + 8 * u64::from(size));
            let (mut last_avail, mut used, mut signalled) = (0u16, 0u16, 0u16);
            let mut processed = 0u64;
            if let Some(gate) = &mode.gate {
                while !gate.wait(Duration::from_millis(50)) {
                    if stop2.load(Ordering::Relaxed) {
                        return processed;
                    }
                }
            }
            while !stop2.load(Ordering::Relaxed) {
                // Busy: ask not to be kicked (without EVENT_IDX; with it, avail_event lags).
                if !event_idx {
                    used_flags.store(1, Ordering::Relaxed);
                }
                while avail_idx.load(Ordering::Acquire) != last_avail {
                    let slot = u64::from(last_avail % size);
                    let head = u16_at(&mem, addrs.avail + 4 + 2 * slot).load(Ordering::Relaxed);
                    let written = serve(&mem, addrs.desc, head, size, &mut disk);
                    for _ in 0..mode.work_spins {
                        std::hint::spin_loop();
                    }
                    let uslot = addrs.used + 4 + 8 * u64::from(used % size);
                    mem.write_bytes(uslot, &u32::from(head).to_le_bytes())
                        .unwrap();
                    mem.write_bytes(uslot + 4, &written.to_le_bytes()).unwrap();
                    last_avail = last_avail.wrapping_add(1);
                    used = used.wrapping_add(1);
                    used_idx.store(used, Ordering::Release);
                    processed += 1;
                    // Interrupt decision, mirror image of the driver's kick decision.
                    fence(Ordering::SeqCst);
                    let notify = if event_idx {
                        vring_need_event(used_event.load(Ordering::Relaxed), used, signalled)
                    } else {
                        avail_flags.load(Ordering::Relaxed) & 1 == 0
                    };
                    signalled = used;
                    if notify {
                        irq.ring();
                    }
                }
                // Going idle: re-enable kicks, fence, re-check (V1-V3 in virtqueue.rs).
                if event_idx {
                    avail_event.store(last_avail, Ordering::Relaxed);
                } else {
                    used_flags.store(0, Ordering::Relaxed);
                }
                fence(Ordering::SeqCst);
                if avail_idx.load(Ordering::Acquire) != last_avail {
                    continue;
                }
                kick.wait(Duration::from_millis(50));
            }
            processed
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FakeBlk {
    /// A failing test must not leave the device thread running on freed memory.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one chain: header, optional data, status. Returns bytes written to writable buffers.
fn serve(mem: &DmaRegion, desc_base: u64, head: u16, size: u16, disk: &mut [u8]) -> u32 {
    let mut chain = Vec::new();
    let mut i = head;
    loop {
        let d = desc_base + 16 * u64::from(i);
        let addr = read_u64(mem, d);
        let len = read_u32(mem, d + 8);
        let flags =
            u32::from(mem.read_u8(d + 12).unwrap()) | u32::from(mem.read_u8(d + 13).unwrap()) << 8;
        let next =
            u16::from(mem.read_u8(d + 14).unwrap()) | u16::from(mem.read_u8(d + 15).unwrap()) << 8;
        chain.push((addr, len, flags & 2 != 0));
        assert!(chain.len() <= size as usize, "descriptor loop");
        if flags & 1 == 0 {
            break;
        }
        i = next;
    }
    let (hdr, _, w) = chain[0];
    assert!(!w, "header must be device-readable");
    let (status_addr, status_len, sw) = *chain.last().unwrap();
    assert!(
        sw && status_len == 1,
        "status must be a writable byte: head {head} chain {chain:x?}"
    );
    let kind = read_u32(mem, hdr);
    let sector = read_u64(mem, hdr + 8);
    let mut status = 0u8;
    let mut written = 1;
    match (kind, chain.len()) {
        (0 | 1, 3) => {
            let (addr, len, w) = chain[1];
            let off = (sector * 512) as usize;
            match disk.get_mut(off..off + len as usize) {
                Some(range) if kind == 0 && w => {
                    mem.write_bytes(addr, range).unwrap();
                    written += len;
                }
                Some(range) if kind == 1 && !w => mem.read_bytes(addr, range).unwrap(),
                _ => status = 1,
            }
        }
        (4, 2) => {}
        (8, 3) => {
            mem.write_bytes(chain[1].0, b"fake-blk\0").unwrap();
            written += 9;
        }
        _ => status = 2,
    }
    mem.write_u8(status_addr, status).unwrap();
    written
}

/// Driver-side harness: RAM, one blk queue, the device thread and its doorbells.
struct Rig {
    blk: FrontBlkQueue<DmaRegion>,
    dev: FakeBlk,
    kick: Arc<Doorbell>,
    irq: Arc<Doorbell>,
    data: u64,
    _ram: Arc<Ram>,
}

fn rig(size: u16, event_idx: bool, mode: DeviceMode) -> Rig {
    let ram = Arc::new(Ram::new());
    let mem = ram.region();
    let mut alloc = BumpAllocator::new(&mem);
    // SAFETY: the Ram lives in the Rig as long as the queue.
    let (vq, addrs) = unsafe { queue_in(&mem, &mut alloc, size, event_idx) };
    let blk = FrontBlkQueue::new(vq, mem, &mut alloc).unwrap();
    let data = alloc.alloc(64 * 4096, 4096).unwrap();
    let (kick, irq) = (Arc::new(Doorbell::default()), Arc::new(Doorbell::default()));
    let dev = FakeBlk::start(mem, addrs, size, event_idx, kick.clone(), irq.clone(), mode);
    Rig {
        blk,
        dev,
        kick,
        irq,
        data,
        _ram: ram,
    }
}

impl Rig {
    fn buf(&self, i: u64) -> DmaBuf {
        DmaBuf {
            addr: self.data + 4096 * (i % 64),
            len: 512,
        }
    }
    fn publish(&mut self) {
        if self.blk.publish() == Notify::Kick {
            self.kick.ring();
        }
    }
    /// Waits (interrupt-driven) for one completion; panics on a lost notification.
    fn wait_one(&mut self) -> u64 {
        loop {
            if let Some(c) = self.blk.complete().unwrap() {
                c.result.unwrap();
                return c.token;
            }
            if self.blk.virtqueue().enable_interrupts() {
                self.blk.virtqueue().disable_interrupts();
                continue;
            }
            assert!(
                self.irq.wait(WAIT),
                "lost interrupt or kick: no completion in {WAIT:?}"
            );
            self.blk.virtqueue().note_interrupt();
            self.blk.virtqueue().disable_interrupts();
        }
    }
}

fn write_req(r: &Rig, i: u64, sector: u64) -> BlkRequest {
    BlkRequest {
        op: BlkOp::Write,
        sector,
        data: Some(r.buf(i)),
    }
}

#[test]
fn data_round_trip_flush_and_id() {
    let mut r = rig(32, true, DeviceMode::default());
    let mem = *r.blk.memory();
    for s in 0..8u64 {
        mem.write_bytes(r.buf(s).addr, &[s as u8 + 1; 512]).unwrap();
        r.blk.submit(&write_req(&r, s, s), s).unwrap();
    }
    r.publish();
    let mut done: Vec<u64> = (0..8).map(|_| r.wait_one()).collect();
    done.sort();
    assert_eq!(done, (0..8).collect::<Vec<_>>());
    let flush = BlkRequest {
        op: BlkOp::Flush,
        sector: 0,
        data: None,
    };
    r.blk.submit(&flush, 100).unwrap();
    r.publish();
    assert_eq!(r.wait_one(), 100);
    for s in 0..8u64 {
        let b = r.buf(32 + s);
        mem.write_bytes(b.addr, &[0; 512]).unwrap();
        r.blk
            .submit(
                &BlkRequest {
                    op: BlkOp::Read,
                    sector: s,
                    data: Some(b),
                },
                s,
            )
            .unwrap();
    }
    r.publish();
    for _ in 0..8 {
        let s = r.wait_one();
        let mut got = [0u8; 512];
        mem.read_bytes(r.buf(32 + s).addr, &mut got).unwrap();
        assert_eq!(got, [s as u8 + 1; 512]);
    }
    let id = DmaBuf {
        addr: r.buf(60).addr,
        len: 20,
    };
    r.blk
        .submit(
            &BlkRequest {
                op: BlkOp::GetId,
                sector: 0,
                data: Some(id),
            },
            7,
        )
        .unwrap();
    r.publish();
    r.wait_one();
    let mut got = [0u8; 8];
    mem.read_bytes(id.addr, &mut got).unwrap();
    assert_eq!(&got, b"fake-blk");
    assert_eq!(r.blk.virtqueue().in_flight(), 0);
    assert_eq!(r.blk.virtqueue().num_free(), 32);
    assert_eq!(r.dev.stop(), 18);
}

#[test]
fn device_errors_reach_the_caller() {
    let mut r = rig(8, false, DeviceMode::default());
    r.blk.submit(&write_req(&r, 0, DISK_SECTORS), 1).unwrap();
    r.publish();
    let c = loop {
        if let Some(c) = r.blk.complete().unwrap() {
            break c;
        }
        if !r.blk.virtqueue().enable_interrupts() {
            assert!(r.irq.wait(WAIT));
        }
    };
    assert_eq!(
        c.result,
        Err(guest_frontend::virtio::FrontRequestError::IoError)
    );
    // Driver-side validation: unaligned data never reaches the ring.
    let bad = BlkRequest {
        op: BlkOp::Read,
        sector: 0,
        data: Some(DmaBuf {
            addr: r.data,
            len: 100,
        }),
    };
    assert!(r.blk.submit(&bad, 2).is_err());
    assert_eq!(r.blk.virtqueue().num_free(), 8);
    r.dev.stop();
}

/// More than 2^16 requests through an 8-entry queue: every index wraps many times.
fn wraparound(event_idx: bool) {
    let mut r = rig(8, event_idx, DeviceMode::default());
    let total = 70_000u64;
    let (mut next, mut done) = (0u64, 0u64);
    let mut depth_cycle = 0u64;
    while done < total {
        // Vary the batch: 1, 2 (a chain is 3 descriptors, so at most 2 fit in 8).
        depth_cycle += 1;
        let batch = 1 + depth_cycle % 2;
        let mut added = 0;
        while added < batch && next < total && r.blk.virtqueue().num_free() >= 3 {
            r.blk
                .submit(&write_req(&r, next, next % DISK_SECTORS), next)
                .unwrap();
            next += 1;
            added += 1;
        }
        r.publish();
        while r.blk.virtqueue().in_flight() > 0 {
            r.wait_one();
            done += 1;
        }
    }
    let st = r.blk.virtqueue().stats();
    assert_eq!(st.completed, total);
    assert_eq!(r.blk.virtqueue().num_free(), 8);
    assert_eq!(r.dev.stop(), total);
}

#[test]
fn wraparound_event_idx() {
    wraparound(true);
}

#[test]
fn wraparound_no_event_idx() {
    wraparound(false);
}

/// Publishing one request at a time while a slow device is busy: the device suppresses kicks,
/// every request still completes, and kicks + suppressed == publishes.
fn suppression(event_idx: bool) {
    let mode = DeviceMode {
        work_spins: 20_000,
        ..DeviceMode::default()
    };
    let mut r = rig(64, event_idx, mode);
    let total = 3000u64;
    let (mut next, mut done, mut publishes) = (0u64, 0u64, 0u64);
    while done < total {
        while next < total && r.blk.virtqueue().num_free() >= 3 {
            r.blk
                .submit(&write_req(&r, next, next % DISK_SECTORS), next)
                .unwrap();
            next += 1;
            r.publish();
            publishes += 1;
        }
        r.wait_one();
        done += 1;
        while let Some(c) = r.blk.complete().unwrap() {
            c.result.unwrap();
            done += 1;
        }
    }
    let st = r.blk.virtqueue().stats();
    assert_eq!(st.kicks_sent + st.kicks_suppressed, publishes);
    assert!(
        st.kicks_suppressed > 0,
        "busy device never suppressed a kick: {st:?}"
    );
    // How many interrupts the driver took depends on how the two threads interleave (on a
    // loaded machine the device finishes each request before the driver sleeps), so only
    // bounds that hold under any interleaving are asserted here; the exact coalescing of a
    // batch is pinned by `event_idx_coalesces_a_batch_into_one_interrupt`.
    eprintln!("event_idx={event_idx}: {st:?}");
    assert_eq!(r.dev.stop(), total);
    let sent = r.irq.rung();
    assert!(
        st.interrupts <= sent,
        "took {} interrupts, the device sent {sent}",
        st.interrupts
    );
    assert!(sent <= total, "{sent} interrupts for {total} completions");
}

#[test]
fn kick_suppression_event_idx() {
    suppression(true);
}

#[test]
fn kick_suppression_used_flags() {
    suppression(false);
}

/// A batch the device completes while the driver sleeps, with the interleaving fixed by a
/// gate: the device sees all `BATCH` requests at once, after the driver asked to be woken
/// on the next completion. With EVENT_IDX the device interrupts once for the batch (the
/// driver's used_event is crossed once) and the driver reaps the rest without another
/// interrupt; with interrupts disabled (either mode) it does not interrupt at all.
fn gated_batch(event_idx: bool, want_interrupts: bool) -> (u64, u64) {
    const BATCH: u64 = 16;
    let gate = Arc::new(Doorbell::default());
    let mode = DeviceMode {
        gate: Some(Arc::clone(&gate)),
        ..DeviceMode::default()
    };
    let mut r = rig(64, event_idx, mode);
    for i in 0..BATCH {
        r.blk.submit(&write_req(&r, i, i), i).unwrap();
    }
    r.publish();
    if want_interrupts {
        assert!(
            !r.blk.virtqueue().enable_interrupts(),
            "the gated device completed something"
        );
    } else {
        r.blk.virtqueue().disable_interrupts();
    }
    gate.ring();
    let mut done = 0u64;
    if want_interrupts {
        assert!(r.irq.wait(WAIT), "no interrupt for the batch in {WAIT:?}");
        r.blk.virtqueue().note_interrupt();
        r.blk.virtqueue().disable_interrupts();
    }
    // Reap by polling, interrupts off, until the whole batch is back.
    let deadline = std::time::Instant::now() + WAIT;
    while done < BATCH {
        match r.blk.complete().unwrap() {
            Some(c) => {
                c.result.unwrap();
                done += 1;
            }
            None => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{done} of {BATCH} completed in {WAIT:?}"
                );
                std::thread::yield_now();
            }
        }
    }
    assert_eq!(r.dev.stop(), BATCH);
    (r.irq.rung(), r.blk.virtqueue().stats().interrupts)
}

#[test]
fn event_idx_coalesces_a_batch_into_one_interrupt() {
    assert_eq!(gated_batch(true, true), (1, 1), "(sent, taken)");
}

#[test]
fn disabled_interrupts_stay_off_for_a_batch() {
    assert_eq!(gated_batch(true, false), (0, 0), "EVENT_IDX: (sent, taken)");
    assert_eq!(
        gated_batch(false, false),
        (0, 0),
        "used flags: (sent, taken)"
    );
}

/// A split queue of `size` with its rings allocated from `alloc`, and their addresses.
///
/// # Safety
/// The memory behind `mem` must outlive the queue.
unsafe fn queue_in(
    mem: &DmaRegion,
    alloc: &mut BumpAllocator,
    size: u16,
    event_idx: bool,
) -> (SplitQueue, QueueAddrs) {
    let addrs = QueueAddrs {
        desc: alloc.alloc(QueueAddrs::desc_bytes(size), 16).unwrap(),
        avail: alloc.alloc(QueueAddrs::avail_bytes(size), 2).unwrap(),
        used: alloc.alloc(QueueAddrs::used_bytes(size), 4).unwrap(),
    };
    // SAFETY: the caller keeps the memory alive as long as the queue.
    let vq = unsafe { SplitQueue::new(mem, addrs, size, event_idx) }.unwrap();
    (vq, addrs)
}

/// A bare split queue of `size` in `ram` (no device thread: tests write the used ring), its
/// ring addresses and a 16-byte buffer for descriptors.
fn bare_queue(ram: &Ram, size: u16, event_idx: bool) -> (SplitQueue, QueueAddrs, DmaBuf) {
    let mem = ram.region();
    // SAFETY: the caller keeps `ram` alive as long as the queue.
    let (vq, addrs) = unsafe { queue_in(&mem, &mut BumpAllocator::new(&mem), size, event_idx) };
    let b = DmaBuf {
        addr: BASE + 0x8000,
        len: 16,
    };
    (vq, addrs, b)
}

/// Hostile used rings, written directly (no device thread): the driver reports an error, keeps
/// its free list intact and refuses further work.
fn hostile(corrupt: impl Fn(&DmaRegion, QueueAddrs, u16), expect: fn(&FrontQueueError) -> bool) {
    let ram = Ram::new();
    let mem = ram.region();
    let size = 8u16;
    let (mut vq, addrs, b) = bare_queue(&ram, size, true);
    let head = vq.add(&[b], &[b, b]).unwrap();
    vq.publish();
    corrupt(&mem, addrs, head);
    let err = vq.pop_used().unwrap_err();
    assert!(expect(&err), "unexpected error {err:?}");
    assert_eq!(vq.pop_used(), Err(FrontQueueError::Broken));
    assert_eq!(vq.add(&[b], &[]), Err(FrontQueueError::Broken));
    // Nothing was returned to the free list by the bad element.
    assert_eq!(vq.num_free(), size - 3);
}

fn put_used(mem: &DmaRegion, addrs: QueueAddrs, slot: u16, id: u32, idx: u16) {
    let e = addrs.used + 4 + 8 * u64::from(slot);
    mem.write_bytes(e, &id.to_le_bytes()).unwrap();
    mem.write_bytes(e + 4, &0u32.to_le_bytes()).unwrap();
    u16_at(mem, addrs.used + 2).store(idx, Ordering::Release);
}

#[test]
fn hostile_used_id_out_of_range() {
    hostile(
        |m, a, _| put_used(m, a, 0, 8, 1),
        |e| matches!(e, FrontQueueError::UsedIdOutOfRange { id: 8 }),
    );
    hostile(
        |m, a, _| put_used(m, a, 0, u32::MAX, 1),
        |e| matches!(e, FrontQueueError::UsedIdOutOfRange { .. }),
    );
}

#[test]
fn hostile_used_id_not_a_head_in_flight() {
    // Descriptor 1 is the second descriptor of the in-flight chain, not its head.
    hostile(
        |m, a, head| put_used(m, a, 0, u32::from(head) + 1, 1),
        |e| matches!(e, FrontQueueError::UsedIdNotInFlight { .. }),
    );
    // A free descriptor.
    hostile(
        |m, a, _| put_used(m, a, 0, 5, 1),
        |e| matches!(e, FrontQueueError::UsedIdNotInFlight { id: 5 }),
    );
}

#[test]
fn hostile_used_index_runaway_and_duplicate() {
    hostile(
        |m, a, head| put_used(m, a, 0, u32::from(head), 5),
        |e| {
            matches!(
                e,
                FrontQueueError::UsedIndexRunaway {
                    used_idx: 5,
                    last_used: 0
                }
            )
        },
    );
    // Two in flight, the device completes the same head twice.
    let ram = Ram::new();
    let mem = ram.region();
    let (mut vq, addrs, b) = bare_queue(&ram, 8, false);
    let h1 = vq.add(&[b], &[b]).unwrap();
    let _h2 = vq.add(&[b], &[b]).unwrap();
    vq.publish();
    put_used(&mem, addrs, 0, u32::from(h1), 1);
    put_used(&mem, addrs, 1, u32::from(h1), 2);
    assert_eq!(vq.pop_used().unwrap().map(|u| u.head), Some(h1));
    assert_eq!(
        vq.pop_used(),
        Err(FrontQueueError::UsedIdNotInFlight { id: u32::from(h1) })
    );
    assert_eq!(vq.num_free(), 6, "the duplicate freed nothing");
}

#[test]
fn out_of_order_completion_keeps_the_free_list_whole() {
    let ram = Ram::new();
    let mem = ram.region();
    let size = 16u16;
    let (mut vq, addrs, b) = bare_queue(&ram, size, true);
    let mut used_idx = 0u16;
    let mut seed = 12345u32;
    for _round in 0..500 {
        let mut heads = Vec::new();
        // Chains of 1..=3 descriptors until full.
        loop {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let n = 1 + (seed >> 16) as usize % 3;
            match vq.add(&vec![b; n], &[]) {
                Ok(h) => heads.push(h),
                Err(FrontQueueError::Full) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(vq.publish() == Notify::Nothing, heads.is_empty());
        // Complete in reverse order.
        for h in heads.iter().rev() {
            put_used(
                &mem,
                addrs,
                used_idx % size,
                u32::from(*h),
                used_idx.wrapping_add(1),
            );
            used_idx = used_idx.wrapping_add(1);
        }
        let mut got = Vec::new();
        while let Some(u) = vq.pop_used().unwrap() {
            got.push(u.head);
        }
        heads.reverse();
        assert_eq!(got, heads);
        assert_eq!(vq.num_free(), size);
        assert_eq!(vq.in_flight(), 0);
    }
}
