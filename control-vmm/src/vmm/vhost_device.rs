//! The VMM as vhost-user frontend of a virtio device (a disk or a network interface) served by
//! the driver domain: frontend-core's session, seen through what a virtio transport needs
//! ([`VirtioBackend`]).
//!
//! Set-up mirrors what the guest does on the transport's registers: at connect time the VMM
//! learns the device's features and config space; when the guest sets DRIVER_OK the VMM hands
//! the backend the memory table (the I/O window only, unless full sharing was asked for), the
//! ring addresses of every queue the guest enabled, and the kick/call eventfds that KVM already
//! has as ioeventfd/irqfd. From then on, requests and frames flow guest <-> backend without
//! this process.
//!
//! A disk's session asks for the backend's in-flight log (the guest owns the rings, so the VMM
//! cannot re-post anything itself), gets it at the first start and hands it back when the
//! device resumes on a restarted backend ([`VhostDevice::resume`]).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use frontend_core::vhost_user::{
    ConfigSpace, DeviceSpec, FrontendSession, FrontendSessionError, DEFAULT_REPLY_TIMEOUT,
};
pub use frontend_core::vhost_user::{SharedRegion, VringSetup};
use vmm_sys_util::eventfd::EventFd;

use super::memory::MemfdRegion;

/// Bytes of virtio-blk config space fetched from the backend (capacity .. num_queues).
pub const BLK_CONFIG_BYTES: usize = 36;
/// Bytes of virtio-net config space fetched from the backend (mac, status,
/// max_virtqueue_pairs, mtu).
pub const NET_CONFIG_BYTES: usize = 12;
/// virtio-blk: more than one request queue; offered when the backend serves several.
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Offset of `num_queues` (u16) in the virtio-blk config space.
const BLK_NUM_QUEUES_OFFSET: usize = 34;
/// Most request queues a disk runs (a virtio-pci function's limit).
pub const MAX_BLK_QUEUES: u16 = 16;
/// virtio-net: the control queue (passed through to the backend as virtqueue 2 when it
/// serves one) and several queue pairs (hidden; see [`VhostDevice::device_features`]).
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// virtio-net features that need the control queue (virtio 1.2, 5.1.3.1): hidden with it.
const VIRTIO_NET_CTRL_DEPENDENT: u64 = 1 << 2 // CTRL_GUEST_OFFLOADS
    | 1 << 18 // CTRL_RX
    | 1 << 19 // CTRL_VLAN
    | 1 << 20 // CTRL_RX_EXTRA
    | 1 << 21 // GUEST_ANNOUNCE
    | 1 << 23; // CTRL_MAC_ADDR
/// virtio-net: the receive and transmit queue, then the control queue.
const NET_QUEUES_WITH_CTRL: u16 = 3;
/// virtio-net: the MAC address in the config space is valid.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// Which virtio device a session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VirtioDeviceType {
    /// virtio-blk: one request queue.
    Blk,
    /// virtio-net: one receive and one transmit queue.
    Net,
}

impl VirtioDeviceType {
    /// The virtio device id (virtio 1.2, 5).
    pub fn device_id(self) -> u16 {
        match self {
            Self::Blk => 2,
            Self::Net => 1,
        }
    }

    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blk => "blk",
            Self::Net => "net",
        }
    }

    fn spec(self) -> DeviceSpec {
        let (queues, max_queues, config) = match self {
            // As many request queues as the backend serves, up to MAX_BLK_QUEUES.
            Self::Blk => (
                1,
                MAX_BLK_QUEUES,
                ConfigSpace::Required {
                    bytes: BLK_CONFIG_BYTES,
                },
            ),
            // A net backend without a config space (DPDK's vhost) still serves frames; the
            // guest then picks its own MAC.
            // One queue pair, and the control queue if the backend serves one (a third
            // queue; a backend with several pairs has its second receive queue there, and
            // then the control queue stays hidden).
            Self::Net => (
                2,
                NET_QUEUES_WITH_CTRL,
                ConfigSpace::IfOffered {
                    bytes: NET_CONFIG_BYTES,
                },
            ),
        };
        DeviceSpec {
            queues,
            max_queues,
            config,
            // A backend that stops answering fails the device instead of hanging a vCPU thread.
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            // The guest owns the rings: a restarted backend resubmits a disk's requests from
            // the log the session keeps. A network interface asks for none (as QEMU's
            // vhost-user-net): its rings restart at the used index.
            inflight: self == Self::Blk,
        }
    }
}

