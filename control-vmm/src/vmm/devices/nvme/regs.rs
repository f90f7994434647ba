//! The controller registers of BAR0 (NVMe 1.2, 3.1): CAP, VS, CC, CSTS, AQA, ASQ, ACQ, and the
//! doorbell stride. Reads and writes of 4 or 8 bytes (`lo_hi_readq` and plain `readq` alike);
//! anything else reads all-ones and is ignored. A write to CC says what the controller must do
//! (enable, reset, shut down); the controller acts and updates CSTS here.

use thiserror::Error;

/// Start of the doorbells (stride 4 bytes: CAP.DSTRD = 0).
pub const DOORBELL_OFFSET: u64 = 0x1000;
/// Bytes of doorbells decoded (SQ tail and CQ head of queues 0..512).
pub const DOORBELL_BYTES: u64 = 0x1000;

/// Largest queue (entries, 0-based in CAP.MQES).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// CAP.TO: ready timeout in 500 ms units.
const CAP_TIMEOUT: u64 = 20;
/// NVMe 1.2.0.
pub const VERSION: u32 = 0x0001_0200;

const CAP: u64 = 0x00;
const VS: u64 = 0x08;
const INTMS: u64 = 0x0c;
const INTMC: u64 = 0x10;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const NSSR: u64 = 0x20;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;

pub const CC_EN: u32 = 1;
const CC_CSS_SHIFT: u32 = 4;
const CC_MPS_SHIFT: u32 = 7;
const CC_AMS_SHIFT: u32 = 11;
const CC_SHN_SHIFT: u32 = 14;
const CC_IOSQES_SHIFT: u32 = 16;
const CC_IOCQES_SHIFT: u32 = 20;
pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Why the controller refuses to enable (it sets CSTS.CFS instead of CSTS.RDY).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnableError {
    #[error("CC.CSS {0} is not the NVM command set")]
    CommandSet(u32),
    #[error("CC.MPS {0}: only 4 KiB pages")]
    PageSize(u32),
    #[error("CC.AMS {0}: only round robin")]
    Arbitration(u32),
    #[error("admin queue sizes {sq}/{cq} entries (2..={MAX_QUEUE_ENTRIES})")]
    AdminQueueSize { sq: u32, cq: u32 },
    #[error("admin queue at {0:#x} is not page-aligned")]
    AdminQueueAlignment(u64),
}

/// What a CC write asks of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CcChange {
    None,
    /// EN 0 -> 1.
    Enable,
    /// EN 1 -> 0: controller reset.
    Disable,
    /// SHN set from 0 (normal or abrupt shutdown).
    Shutdown,
}

/// The admin queue as the guest configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminQueues {
    pub sq_base: u64,
    pub sq_entries: u32,
    pub cq_base: u64,
    pub cq_entries: u32,
}

/// Register state.
#[derive(Debug, Default, Clone)]
pub struct Registers {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
}

/// CAP: MQES, contiguous queues required, timeout, stride 4, NVM command set, 4 KiB pages.
pub fn capabilities() -> u64 {
    u64::from(MAX_QUEUE_ENTRIES - 1) | 1 << 16 | CAP_TIMEOUT << 24 | 1 << 37
}

fn set_half(v: &mut u64, high: bool, w: u32) {
    *v = if high {
        (*v & 0xffff_ffff) | (u64::from(w) << 32)
    } else {
        (*v & !0xffff_ffff) | u64::from(w)
    };
}

impl Registers {
    pub fn cc(&self) -> u32 {
        self.cc
    }

    pub fn csts(&self) -> u32 {
        self.csts
    }

    pub fn ready(&self) -> bool {
        self.csts & CSTS_RDY != 0 && self.csts & CSTS_CFS == 0
    }

    /// I/O submission and completion queue entry sizes (log2) the guest chose.
    pub fn io_entry_sizes(&self) -> (u32, u32) {
        (
            (self.cc >> CC_IOSQES_SHIFT) & 0xf,
            (self.cc >> CC_IOCQES_SHIFT) & 0xf,
        )
    }

