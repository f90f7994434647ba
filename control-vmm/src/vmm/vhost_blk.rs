//! The VMM as vhost-user frontend of a virtio-blk backend in the driver domain: the
//! frontend-core session, seen through what a virtio transport needs ([`BlkBackend`]).
//!
//! Set-up mirrors what the guest does on the transport's registers: at connect time the VMM
//! learns the device's features and config space; when the guest sets DRIVER_OK the VMM hands
//! the backend the memory table (the I/O window only, unless full sharing was asked for), the
//! ring addresses, and the kick/call eventfds that KVM already has as ioeventfd/irqfd. From
//! then on, requests flow guest <-> backend without this process.

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
/// The one request queue a VMM block device runs.
const QUEUE: usize = 0;

/// What a virtio transport (virtio-mmio today) needs from a block device's backend: the
/// vhost-user session in the VMM, a fake in unit tests.
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
    fn start(&mut self, features: u64, q: VringSetup) -> Result<(), FrontendSessionError>;
    /// Stops queue 0; returns the avail index the backend stopped at, if it ran.
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

/// A connected vhost-user-blk backend with one queue, and the memory it will be shown.
#[derive(Debug)]
pub struct VhostBlk {
    session: FrontendSession,
    /// The device's config space as read at connect (zeros if the backend sent less).
    config: [u8; BLK_CONFIG_BYTES],
    /// What the next start announces (the current machine's memory).
    regions: Vec<SharedRegion>,
}

fn spec() -> DeviceSpec {
    DeviceSpec {
        queues: 1,
        config: ConfigSpace::Required {
            bytes: BLK_CONFIG_BYTES,
        },
        // A backend that stops answering fails the device instead of hanging a vCPU thread.
        reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
    }
}

impl VhostBlk {
    /// Connects (retrying while the backend starts, up to `timeout`) and reads the device's
    /// features and configuration. `regions` is what the backend will be allowed to see.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, FrontendSessionError> {
        Ok(Self::wrap(
            FrontendSession::connect_path(path, timeout, spec())?,
            regions,
        ))
    }

    /// Runs the set-up over an already connected socket (e.g. one the toolstack handed over).
    pub fn from_stream(
        stream: UnixStream,
        regions: Vec<SharedRegion>,
    ) -> Result<Self, FrontendSessionError> {
        Ok(Self::wrap(
            FrontendSession::connect(stream, spec())?,
            regions,
        ))
    }

    fn wrap(session: FrontendSession, regions: Vec<SharedRegion>) -> Self {
        let mut config = [0u8; BLK_CONFIG_BYTES];
        let raw = session.config().unwrap_or_default();
        let n = raw.len().min(BLK_CONFIG_BYTES);
        config[..n].copy_from_slice(&raw[..n]);
        Self {
            session,
            config,
            regions,
        }
    }

    /// The disk's capacity in 512-byte sectors (virtio-blk config `capacity`).
    pub fn capacity_sectors(&self) -> u64 {
        let mut capacity = [0u8; 8];
        capacity.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(capacity)
    }

    /// Kick: KVM signals it on a QueueNotify write (ioeventfd); the backend waits on it.
    pub fn kick(&self) -> Result<&EventFd, FrontendSessionError> {
        self.session.kick(QUEUE)
    }

    /// Call: the backend signals it; KVM injects the device interrupt (irqfd).
    pub fn call(&self) -> Result<&EventFd, FrontendSessionError> {
        self.session.call(QUEUE)
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

impl BlkBackend for VhostBlk {
    /// Features the guest is offered (the vhost-user protocol bit removed).
    fn device_features(&self) -> u64 {
        self.session.device_features()
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn regions(&self) -> &[SharedRegion] {
        &self.regions
    }

    fn running(&self) -> bool {
        self.session.running(QUEUE)
    }

    /// Acknowledges the guest's `features`, sends the memory table and starts queue 0.
    fn start(&mut self, features: u64, q: VringSetup) -> Result<(), FrontendSessionError> {
        self.session.set_features(features)?;
        self.session.set_mem_table(&self.regions)?;
        self.session.start_vring(QUEUE, q)
    }

    /// Stops the queue (GET_VRING_BASE): after this returns, the backend no longer touches
    /// guest memory.
    fn stop(&mut self) -> Result<Option<u32>, FrontendSessionError> {
        self.session.stop_vring(QUEUE)
    }
}
