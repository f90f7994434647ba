//! virtio-net driver (virtio 1.2, section 5.1) over two [`SplitQueue`]s (receiveq1, transmitq1).
//!
//! Every descriptor owns one fixed [`NET_BUF_LEN`]-byte buffer in DMA memory, indexed by the
//! chain's head descriptor, so nothing is allocated per frame. A transmitted frame is the
//! 12-byte virtio-net header (all zero: no offloads are negotiated) followed by the frame, in
//! one descriptor. Receive buffers are single writable descriptors; with MRG_RXBUF a frame may
//! span several of them (`num_buffers` in the first one's header). Everything the device
//! returns (used lengths, `num_buffers`) is checked before use.

use core::fmt;

use super::memory::{BumpAllocator, DmaBuf, DmaMemory, FrontMemoryError};
use super::virtqueue::{FrontQueueError, Notify, SplitQueue};
use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Feature: `mtu` in config is valid.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// Feature: `mac` in config is valid.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature: the driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Feature: `status` in config is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `status` bit: link up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// The virtio-net header length (VERSION_1).
pub const NET_HDR_LEN: usize = 12;
/// Bytes of each descriptor's buffer: header plus the largest frame (1514 + VLAN tag).
pub const NET_BUF_LEN: usize = 2048;
/// The largest frame this driver sends or accepts.
pub const NET_MAX_FRAME: usize = 1518;
/// Bytes of config space [`FrontNetConfig::parse`] reads.
pub const NET_CONFIG_BYTES: usize = 12;

/// Errors of the virtio-net driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    /// The device lacks a required feature.
    MissingFeature(u64),
    /// The config space is too short.
    ShortConfig,
    /// A frame to send is shorter than an Ethernet header or longer than [`NET_MAX_FRAME`].
    BadFrame(usize),
    /// The receive buffer given is smaller than the frame.
    BufferTooSmall(usize),
    /// The device returned a length or buffer count that cannot be right.
    DeviceLength(u32),
    /// The virtqueue failed.
    Queue(FrontQueueError),
    /// DMA memory access failed.
    Memory(FrontMemoryError),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingFeature(b) => write!(f, "device lacks feature {b:#x}"),
            Self::ShortConfig => write!(f, "config space too short"),
            Self::BadFrame(n) => write!(f, "cannot send a {n}-byte frame"),
            Self::BufferTooSmall(n) => write!(f, "a {n}-byte frame does not fit the buffer"),
            Self::DeviceLength(n) => write!(f, "device returned an impossible length {n}"),
            Self::Queue(e) => write!(f, "virtqueue: {e}"),
            Self::Memory(e) => write!(f, "DMA memory: {e}"),
        }
    }
}

impl core::error::Error for NetError {}

impl From<FrontQueueError> for NetError {
    fn from(e: FrontQueueError) -> Self {
        Self::Queue(e)
    }
}

impl From<FrontMemoryError> for NetError {
    fn from(e: FrontMemoryError) -> Self {
        Self::Memory(e)
    }
}

/// Device configuration (the fields this driver uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontNetConfig {
    /// MAC address, if VIRTIO_NET_F_MAC.
    pub mac: Option<[u8; 6]>,
    /// Link status, if VIRTIO_NET_F_STATUS.
    pub status: Option<u16>,
    /// MTU, if VIRTIO_NET_F_MTU.
    pub mtu: Option<u16>,
}

impl FrontNetConfig {
    /// Parses the config space (little-endian) given the negotiated features.
    pub fn parse(raw: &[u8], features: u64) -> Result<Self, NetError> {
        let field = |off: usize, n: usize| raw.get(off..off + n).ok_or(NetError::ShortConfig);
        let u16_at = |off: usize| -> Result<u16, NetError> {
            let b = field(off, 2)?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        };
        let mac = if features & VIRTIO_NET_F_MAC != 0 {
            let mut m = [0u8; 6];
            m.copy_from_slice(field(0, 6)?);
            Some(m)
        } else {
            None
        };
        let status = if features & VIRTIO_NET_F_STATUS != 0 {
            Some(u16_at(6)?)
        } else {
            None
        };
        let mtu = if features & VIRTIO_NET_F_MTU != 0 {
            Some(u16_at(10)?)
        } else {
            None
        };
        Ok(Self { mac, status, mtu })
    }
}