    /// A register read (`offset` below the doorbells); all-ones for what is not a register.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let qword = |v: u64, data: &mut [u8], high: bool| match data.len() {
            8 if !high => data.copy_from_slice(&v.to_le_bytes()),
            4 => {
                let w = if high { v >> 32 } else { v } as u32;
                data.copy_from_slice(&w.to_le_bytes());
            }
            _ => data.fill(0xff),
        };
        let dword = |v: u32, data: &mut [u8]| match data.len() {
            4 => data.copy_from_slice(&v.to_le_bytes()),
            _ => data.fill(0xff),
        };
        match offset {
            CAP | 0x04 => qword(capabilities(), data, offset == 0x04),
            VS => dword(VERSION, data),
            INTMS | INTMC | NSSR => dword(0, data),
            CC => dword(self.cc, data),
            CSTS => dword(self.csts, data),
            AQA => dword(self.aqa, data),
            ASQ | 0x2c => qword(self.asq, data, offset == 0x2c),
            ACQ | 0x34 => qword(self.acq, data, offset == 0x34),
            // CMBLOC, CMBSZ (1.2) and the rest: not implemented, read 0.
            o if o % 4 == 0 && data.len() == 4 => dword(0, data),
            _ => data.fill(0xff),
        }
    }

    /// A register write; returns what the controller must do about it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> CcChange {
        let v = match data.len() {
            4 => u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            8 => u64::from_le_bytes(data.try_into().unwrap_or([0; 8])),
            _ => {
                log::warn!(
                    "nvme: {}-byte register write at {offset:#x} ignored",
                    data.len()
                );
                return CcChange::None;
            }
        };
        let stopped = self.cc & CC_EN == 0;
        match (offset, data.len()) {
            (CC, 4) => return self.write_cc(v as u32),
            // The admin queue registers may change only while the controller is disabled.
            (AQA, 4) if stopped => self.aqa = v as u32 & 0x0fff_0fff,
            (ASQ, 8) if stopped => self.asq = v,
            (ACQ, 8) if stopped => self.acq = v,
            (ASQ | 0x2c, 4) if stopped => set_half(&mut self.asq, offset == 0x2c, v as u32),
            (ACQ | 0x34, 4) if stopped => set_half(&mut self.acq, offset == 0x34, v as u32),
            // INTMS/INTMC: not for MSI-X; NSSR: no subsystem reset. Read-only registers.
            _ => log::warn!("nvme: write {v:#x} to register {offset:#x} ignored"),
        }
        CcChange::None
    }

    fn write_cc(&mut self, v: u32) -> CcChange {
        let before = self.cc;
        self.cc = v & 0x00ff_fff1;
        match (before & CC_EN, v & CC_EN) {
            (0, 1) => return CcChange::Enable,
            (1, 0) => return CcChange::Disable,
            _ => {}
        }
        let shn = |cc: u32| (cc >> CC_SHN_SHIFT) & 3;
        if shn(before) == 0 && shn(v) != 0 {
            return CcChange::Shutdown;
        }
        CcChange::None
    }

    /// Checks CC and the admin queue registers for an enable.
    pub fn admin_queues(&self) -> Result<AdminQueues, EnableError> {
        let css = (self.cc >> CC_CSS_SHIFT) & 7;
        if css != 0 {
            return Err(EnableError::CommandSet(css));
        }
        let mps = (self.cc >> CC_MPS_SHIFT) & 0xf;
        if mps != 0 {
            return Err(EnableError::PageSize(mps));
        }
        let ams = (self.cc >> CC_AMS_SHIFT) & 7;
        if ams != 0 {
            return Err(EnableError::Arbitration(ams));
        }
        let sq = (self.aqa & 0xfff) + 1;
        let cq = ((self.aqa >> 16) & 0xfff) + 1;
        if sq < 2 || cq < 2 || sq > MAX_QUEUE_ENTRIES || cq > MAX_QUEUE_ENTRIES {
            return Err(EnableError::AdminQueueSize { sq, cq });
        }
        for base in [self.asq, self.acq] {
            if base % 4096 != 0 {
                return Err(EnableError::AdminQueueAlignment(base));
            }
        }
        Ok(AdminQueues {
            sq_base: self.asq,
            sq_entries: sq,
            cq_base: self.acq,
            cq_entries: cq,
        })
    }

    /// The controller is ready (or failed: CFS).
    pub fn set_ready(&mut self, ok: bool) {
        self.csts = if ok { CSTS_RDY } else { CSTS_CFS };
    }

    /// A controller fatal status (the guest must reset the controller).
    pub fn set_fatal(&mut self) {
        self.csts |= CSTS_CFS;
    }

    /// Reset (EN cleared): not ready, no shutdown status.
    pub fn set_reset(&mut self) {
        self.csts = 0;
    }

    /// Shutdown processing complete (CSTS.SHST = 10b).
    pub fn set_shutdown_complete(&mut self) {
        self.csts = (self.csts & !(3 << 2)) | CSTS_SHST_COMPLETE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32(r: &Registers, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn cap_reads_whole_or_in_halves_and_cc_transitions_are_reported() {
        let mut r = Registers::default();
        let mut q = [0u8; 8];
        r.read(0, &mut q);
        let cap = u64::from_le_bytes(q);
        assert_eq!(cap & 0xffff, 1023, "MQES");
        assert_eq!((cap >> 37) & 1, 1, "NVM command set");
        assert_eq!(u64::from(r32(&r, 0)) | u64::from(r32(&r, 4)) << 32, cap);
        assert_eq!(r32(&r, 8), VERSION);
        let mut odd = [0u8; 2];
        r.read(0x14, &mut odd);
        assert_eq!(odd, [0xff, 0xff]);
        r.write(AQA, &0x001f_001fu32.to_le_bytes());
        r.write(ASQ, &0x10000u64.to_le_bytes());
        r.write(ACQ, &0x11000u32.to_le_bytes());
        assert_eq!(
            r.write(CC, &(0x0046_0001u32).to_le_bytes()),
            CcChange::Enable
        );
        let aq = r.admin_queues().unwrap();
        assert_eq!((aq.sq_entries, aq.cq_entries), (32, 32));
        assert_eq!((aq.sq_base, aq.cq_base), (0x10000, 0x11000));
        assert_eq!(r.io_entry_sizes(), (6, 4));
        // While enabled, the admin queue registers are frozen.
        r.write(ASQ, &0x20000u64.to_le_bytes());
        assert_eq!(r32(&r, ASQ), 0x10000);
        assert_eq!(
            r.write(CC, &(0x0046_4001u32).to_le_bytes()),
            CcChange::Shutdown
        );
        assert_eq!(r.write(CC, &(0x0046_4001u32).to_le_bytes()), CcChange::None);
        assert_eq!(r.write(CC, &0u32.to_le_bytes()), CcChange::Disable);
    }

    #[test]
    fn bad_enables_are_refused_with_a_reason() {
        let mut r = Registers::default();
        r.write(AQA, &0u32.to_le_bytes());
        r.write(CC, &1u32.to_le_bytes());
        assert!(matches!(
            r.admin_queues(),
            Err(EnableError::AdminQueueSize { sq: 1, cq: 1 })
        ));
        r.write(CC, &0u32.to_le_bytes());
        r.write(AQA, &0x0001_0001u32.to_le_bytes());
        r.write(ASQ, &0x10010u64.to_le_bytes());
        assert_eq!(
            r.admin_queues(),
            Err(EnableError::AdminQueueAlignment(0x10010))
        );
        r.write(CC, &(1u32 | 1 << 7).to_le_bytes());
        assert_eq!(r.admin_queues(), Err(EnableError::PageSize(1)));
    }
}
