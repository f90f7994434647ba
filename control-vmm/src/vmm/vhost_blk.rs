//! The VMM as vhost-user frontend of a virtio-blk backend in the driver domain.
//!
//! Set-up mirrors what the guest does on the virtio-mmio registers: at connect time the VMM
//! learns the device's features and config space; when the guest sets DRIVER_OK the VMM hands
//! the backend the memory table (the I/O window only, unless full sharing was asked for), the
//! ring addresses, and the kick/call eventfds that KVM already has as ioeventfd/irqfd. From
//! then on, requests flow guest <-> backend without this process. In the memory table each
//! region's "user address" is its GPA, so ring addresses are passed as the guest wrote them.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::memory::MemfdRegion;

/// Bytes of virtio-blk config space fetched from the backend (capacity .. num_queues).
pub const BLK_CONFIG_BYTES: usize = 36;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// How long the backend may take to answer one vhost-user request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the virtio-mmio transport needs from a block backend (a vhost-user session in the
/// VMM; a fake in unit tests).
pub trait BlkBackend: Send {
    /// Features the guest is offered.
    fn device_features(&self) -> u64;
    /// The device's config space.
    fn config(&self) -> &[u8];
    /// The guest-physical regions the backend can see.
    fn regions(&self) -> &[SharedRegion];
    /// Whether a queue is running in the backend.
    fn running(&self) -> bool;
    /// Starts queue 0 with the guest's features and ring layout.
    fn start(&mut self, features: u64, q: QueueSetup) -> Result<(), VhostBlkError>;
    /// Stops queue 0; returns the avail index the backend stopped at, if it ran.
    fn stop(&mut self) -> Result<Option<u32>, VhostBlkError>;
}

/// Errors of the vhost-user session.
#[derive(Debug, Error)]
pub enum VhostBlkError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("vhost-user {op}: {source}")]
    Protocol {
        op: &'static str,
        source: vhost::Error,
    },
    #[error("backend lacks {0}")]
    Unsupported(&'static str),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("configuring the vhost-user socket: {0}")]
    Socket(std::io::Error),
}

fn vu(op: &'static str) -> impl FnOnce(vhost::Error) -> VhostBlkError {
    move |source| VhostBlkError::Protocol { op, source }
}

/// One queue as the guest configured it (GPAs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A shared memory region announced to the backend.
#[derive(Debug, Clone, Copy)]
pub struct SharedRegion {
    pub gpa: u64,
    pub len: u64,
    pub fd: i32,
}

impl SharedRegion {
    pub fn of(r: &MemfdRegion) -> Self {
        Self {
            gpa: r.gpa,
            len: r.len,
            fd: r.file.as_raw_fd(),
        }
    }
}

/// A connected vhost-user-blk backend with one queue.
pub struct VhostBlk {
    frontend: Frontend,
    device_features: u64,
    config: [u8; BLK_CONFIG_BYTES],
    /// Kick: KVM signals it on a QueueNotify write (ioeventfd); the backend waits on it.
    pub kick: EventFd,
    /// Call: the backend signals it; KVM injects the device interrupt (irqfd).
    pub call: EventFd,
    regions: Vec<SharedRegion>,
    running: bool,
}

impl std::fmt::Debug for VhostBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostBlk")
            .field(
                "device_features",
                &format_args!("{:#x}", self.device_features),
            )
            .field("regions", &self.regions)
            .field("running", &self.running)
            .finish()
    }
}

impl VhostBlk {
    /// Connects (retrying while the backend starts, up to `timeout`) and reads the device's
    /// features and configuration. `regions` is what the backend will be allowed to see.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, VhostBlkError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(VhostBlkError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        Self::from_stream(stream, regions)
    }

    /// Runs the set-up over an already connected socket (e.g. one the toolstack handed over).
    pub fn from_stream(
        stream: UnixStream,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, VhostBlkError> {
        // A backend that stops answering fails the device instead of hanging a vCPU thread.
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(VhostBlkError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, 1);
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & proto_bit == 0 {
            return Err(VhostBlkError::Unsupported("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostBlkError::Unsupported("VIRTIO_F_VERSION_1"));
        }
        let proto = frontend
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostBlkError::Unsupported("the CONFIG protocol feature"));
        }
        // REPLY_ACK, where offered, makes set-up failures (a refused memory table) synchronous
        // errors instead of a silently dead queue.
        let want =
            VhostUserProtocolFeatures::CONFIG | (proto & VhostUserProtocolFeatures::REPLY_ACK);
        frontend
            .set_protocol_features(want)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        let (_, raw) = frontend
            .get_config(
                0,
                BLK_CONFIG_BYTES as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; BLK_CONFIG_BYTES],
            )
            .map_err(vu("GET_CONFIG"))?;
        let mut config = [0u8; BLK_CONFIG_BYTES];
        let n = raw.len().min(BLK_CONFIG_BYTES);
        config[..n].copy_from_slice(&raw[..n]);
        let efd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        Ok(Self {
            frontend,
            device_features: offered & !proto_bit,
            config,
            kick: efd().map_err(VhostBlkError::EventFd)?,
            call: efd().map_err(VhostBlkError::EventFd)?,
            regions,
            running: false,
        })
    }
}

impl VhostBlk {
    /// Replaces the regions the backend will see at the next start (a new machine's memory).
    /// Refused while a queue runs.
    pub fn set_regions(&mut self, regions: Vec<SharedRegion>) -> bool {
        if self.running {
            return false;
        }
        self.regions = regions;
        true
    }
}

impl BlkBackend for VhostBlk {
    /// Features the guest is offered (the vhost-user protocol bit removed).
    fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The device's config space as read at connect time.
    fn config(&self) -> &[u8] {
        &self.config
    }

    /// Whether a queue is running in the backend.
    fn running(&self) -> bool {
        self.running
    }

    /// The regions the backend sees.
    fn regions(&self) -> &[SharedRegion] {
        &self.regions
    }

    /// Starts queue 0 in the backend with the guest's `features` and ring layout.
    fn start(&mut self, features: u64, q: QueueSetup) -> Result<(), VhostBlkError> {
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features | proto_bit)
            .map_err(vu("SET_FEATURES"))?;
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.gpa,
                mmap_offset: 0,
                mmap_handle: r.fd,
            })
            .collect();
        self.frontend
            .set_mem_table(&table)
            .map_err(vu("SET_MEM_TABLE"))?;
        self.frontend
            .set_vring_num(0, q.size)
            .map_err(vu("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_base(0, 0)
            .map_err(vu("SET_VRING_BASE"))?;
        let ring = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: q.desc,
            used_ring_addr: q.used,
            avail_ring_addr: q.avail,
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(0, &ring)
            .map_err(vu("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_call(0, &self.call)
            .map_err(vu("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_kick(0, &self.kick)
            .map_err(vu("SET_VRING_KICK"))?;
        self.frontend
            .set_vring_enable(0, true)
            .map_err(vu("SET_VRING_ENABLE"))?;
        self.running = true;
        Ok(())
    }

    /// Stops the queue and fetches its state back (GET_VRING_BASE): after this returns, the
    /// backend no longer touches guest memory. Returns the avail index it stopped at.
    fn stop(&mut self) -> Result<Option<u32>, VhostBlkError> {
        if !self.running {
            return Ok(None);
        }
        self.running = false;
        let base = self
            .frontend
            .get_vring_base(0)
            .map_err(vu("GET_VRING_BASE"))?;
        Ok(Some(base))
    }
}