/// Chooses the features to acknowledge: VERSION_1 is required; MAC, STATUS, MTU are taken when
/// offered; MRG_RXBUF and EVENT_IDX only if wanted. No offloads.
pub fn negotiate_features(
    device: u64,
    want_mrg: bool,
    want_event_idx: bool,
) -> Result<u64, NetError> {
    if device & VIRTIO_F_VERSION_1 == 0 {
        return Err(NetError::MissingFeature(VIRTIO_F_VERSION_1));
    }
    let mut wanted = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU;
    if want_mrg {
        wanted |= VIRTIO_NET_F_MRG_RXBUF;
    }
    if want_event_idx {
        wanted |= VIRTIO_RING_F_EVENT_IDX;
    }
    Ok(device & wanted)
}

/// One receive/transmit queue pair.
pub struct NetQueuePair<M: DmaMemory> {
    rx: SplitQueue,
    tx: SplitQueue,
    mem: M,
    rx_bufs: u64,
    tx_bufs: u64,
    mrg: bool,
}

impl<M: DmaMemory> fmt::Debug for NetQueuePair<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetQueuePair")
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .field("mrg", &self.mrg)
            .finish()
    }
}

impl<M: DmaMemory> NetQueuePair<M> {
    /// Wraps `rx` and `tx`, allocating one buffer per descriptor from `alloc` (which must
    /// allocate from `mem`). `mrg` is whether MRG_RXBUF was negotiated.
    pub fn new(
        rx: SplitQueue,
        tx: SplitQueue,
        mem: M,
        alloc: &mut BumpAllocator,
        mrg: bool,
    ) -> Result<Self, NetError> {
        let rx_len = NET_BUF_LEN * rx.size() as usize;
        let tx_len = NET_BUF_LEN * tx.size() as usize;
        let rx_bufs = alloc.alloc(rx_len, 64)?;
        let tx_bufs = alloc.alloc(tx_len, 64)?;
        for (addr, len) in [(rx_bufs, rx_len), (tx_bufs, tx_len)] {
            mem.translate(addr, len)
                .ok_or(FrontMemoryError::OutOfRange { addr, len })?;
        }
        Ok(Self {
            rx,
            tx,
            mem,
            rx_bufs,
            tx_bufs,
            mrg,
        })
    }

    /// The receive virtqueue.
    pub fn rx_queue(&mut self) -> &mut SplitQueue {
        &mut self.rx
    }

    /// The transmit virtqueue.
    pub fn tx_queue(&mut self) -> &mut SplitQueue {
        &mut self.tx
    }

    fn rx_buf(&self, head: u16) -> DmaBuf {
        DmaBuf {
            addr: self.rx_bufs + NET_BUF_LEN as u64 * u64::from(head),
            len: NET_BUF_LEN as u32,
        }
    }

    /// Posts every free descriptor as a receive buffer; returns whether to kick.
    pub fn fill_rx(&mut self) -> Result<Notify, NetError> {
        while self.rx.num_free() > 0 {
            let head = self.rx.next_head();
            let buf = self.rx_buf(head);
            self.rx.add(&[], &[buf])?;
        }
        Ok(self.rx.publish())
    }

    /// Reclaims transmitted buffers; returns how many.
    pub fn reclaim_tx(&mut self) -> Result<usize, NetError> {
        let mut n = 0;
        while self.tx.pop_used()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Queues `frame` for transmission (call [`NetQueuePair::publish_tx`] to make it visible).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        if frame.len() < 14 || frame.len() > NET_MAX_FRAME {
            return Err(NetError::BadFrame(frame.len()));
        }
        if self.tx.num_free() == 0 {
            self.reclaim_tx()?;
        }
        if self.tx.num_free() == 0 {
            return Err(NetError::Queue(FrontQueueError::Full));
        }
        let head = self.tx.next_head();
        let addr = self.tx_bufs + NET_BUF_LEN as u64 * u64::from(head);
        self.mem.write_bytes(addr, &[0u8; NET_HDR_LEN])?;
        self.mem.write_bytes(addr + NET_HDR_LEN as u64, frame)?;
        let len = (NET_HDR_LEN + frame.len()) as u32;
        let added = self.tx.add(&[DmaBuf { addr, len }], &[])?;
        debug_assert_eq!(added, head);
        Ok(())
    }