/// What a virtio transport (virtio-mmio, virtio-pci) needs from a device's backend: the
/// vhost-user session in the VMM, a fake in unit tests.
pub trait VirtioBackend: Send {
    /// Which device it is.
    fn device_type(&self) -> VirtioDeviceType;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Features the guest is offered.
    fn device_features(&self) -> u64;
    /// The device's config space.
    fn config(&self) -> &[u8];
    /// The guest-physical regions the backend can see.
    fn regions(&self) -> &[SharedRegion];
    /// Whether a queue is running in the backend.
    fn running(&self) -> bool;
    /// Starts the queues the guest enabled (`queues[i]` is queue i; None: not enabled) with
    /// the guest's features.
    fn start(
        &mut self,
        features: u64,
        queues: &[Option<VringSetup>],
    ) -> Result<(), FrontendSessionError>;
    /// Stops every running queue; returns the avail index queue 0 stopped at, if it ran.
    fn stop(&mut self) -> Result<Option<u32>, FrontendSessionError>;
}

/// The region a memfd-backed piece of guest memory is announced as.
pub fn shared_region(r: &MemfdRegion) -> SharedRegion {
    SharedRegion {
        gpa: r.gpa,
        len: r.len,
        fd: r.file.as_raw_fd(),
    }
}

/// A connected vhost-user backend of one virtio device, and the memory it will be shown.
#[derive(Debug)]
pub struct VhostDevice {
    kind: VirtioDeviceType,
    session: FrontendSession,
    /// The device's config space as read at connect (zeros where the backend sent less).
    config: Vec<u8>,
    /// What the next start announces (the current machine's memory).
    regions: Vec<SharedRegion>,
    /// Features kept from the guest besides those this VMM never offers.
    hidden: u64,
    /// The backend is known to serve the virtio-net control queue (the project's driver
    /// domain); other vhost-user backends (DPDK's vhost library, say) offer CTRL_VQ for a
    /// frontend that serves it itself, as QEMU does.
    backend_ctrl_vq: bool,
}

