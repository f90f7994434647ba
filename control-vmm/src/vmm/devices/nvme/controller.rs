//! The controller: BAR0 register and doorbell accesses (each one an MMIO exit of the guest),
//! the queues, and the command loop. A tail doorbell makes the VMM fetch the new submission
//! entries from guest memory, execute them (admin: [`super::commands`], NVM I/O on the
//! backing file: [`super::io`]), post their completions and raise each completion queue's
//! MSI-X vector once (an eventfd the MSI-X model binds to KVM as an irqfd).
//!
//! Guest mistakes fail that command with a status, or are ignored and reported as the spec
//! says: a doorbell for a queue that does not exist or a value past the queue's end is
//! ignored and posted as an asynchronous event (Error, "invalid doorbell register/value") if
//! an Asynchronous Event Request is held; a submission or completion queue the VMM can no
//! longer access sets CSTS.CFS. Nothing a guest writes fails the VMM.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::io::Namespace;
use super::queues::{Command, Completion, CompletionQueue, QueueError, SubmissionQueue};
use super::regs::{CcChange, Registers, DOORBELL_BYTES, DOORBELL_OFFSET};

/// I/O queue pairs the controller offers (Set Features, Number of Queues).
pub const MAX_IO_QUEUES: u16 = 8;
/// MSI-X vectors: the admin queue's and one per I/O queue.
pub const MSIX_VECTORS: u16 = MAX_IO_QUEUES + 1;
/// Asynchronous Event Requests held at most (AERL + 1).
pub const MAX_AERS: usize = 4;
/// Asynchronous events kept while no request is held.
const MAX_EVENTS: usize = 8;
/// Asynchronous event information: Error type, the error information log page.
const EVENT_INVALID_DOORBELL_REGISTER: u32 = 0x01_00_00;
const EVENT_INVALID_DOORBELL_VALUE: u32 = 0x01_01_00;

/// What the controller did, for the exit table and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NvmeStats {
    pub doorbells: u64,
    pub commands: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Commands completed with an error status.
    pub errors: u64,
    /// MSI-X vectors raised.
    pub interrupts: u64,
    /// Doorbell writes ignored (no such queue, value past the queue, controller not ready).
    pub bad_doorbells: u64,
}

/// One emulated NVMe controller with one namespace.
#[derive(Debug)]
pub struct NvmeController {
    pub(super) mem: GuestMemoryMmap,
    pub(super) ns: Namespace,
    pub(super) regs: Registers,
    pub(super) sqs: Vec<Option<SubmissionQueue>>,
    pub(super) cqs: Vec<Option<CompletionQueue>>,
    /// Command ids of held Asynchronous Event Requests.
    pub(super) aers: Vec<u16>,
    events: VecDeque<u32>,
    /// I/O queues granted by Set Features (Number of Queues).
    pub(super) io_queues: u16,
    irqs: Vec<Arc<EventFd>>,
    /// Completion queues that got entries since their vector was last raised.
    irq_due: Vec<bool>,
    pub(super) stats: NvmeStats,
}

impl NvmeController {
    /// A controller over guest memory `mem` and namespace `ns`; `irqs[v]` raises MSI-X
    /// vector `v` (at least [`MSIX_VECTORS`] of them).
    pub fn new(mem: GuestMemoryMmap, ns: Namespace, irqs: Vec<Arc<EventFd>>) -> Self {
        let n = usize::from(MAX_IO_QUEUES) + 1;
        Self {
            mem,
            ns,
            regs: Registers::default(),
            sqs: vec![None; n],
            cqs: vec![None; n],
            aers: Vec::new(),
            events: VecDeque::new(),
            io_queues: MAX_IO_QUEUES,
            irqs,
            irq_due: vec![false; n],
            stats: NvmeStats::default(),
        }
    }

    pub fn stats(&self) -> NvmeStats {
        self.stats
    }

    /// CSTS, as the guest reads it.
    pub fn csts(&self) -> u32 {
        self.regs.csts()
    }

