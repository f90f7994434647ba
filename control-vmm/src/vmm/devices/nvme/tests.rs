//! The controller driven as a guest driver drives it: register and doorbell writes to BAR0,
//! queues and buffers in a fake guest memory (vm-memory over anonymous memory), interrupts
//! read from the MSI-X PBA (MSI-X left disabled, a raised vector stays pending), and the
//! backing file read from outside.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::controller::MSIX_VECTORS;
use super::io::Namespace;
use super::pci::{NvmePci, MSIX_PBA_OFFSET};
use crate::vmm::exits::{Counter, ExitCounters};
use crate::vmm::pci::msix::tests::Recorder;
use crate::vmm::pci::PciDevice;

const RAM: usize = 1 << 20;
const ASQ: u64 = 0x10000;
const ACQ: u64 = 0x11000;
const IOSQ: u64 = 0x12000;
const IOCQ: u64 = 0x13000;
const BUF: u64 = 0x20000;
const LIST: u64 = 0x40000;
const ENTRIES: u32 = 16;
const IMAGE_BLOCKS: u64 = 2048;

struct Rig {
    dev: NvmePci,
    mem: GuestMemoryMmap,
    image: tempfile::NamedTempFile,
    counters: Arc<ExitCounters>,
    sq_base: [u64; 2],
    sq_tail: [u32; 2],
    cq_base: [u64; 2],
    cq_head: [u32; 2],
    phase: [bool; 2],
    cid: u16,
}

/// What a completion entry said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cqe {
    result: u32,
    sqid: u16,
    cid: u16,
    /// Status without DNR.
    status: u16,
}

