//! Device options, the feature bits offered, and the virtio-net configuration space.
//!
//! Offered, because implemented: VERSION_1, EVENT_IDX, INDIRECT_DESC, MAC, STATUS (link always
//! up), MTU (1500), MRG_RXBUF, MQ when more than one queue pair is configured, and (unless
//! `offloads` is off) checksum offload and TCP segmentation both ways: CSUM, GUEST_CSUM,
//! HOST_TSO4/6, HOST_ECN, GUEST_TSO4/6, GUEST_ECN (the switch finishes the work for a port
//! that did not negotiate it, [`super::offload`]), and (unless `ctrl_vq` is off) the control
//! queue with CTRL_RX ([`super::ctrl`]; frontends such as QEMU and DPDK serve their own and
//! never hand it over). Not offered, because not implemented: UDP fragmentation/segmentation
//! (UFO, USO), CTRL_VLAN, CTRL_MAC_ADDR, GUEST_ANNOUNCE.

use std::sync::Arc;

use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::frame::Mac;
use super::header::{TxOffloads, HDR_LEN, HDR_LEN_LEGACY, MTU};
use crate::virtio_core::counters::DeviceCounters;
use crate::virtio_core::memory::SealPolicy;
use crate::virtio_core::MemoryGrant;

/// Device handles checksum offload of transmitted frames.
pub const NET_F_CSUM: u32 = 0;
/// Driver handles partial checksums of received frames.
pub const NET_F_GUEST_CSUM: u32 = 1;
/// `mtu` in the configuration space is valid.
pub const NET_F_MTU: u32 = 3;
/// `mac` in the configuration space is valid.
pub const NET_F_MAC: u32 = 5;
/// Driver takes TSOv4 frames.
pub const NET_F_GUEST_TSO4: u32 = 7;
/// Driver takes TSOv6 frames.
pub const NET_F_GUEST_TSO6: u32 = 8;
/// Driver takes TSO frames with ECN.
pub const NET_F_GUEST_ECN: u32 = 9;
/// Driver takes UFO frames.
pub const NET_F_GUEST_UFO: u32 = 10;
/// Device accepts TSOv4.
pub const NET_F_HOST_TSO4: u32 = 11;
/// Device accepts TSOv6.
pub const NET_F_HOST_TSO6: u32 = 12;
/// Device accepts TSO frames with ECN.
pub const NET_F_HOST_ECN: u32 = 13;
/// Device accepts UFO.
pub const NET_F_HOST_UFO: u32 = 14;
/// Driver can merge receive buffers.
pub const NET_F_MRG_RXBUF: u32 = 15;
/// `status` in the configuration space is valid.
pub const NET_F_STATUS: u32 = 16;
/// Control queue.
pub const NET_F_CTRL_VQ: u32 = 17;
/// Receive filtering commands on the control queue (promiscuous, all-multicast).
pub const NET_F_CTRL_RX: u32 = 18;
/// Multiple queue pairs.
pub const NET_F_MQ: u32 = 22;
/// `status`: link is up.
pub const NET_S_LINK_UP: u16 = 1;

/// Options of one virtio-net device.
#[derive(Clone, Debug)]
pub struct NetBackendConfig {
    /// The MAC address published to the driver.
    pub mac: Mac,
    /// Queue pairs (RX/TX); `2 * queue_pairs` virtqueues.
    pub queue_pairs: u16,
    /// Largest queue size accepted (a power of two, <= 32768).
    pub queue_size: u16,
    /// Frames processed from one queue per wakeup before the other queues get a turn.
    pub budget: usize,
    /// Busy-poll idle queues this long (guest kicks and switch wake-ups off) before sleeping;
    /// 0 disables polling.
    pub poll_us: u64,
    /// What to accept from peer-supplied memory that is not sealed against shrinking.
    pub seal_policy: SealPolicy,
    /// The guest memory the peer may share: any table (a standalone backend serving QEMU,
    /// say), or the I/O window the toolstack granted (managed mode).
    pub grant: MemoryGrant,
    /// Where the transport counts kicks and interrupts (frames and bytes are the switch
    /// port's counters).
    pub counters: Arc<DeviceCounters>,
    /// Offer checksum offload and TCP segmentation (both ways).
    pub offloads: bool,
    /// Offer the control queue (CTRL_VQ, CTRL_RX): one more virtqueue after the pairs.
    pub ctrl_vq: bool,
}

