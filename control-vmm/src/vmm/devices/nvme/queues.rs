//! Submission and completion queues in guest memory (NVMe 1.2, 4.1): fetching 64-byte
//! submission entries at the head, posting 16-byte completion entries at the tail with the
//! phase tag, and the doorbell values the guest may write. Queues are physically contiguous
//! (CAP.CQR) and checked to lie in guest RAM when created.

use std::sync::atomic::Ordering;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SQE_BYTES: u64 = 64;
pub const CQE_BYTES: u64 = 16;

/// Queue problems: a queue outside RAM (refused when created) or a doorbell value past it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue of {entries} entries at {base:#x} is not in guest RAM")]
    OutsideRam { base: u64, entries: u32 },
    #[error("doorbell value {value} for a queue of {entries} entries")]
    DoorbellValue { value: u32, entries: u32 },
    #[error("guest memory access at {0:#x} failed")]
    Access(u64),
}

/// A submission entry as the controller uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    pub opcode: u8,
    /// FUSE and PSDT bits of dword 0 (must be 0: no fused commands, PRPs only).
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
}

impl Command {
    pub fn parse(raw: &[u8; SQE_BYTES as usize]) -> Self {
        let d = |i: usize| {
            u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]])
        };
        let q = |i: usize| u64::from(d(i)) | u64::from(d(i + 1)) << 32;
        Self {
            opcode: raw[0],
            flags: raw[1],
            cid: u16::from_le_bytes([raw[2], raw[3]]),
            nsid: d(1),
            prp1: q(6),
            prp2: q(8),
            cdw10: d(10),
            cdw11: d(11),
            cdw12: d(12),
        }
    }
}

/// A completion entry to post.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    pub result: u32,
    pub cid: u16,
    /// Status field (SC in bits 7:0, SCT in 10:8, DNR in 15), without the phase tag.
    pub status: u16,
}

fn check(mem: &GuestMemoryMmap, base: u64, entries: u32, entry: u64) -> Result<(), QueueError> {
    let len = u64::from(entries) * entry;
    let ok = usize::try_from(len)
        .is_ok_and(|n| GuestMemoryBackend::check_range(mem, GuestAddress(base), n));
    if ok {
        Ok(())
    } else {
        Err(QueueError::OutsideRam { base, entries })
    }
}

/// A submission queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmissionQueue {
    pub base: u64,
    pub entries: u32,
    pub head: u32,
    pub tail: u32,
    pub cqid: u16,
}

impl SubmissionQueue {
    pub fn new(
        mem: &GuestMemoryMmap,
        base: u64,
        entries: u32,
        cqid: u16,
    ) -> Result<Self, QueueError> {
        check(mem, base, entries, SQE_BYTES)?;
        Ok(Self {
            base,
            entries,
            head: 0,
            tail: 0,
            cqid,
        })
    }

    /// The guest wrote the tail doorbell.
    pub fn set_tail(&mut self, value: u32) -> Result<(), QueueError> {
        if value >= self.entries {
            return Err(QueueError::DoorbellValue {
                value,
                entries: self.entries,
            });
        }
        self.tail = value;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Takes the command at the head.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Command, QueueError> {
        let at = self.base + u64::from(self.head) * SQE_BYTES;
        let mut raw = [0u8; SQE_BYTES as usize];
        mem.read_slice(&mut raw, GuestAddress(at))
            .map_err(|_| QueueError::Access(at))?;
        self.head = (self.head + 1) % self.entries;
        Ok(Command::parse(&raw))
    }
}

/// A completion queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionQueue {
    pub base: u64,
    pub entries: u32,
    pub head: u32,
    pub tail: u32,
    pub phase: bool,
    /// MSI-X vector, if interrupts are enabled for it.
    pub vector: Option<u16>,
}

impl CompletionQueue {
    pub fn new(
        mem: &GuestMemoryMmap,
        base: u64,
        entries: u32,
        vector: Option<u16>,
    ) -> Result<Self, QueueError> {
        check(mem, base, entries, CQE_BYTES)?;
        Ok(Self {
            base,
            entries,
            head: 0,
            tail: 0,
            phase: true,
            vector,
        })
    }

    /// The guest wrote the head doorbell.
    pub fn set_head(&mut self, value: u32) -> Result<(), QueueError> {
        if value >= self.entries {
            return Err(QueueError::DoorbellValue {
                value,
                entries: self.entries,
            });
        }
        self.head = value;
        Ok(())
    }

    pub fn is_full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }

    /// Posts `c` at the tail (the caller checked there is room): dwords 0..2 first, then
    /// dword 3 with the phase tag, so a guest polling the phase never sees a torn entry.
    pub fn post(
        &mut self,
        mem: &GuestMemoryMmap,
        c: Completion,
        sqid: u16,
        sqhd: u32,
    ) -> Result<(), QueueError> {
        let at = self.base + u64::from(self.tail) * CQE_BYTES;
        let mut first = [0u8; 12];
        first[..4].copy_from_slice(&c.result.to_le_bytes());
        first[8..10].copy_from_slice(&(sqhd as u16).to_le_bytes());
        first[10..12].copy_from_slice(&sqid.to_le_bytes());
        mem.write_slice(&first, GuestAddress(at))
            .map_err(|_| QueueError::Access(at))?;
        let dw3 = u32::from(c.cid) | u32::from(self.phase) << 16 | u32::from(c.status) << 17;
        mem.store(dw3, GuestAddress(at + 12), Ordering::Release)
            .map_err(|_| QueueError::Access(at))?;
        self.tail = (self.tail + 1) % self.entries;
        if self.tail == 0 {
            self.phase = !self.phase;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_flip_the_phase_on_wrap_and_a_full_queue_says_so() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut cq = CompletionQueue::new(&mem, 0x1000, 2, Some(0)).unwrap();
        let c = Completion {
            result: 7,
            cid: 0x42,
            status: 0,
        };
        cq.post(&mem, c, 3, 1).unwrap();
        assert!(cq.is_full(), "2 entries, head 0, tail 1");
        let dw3: u32 = mem.read_obj(GuestAddress(0x100c)).unwrap();
        assert_eq!(dw3, 0x42 | 1 << 16);
        let dw2: u32 = mem.read_obj(GuestAddress(0x1008)).unwrap();
        assert_eq!(dw2, 1 | 3 << 16);
        cq.set_head(1).unwrap();
        cq.post(
            &mem,
            Completion {
                status: 0x4002,
                ..c
            },
            3,
            2,
        )
        .unwrap();
        assert!(!cq.phase, "wrapped");
        let dw3: u32 = mem.read_obj(GuestAddress(0x101c)).unwrap();
        assert_eq!(dw3 >> 16, 1 | 0x4002 << 1, "phase, then status with DNR");
        assert_eq!(
            cq.set_head(2),
            Err(QueueError::DoorbellValue {
                value: 2,
                entries: 2
            })
        );
        assert!(CompletionQueue::new(&mem, 0xff00, 32, None).is_err());
        assert!(SubmissionQueue::new(&mem, 0xf000, 64, 1).is_ok());
        assert!(SubmissionQueue::new(&mem, 0xf000, 65, 1).is_err());
    }
}
