//! A minimal user-space NVMe driver over a VFIO-owned function: it proves the ownership path
//! end to end by bringing up the admin queue in DMA-mapped memory of the driver domain,
//! completing Identify by interrupt (not by polling the completion queue), and reading a
//! block through an I/O queue pair.
//!
//! Every completion must be announced by the device's interrupt eventfd before it is
//! accepted, so a working run proves MSI-X (or INTx) delivery through the IOMMU's interrupt
//! remapping as well as DMA translation.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vfio::{wait_eventfds, DmaBuffer, IrqMode, VfioError, VfioPciDevice};

/// Errors of the NVMe probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error("{0}: creating the interrupt eventfd: {1}")]
    EventFd(String, #[source] std::io::Error),
    #[error("controller needs pages of at least {0} bytes; this driver uses 4096")]
    PageSize(u64),
    #[error("controller did not become {want} within {timeout:?} (CSTS=0x{csts:x})")]
    ReadyTimeout {
        want: &'static str,
        csts: u32,
        timeout: Duration,
    },
    #[error("controller fatal status after enable (CSTS=0x{0:x}; on an NVMe VF: its secondary controller is offline)")]
    Fatal(u32),
    #[error("{what}: no interrupt within {timeout:?} (completion queue entry {cqe})")]
    NoInterrupt {
        what: String,
        timeout: Duration,
        cqe: &'static str,
    },
    #[error("{what}: completion for command id {got}, expected {want}")]
    WrongCid { what: String, got: u16, want: u16 },
    #[error("{what}: the controller answered status 0x{status:x}")]
    Status { what: String, status: u16 },
    #[error("namespace {0} is not attached to this controller (size 0)")]
    NoNamespace(u32),
    #[error("identify data shorter than its structure")]
    ShortData,
    #[error("waiting for the interrupt: {0}")]
    Wait(#[source] std::io::Error),
}

// Controller registers (NVMe base specification, section 3.1).
const REG_CAP: u64 = 0x00;
const REG_VS: u64 = 0x08;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

const QUEUE_DEPTH: u16 = 16;
const SQE_SIZE: usize = 64;
const CQE_SIZE: usize = 16;
const PAGE: usize = 4096;

// Layout of the DMA buffer, one page each.
const ASQ_OFF: usize = 0;
const ACQ_OFF: usize = PAGE;
const IOSQ_OFF: usize = 2 * PAGE;
const IOCQ_OFF: usize = 3 * PAGE;
const DATA_OFF: usize = 4 * PAGE;
const DMA_LEN: usize = 5 * PAGE;

/// The IOVA where the probe maps its buffer (any page-aligned address the IOMMU accepts).
pub const PROBE_IOVA: u64 = 0x1000_0000;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What Identify Controller returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    pub vid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cntlid: u16,
    pub namespaces: u32,
}

/// Parses the 4 KiB Identify Controller data structure.
pub fn parse_identify_controller(b: &[u8]) -> Option<IdentifyController> {
    let text = |r: std::ops::Range<usize>| {
        String::from_utf8_lossy(b.get(r).unwrap_or_default())
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    let u16_at = |o: usize| Some(u16::from_le_bytes([*b.get(o)?, *b.get(o + 1)?]));
    let u32_at = |o: usize| {
        Some(u32::from_le_bytes([
            *b.get(o)?,
            *b.get(o + 1)?,
            *b.get(o + 2)?,
            *b.get(o + 3)?,
        ]))
    };
    Some(IdentifyController {
        vid: u16_at(0)?,
        serial: text(4..24),
        model: text(24..64),
        firmware: text(64..72),
        cntlid: u16_at(78)?,
        namespaces: u32_at(516)?,
    })
}

/// Parses Identify Namespace: (size in blocks, block size in bytes).
pub fn parse_identify_namespace(b: &[u8]) -> Option<(u64, u32)> {
    let nsze = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
    let flbas = usize::from(*b.get(26)? & 0xf);
    let lbads = *b.get(128 + 4 * flbas + 2)?;
    if !(9..=16).contains(&lbads) {
        return None;
    }
    Some((nsze, 1u32 << lbads))
}

struct Queue {
    qid: u16,
    sq_off: usize,
    cq_off: usize,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
}

/// Statistics of a probe, for the caller's report.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeStats {
    pub commands: u32,
    pub interrupts: u32,
}