fn sqe(opcode: u8, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 3]) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = opcode;
    b[4..8].copy_from_slice(&nsid.to_le_bytes());
    b[24..32].copy_from_slice(&prp1.to_le_bytes());
    b[32..40].copy_from_slice(&prp2.to_le_bytes());
    for (i, v) in cdw.iter().enumerate() {
        b[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    b
}

impl Rig {
    fn new(writable: bool) -> Self {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(IMAGE_BLOCKS * 512).unwrap();
        image.write_all(b"BLOCK-ZERO").unwrap();
        let file = File::options()
            .read(true)
            .write(writable)
            .open(image.path())
            .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let counters = Arc::new(ExitCounters::default());
        let ns = Namespace::new(file, writable).unwrap();
        let dev = NvmePci::new(
            mem.clone(),
            ns,
            0xc000_0000,
            24,
            Arc::new(Recorder::default()),
            Arc::clone(&counters),
        )
        .unwrap();
        let mut rig = Self {
            dev,
            mem,
            image,
            counters,
            sq_base: [ASQ, IOSQ],
            sq_tail: [0; 2],
            cq_base: [ACQ, IOCQ],
            cq_head: [0; 2],
            phase: [true; 2],
            cid: 0,
        };
        // Memory decoding and bus mastering on, as the driver's pci_enable_device does.
        rig.dev.config_write(4, &6u16.to_le_bytes());
        rig
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.dev.bar_write(0, off, &v.to_le_bytes());
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn csts(&mut self) -> u32 {
        self.r32(0x1c)
    }

    fn enable(&mut self) {
        self.w32(0x24, (ENTRIES - 1) << 16 | (ENTRIES - 1));
        self.dev.bar_write(0, 0x28, &ASQ.to_le_bytes());
        self.w32(0x30, ACQ as u32);
        self.w32(0x34, 0);
        self.w32(0x14, 0x0046_0001);
        assert_eq!(self.csts(), 1, "ready");
    }

    fn submit(&mut self, qid: usize, mut e: [u8; 64]) -> u16 {
        self.cid += 1;
        e[2..4].copy_from_slice(&self.cid.to_le_bytes());
        let at = self.sq_base[qid] + u64::from(self.sq_tail[qid]) * 64;
        self.mem.write_slice(&e, GuestAddress(at)).unwrap();
        self.sq_tail[qid] = (self.sq_tail[qid] + 1) % ENTRIES;
        let tail = self.sq_tail[qid];
        self.w32(0x1000 + 8 * qid as u64, tail);
        self.cid
    }

    /// The next completion of queue `qid`, if the controller posted one (head doorbell rung).
    fn completion(&mut self, qid: usize) -> Option<Cqe> {
        let at = self.cq_base[qid] + u64::from(self.cq_head[qid]) * 16;
        let dw: [u32; 4] =
            std::array::from_fn(|i| self.mem.read_obj(GuestAddress(at + 4 * i as u64)).unwrap());
        if (dw[3] >> 16) & 1 != u32::from(self.phase[qid]) {
            return None;
        }
        self.cq_head[qid] = (self.cq_head[qid] + 1) % ENTRIES;
        if self.cq_head[qid] == 0 {
            self.phase[qid] = !self.phase[qid];
        }
        let head = self.cq_head[qid];
        self.w32(0x1000 + 8 * qid as u64 + 4, head);
        Some(Cqe {
            result: dw[0],
            sqid: (dw[2] >> 16) as u16,
            cid: dw[3] as u16,
            status: ((dw[3] >> 17) & 0x3fff) as u16,
        })
    }

    /// Runs a command on queue `qid` and returns its completion.
    fn run(&mut self, qid: usize, e: [u8; 64]) -> Cqe {
        let cid = self.submit(qid, e);
        let c = self.completion(qid).expect("a completion");
        assert_eq!((c.cid, c.sqid), (cid, qid as u16));
        c
    }

    fn io_queues(&mut self) {
        assert_eq!(
            self.run(0, sqe(0x09, 0, 0, 0, [7, 0x000f_000f, 0])).status,
            0
        );
        let c = self.run(
            0,
            sqe(0x05, 0, IOCQ, 0, [(ENTRIES - 1) << 16 | 1, 1 << 16 | 3, 0]),
        );
        assert_eq!(c.status, 0, "create CQ 1");
        let c = self.run(
            0,
            sqe(0x01, 0, IOSQ, 0, [(ENTRIES - 1) << 16 | 1, 1 << 16 | 1, 0]),
        );
        assert_eq!(c.status, 0, "create SQ 1");
    }

    fn pending_vectors(&mut self) -> u32 {
        self.r32(MSIX_PBA_OFFSET)
    }

    fn image_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(self.image.path()).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut b = vec![0; len];
        f.read_exact(&mut b).unwrap();
        b
    }
}

const READ: u8 = 0x02;
const WRITE: u8 = 0x01;

#[test]
fn bring_up_as_linux_does_then_io_reaches_the_backing_file() {
    let mut g = Rig::new(true);
    let mut q = [0u8; 8];
    g.dev.bar_read(0, 0, &mut q);
    assert_eq!(u64::from_le_bytes(q) & 0xffff, 1023, "CAP.MQES");
    assert_eq!(g.r32(8), 0x0001_0200, "VS 1.2");
    g.enable();
    // Identify controller and namespace, the active namespace list.
    assert_eq!(g.run(0, sqe(0x06, 0, BUF, 0, [1, 0, 0])).status, 0);
    let vid: u16 = g.mem.read_obj(GuestAddress(BUF)).unwrap();
    let mdts: u8 = g.mem.read_obj(GuestAddress(BUF + 77)).unwrap();
    let nn: u32 = g.mem.read_obj(GuestAddress(BUF + 516)).unwrap();
    let sqes: u8 = g.mem.read_obj(GuestAddress(BUF + 512)).unwrap();
    assert_eq!((vid, mdts, nn, sqes), (super::pci::VENDOR, 5, 1, 0x66));
    assert_eq!(g.run(0, sqe(0x06, 1, BUF, 0, [0, 0, 0])).status, 0);
    let nsze: u64 = g.mem.read_obj(GuestAddress(BUF)).unwrap();
    assert_eq!(nsze, IMAGE_BLOCKS);
    let nsattr: u8 = g.mem.read_obj(GuestAddress(BUF + 99)).unwrap();
    assert_eq!(nsattr, 0, "writable");
    assert_eq!(g.run(0, sqe(0x06, 0, BUF, 0, [2, 0, 0])).status, 0);
    let list: [u32; 2] = g.mem.read_obj(GuestAddress(BUF)).unwrap();
    assert_eq!(list, [1, 0]);
    // Number of queues: 16 asked, 8 granted (0-based in the result).
    let c = g.run(0, sqe(0x09, 0, 0, 0, [7, 0x000f_000f, 0]));
    assert_eq!((c.status, c.result), (0, 0x0007_0007));
    let c = g.run(0, sqe(0x0a, 0, 0, 0, [7, 0, 0]));
    assert_eq!(c.result, 0x0007_0007);
    g.io_queues();
    assert_eq!(
        g.pending_vectors() & 1,
        1,
        "admin completions raised vector 0"
    );

    // Write 4 KiB at LBA 16 from a buffer starting mid-page (two PRPs), read it from outside.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    g.mem.write_slice(&data, GuestAddress(BUF + 0x800)).unwrap();
    let c = g.run(1, sqe(WRITE, 1, BUF + 0x800, BUF + 0x1000, [16, 0, 7]));
    assert_eq!(c.status, 0);
    assert_eq!(g.image_at(16 * 512, 4096), data);
    assert_eq!(g.pending_vectors() & 0b10, 0b10, "the I/O queue's vector 1");
    // Read 12 KiB from LBA 0 through a PRP list; block 0 holds what was put there.
    g.mem.write_obj(0x31000u64, GuestAddress(LIST)).unwrap();
    g.mem.write_obj(0x32000u64, GuestAddress(LIST + 8)).unwrap();
    let c = g.run(1, sqe(READ, 1, 0x30000, LIST, [0, 0, 23]));
    assert_eq!(c.status, 0);
    let mut head = [0u8; 10];
    g.mem.read_slice(&mut head, GuestAddress(0x30000)).unwrap();
    assert_eq!(&head, b"BLOCK-ZERO");
    let mut third = vec![0u8; 4096];
    g.mem.read_slice(&mut third, GuestAddress(0x32000)).unwrap();
    assert_eq!(
        third,
        g.image_at(8192, 4096),
        "LBAs 16..23 land in the list's last page"
    );
    assert_eq!(g.run(1, sqe(0x00, 1, 0, 0, [0; 3])).status, 0, "flush");
    let s = g.dev.stats();
    assert_eq!((s.reads, s.writes, s.flushes, s.errors), (1, 1, 1, 0));
    assert!(
        g.counters.get(Counter::NvmeDoorbell) >= 2 * 10,
        "every doorbell an exit"
    );

    // Tear down as Linux does at poweroff: delete SQ, CQ, then the shutdown notification.
    assert_eq!(g.run(0, sqe(0x00, 0, 0, 0, [1, 0, 0])).status, 0);
    assert_eq!(g.run(0, sqe(0x04, 0, 0, 0, [1, 0, 0])).status, 0);
    g.w32(0x14, 0x0046_4001);
    assert_eq!(g.csts() & 0xc, 0x8, "CSTS.SHST: shutdown complete");
    g.w32(0x14, 0);
    assert_eq!(g.csts(), 0, "reset");
}

#[test]
fn hostile_commands_fail_with_their_status_and_the_controller_goes_on() {
    let mut g = Rig::new(true);
    g.enable();
    let admin = |g: &mut Rig, e| g.run(0, e).status;
    // Queue creation: qid 0, qid past the granted count, size 1, outside RAM, no such CQ,
    // vector past the table, not contiguous.
    assert_eq!(admin(&mut g, sqe(0x09, 0, 0, 0, [7, 0x0001_0001, 0])), 0);
    let cq = |qid: u32, size: u32, base: u64, flags: u32| {
        sqe(0x05, 0, base, 0, [(size - 1) << 16 | qid, flags, 0])
    };
    assert_eq!(admin(&mut g, cq(0, 16, IOCQ, 1)), 0x101);
    assert_eq!(admin(&mut g, cq(3, 16, IOCQ, 1)), 0x101, "2 queues granted");
    assert_eq!(admin(&mut g, cq(1, 1, IOCQ, 1)), 0x102);
    assert_eq!(admin(&mut g, cq(1, 1025, IOCQ, 1)), 0x102);
    assert_eq!(
        admin(&mut g, cq(1, 16, RAM as u64 - 0x100 + 0x100, 1)),
        0x002,
        "outside RAM"
    );
    assert_eq!(admin(&mut g, cq(1, 16, 1 << 40, 1)), 0x002);
    assert_eq!(admin(&mut g, cq(1, 16, IOCQ + 8, 1)), 0x002, "misaligned");
    assert_eq!(admin(&mut g, cq(1, 16, IOCQ, 0)), 0x002, "not contiguous");
    assert_eq!(
        admin(&mut g, cq(1, 16, IOCQ, 3 | (MSIX_VECTORS as u32) << 16)),
        0x108
    );
    let sq = sqe(0x01, 0, IOSQ, 0, [15 << 16 | 1, 2 << 16 | 1, 0]);
    assert_eq!(admin(&mut g, sq), 0x100, "no completion queue 2");
    assert_eq!(
        admin(&mut g, sqe(0x00, 0, 0, 0, [0, 0, 0])),
        0x101,
        "delete the admin SQ"
    );
    assert_eq!(admin(&mut g, sqe(0x04, 0, 0, 0, [5, 0, 0])), 0x101);
    assert_eq!(admin(&mut g, sqe(0x7f, 0, 0, 0, [0; 3])), 0x001);
    assert_eq!(
        admin(&mut g, sqe(0x06, 0, BUF, 0, [0x55, 0, 0])),
        0x002,
        "CNS"
    );
    assert_eq!(admin(&mut g, sqe(0x06, 2, BUF, 0, [0, 0, 0])), 0x00b);
    assert_eq!(admin(&mut g, sqe(0x06, 0, 1 << 40, 0, [1, 0, 0])), 0x004);
    assert_eq!(admin(&mut g, sqe(0x06, 0, BUF + 2, 0, [1, 0, 0])), 0x013);
    assert_eq!(
        admin(&mut g, sqe(0x09, 0, 0, 0, [0x80, 0, 0])),
        0x002,
        "feature"
    );
    assert_eq!(
        admin(&mut g, sqe(0x09, 0, 0, 0, [7, 0xffff_ffff, 0])),
        0x002
    );
    g.io_queues();
    assert_eq!(
        admin(&mut g, sqe(0x04, 0, 0, 0, [1, 0, 0])),
        0x10c,
        "CQ 1 has SQ 1"
    );

    let io = |g: &mut Rig, e| g.run(1, e).status;
    assert_eq!(
        io(&mut g, sqe(WRITE, 1, 1 << 40, 0, [0, 0, 0])),
        0x004,
        "PRP outside RAM"
    );
    assert_eq!(
        io(&mut g, sqe(WRITE, 1, BUF, 1 << 40, [0, 0, 15])),
        0x004,
        "PRP2 outside"
    );
    assert_eq!(
        io(&mut g, sqe(READ, 1, BUF, 1 << 40, [0, 0, 23])),
        0x004,
        "list outside"
    );
    g.mem.write_obj(0xffff_f000u64, GuestAddress(LIST)).unwrap();
    assert_eq!(
        io(&mut g, sqe(READ, 1, BUF, LIST, [0, 0, 23])),
        0x004,
        "list entry"
    );
    g.mem.write_obj(0x31008u64, GuestAddress(LIST)).unwrap();
    assert_eq!(
        io(&mut g, sqe(READ, 1, BUF, LIST, [0, 0, 23])),
        0x013,
        "entry offset"
    );
    assert_eq!(
        io(&mut g, sqe(READ, 1, BUF, 0, [0, 0, 0xffff])),
        0x002,
        "past MDTS"
    );
    assert_eq!(
        io(&mut g, sqe(READ, 1, BUF, 0, [IMAGE_BLOCKS as u32, 0, 0])),
        0x080
    );
    assert_eq!(
        io(&mut g, sqe(READ, 1, BUF, 0, [u32::MAX, u32::MAX, 1])),
        0x080,
        "wraps"
    );
    assert_eq!(io(&mut g, sqe(READ, 3, BUF, 0, [0, 0, 0])), 0x00b);
    assert_eq!(
        io(&mut g, sqe(0x09, 1, BUF, 0, [0, 0, 0])),
        0x001,
        "DSM not supported"
    );
    let mut fused = sqe(READ, 1, BUF, 0, [0; 3]);
    fused[1] = 0x40;
    assert_eq!(io(&mut g, fused), 0x002, "SGL");
    assert_eq!(g.image_at(0, 10), b"BLOCK-ZERO", "nothing written");

    // Still working.
    g.mem
        .write_slice(b"AFTER-THE-ABUSE", GuestAddress(BUF))
        .unwrap();
    assert_eq!(io(&mut g, sqe(WRITE, 1, BUF, 0, [100, 0, 0])), 0);
    assert_eq!(g.image_at(100 * 512, 15), b"AFTER-THE-ABUSE");
    assert_eq!(g.csts(), 1, "no fatal status");
}

#[test]
fn a_read_only_namespace_refuses_writes_and_says_so() {
    let mut g = Rig::new(false);
    g.enable();
    assert_eq!(g.run(0, sqe(0x06, 1, BUF, 0, [0, 0, 0])).status, 0);
    let nsattr: u8 = g.mem.read_obj(GuestAddress(BUF + 99)).unwrap();
    assert_eq!(nsattr, 1, "write protected");
    g.io_queues();
    g.mem.write_slice(b"OVERWRITE", GuestAddress(BUF)).unwrap();
    assert_eq!(g.run(1, sqe(WRITE, 1, BUF, 0, [0, 0, 0])).status, 0x182);
    assert_eq!(g.run(1, sqe(READ, 1, BUF, 0, [0, 0, 0])).status, 0);
    assert_eq!(g.image_at(0, 10), b"BLOCK-ZERO");
}

#[test]
fn doorbell_misuse_is_ignored_and_reported_by_an_asynchronous_event() {
    let mut g = Rig::new(true);
    // Before the controller is enabled: ignored.
    g.w32(0x1000, 1);
    g.enable();
    let aer = g.submit(0, sqe(0x0c, 0, 0, 0, [0; 3]));
    assert_eq!(g.completion(0), None, "an AER is held");
    // SQ tail doorbell of queue 5, which does not exist: the AER completes (error event,
    // invalid doorbell register, log page 1).
    g.w32(0x1000 + 5 * 8, 3);
    let c = g.completion(0).expect("the AER completed");
    assert_eq!((c.cid, c.status, c.result), (aer, 0, 0x0001_0000));
    // A value past the admin queue's end, with no AER held: ignored; the next AER gets it.
    g.w32(0x1000, ENTRIES + 3);
    g.w32(0x1004, 999);
    assert_eq!(g.completion(0), None);
    let aer = g.submit(0, sqe(0x0c, 0, 0, 0, [0; 3]));
    let c = g
        .completion(0)
        .expect("a waiting event completes the new AER");
    assert_eq!(
        (c.cid, c.result),
        (aer, 0x0001_0100),
        "invalid doorbell value"
    );
    // An odd width (ignored), and the head doorbell of completion queue 511 (an event).
    g.dev.bar_write(0, 0x1000, &[1, 0]);
    g.w32(0x1ffc, 1);
    // The next AERs take the waiting events (the CQ head's bad value, then queue 511); then
    // four are held and a fifth is too many.
    for _ in 0..7 {
        g.submit(0, sqe(0x0c, 0, 0, 0, [0; 3]));
    }
    let c = g.completion(0).expect("an event");
    assert_eq!((c.status, c.result), (0, 0x0001_0100));
    let c = g.completion(0).expect("an event");
    assert_eq!((c.status, c.result), (0, 0x0001_0000));
    let c = g.completion(0).expect("AER limit");
    assert_eq!(c.status, 0x105);
    assert_eq!(g.completion(0), None, "four held");
    assert_eq!(g.dev.stats().bad_doorbells, 6);
    assert_eq!(g.csts(), 1, "still ready");
    // Bus mastering off: doorbells do nothing.
    g.dev.config_write(4, &2u16.to_le_bytes());
    let before = g.dev.stats().commands;
    g.submit(0, sqe(0x06, 0, BUF, 0, [1, 0, 0]));
    assert_eq!(g.dev.stats().commands, before);
}

#[test]
fn a_full_completion_queue_holds_submissions_until_its_head_moves() {
    let mut g = Rig::new(true);
    g.enable();
    assert_eq!(g.run(0, sqe(0x09, 0, 0, 0, [7, 0, 0])).status, 0);
    // CQ 1 of 2 entries (room for one completion), SQ 1 of 16.
    let c = g.run(0, sqe(0x05, 0, IOCQ, 0, [1 << 16 | 1, 1, 0]));
    assert_eq!(c.status, 0);
    assert_eq!(
        g.run(0, sqe(0x01, 0, IOSQ, 0, [15 << 16 | 1, 1 << 16 | 1, 0]))
            .status,
        0
    );
    for _ in 0..3 {
        let cid = g.cid + 1;
        g.cid = cid - 1;
        let at = IOSQ + u64::from(g.sq_tail[1]) * 64;
        let mut e = sqe(0x00, 1, 0, 0, [0; 3]);
        e[2..4].copy_from_slice(&cid.to_le_bytes());
        g.mem.write_slice(&e, GuestAddress(at)).unwrap();
        g.sq_tail[1] += 1;
        g.cid = cid;
    }
    let tail = g.sq_tail[1];
    g.w32(0x1008, tail);
    assert_eq!(g.dev.stats().flushes, 1, "one slot in the completion queue");
    // Consuming completions (head doorbells) lets the queue go on, one at a time.
    let first = g.cqe_2(0);
    assert_eq!(g.dev.stats().flushes, 2);
    let second = g.cqe_2(1);
    assert_eq!(g.dev.stats().flushes, 3);
    let third = g.cqe_2(0);
    assert_eq!((first.status, second.status, third.status), (0, 0, 0));
    assert_eq!(third.cid, first.cid + 2);
}

impl Rig {
    /// Takes the completion in slot `slot` of the 2-entry CQ 1 and rings its head doorbell.
    fn cqe_2(&mut self, slot: u64) -> Cqe {
        let dw3: u32 = self
            .mem
            .read_obj(GuestAddress(IOCQ + slot * 16 + 12))
            .unwrap();
        self.w32(0x100c, (slot as u32 + 1) % 2);
        Cqe {
            result: 0,
            sqid: 1,
            cid: dw3 as u16,
            status: ((dw3 >> 17) & 0x3fff) as u16,
        }
    }
}

#[test]
fn a_bad_enable_sets_the_fatal_status_and_a_reset_clears_it() {
    let mut g = Rig::new(true);
    g.w32(0x24, 0);
    g.w32(0x14, 0x0046_0001);
    assert_eq!(g.csts() & 3, 2, "CFS, not ready");
    g.w32(0x1000, 1);
    assert_eq!(g.dev.stats().commands, 0);
    g.w32(0x14, 0);
    assert_eq!(g.csts(), 0);
    // Admin queue outside RAM.
    g.w32(0x24, 0x000f_000f);
    g.dev.bar_write(0, 0x28, &(1u64 << 40).to_le_bytes());
    g.w32(0x14, 0x0046_0001);
    assert_eq!(g.csts() & 3, 2);
    g.w32(0x14, 0);
    // Then a good one; a reset removes the I/O queues.
    g.enable();
    g.io_queues();
    g.w32(0x14, 0);
    g.enable();
    g.sq_tail = [0; 2];
    let before = g.dev.stats().bad_doorbells;
    g.w32(0x1008, 1);
    assert_eq!(g.dev.stats().bad_doorbells, before + 1, "SQ 1 is gone");
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_registers_doorbells_and_queue_contents_never_fail_the_vmm() {
    let mut g = Rig::new(true);
    let mut n = Noise(0x5eed_1234_abcd_0001);
    for round in 0..20_000u32 {
        if round % 64 == 0 {
            // A reset, a well-formed enable and I/O queues now and then, so commands run.
            g.w32(0x14, 0);
            g.sq_tail = [0; 2];
            g.cq_head = [0; 2];
            g.phase = [true; 2];
            g.enable();
            g.io_queues();
        }
        let r = n.next();
        let v = (r >> 32) as u32;
        match r % 8 {
            0 => g.w32(((r >> 8) % 0x40) & !3, v),
            1 | 2 => g.w32(0x1000 + ((r >> 8) % 0x48) * 4, v % 20),
            3 => {
                // Garbage (or a plausible command) in either admin queue page.
                let at = ASQ + (r >> 8) % 0x2000;
                let _ = g.mem.write_obj(v, GuestAddress(at & !3));
            }
            4 => {
                let mut e = sqe(
                    (v % 16) as u8,
                    v >> 28,
                    n.next() % (2 * RAM as u64),
                    n.next(),
                    [n.next() as u32, n.next() as u32, (n.next() % 0x40) as u32],
                );
                e[1] = if v & 0x100 != 0 { 0 } else { (v >> 9) as u8 };
                // Half to the admin queue, half (mostly plausible NVM commands) to SQ 1.
                let q = (v >> 27) as usize & 1;
                if q == 1 {
                    e[0] = (v % 4) as u8;
                    e[4..8].copy_from_slice(&(1 + (v >> 20) % 2).to_le_bytes());
                    let prp1 = (n.next() % RAM as u64) & !0x1ff;
                    e[24..32].copy_from_slice(&prp1.to_le_bytes());
                    e[40..44].copy_from_slice(&((v >> 4) % 2048).to_le_bytes());
                    e[44..48].copy_from_slice(&u32::from(v & 0x800 != 0).to_le_bytes());
                    e[48..52].copy_from_slice(&(v % 8).to_le_bytes());
                    e[1] &= 0x40;
                }
                let tail = g.sq_tail[q];
                let _ = g
                    .mem
                    .write_slice(&e, GuestAddress(g.sq_base[q] + u64::from(tail) * 64));
                g.sq_tail[q] = (tail + 1) % ENTRIES;
                g.w32(0x1000 + 8 * q as u64, g.sq_tail[q]);
            }
            _ => {
                let mut b = [0u8; 8];
                g.dev.bar_read(0, (r >> 8) % 0x4000, &mut b[..4]);
            }
        }
    }
    let s = g.dev.stats();
    assert!(
        s.commands > 1000 && s.reads + s.writes > 50,
        "commands ran: {s:?}"
    );
    assert!(s.errors > 0 && s.bad_doorbells > 0, "{s:?}");
    // The controller still works after all of it.
    g.w32(0x14, 0);
    g.sq_tail = [0; 2];
    g.cq_head = [0; 2];
    g.phase = [true; 2];
    g.enable();
    g.io_queues();
    g.mem.write_slice(b"STILL-HERE", GuestAddress(BUF)).unwrap();
    assert_eq!(g.run(1, sqe(WRITE, 1, BUF, 0, [7, 0, 0])).status, 0);
    assert_eq!(g.image_at(7 * 512, 10), b"STILL-HERE");
}
