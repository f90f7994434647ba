//! Admin commands (NVMe 1.2, 5): Identify (controller, namespace, active namespace list),
//! create and delete I/O submission and completion queues, Get/Set Features (Number of Queues,
//! and reading Volatile Write Cache), Asynchronous Event Request (held until an event). Any
//! other opcode, feature or Identify CNS completes with an error status, as does every field a
//! guest gets wrong; [`CommandError`] maps each failure to its status.

use thiserror::Error;

use super::controller::{NvmeController, MAX_AERS};
use super::prp::PrpError;
use super::queues::{Command, Completion, CompletionQueue, QueueError, SubmissionQueue};
use super::regs::{MAX_QUEUE_ENTRIES, VERSION};

/// Status Code Type 1 (command specific) and 2 (media errors), shifted into the status field.
const SCT_COMMAND: u16 = 1 << 8;
const SCT_MEDIA: u16 = 2 << 8;
/// Do Not Retry.
pub const DNR: u16 = 1 << 14;

/// Maximum data transfer, log2 of 4 KiB pages (MDTS): 128 KiB.
pub const MDTS: u8 = 5;
pub const MAX_TRANSFER: u64 = 4096 << MDTS;

/// Why a command failed.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error("opcode {0:#04x} not supported")]
    InvalidOpcode(u8),
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    #[error("data transfer: {0}")]
    DataTransfer(PrpError),
    #[error("namespace {0} does not exist")]
    InvalidNamespace(u32),
    #[error("LBA range past the namespace's end")]
    LbaOutOfRange,
    #[error("completion queue {0} does not exist")]
    CompletionQueueInvalid(u16),
    #[error("queue identifier {0} invalid or in use")]
    InvalidQueueId(u16),
    #[error("queue size {0} invalid")]
    InvalidQueueSize(u32),
    #[error("queue memory: {0}")]
    QueueMemory(QueueError),
    #[error("too many asynchronous event requests")]
    AerLimit,
    #[error("interrupt vector {0} invalid")]
    InvalidVector(u16),
    #[error("completion queue {0} still has submission queues")]
    InvalidQueueDeletion(u16),
    #[error("write to a read-only namespace")]
    ReadOnly,
    #[error("writing the backing file: {0}")]
    WriteFault(std::io::Error),
    #[error("reading the backing file: {0}")]
    ReadError(std::io::Error),
}

impl From<PrpError> for CommandError {
    fn from(e: PrpError) -> Self {
        Self::DataTransfer(e)
    }
}

impl CommandError {
    /// The status field (without phase tag and DNR).
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidOpcode(_) => 0x01,
            Self::InvalidField(_) | Self::QueueMemory(_) => 0x02,
            Self::DataTransfer(PrpError::Offset(_)) => 0x13,
            Self::DataTransfer(PrpError::OutsideRam { .. }) => 0x04,
            Self::InvalidNamespace(_) => 0x0b,
            Self::LbaOutOfRange => 0x80,
            Self::CompletionQueueInvalid(_) => SCT_COMMAND,
            Self::InvalidQueueId(_) => SCT_COMMAND | 0x01,
            Self::InvalidQueueSize(_) => SCT_COMMAND | 0x02,
            Self::AerLimit => SCT_COMMAND | 0x05,
            Self::InvalidVector(_) => SCT_COMMAND | 0x08,
            Self::InvalidQueueDeletion(_) => SCT_COMMAND | 0x0c,
            Self::ReadOnly => SCT_COMMAND | 0x82,
            Self::WriteFault(_) => SCT_MEDIA | 0x80,
            Self::ReadError(_) => SCT_MEDIA | 0x81,
        }
    }
}

/// The completion of command `cid` with result `r`.
pub fn completion(cid: u16, r: Result<u32, CommandError>) -> Completion {
    match r {
        Ok(result) => Completion {
            result,
            cid,
            status: 0,
        },
        Err(e) => {
            log::debug!("nvme: command {cid} failed: {e}");
            Completion {
                result: 0,
                cid,
                status: e.status() | DNR,
            }
        }
    }
}