/// An NVMe controller driven from user space through VFIO.
pub struct NvmeController {
    // Field order is drop order: the DMA buffer is unmapped before the device is closed.
    dma: DmaBuffer,
    irq: EventFd,
    mode: IrqMode,
    dstrd: u32,
    admin: Queue,
    io: Option<Queue>,
    next_cid: u16,
    pub cap: u64,
    pub version: u32,
    pub stats: ProbeStats,
    dev: VfioPciDevice,
}

impl NvmeController {
    /// Resets the controller and brings up its admin queue with interrupts routed to an
    /// eventfd.
    pub fn bring_up(mut dev: VfioPciDevice) -> Result<Self, ProbeError> {
        dev.enable_bus_master()?;
        dev.bar0()?;
        let bar = dev.mapped_bar0().ok_or(VfioError::BarNotMappable {
            bdf: dev.bdf(),
            flags: 0,
            size: 0,
        })?;
        let cap = bar.read64(REG_CAP)?;
        let version = bar.read32(REG_VS)?;
        let mpsmin = 1u64 << (12 + ((cap >> 48) & 0xf));
        if mpsmin > PAGE as u64 {
            return Err(ProbeError::PageSize(mpsmin));
        }
        let timeout = Duration::from_millis(((cap >> 24) & 0xff).max(1) * 500);
        bar.write32(REG_CC, 0)?;
        wait_ready(bar, false, timeout)?;
        let dma = dev.map_dma(PROBE_IOVA, DMA_LEN)?;
        let depth = u32::from(QUEUE_DEPTH - 1);
        bar.write32(REG_AQA, depth << 16 | depth)?;
        bar.write64(REG_ASQ, dma.iova() + ASQ_OFF as u64)?;
        bar.write64(REG_ACQ, dma.iova() + ACQ_OFF as u64)?;
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| ProbeError::EventFd(dev.bdf().to_string(), e))?;
        let mode = dev.enable_interrupt(&irq)?;
        // IOCQES 16 bytes (2^4), IOSQES 64 bytes (2^6), NVM command set, 4 KiB pages, enable.
        bar.write32(REG_CC, 4 << 20 | 6 << 16 | 1)?;
        wait_ready(bar, true, timeout)?;
        Ok(NvmeController {
            dma,
            irq,
            mode,
            dstrd: ((cap >> 32) & 0xf) as u32,
            admin: Queue {
                qid: 0,
                sq_off: ASQ_OFF,
                cq_off: ACQ_OFF,
                sq_tail: 0,
                cq_head: 0,
                phase: true,
            },
            io: None,
            next_cid: 1,
            cap,
            version,
            stats: ProbeStats::default(),
            dev,
        })
    }

    pub fn device(&self) -> &VfioPciDevice {
        &self.dev
    }

    /// See [`VfioPciDevice::mark_requested`].
    pub fn mark_requested(&mut self) {
        self.dev.mark_requested();
    }

    pub fn irq_mode(&self) -> IrqMode {
        self.mode
    }

    fn doorbell(&self, qid: u16, completion: bool) -> u64 {
        let index = 2 * u64::from(qid) + u64::from(completion);
        DOORBELLS + index * (4u64 << self.dstrd)
    }

    /// Submits one command on `io` (else admin) and waits for its interrupt and completion.
    fn execute(&mut self, what: &str, io: bool, mut sqe: [u32; 16]) -> Result<u32, ProbeError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe[0] = (sqe[0] & 0xffff) | u32::from(cid) << 16;
        let bytes: Vec<u8> = sqe.iter().flat_map(|d| d.to_le_bytes()).collect();
        let q = match (io, self.io.as_mut()) {
            (true, Some(q)) => q,
            _ => &mut self.admin,
        };
        self.dma
            .write_bytes(q.sq_off + usize::from(q.sq_tail) * SQE_SIZE, &bytes)?;
        q.sq_tail = (q.sq_tail + 1) % QUEUE_DEPTH;
        let (qid, tail) = (q.qid, q.sq_tail);
        fence(Ordering::SeqCst);
        let db = self.doorbell(qid, false);
        self.dev
            .mapped_bar0()
            .ok_or(VfioError::BarNotMappable {
                bdf: self.dev.bdf(),
                flags: 0,
                size: 0,
            })?
            .write32(db, u32::from(tail))?;
        self.stats.commands += 1;

        // The interrupt must come first: that is what this probe proves.
        let fired = wait_eventfds(&[&self.irq], COMMAND_TIMEOUT).map_err(ProbeError::Wait)?;
        let q = match (io, self.io.as_ref()) {
            (true, Some(q)) => q,
            _ => &self.admin,
        };
        let entry = q.cq_off + usize::from(q.cq_head) * CQE_SIZE;
        let present = |dma: &DmaBuffer| -> Result<Option<(u32, u32)>, VfioError> {
            let dw3 = dma.read_u32(entry + 12)?;
            Ok((((dw3 >> 16) & 1 != 0) == q.phase).then_some((dma.read_u32(entry)?, dw3)))
        };
        if fired.is_none() {
            let cqe = if present(&self.dma)?.is_some() {
                "posted, so the interrupt was lost"
            } else {
                "not posted either"
            };
            return Err(ProbeError::NoInterrupt {
                what: what.to_string(),
                timeout: COMMAND_TIMEOUT,
                cqe,
            });
        }
        self.stats.interrupts += 1;
        // The entry is written before the interrupt is raised; allow for a slow store anyway.
        let deadline = Instant::now() + Duration::from_millis(100);
        let (dw0, dw3) = loop {
            if let Some(c) = present(&self.dma)? {
                break c;
            }
            if Instant::now() >= deadline {
                return Err(ProbeError::NoInterrupt {
                    what: what.to_string(),
                    timeout: COMMAND_TIMEOUT,
                    cqe: "missing although the interrupt fired",
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let q = match (io, self.io.as_mut()) {
            (true, Some(q)) => q,
            _ => &mut self.admin,
        };
        q.cq_head = (q.cq_head + 1) % QUEUE_DEPTH;
        if q.cq_head == 0 {
            q.phase = !q.phase;
        }
        let (qid, head) = (q.qid, q.cq_head);
        let db = self.doorbell(qid, true);
        if let Some(bar) = self.dev.mapped_bar0() {
            bar.write32(db, u32::from(head))?;
        }
        if self.mode == IrqMode::Intx {
            self.dev.unmask_intx()?;
        }
        let got = (dw3 & 0xffff) as u16;
        if got != cid {
            return Err(ProbeError::WrongCid {
                what: what.to_string(),
                got,
                want: cid,
            });
        }
        let status = (dw3 >> 17) as u16;
        if status != 0 {
            return Err(ProbeError::Status {
                what: what.to_string(),
                status,
            });
        }
        Ok(dw0)
    }

    fn data_iova(&self) -> u64 {
        self.dma.iova() + DATA_OFF as u64
    }

    /// Identify Controller (CNS 1), completed by interrupt.
    pub fn identify_controller(&mut self) -> Result<IdentifyController, ProbeError> {
        self.dma.fill(DATA_OFF, PAGE, 0)?;
        let mut sqe = [0u32; 16];
        sqe[0] = 0x06;
        let prp = self.data_iova();
        sqe[6] = prp as u32;
        sqe[7] = (prp >> 32) as u32;
        sqe[10] = 1;
        self.execute("Identify Controller", false, sqe)?;
        let data = self.dma.read_bytes(DATA_OFF, PAGE)?;
        parse_identify_controller(&data).ok_or(ProbeError::ShortData)
    }

    /// Identify Namespace: (blocks, block size).
    pub fn identify_namespace(&mut self, nsid: u32) -> Result<(u64, u32), ProbeError> {
        self.dma.fill(DATA_OFF, PAGE, 0)?;
        let mut sqe = [0u32; 16];
        sqe[0] = 0x06;
        sqe[1] = nsid;
        let prp = self.data_iova();
        sqe[6] = prp as u32;
        sqe[7] = (prp >> 32) as u32;
        self.execute("Identify Namespace", false, sqe)?;
        let data = self.dma.read_bytes(DATA_OFF, PAGE)?;
        match parse_identify_namespace(&data) {
            Some((blocks, bs)) if blocks > 0 && bs as usize <= PAGE => Ok((blocks, bs)),
            _ => Err(ProbeError::NoNamespace(nsid)),
        }
    }

    /// Creates I/O queue pair 1 (interrupts on vector 0).
    pub fn create_io_queues(&mut self) -> Result<(), ProbeError> {
        let depth = u32::from(QUEUE_DEPTH - 1) << 16;
        let mut sqe = [0u32; 16];
        sqe[0] = 0x05; // Create I/O Completion Queue
        let cq = self.dma.iova() + IOCQ_OFF as u64;
        sqe[6] = cq as u32;
        sqe[7] = (cq >> 32) as u32;
        sqe[10] = depth | 1;
        sqe[11] = 0b11; // physically contiguous, interrupts enabled, vector 0
        self.execute("Create I/O Completion Queue", false, sqe)?;
        let mut sqe = [0u32; 16];
        sqe[0] = 0x01; // Create I/O Submission Queue
        let sq = self.dma.iova() + IOSQ_OFF as u64;
        sqe[6] = sq as u32;
        sqe[7] = (sq >> 32) as u32;
        sqe[10] = depth | 1;
        sqe[11] = 1 << 16 | 1; // completion queue 1, physically contiguous
        self.execute("Create I/O Submission Queue", false, sqe)?;
        self.io = Some(Queue {
            qid: 1,
            sq_off: IOSQ_OFF,
            cq_off: IOCQ_OFF,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        });
        Ok(())
    }

    /// Reads one block of `block_size` bytes at `lba` of namespace `nsid`.
    pub fn read_block(
        &mut self,
        nsid: u32,
        lba: u64,
        block_size: u32,
    ) -> Result<Vec<u8>, ProbeError> {
        if self.io.is_none() {
            self.create_io_queues()?;
        }
        self.dma.fill(DATA_OFF, PAGE, 0)?;
        let mut sqe = [0u32; 16];
        sqe[0] = 0x02; // Read
        sqe[1] = nsid;
        let prp = self.data_iova();
        sqe[6] = prp as u32;
        sqe[7] = (prp >> 32) as u32;
        sqe[10] = lba as u32;
        sqe[11] = (lba >> 32) as u32;
        sqe[12] = 0; // one block (0-based count)
        self.execute("Read", true, sqe)?;
        Ok(self.dma.read_bytes(DATA_OFF, block_size as usize)?)
    }
}

impl Drop for NvmeController {
    /// Disables the controller before its queues' memory is unmapped (the fields drop after
    /// this, DMA buffer first) and the device is closed.
    fn drop(&mut self) {
        if let Some(bar) = self.dev.mapped_bar0() {
            let _ = bar.write32(REG_CC, 0);
            let _ = wait_ready(bar, false, Duration::from_secs(2));
        }
        self.dev.disable_interrupts();
    }
}

fn wait_ready(
    bar: &super::vfio::MmioRegion,
    ready: bool,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let csts = bar.read32(REG_CSTS)?;
        if csts == u32::MAX {
            return Err(ProbeError::Fatal(csts));
        }
        if ready && csts & 2 != 0 {
            return Err(ProbeError::Fatal(csts));
        }
        if (csts & 1 != 0) == ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ProbeError::ReadyTimeout {
                want: if ready { "ready" } else { "disabled" },
                csts,
                timeout,
            });
        }
        // Sleep, not spin: the lab VM has one vCPU, and the emulated device needs it.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identify_controller() {
        let mut b = vec![0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"deadbeef            ");
        b[24..64].copy_from_slice(format!("{:<40}", "QEMU NVMe Ctrl").as_bytes());
        b[64..72].copy_from_slice(b"7.2.0   ");
        b[78..80].copy_from_slice(&2u16.to_le_bytes());
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        let id = parse_identify_controller(&b).unwrap();
        assert_eq!(id.vid, 0x1b36);
        assert_eq!(id.serial, "deadbeef");
        assert_eq!(id.model, "QEMU NVMe Ctrl");
        assert_eq!(id.firmware, "7.2.0");
        assert_eq!((id.cntlid, id.namespaces), (2, 256));
        assert_eq!(parse_identify_controller(&b[..100]), None);
    }

    #[test]
    fn parses_identify_namespace_and_rejects_bad_block_sizes() {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&131072u64.to_le_bytes());
        b[26] = 1; // format 1
        b[128 + 4 + 2] = 12; // 4096-byte blocks
        assert_eq!(parse_identify_namespace(&b), Some((131072, 4096)));
        b[128 + 4 + 2] = 40;
        assert_eq!(parse_identify_namespace(&b), None);
    }
}