impl Default for NetBackendConfig {
    fn default() -> Self {
        NetBackendConfig {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            queue_size: 256,
            budget: 64,
            poll_us: 0,
            seal_policy: SealPolicy::AllowUnsealedChecked,
            grant: MemoryGrant::AllRam,
            counters: Arc::default(),
            offloads: true,
            ctrl_vq: true,
        }
    }
}

impl NetBackendConfig {
    /// The virtio feature bits offered (without the vhost-user PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        // IN_ORDER: every queue uses its chains in the order they were made available (TX
        // and the control queue complete them in that order; RX fills them in that order,
        // several per frame with MRG_RXBUF), so the driver may reclaim them by the used index
        // alone.
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_F_IN_ORDER)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << NET_F_MAC)
            | (1u64 << NET_F_STATUS)
            | (1u64 << NET_F_MTU)
            | (1u64 << NET_F_MRG_RXBUF);
        if self.queue_pairs > 1 {
            f |= 1u64 << NET_F_MQ;
        }
        if self.ctrl_vq {
            f |= 1u64 << NET_F_CTRL_VQ | 1u64 << NET_F_CTRL_RX;
        }
        if self.offloads {
            for b in [
                NET_F_CSUM,
                NET_F_GUEST_CSUM,
                NET_F_HOST_TSO4,
                NET_F_HOST_TSO6,
                NET_F_HOST_ECN,
                NET_F_GUEST_TSO4,
                NET_F_GUEST_TSO6,
                NET_F_GUEST_ECN,
            ] {
                f |= 1u64 << b;
            }
        }
        f
    }

    /// The number of virtqueues: the pairs, then the control queue if offered.
    pub fn num_queues(&self) -> usize {
        2 * usize::from(self.queue_pairs) + usize::from(self.ctrl_vq)
    }
}

/// What the driver accepted, as the data path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Header length on both rings.
    pub hdr_len: usize,
    /// Receive frames may span several chains.
    pub mrg_rxbuf: bool,
    /// Offloads allowed on transmitted frames.
    pub tx_offloads: TxOffloads,
    /// Offloads the driver takes on received frames (the work on other frames is done by the
    /// device).
    pub rx_offloads: TxOffloads,
}

impl Negotiated {
    /// Decode the acked feature bits.
    pub fn from_features(acked: u64) -> Self {
        let has = |b: u32| acked & (1u64 << b) != 0;
        let mrg_rxbuf = has(NET_F_MRG_RXBUF);
        Negotiated {
            hdr_len: if has(VIRTIO_F_VERSION_1) || mrg_rxbuf {
                HDR_LEN
            } else {
                HDR_LEN_LEGACY
            },
            mrg_rxbuf,
            // Segmentation needs checksum offload (virtio 1.2, 5.1.3.1), ECN needs some
            // segmentation: a driver that acks one without the other gets neither.
            tx_offloads: Self::offloads(
                has(NET_F_CSUM),
                has(NET_F_HOST_TSO4),
                has(NET_F_HOST_TSO6),
                has(NET_F_HOST_ECN),
            ),
            rx_offloads: Self::offloads(
                has(NET_F_GUEST_CSUM),
                has(NET_F_GUEST_TSO4),
                has(NET_F_GUEST_TSO6),
                has(NET_F_GUEST_ECN),
            ),
        }
    }

    fn offloads(csum: bool, tso4: bool, tso6: bool, ecn: bool) -> TxOffloads {
        let (tso4, tso6) = (csum && tso4, csum && tso6);
        TxOffloads {
            csum,
            tso4,
            tso6,
            ecn: ecn && (tso4 || tso6),
        }
    }
}

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated::from_features(1u64 << VIRTIO_F_VERSION_1)
    }
}

/// The virtio-net configuration space (virtio 1.2, 5.1.4), little endian: mac, status,
/// max_virtqueue_pairs, mtu.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfigSpace {
    bytes: [u8; Self::LEN],
}

impl NetConfigSpace {
    /// Bytes published.
    pub const LEN: usize = 12;

    /// The space for `cfg`.
    pub fn new(cfg: &NetBackendConfig) -> Self {
        let mut bytes = [0u8; Self::LEN];
        bytes[0..6].copy_from_slice(&cfg.mac);
        bytes[6..8].copy_from_slice(&NET_S_LINK_UP.to_le_bytes());
        bytes[8..10].copy_from_slice(&cfg.queue_pairs.to_le_bytes());
        bytes[10..12].copy_from_slice(&MTU.to_le_bytes());
        NetConfigSpace { bytes }
    }