const OP_DELETE_SQ: u8 = 0x00;
const OP_CREATE_SQ: u8 = 0x01;
const OP_DELETE_CQ: u8 = 0x04;
const OP_CREATE_CQ: u8 = 0x05;
const OP_IDENTIFY: u8 = 0x06;
const OP_SET_FEATURES: u8 = 0x09;
const OP_GET_FEATURES: u8 = 0x0a;
const OP_ASYNC_EVENT: u8 = 0x0c;
const FEATURE_VOLATILE_WRITE_CACHE: u32 = 0x06;
const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;

/// Writes `s` into `b` at `at`, space-padded to `len` (Identify's ASCII fields).
fn ascii(b: &mut [u8], at: usize, len: usize, s: &str) {
    let field = &mut b[at..at + len];
    field.fill(b' ');
    let n = s.len().min(len);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl NvmeController {
    /// An admin command; None for a request held (AER).
    pub(super) fn admin(&mut self, cmd: Command) -> Option<Completion> {
        let r = if cmd.flags != 0 {
            Err(CommandError::InvalidField("fused or SGL command"))
        } else {
            match cmd.opcode {
                OP_DELETE_SQ => self.delete_sq(&cmd),
                OP_CREATE_SQ => self.create_sq(&cmd),
                OP_DELETE_CQ => self.delete_cq(&cmd),
                OP_CREATE_CQ => self.create_cq(&cmd),
                OP_IDENTIFY => self.identify(&cmd),
                OP_SET_FEATURES => self.set_features(&cmd),
                OP_GET_FEATURES => self.get_features(&cmd),
                OP_ASYNC_EVENT if self.aers.len() < MAX_AERS => {
                    self.aers.push(cmd.cid);
                    return None;
                }
                OP_ASYNC_EVENT => Err(CommandError::AerLimit),
                op => Err(CommandError::InvalidOpcode(op)),
            }
        };
        Some(completion(cmd.cid, r))
    }

    /// An I/O queue id for a new queue (1..=granted); `taken` says whether it is in use.
    fn new_qid(&self, cmd: &Command, taken: bool) -> Result<(usize, u32), CommandError> {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        if qid == 0 || qid > self.io_queues || taken {
            return Err(CommandError::InvalidQueueId(qid));
        }
        let entries = (cmd.cdw10 >> 16) + 1;
        if !(2..=MAX_QUEUE_ENTRIES).contains(&entries) {
            return Err(CommandError::InvalidQueueSize(entries));
        }
        if cmd.cdw11 & 1 == 0 {
            return Err(CommandError::InvalidField(
                "queue not physically contiguous",
            ));
        }
        if !cmd.prp1.is_multiple_of(4096) {
            return Err(CommandError::InvalidField("queue base not page-aligned"));
        }
        Ok((usize::from(qid), entries))
    }

    fn slot_taken<T>(queues: &[Option<T>], cdw10: u32) -> bool {
        queues
            .get((cdw10 & 0xffff) as usize)
            .is_some_and(Option::is_some)
    }

    fn create_cq(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        let (qid, entries) = self.new_qid(cmd, Self::slot_taken(&self.cqs, cmd.cdw10))?;
        if self.regs.io_entry_sizes().1 != 4 {
            return Err(CommandError::InvalidField("CC.IOCQES is not 16 bytes"));
        }
        let vector = (cmd.cdw11 & 2 != 0).then_some((cmd.cdw11 >> 16) as u16);
        if let Some(v) = vector.filter(|v| *v >= self.vectors()) {
            return Err(CommandError::InvalidVector(v));
        }
        let cq = CompletionQueue::new(&self.mem, cmd.prp1, entries, vector)
            .map_err(CommandError::QueueMemory)?;
        self.cqs[qid] = Some(cq);
        Ok(0)
    }

    fn create_sq(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        let (qid, entries) = self.new_qid(cmd, Self::slot_taken(&self.sqs, cmd.cdw10))?;
        if self.regs.io_entry_sizes().0 != 6 {
            return Err(CommandError::InvalidField("CC.IOSQES is not 64 bytes"));
        }
        let cqid = (cmd.cdw11 >> 16) as u16;
        if cqid == 0 || !Self::slot_taken(&self.cqs, u32::from(cqid)) {
            return Err(CommandError::CompletionQueueInvalid(cqid));
        }
        let sq = SubmissionQueue::new(&self.mem, cmd.prp1, entries, cqid)
            .map_err(CommandError::QueueMemory)?;
        self.sqs[qid] = Some(sq);
        Ok(0)
    }

    fn delete_sq(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        match self.sqs.get_mut(usize::from(qid)) {
            Some(q @ Some(_)) if qid != 0 => {
                *q = None;
                Ok(0)
            }
            _ => Err(CommandError::InvalidQueueId(qid)),
        }
    }

    fn delete_cq(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        let qid = (cmd.cdw10 & 0xffff) as u16;
        if qid == 0 || !Self::slot_taken(&self.cqs, u32::from(qid)) {
            return Err(CommandError::InvalidQueueId(qid));
        }
        if self.sqs.iter().flatten().any(|s| s.cqid == qid) {
            return Err(CommandError::InvalidQueueDeletion(qid));
        }
        self.cqs[usize::from(qid)] = None;
        Ok(0)
    }

    fn identify(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        let mut b = vec![0u8; 4096];
        match cmd.cdw10 & 0xff {
            0 if cmd.nsid == 1 => self.identify_namespace(&mut b),
            0 => return Err(CommandError::InvalidNamespace(cmd.nsid)),
            1 => self.identify_controller(&mut b),
            // Active namespaces above `nsid`: namespace 1 only.
            2 if cmd.nsid == 0 => b[..4].copy_from_slice(&1u32.to_le_bytes()),
            2 if cmd.nsid < 0xffff_fffe => {}
            2 => return Err(CommandError::InvalidNamespace(cmd.nsid)),
            _ => return Err(CommandError::InvalidField("Identify CNS")),
        }
        self.write_data(cmd, &b)?;
        Ok(0)
    }

    fn identify_controller(&self, b: &mut [u8]) {
        b[0..2].copy_from_slice(&super::pci::VENDOR.to_le_bytes());
        b[2..4].copy_from_slice(&super::pci::VENDOR.to_le_bytes());
        ascii(b, 4, 20, "SPLITVMM-EMU-0001");
        ascii(b, 24, 40, "splitvmm emulated NVMe");
        ascii(b, 64, 8, env!("CARGO_PKG_VERSION"));
        b[72] = 6; // RAB
        b[77] = MDTS;
        b[78..80].copy_from_slice(&1u16.to_le_bytes()); // CNTLID
        b[80..84].copy_from_slice(&VERSION.to_le_bytes());
        b[258] = 3; // ACL
        b[259] = (MAX_AERS - 1) as u8; // AERL
        b[512] = 0x66; // SQES: 64 bytes
        b[513] = 0x44; // CQES: 16 bytes
        b[516..520].copy_from_slice(&1u32.to_le_bytes()); // NN
        b[525] = 1; // VWC: Flush is meaningful
                    // Power state 0: 25 W.
        b[2048..2050].copy_from_slice(&2500u16.to_le_bytes());
    }

    fn identify_namespace(&self, b: &mut [u8]) {
        let blocks = self.ns.blocks();
        for at in [0, 8, 16] {
            b[at..at + 8].copy_from_slice(&blocks.to_le_bytes());
        }
        // NLBAF 0 (one format), FLBAS 0; LBA format 0: 512-byte blocks.
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        if !self.ns.writable() {
            b[99] = 1; // NSATTR: write protected
        }
    }

    fn set_features(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        match cmd.cdw10 & 0xff {
            FEATURE_NUMBER_OF_QUEUES => {
                let (sq, cq) = (cmd.cdw11 & 0xffff, cmd.cdw11 >> 16);
                if sq == 0xffff || cq == 0xffff {
                    return Err(CommandError::InvalidField("number of queues"));
                }
                let wanted = sq.max(cq) + 1;
                self.io_queues = wanted.min(u32::from(super::controller::MAX_IO_QUEUES)) as u16;
                Ok(self.queues_result())
            }
            _ => Err(CommandError::InvalidField("feature")),
        }
    }

    fn get_features(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        match cmd.cdw10 & 0xff {
            FEATURE_NUMBER_OF_QUEUES => Ok(self.queues_result()),
            FEATURE_VOLATILE_WRITE_CACHE => Ok(1),
            _ => Err(CommandError::InvalidField("feature")),
        }
    }

    fn queues_result(&self) -> u32 {
        let n = u32::from(self.io_queues) - 1;
        n | n << 16
    }
}
