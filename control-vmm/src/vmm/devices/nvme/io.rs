//! The namespace and the NVM command set: Read, Write and Flush on the backing file, with the
//! data moved between the file and the guest's buffers (PRPs, [`super::prp`]) through a bounce
//! buffer of at most MDTS bytes. The file is opened by whoever starts the VMM; a namespace that
//! is not writable fails every Write with "attempted write to read only range" and is reported
//! write-protected in Identify Namespace.

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::commands::{CommandError, MAX_TRANSFER};
use super::controller::NvmeController;
use super::prp;
use super::queues::Command;

/// Logical block size.
pub const BLOCK: u64 = 512;

const OP_FLUSH: u8 = 0x00;
const OP_WRITE: u8 = 0x01;
const OP_READ: u8 = 0x02;

/// A backing file that cannot be a namespace.
#[derive(Debug, Error)]
pub enum NamespaceError {
    #[error("reading its size: {0}")]
    Size(std::io::Error),
    #[error("smaller than one {BLOCK}-byte block")]
    Empty,
}

/// Namespace 1: the backing file, in 512-byte blocks (a partial last block is not used).
#[derive(Debug)]
pub struct Namespace {
    file: File,
    blocks: u64,
    writable: bool,
}

impl Namespace {
    /// `file` is a regular file or a block device (whose size `metadata` does not give).
    pub fn new(mut file: File, writable: bool) -> Result<Self, NamespaceError> {
        use std::io::Seek;
        let len = file
            .seek(std::io::SeekFrom::End(0))
            .map_err(NamespaceError::Size)?;
        let blocks = len / BLOCK;
        if blocks == 0 {
            return Err(NamespaceError::Empty);
        }
        Ok(Self {
            file,
            blocks,
            writable,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Makes written data durable (nothing to do for a read-only namespace).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.writable {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }
}

impl NvmeController {
    /// An NVM command from an I/O queue: its result dword or why it failed.
    pub(super) fn nvm_command(&mut self, cmd: &Command) -> Result<u32, CommandError> {
        if cmd.flags != 0 {
            return Err(CommandError::InvalidField("fused or SGL command"));
        }
        match cmd.opcode {
            OP_FLUSH => {
                if cmd.nsid != 1 && cmd.nsid != 0xffff_ffff {
                    return Err(CommandError::InvalidNamespace(cmd.nsid));
                }
                self.stats.flushes += 1;
                self.ns.flush().map_err(CommandError::WriteFault)?;
                Ok(0)
            }
            OP_WRITE | OP_READ => {
                if cmd.nsid != 1 {
                    return Err(CommandError::InvalidNamespace(cmd.nsid));
                }
                let slba = u64::from(cmd.cdw10) | u64::from(cmd.cdw11) << 32;
                let blocks = u64::from(cmd.cdw12 & 0xffff) + 1;
                let bytes = blocks * BLOCK;
                if bytes > MAX_TRANSFER {
                    return Err(CommandError::InvalidField("transfer larger than MDTS"));
                }
                if slba
                    .checked_add(blocks)
                    .is_none_or(|end| end > self.ns.blocks)
                {
                    return Err(CommandError::LbaOutOfRange);
                }
                let at = slba * BLOCK;
                if cmd.opcode == OP_WRITE {
                    if !self.ns.writable {
                        return Err(CommandError::ReadOnly);
                    }
                    let data = self.read_data(cmd, bytes)?;
                    self.stats.writes += 1;
                    self.ns
                        .file
                        .write_all_at(&data, at)
                        .map_err(CommandError::WriteFault)?;
                } else {
                    // Check the buffers before touching the file.
                    prp::segments(&self.mem, cmd.prp1, cmd.prp2, bytes)?;
                    let mut data = vec![0u8; bytes as usize];
                    self.stats.reads += 1;
                    self.ns
                        .file
                        .read_exact_at(&mut data, at)
                        .map_err(CommandError::ReadError)?;
                    self.write_data(cmd, &data)?;
                }
                Ok(0)
            }
            op => Err(CommandError::InvalidOpcode(op)),
        }
    }

    /// Copies `data` to the command's buffers (controller to host).
    pub(super) fn write_data(&self, cmd: &Command, data: &[u8]) -> Result<(), CommandError> {
        let mut at = 0;
        for s in prp::segments(&self.mem, cmd.prp1, cmd.prp2, data.len() as u64)? {
            self.mem
                .write_slice(&data[at..at + s.len], GuestAddress(s.gpa))
                .map_err(|_| prp::PrpError::OutsideRam {
                    gpa: s.gpa,
                    len: s.len as u64,
                })?;
            at += s.len;
        }
        Ok(())
    }

    /// `len` bytes from the command's buffers (host to controller).
    fn read_data(&self, cmd: &Command, len: u64) -> Result<Vec<u8>, CommandError> {
        let segments = prp::segments(&self.mem, cmd.prp1, cmd.prp2, len)?;
        let mut data = vec![0u8; len as usize];
        let mut at = 0;
        for s in segments {
            self.mem
                .read_slice(&mut data[at..at + s.len], GuestAddress(s.gpa))
                .map_err(|_| prp::PrpError::OutsideRam {
                    gpa: s.gpa,
                    len: s.len as u64,
                })?;
            at += s.len;
        }
        Ok(data)
    }
}