    /// Read `size` bytes at `offset`; out-of-range reads return what lies in range (possibly
    /// nothing), as vhost-user frontends expect.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(Self::LEN);
        let end = start.saturating_add(size as usize).min(Self::LEN);
        self.bytes[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_honest() {
        let cfg = NetBackendConfig::default();
        let f = cfg.features();
        for b in [NET_F_HOST_UFO, NET_F_GUEST_UFO, NET_F_MQ] {
            assert_eq!(f & (1 << b), 0, "bit {b} must not be offered");
        }
        for b in [
            NET_F_MRG_RXBUF,
            NET_F_CTRL_VQ,
            NET_F_CTRL_RX,
            NET_F_CSUM,
            NET_F_GUEST_CSUM,
            NET_F_HOST_TSO4,
            NET_F_HOST_TSO6,
            NET_F_HOST_ECN,
            NET_F_GUEST_TSO4,
            NET_F_GUEST_TSO6,
            NET_F_GUEST_ECN,
        ] {
            assert_ne!(f & (1 << b), 0, "bit {b} must be offered");
        }
        // Every queue uses its chains in order (net_tx_chains and net_core check the used
        // rings).
        assert_ne!(f & (1 << VIRTIO_F_IN_ORDER), 0);
        let plain = NetBackendConfig {
            offloads: false,
            ..NetBackendConfig::default()
        };
        for b in [
            NET_F_CSUM,
            NET_F_GUEST_CSUM,
            NET_F_HOST_TSO4,
            NET_F_GUEST_TSO4,
        ] {
            assert_eq!(
                plain.features() & (1 << b),
                0,
                "bit {b} offered without offloads"
            );
        }
        let mq = NetBackendConfig {
            queue_pairs: 4,
            ..NetBackendConfig::default()
        };
        assert_ne!(mq.features() & (1 << NET_F_MQ), 0);
        assert_eq!(mq.num_queues(), 9, "four pairs and the control queue");
        let no_ctrl = NetBackendConfig {
            ctrl_vq: false,
            ..mq
        };
        assert_eq!(no_ctrl.num_queues(), 8);
        assert_eq!(
            no_ctrl.features() & (1 << NET_F_CTRL_VQ | 1 << NET_F_CTRL_RX),
            0
        );
    }

    #[test]
    fn negotiation_sets_header_length() {
        assert_eq!(Negotiated::from_features(0).hdr_len, HDR_LEN_LEGACY);
        assert_eq!(
            Negotiated::from_features(1 << NET_F_MRG_RXBUF).hdr_len,
            HDR_LEN
        );
        let n = Negotiated::from_features(1 << VIRTIO_F_VERSION_1);
        assert_eq!(n.hdr_len, HDR_LEN);
        assert!(!n.mrg_rxbuf);
        assert_eq!(n.tx_offloads, TxOffloads::default());
        assert_eq!(n.rx_offloads, TxOffloads::default());
    }

    #[test]
    fn offloads_follow_their_dependencies() {
        let all = NetBackendConfig::default().features();
        let n = Negotiated::from_features(all);
        assert_eq!(n.tx_offloads, TxOffloads::ALL);
        assert_eq!(n.rx_offloads, TxOffloads::ALL);
        // TSO without CSUM, ECN without TSO: ignored.
        let n = Negotiated::from_features(
            1 << NET_F_HOST_TSO4
                | 1 << NET_F_GUEST_TSO6
                | 1 << NET_F_GUEST_CSUM
                | 1 << NET_F_HOST_ECN,
        );
        assert_eq!(n.tx_offloads, TxOffloads::default());
        assert!(n.rx_offloads.csum && n.rx_offloads.tso6 && !n.rx_offloads.tso4);
        let n = Negotiated::from_features(1 << NET_F_GUEST_CSUM | 1 << NET_F_GUEST_ECN);
        assert!(!n.rx_offloads.ecn);
    }

    #[test]
    fn config_space_layout() {
        let cfg = NetBackendConfig {
            queue_pairs: 2,
            ..NetBackendConfig::default()
        };
        let s = NetConfigSpace::new(&cfg);
        let all = s.read(0, 64);
        assert_eq!(all.len(), NetConfigSpace::LEN);
        assert_eq!(&all[0..6], &cfg.mac);
        assert_eq!(all[6], 1);
        assert_eq!(all[8], 2);
        assert_eq!(u16::from_le_bytes([all[10], all[11]]), 1500);
        assert!(s.read(100, 4).is_empty());
        assert_eq!(s.read(6, 2), vec![1, 0]);
    }
}
