//! virtio-blk driver (virtio 1.2, section 5.2) over a [`SplitQueue`].
//!
//! A request is a chain of: a 16-byte header (device-readable: type, reserved, sector), an
//! optional data buffer (readable for writes, writable for reads and GET_ID), and a 1-byte status
//! (device-writable). Headers and status bytes live in DMA memory in per-queue arrays indexed by
//! the chain's head descriptor, so no allocation happens per request; data buffers are supplied
//! by the caller as [`DmaBuf`]s (bounce buffers in a process domain's I/O window).

use core::fmt;

use super::memory::{BumpAllocator, DmaBuf, DmaMemory, FrontMemoryError};
use super::virtqueue::{FrontQueueError, Notify, SplitQueue, MAX_QUEUE_SIZE};
use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Sector size of the virtio-blk protocol (addresses are always in 512-byte units).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a GET_ID reply.
pub const BLK_ID_BYTES: usize = 20;

/// Feature: maximum segment size in config.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature: maximum segment count in config.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: block size in config.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// Feature: FLUSH command.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Feature: multiple queues, count in config.
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Status byte value written before submission: not a valid device status, so a device that
/// "completes" a request without writing the status is detected.
const STATUS_UNWRITTEN: u8 = 0xff;

/// Errors of the virtio-blk driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkError {
    /// The device lacks a feature the driver requires.
    MissingFeature(u64),
    /// The config space is shorter than required.
    ShortConfig,
    /// A data buffer is empty or not a multiple of the sector size.
    BadLength(u32),
    /// Virtqueue error (full, or the device broke the queue).
    Queue(FrontQueueError),
    /// DMA memory error.
    Memory(FrontMemoryError),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingFeature(bits) => write!(f, "device lacks required features {bits:#x}"),
            Self::ShortConfig => write!(f, "virtio-blk config space too short"),
            Self::BadLength(n) => write!(f, "data length {n} is not a positive multiple of 512"),
            Self::Queue(e) => write!(f, "{e}"),
            Self::Memory(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for BlkError {}

impl From<FrontQueueError> for BlkError {
    fn from(e: FrontQueueError) -> Self {
        Self::Queue(e)
    }
}
impl From<FrontMemoryError> for BlkError {
    fn from(e: FrontMemoryError) -> Self {
        Self::Memory(e)
    }
}

/// A request the device failed (the status byte it returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontRequestError {
    /// VIRTIO_BLK_S_IOERR.
    IoError,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupported,
    /// Any other status value (including "never written").
    BadStatus(u8),
}

impl fmt::Display for FrontRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IoError => write!(f, "device reported an I/O error"),
            Self::Unsupported => write!(f, "device does not support the request"),
            Self::BadStatus(s) => write!(f, "device returned invalid status {s:#x}"),
        }
    }
}

impl core::error::Error for FrontRequestError {}

/// Request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkOp {
    /// Read sectors into a writable buffer.
    Read,
    /// Write sectors from a readable buffer.
    Write,
    /// Flush the device's write cache.
    Flush,
    /// Read the 20-byte device id string.
    GetId,
}

/// A request to submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRequest {
    /// Type.
    pub op: BlkOp,
    /// First sector (512-byte units); ignored for FLUSH and GET_ID.
    pub sector: u64,
    /// Data buffer: required for Read/Write (multiple of 512 bytes), GetId (>= 20 bytes).
    pub data: Option<DmaBuf>,
}

/// A completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The token given at submission.
    pub token: u64,
    /// The request type.
    pub op: BlkOp,
    /// Device verdict.
    pub result: Result<(), FrontRequestError>,
}

/// Device configuration (the fields this driver uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontBlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size, if VIRTIO_BLK_F_BLK_SIZE.
    pub blk_size: Option<u32>,
    /// Number of queues, if VIRTIO_BLK_F_MQ.
    pub num_queues: Option<u16>,
}

/// Bytes of config space [`FrontBlkConfig::parse`] reads.
pub const BLK_CONFIG_BYTES: usize = 36;

impl FrontBlkConfig {
    /// Parses the config space (little-endian) given the negotiated features.
    pub fn parse(raw: &[u8], features: u64) -> Result<Self, BlkError> {
        let field = |off: usize, n: usize| raw.get(off..off + n).ok_or(BlkError::ShortConfig);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(field(0, 8)?);
        let blk_size = if features & VIRTIO_BLK_F_BLK_SIZE != 0 {
            let mut b = [0u8; 4];
            b.copy_from_slice(field(20, 4)?);
            Some(u32::from_le_bytes(b))
        } else {
            None
        };
        let num_queues = if features & VIRTIO_BLK_F_MQ != 0 {
            let mut b = [0u8; 2];
            b.copy_from_slice(field(34, 2)?);
            Some(u16::from_le_bytes(b))
        } else {
            None
        };
        Ok(Self {
            capacity: u64::from_le_bytes(cap),
            blk_size,
            num_queues,
        })
    }
}

/// Chooses the features to acknowledge from what the device offers. VERSION_1 is required;
/// EVENT_IDX is taken only if `want_event_idx`.
pub fn negotiate_features(device: u64, want_event_idx: bool) -> Result<u64, BlkError> {
    if device & VIRTIO_F_VERSION_1 == 0 {
        return Err(BlkError::MissingFeature(VIRTIO_F_VERSION_1));
    }
    let mut wanted = VIRTIO_F_VERSION_1
        | VIRTIO_BLK_F_FLUSH
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_RO
        | VIRTIO_BLK_F_MQ
        | VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_SIZE_MAX;
    if want_event_idx {
        wanted |= VIRTIO_RING_F_EVENT_IDX;
    }
    Ok(device & wanted)
}