impl VhostDevice {
    /// Connects to a disk's backend (retrying while it starts, up to `timeout`) and reads the
    /// device's features and configuration. `regions` is what the backend will see.
    pub fn connect_blk(
        path: &Path,
        timeout: Duration,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, FrontendSessionError> {
        let kind = VirtioDeviceType::Blk;
        Ok(Self::wrap(
            kind,
            FrontendSession::connect_path(path, timeout, kind.spec())?,
            regions,
        ))
    }

    /// Runs the set-up of a `kind` device over an already connected socket (one the
    /// toolstack handed over).
    pub fn from_stream(
        kind: VirtioDeviceType,
        stream: UnixStream,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, FrontendSessionError> {
        Ok(Self::wrap(
            kind,
            FrontendSession::connect(stream, kind.spec())?,
            regions,
        ))
    }

    fn wrap(kind: VirtioDeviceType, session: FrontendSession, regions: Vec<SharedRegion>) -> Self {
        let bytes = match kind {
            VirtioDeviceType::Blk => BLK_CONFIG_BYTES,
            VirtioDeviceType::Net => NET_CONFIG_BYTES,
        };
        let mut config = vec![0u8; bytes];
        let raw = session.config().unwrap_or_default();
        let n = raw.len().min(bytes);
        config[..n].copy_from_slice(&raw[..n]);
        if kind == VirtioDeviceType::Blk {
            // The queues this session runs (the backend's, at most MAX_BLK_QUEUES); read only
            // with VIRTIO_BLK_F_MQ, offered when there are several.
            let queues = u16::try_from(session.num_queues()).unwrap_or(1);
            if let Some(field) = config.get_mut(BLK_NUM_QUEUES_OFFSET..BLK_NUM_QUEUES_OFFSET + 2) {
                field.copy_from_slice(&queues.to_le_bytes());
            }
        }
        Self {
            kind,
            session,
            config,
            regions,
            hidden: 0,
            backend_ctrl_vq: false,
        }
    }

    /// Passes the virtio-net control queue through to the backend when it offers one (as the
    /// third queue): only for a backend known to serve it, the project's driver domain.
    pub fn with_backend_control_queue(mut self) -> Self {
        self.backend_ctrl_vq = true;
        self
    }

    /// Keeps `features` from the guest too (e.g. `VIRTIO_RING_F_EVENT_IDX`, to measure
    /// without notification suppression).
    pub fn hide_features(&mut self, features: u64) {
        self.hidden |= features;
    }

    /// Queue `q`'s kick: KVM signals it on a notify write (ioeventfd); the backend waits on it.
    pub fn kick(&self, q: usize) -> Result<&EventFd, FrontendSessionError> {
        self.session.kick(q)
    }

    /// Queue `q`'s call: the backend signals it; KVM injects the queue's interrupt (irqfd).
    pub fn call(&self, q: usize) -> Result<&EventFd, FrontendSessionError> {
        self.session.call(q)
    }

    /// A disk's capacity in 512-byte sectors (virtio-blk config `capacity`; 0 for other
    /// devices).
    pub fn capacity_sectors(&self) -> u64 {
        match (self.kind, self.config.get(..8)) {
            (VirtioDeviceType::Blk, Some(raw)) => {
                u64::from_le_bytes(raw.try_into().unwrap_or_default())
            }
            _ => 0,
        }
    }

    /// A network interface's MAC address, if the backend gave one.
    pub fn mac(&self) -> Option<[u8; 6]> {
        let offered = self.session.device_features() & VIRTIO_NET_F_MAC != 0;
        let raw = self.config.get(..6)?;
        (self.kind == VirtioDeviceType::Net && offered).then(|| raw.try_into().unwrap_or_default())
    }

    /// Resumes the running queues on `stream`, a connection to a restarted backend
    /// ([`FrontendSession::resume`]): the in-flight log handed back, each ring at the used
    /// index `used_index` reads from the guest's used ring, kicked. A disk's running rings
    /// need the log (requests completed out of order would otherwise be served twice); a
    /// network interface resumes without one (frames in flight resent or lost). Returns
    /// whether the log was handed back.
    pub fn resume(
        &mut self,
        stream: UnixStream,
        used_index: &mut dyn FnMut(usize, VringSetup) -> Result<u16, String>,
    ) -> Result<bool, FrontendSessionError> {
        if self.kind == VirtioDeviceType::Blk
            && self.session.any_running()
            && !self.session.holds_inflight_log()
        {
            return Err(FrontendSessionError::Unsupported(
                "in-flight tracking (INFLIGHT_SHMFD), which a running disk needs to resume",
            ));
        }
        self.session.resume(stream, self.kind.spec(), used_index)
    }

    /// A duplicate of the connection's socket (it hangs up when the backend goes away).
    pub fn peer(&self) -> Result<std::os::fd::OwnedFd, FrontendSessionError> {
        self.session.peer()
    }

    /// Whether the session holds the backend's in-flight log.
    pub fn holds_inflight_log(&self) -> bool {
        self.session.holds_inflight_log()
    }

    /// Replaces the regions the backend will see at the next start (a new machine's memory).
    /// Refused while a queue runs.
    pub fn set_regions(&mut self, regions: Vec<SharedRegion>) -> bool {
        if self.session.any_running() {
            return false;
        }
        self.regions = regions;
        true
    }
}

impl VirtioBackend for VhostDevice {
    fn device_type(&self) -> VirtioDeviceType {
        self.kind
    }

    fn num_queues(&self) -> usize {
        self.session.num_queues()
    }

    /// Features the guest is offered: the backend's (the vhost-user protocol bit removed);
    /// a disk's several request queues when the backend serves several (else MQ hidden); one
    /// queue pair per interface (MQ hidden; a backend with more pairs still serves the
    /// first). The control queue is offered when the backend is the driver domain
    /// ([`VhostDevice::with_backend_control_queue`]), offers CTRL_VQ and serves a third queue:
    /// with MQ not negotiated that is the control queue (virtio 1.2, 5.1.2), served by the
    /// driver domain's `net::ctrl`, so this VMM stays off that path too. Otherwise the
    /// control queue and every feature that needs it are hidden.
    fn device_features(&self) -> u64 {
        let offered = self.session.device_features();
        let hidden = match self.kind {
            VirtioDeviceType::Blk if self.session.num_queues() > 1 => 0,
            VirtioDeviceType::Blk => VIRTIO_BLK_F_MQ,
            VirtioDeviceType::Net
                if self.backend_ctrl_vq
                    && offered & VIRTIO_NET_F_CTRL_VQ != 0
                    && self.session.num_queues() == usize::from(NET_QUEUES_WITH_CTRL) =>
            {
                VIRTIO_NET_F_MQ
            }
            VirtioDeviceType::Net => {
                VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_CTRL_DEPENDENT
            }
        };
        offered & !hidden & !self.hidden
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn regions(&self) -> &[SharedRegion] {
        &self.regions
    }

    fn running(&self) -> bool {
        self.session.any_running()
    }

    /// Acknowledges the guest's `features`, gets the in-flight log (if the backend keeps
    /// one; sized for the largest ring), sends the memory table and starts each enabled queue.
    fn start(
        &mut self,
        features: u64,
        queues: &[Option<VringSetup>],
    ) -> Result<(), FrontendSessionError> {
        self.session.set_features(features)?;
        let largest = queues.iter().flatten().map(|r| r.size).max().unwrap_or(0);
        if largest > 0 {
            self.session.prepare_inflight(largest)?;
        }
        self.session.set_mem_table(&self.regions)?;
        for (q, ring) in queues.iter().enumerate() {
            if let Some(ring) = ring {
                self.session.start_vring(q, *ring)?;
            }
        }
        Ok(())
    }

    /// Stops every queue (GET_VRING_BASE): after this returns, the backend no longer touches
    /// guest memory.
    fn stop(&mut self) -> Result<Option<u32>, FrontendSessionError> {
        let mut first = None;
        let mut failed = None;
        for q in 0..self.session.num_queues() {
            match self.session.stop_vring(q) {
                Ok(base) if q == 0 => first = base,
                Ok(_) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(first),
        }
    }
}