    /// Publishes queued frames; returns whether to kick the TX queue.
    pub fn publish_tx(&mut self) -> Notify {
        self.tx.publish()
    }

    /// Takes one received frame into `out`; returns its length, or `None` if nothing arrived.
    /// The buffers go back to the device (publish with [`NetQueuePair::fill_rx`]).
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<usize>, NetError> {
        let Some(first) = self.rx.pop_used()? else {
            return Ok(None);
        };
        let mut hdr = [0u8; NET_HDR_LEN];
        let len = first.len as usize;
        if !(NET_HDR_LEN..=NET_BUF_LEN).contains(&len) {
            self.recycle()?;
            return Err(NetError::DeviceLength(first.len));
        }
        let buf = self.rx_buf(first.head);
        self.mem.read_bytes(buf.addr, &mut hdr)?;
        let nbufs = if self.mrg {
            u16::from_le_bytes([hdr[10], hdr[11]])
        } else {
            1
        };
        let mut total = 0usize;
        let mut copy = |this: &Self, addr: u64, n: usize| -> Result<(), NetError> {
            let dst = out
                .get_mut(total..total + n)
                .ok_or(NetError::BufferTooSmall(total + n))?;
            this.mem.read_bytes(addr, dst)?;
            total += n;
            Ok(())
        };
        let mut result = if nbufs == 0 || usize::from(nbufs) > self.rx.size() as usize {
            Err(NetError::DeviceLength(u32::from(nbufs)))
        } else {
            copy(self, buf.addr + NET_HDR_LEN as u64, len - NET_HDR_LEN)
        };
        self.recycle()?;
        for _ in 1..nbufs.max(1) {
            if result.is_err() {
                break;
            }
            // The rest of the frame must already be in the used ring.
            let Some(next) = self.rx.pop_used()? else {
                result = Err(NetError::DeviceLength(u32::from(nbufs)));
                break;
            };
            if next.len as usize > NET_BUF_LEN {
                result = Err(NetError::DeviceLength(next.len));
            } else {
                let addr = self.rx_buf(next.head).addr;
                result = copy(self, addr, next.len as usize);
            }
            self.recycle()?;
        }
        result.map(|()| Some(total))
    }

    /// Re-adds one receive buffer (each descriptor owns its buffer, so the free head's
    /// buffer is the one just returned).
    fn recycle(&mut self) -> Result<(), NetError> {
        let h = self.rx.next_head();
        let buf = self.rx_buf(h);
        self.rx.add(&[], &[buf])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse_honours_features() {
        let raw = [2, 0, 0, 0, 0, 9, 1, 0, 1, 0, 0xdc, 0x05];
        let c = FrontNetConfig::parse(
            &raw,
            VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU,
        )
        .unwrap();
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(c.status, Some(VIRTIO_NET_S_LINK_UP));
        assert_eq!(c.mtu, Some(1500));
        let c = FrontNetConfig::parse(&raw[..6], VIRTIO_NET_F_MAC).unwrap();
        assert_eq!(c.status, None);
        assert_eq!(
            FrontNetConfig::parse(&raw[..4], VIRTIO_NET_F_MAC),
            Err(NetError::ShortConfig)
        );
    }

    #[test]
    fn negotiation_takes_no_offloads() {
        let all = u64::MAX;
        let f = negotiate_features(all, false, false).unwrap();
        assert_eq!(f & 0xfff & !(VIRTIO_NET_F_MTU | VIRTIO_NET_F_MAC), 0);
        assert_eq!(f & VIRTIO_NET_F_MRG_RXBUF, 0);
        assert_ne!(
            negotiate_features(all, true, true).unwrap() & VIRTIO_NET_F_MRG_RXBUF,
            0
        );
        assert!(negotiate_features(0, true, true).is_err());
    }
}