#[derive(Clone, Copy)]
struct Slot {
    token: u64,
    op: BlkOp,
}

/// One virtio-blk request queue.
pub struct FrontBlkQueue<M: DmaMemory> {
    vq: SplitQueue,
    mem: M,
    headers: u64,
    status: u64,
    slots: [Slot; MAX_QUEUE_SIZE as usize],
}

impl<M: DmaMemory> fmt::Debug for FrontBlkQueue<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontBlkQueue")
            .field("vq", &self.vq)
            .finish()
    }
}

impl<M: DmaMemory> FrontBlkQueue<M> {
    /// Wraps `vq`, allocating its header and status arrays from `alloc` (which must allocate
    /// from `mem`).
    pub fn new(vq: SplitQueue, mem: M, alloc: &mut BumpAllocator) -> Result<Self, BlkError> {
        let n = vq.size() as usize;
        let headers = alloc.alloc(16 * n, 16)?;
        let status = alloc.alloc(n, 1)?;
        // Fail now, not per request, if the arrays are not inside `mem`.
        mem.translate(headers, 16 * n)
            .ok_or(FrontMemoryError::OutOfRange {
                addr: headers,
                len: 16 * n,
            })?;
        mem.translate(status, n)
            .ok_or(FrontMemoryError::OutOfRange {
                addr: status,
                len: n,
            })?;
        Ok(Self {
            vq,
            mem,
            headers,
            status,
            slots: [Slot {
                token: 0,
                op: BlkOp::Flush,
            }; MAX_QUEUE_SIZE as usize],
        })
    }

    /// The underlying virtqueue (counters, interrupt control).
    pub fn virtqueue(&mut self) -> &mut SplitQueue {
        &mut self.vq
    }

    /// The underlying virtqueue, read-only.
    pub fn virtqueue_ref(&self) -> &SplitQueue {
        &self.vq
    }

    /// The DMA memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Requests that can still be added, assuming each needs `descs_per_request` descriptors.
    pub fn free_slots(&self, descs_per_request: u16) -> u16 {
        self.vq.num_free() / descs_per_request.max(1)
    }

    /// Adds a request (not yet visible to the device: call [`FrontBlkQueue::publish`]). `token` is
    /// returned in the completion.
    pub fn submit(&mut self, req: &BlkRequest, token: u64) -> Result<(), BlkError> {
        let (kind, data_writable) = match req.op {
            BlkOp::Read => (VIRTIO_BLK_T_IN, true),
            BlkOp::Write => (VIRTIO_BLK_T_OUT, false),
            BlkOp::Flush => (VIRTIO_BLK_T_FLUSH, false),
            BlkOp::GetId => (VIRTIO_BLK_T_GET_ID, true),
        };
        match (req.op, req.data) {
            (BlkOp::Read | BlkOp::Write, Some(d))
                if d.len == 0 || u64::from(d.len) % SECTOR_SIZE != 0 =>
            {
                return Err(BlkError::BadLength(d.len))
            }
            (BlkOp::Read | BlkOp::Write, None) => return Err(BlkError::BadLength(0)),
            (BlkOp::GetId, Some(d)) if (d.len as usize) < BLK_ID_BYTES => {
                return Err(BlkError::BadLength(d.len))
            }
            (BlkOp::GetId, None) => return Err(BlkError::BadLength(0)),
            _ => {}
        }
        let data = match req.op {
            BlkOp::Flush => None,
            _ => req.data,
        };
        let needed = if data.is_some() { 3 } else { 2 };
        if self.vq.num_free() < needed {
            return Err(BlkError::Queue(FrontQueueError::Full));
        }
        // Header and status are indexed by the chain's head, which is the head of the free list
        // now; the descriptors must carry their addresses, so look the head up before adding.
        let head = self.vq.next_head();
        let hdr = DmaBuf {
            addr: self.headers + 16 * u64::from(head),
            len: 16,
        };
        let status = DmaBuf {
            addr: self.status + u64::from(head),
            len: 1,
        };
        let sector = match req.op {
            BlkOp::Read | BlkOp::Write => req.sector,
            _ => 0,
        };
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_bytes(hdr.addr, &raw)?;
        self.mem.write_u8(status.addr, STATUS_UNWRITTEN)?;
        let added = match (data, data_writable) {
            (None, _) => self.vq.add(&[hdr], &[status])?,
            (Some(d), false) => self.vq.add(&[hdr, d], &[status])?,
            (Some(d), true) => self.vq.add(&[hdr], &[d, status])?,
        };
        debug_assert_eq!(added, head);
        self.slots[head as usize] = Slot { token, op: req.op };
        Ok(())
    }

    /// Publishes submitted requests; returns whether the device must be kicked.
    pub fn publish(&mut self) -> Notify {
        self.vq.publish()
    }

    /// Reaps one completion, if any.
    pub fn complete(&mut self) -> Result<Option<BlkCompletion>, BlkError> {
        let Some(used) = self.vq.pop_used()? else {
            return Ok(None);
        };
        let status = self.mem.read_u8(self.status + u64::from(used.head))?;
        let result = match status {
            VIRTIO_BLK_S_OK => Ok(()),
            VIRTIO_BLK_S_IOERR => Err(FrontRequestError::IoError),
            VIRTIO_BLK_S_UNSUPP => Err(FrontRequestError::Unsupported),
            other => Err(FrontRequestError::BadStatus(other)),
        };
        let slot = self.slots[used.head as usize];
        Ok(Some(BlkCompletion {
            token: slot.token,
            op: slot.op,
            result,
        }))
    }
}