    /// A read of BAR0 below the MSI-X table: registers (doorbells read 0).
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset < DOORBELL_OFFSET {
            self.regs.read(offset, data);
        } else {
            data.fill(0);
        }
    }

    /// A write of BAR0 below the MSI-X table.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset < DOORBELL_OFFSET {
            match self.regs.write(offset, data) {
                CcChange::None => {}
                CcChange::Enable => self.enable(),
                CcChange::Disable => self.reset("CC.EN cleared"),
                CcChange::Shutdown => self.shutdown(),
            }
        } else if offset < DOORBELL_OFFSET + DOORBELL_BYTES {
            self.doorbell(offset - DOORBELL_OFFSET, data);
        } else {
            log::warn!("nvme: write {data:02x?} to BAR0 {offset:#x} ignored");
        }
    }

    fn enable(&mut self) {
        let made = self
            .regs
            .admin_queues()
            .map_err(|e| e.to_string())
            .and_then(|aq| {
                let sq = SubmissionQueue::new(&self.mem, aq.sq_base, aq.sq_entries, 0);
                let cq = CompletionQueue::new(&self.mem, aq.cq_base, aq.cq_entries, Some(0));
                sq.and_then(|sq| cq.map(|cq| (sq, cq)))
                    .map_err(|e| e.to_string())
            });
        match made {
            Ok((sq, cq)) => {
                log::info!(
                    "nvme: enabled, admin queues {}/{} entries",
                    sq.entries,
                    cq.entries
                );
                self.sqs[0] = Some(sq);
                self.cqs[0] = Some(cq);
                self.regs.set_ready(true);
            }
            Err(why) => {
                log::warn!("nvme: enable refused (CSTS.CFS): {why}");
                self.regs.set_ready(false);
            }
        }
    }

    /// Controller reset: queues, held requests and events are gone.
    fn reset(&mut self, why: &str) {
        log::info!("nvme: reset ({why})");
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.irq_due.iter_mut().for_each(|d| *d = false);
        self.aers.clear();
        self.events.clear();
        self.io_queues = MAX_IO_QUEUES;
        self.regs.set_reset();
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.ns.flush() {
            log::error!("nvme: flushing the backing file at shutdown: {e}");
        }
        log::info!("nvme: shutdown notification; shutdown complete");
        self.regs.set_shutdown_complete();
    }

    fn fatal(&mut self, why: &QueueError) {
        log::error!("nvme: controller fatal status: {why}");
        self.regs.set_fatal();
    }

    fn doorbell(&mut self, offset: u64, data: &[u8]) {
        self.stats.doorbells += 1;
        let value = match <[u8; 4]>::try_from(data) {
            Ok(b) if offset.is_multiple_of(4) => u32::from_le_bytes(b),
            _ => return self.bad_doorbell(offset, data.len() as u32, None),
        };
        if !self.regs.ready() {
            return self.bad_doorbell(offset, value, None);
        }
        let index = offset / 4;
        let qid = (index / 2) as usize;
        if index.is_multiple_of(2) {
            let r = self
                .sqs
                .get_mut(qid)
                .and_then(Option::as_mut)
                .map(|q| q.set_tail(value));
            match r {
                Some(Ok(())) => self.process(qid),
                Some(Err(_)) => {
                    self.bad_doorbell(offset, value, Some(EVENT_INVALID_DOORBELL_VALUE))
                }
                None => self.bad_doorbell(offset, value, Some(EVENT_INVALID_DOORBELL_REGISTER)),
            }
        } else {
            let r = self
                .cqs
                .get_mut(qid)
                .and_then(Option::as_mut)
                .map(|q| q.set_head(value));
            match r {
                Some(Ok(())) => {
                    // Room in this completion queue: its submission queues may go on.
                    let waiting: Vec<usize> = (0..self.sqs.len())
                        .filter(|&s| self.sqs[s].is_some_and(|q| usize::from(q.cqid) == qid))
                        .collect();
                    for s in waiting {
                        self.process(s);
                    }
                }
                Some(Err(_)) => {
                    self.bad_doorbell(offset, value, Some(EVENT_INVALID_DOORBELL_VALUE))
                }
                None => self.bad_doorbell(offset, value, Some(EVENT_INVALID_DOORBELL_REGISTER)),
            }
        }
        self.deliver_events();
        self.raise_due();
    }

    fn bad_doorbell(&mut self, offset: u64, value: u32, event: Option<u32>) {
        self.stats.bad_doorbells += 1;
        if self.stats.bad_doorbells.is_power_of_two() {
            log::warn!(
                "nvme: doorbell {:#x} = {value} ignored ({} so far)",
                DOORBELL_OFFSET + offset,
                self.stats.bad_doorbells
            );
        }
        if let Some(e) = event {
            if self.events.len() < MAX_EVENTS {
                self.events.push_back(e);
            }
        }
    }

    /// Runs submission queue `qid` until it is empty or its completion queue is full.
    fn process(&mut self, qid: usize) {
        loop {
            let Some(sq) = self.sqs.get(qid).copied().flatten() else {
                return;
            };
            let cqid = usize::from(sq.cqid);
            match self.cqs.get(cqid).copied().flatten() {
                Some(cq) if !sq.is_empty() && !cq.is_full() => {}
                _ => return,
            }
            let popped = match self.sqs[qid].as_mut() {
                Some(q) => q.pop(&self.mem),
                None => return,
            };
            let cmd = match popped {
                Ok(c) => c,
                Err(e) => return self.fatal(&e),
            };
            self.stats.commands += 1;
            let done = if qid == 0 {
                self.admin(cmd)
            } else {
                self.io(cmd)
            };
            if let Some(c) = done {
                if c.status != 0 {
                    self.stats.errors += 1;
                    if self.stats.errors.is_power_of_two() {
                        log::info!(
                            "nvme: queue {qid}: opcode {:#04x} (cdw10 {:#x}) completed with \
                             status {:#x} ({} so far)",
                            cmd.opcode,
                            cmd.cdw10,
                            c.status,
                            self.stats.errors
                        );
                    }
                }
                // The command may have deleted queues; the head is that of `qid` now.
                let sqhd = self.sqs[qid].map_or(0, |q| q.head);
                self.post(cqid, c, qid as u16, sqhd);
            }
        }
    }

    fn post(&mut self, cqid: usize, c: Completion, sqid: u16, sqhd: u32) {
        let Some(cq) = self.cqs.get_mut(cqid).and_then(Option::as_mut) else {
            return;
        };
        match cq.post(&self.mem, c, sqid, sqhd) {
            Ok(()) => self.irq_due[cqid] = true,
            Err(e) => self.fatal(&e),
        }
    }

    /// Completes held Asynchronous Event Requests with waiting events.
    fn deliver_events(&mut self) {
        while !self.events.is_empty() && !self.aers.is_empty() {
            match self.cqs[0] {
                Some(cq) if !cq.is_full() => {}
                _ => return,
            }
            let (Some(result), Some(cid)) = (self.events.pop_front(), self.aers.pop()) else {
                return;
            };
            let sqhd = self.sqs[0].map_or(0, |q| q.head);
            self.post(
                0,
                Completion {
                    result,
                    cid,
                    status: 0,
                },
                0,
                sqhd,
            );
        }
    }

    fn raise_due(&mut self) {
        for cqid in 0..self.irq_due.len() {
            if !std::mem::take(&mut self.irq_due[cqid]) {
                continue;
            }
            let Some(v) = self.cqs[cqid].and_then(|q| q.vector) else {
                continue;
            };
            if let Some(irq) = self.irqs.get(usize::from(v)) {
                self.stats.interrupts += 1;
                if let Err(e) = irq.write(1) {
                    log::error!("nvme: raising MSI-X vector {v}: {e}");
                }
            }
        }
    }

    /// The command from an I/O queue.
    fn io(&mut self, cmd: Command) -> Option<Completion> {
        let r = self.nvm_command(&cmd);
        Some(super::commands::completion(cmd.cid, r))
    }

    pub(super) fn vectors(&self) -> u16 {
        self.irqs.len() as u16
    }
}
