//! This project's vhost-user request handler: the backend side of one session, on the `vhost`
//! crate's protocol types ([`VhostUserBackendReqHandlerMut`]; the crate's
//! `BackendReqHandler` reads, checks and answers the messages) with virtio-queue's queues.
//!
//! Why not vhost-user-backend's: its handler (0.24) is private and refuses GET_INFLIGHT_FD
//! and SET_INFLIGHT_FD, and in-flight tracking that survives the backend needs both. This one
//! serves them for a device that keeps an in-flight log
//! ([`crate::virtio_core::InflightTracking`]): GET hands the
//! frontend a fresh log (a memfd in the libvhost-user layout); SET takes over the log the
//! frontend hands back after a restart; when such a ring starts, the device resumes at the
//! ring's used index plus what is in flight, resubmits those in counter order, and the ring is
//! kicked once.
//!
//! Everything else follows the vhost-user specification as vhost-user-backend did: rings
//! start on SET_VRING_KICK and stop on GET_VRING_BASE; with PROTOCOL_FEATURES they wait for
//! SET_VRING_ENABLE; ring addresses are translated from the frontend's virtual addresses
//! through the memory table, and every table is checked ([`VhostUserDevice::update_memory`])
//! before a queue reads it. An error ends the session (that device), never the backend.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::info;
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use super::device::VhostUserDevice;
use super::vring::{Vring, VringError};
use super::worker::{WorkerError, Workers};
use crate::virtio_core::{BackendDevice, GuestMem, InflightSetupError, TransportQueue};

/// Memory slots offered (the kernel's vhost limit, as vhost-user-backend offered).
const MAX_MEM_SLOTS: u64 = 509;

/// Why a request is refused.
#[derive(Debug, Error)]
pub enum HandlerError {
    /// The vring index is past the device's queues.
    #[error("no vring {0}")]
    NoVring(u32),
    /// A vring set-up value was refused.
    #[error("vring {0}: {1}")]
    Vring(u32, #[source] VringError),
    /// A ring address is in no region of the memory table.
    #[error("address {0:#x} is in no region of the memory table")]
    Unmapped(u64),
    /// The memory table could not be mapped or is refused.
    #[error("memory table: {0}")]
    Memory(String),
    /// The device keeps no in-flight log.
    #[error("this device keeps no in-flight log")]
    NoInflight,
    /// The in-flight log could not be handed out or taken over.
    #[error("in-flight log: {0}")]
    Inflight(#[source] InflightSetupError),
    /// Reading the ring failed.
    #[error("vring {0}: {1}")]
    Ring(u32, virtio_queue::Error),
    /// Features not offered were acknowledged.
    #[error("features {0:#x} were not offered")]
    Features(u64),
    /// Signalling a ring's new call eventfd failed.
    #[error("vring {0}: signalling the call eventfd: {1}")]
    Call(u8, #[source] io::Error),
    /// The workers could not be started or steered.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

impl From<HandlerError> for VuError {
    fn from(e: HandlerError) -> Self {
        VuError::ReqHandlerError(io::Error::other(e))
    }
}

/// Where the frontend's virtual addresses of one region land in guest memory.
#[derive(Debug)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The backend side of one vhost-user session.
pub struct VhostUserReqHandler<D: BackendDevice> {
    device: Arc<VhostUserDevice<D>>,
    vrings: Vec<Arc<Vring>>,
    workers: Workers,
    mem: GuestMem,
    mappings: Vec<AddrMapping>,
    owned: bool,
    acked_features: u64,
    /// SET_INFLIGHT_FD took over a log: starting rings resume from it.
    inflight_adopted: bool,
}

impl<D: BackendDevice> VhostUserReqHandler<D> {
    /// A handler for `device`, its vrings and its running (idle) workers.
    pub fn new(device: Arc<VhostUserDevice<D>>) -> Result<Self, HandlerError> {
        let max = device.device().max_queue_size();
        let vrings = (0..device.device().num_queues())
            .map(|i| {
                Vring::new(max)
                    .map(Arc::new)
                    .map_err(|e| HandlerError::Vring(i as u32, VringError::Queue(e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let workers = Workers::start(&device, &vrings)?;
        Ok(VhostUserReqHandler {
            device,
            vrings,
            workers,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            inflight_adopted: false,
        })
    }

    /// The session's vrings, by queue index.
    pub fn vrings(&self) -> &[Arc<Vring>] {
        &self.vrings
    }

    /// Stops the workers (the session ended).
    pub fn stop_workers(&mut self) {
        self.workers.stop();
    }

    fn vring(&self, index: u32) -> Result<&Arc<Vring>, HandlerError> {
        self.vrings
            .get(index as usize)
            .ok_or(HandlerError::NoVring(index))
    }

    fn gpa(&self, vmm_va: u64) -> Result<u64, HandlerError> {
        self.mappings
            .iter()
            .find(|m| vmm_va >= m.vmm_addr && vmm_va - m.vmm_addr < m.size)
            .map(|m| vmm_va - m.vmm_addr + m.gpa_base)
            .ok_or(HandlerError::Unmapped(vmm_va))
    }

    /// Watches the ring's kick while it runs, and stops watching it otherwise.
    fn update_registration(&self, index: usize) -> Result<(), HandlerError> {
        let Some(vring) = self.vrings.get(index) else {
            return Ok(());
        };
        let Some(worker) = self.workers.for_queue(&self.device, index) else {
            return Ok(());
        };
        let s = vring.lock();
        if let Some(fd) = s.kick_fd() {
            if s.running() {
                worker.watch_kick(fd, index)?;
            } else {
                worker.unwatch_kick(fd);
            }
        }
        Ok(())
    }

    /// Installs `mem` as the memory table once the device's check passed (a refused table
    /// is never installed, so no queue pass can read it).
    fn install_memory(&mut self, mem: GuestMemoryMmap) -> Result<(), HandlerError> {
        self.device
            .precheck_memory(&mem)
            .map_err(|e| HandlerError::Memory(e.to_string()))?;
        self.mem
            .lock()
            .map_err(|e| HandlerError::Memory(e.to_string()))?
            .replace(mem);
        self.device
            .update_memory(self.mem.clone())
            .map_err(|e| HandlerError::Memory(e.to_string()))
    }

    /// The ring was just started: with a log taken over, resume from it and kick the ring.
    fn resume(&self, index: u32) -> Result<(), HandlerError> {
        let Some(inflight) = self
            .device
            .device()
            .inflight()
            .filter(|_| self.inflight_adopted)
        else {
            return Ok(());
        };
        let vring = self.vring(index)?;
        if !self.device.memory().usable() {
            return Ok(());
        }
        let mem = self.mem.memory();
        let n = inflight
            .resume_queue(index as usize, vring.lock().queue_mut(), &mem)
            .map_err(HandlerError::Inflight)?;
        log::debug!(
            "{} queue {index}: resumed, {n} request(s) to resubmit",
            self.device.device().name()
        );
        // Kicked even with nothing to resubmit: requests the driver added while the backend
        // was gone were announced to nobody. And the driver is signalled once: the previous
        // backend may have died between publishing used elements and signalling them
        // (EVENT_IDX then suppresses every later interrupt, and the guest waits forever).
        vring
            .kick()
            .map_err(|e| HandlerError::Inflight(Box::new(e)))?;
        vring
            .signal_driver()
            .map_err(|e| HandlerError::Call(index as u8, e))?;
        Ok(())
    }
}

impl<D: BackendDevice> VhostUserBackendReqHandlerMut for VhostUserReqHandler<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        self.device.mark_greeted();
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owned = false;
        self.acked_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for (index, vring) in self.vrings.iter().enumerate() {
            vring.set_enabled(false);
            self.update_registration(index)?;
            self.device.device().reset_queue(index);
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.device.features();
        if features & !offered != 0 {
            return Err(HandlerError::Features(features & !offered).into());
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES, rings are enabled at once (vhost-user "Ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for (index, vring) in self.vrings.iter().enumerate() {
                vring.set_enabled(true);
                self.update_registration(index)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_event_idx(event_idx);
        }
        self.device.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not served"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let mapped = GuestRegionMmap::new(
                region.mmap_region(file)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| HandlerError::Memory("a region does not fit".into()))?;
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(mapped);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| HandlerError::Memory(e.to_string()))?;
        self.mappings = mappings;
        self.install_memory(mem)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.vring(index)?
            .set_size(num)
            .map_err(|e| HandlerError::Vring(index, e))?;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (desc, avail, used) = (self.gpa(descriptor)?, self.gpa(available)?, self.gpa(used)?);
        let vring = self.vring(index)?;
        vring
            .set_addresses(desc, avail, used)
            .map_err(|e| HandlerError::Vring(index, e))?;
        // The used index goes on from the ring's (SET_VRING_BASE restores only the avail
        // index), read only from a table that passed its check.
        if self.device.memory().usable() {
            let mut s = vring.lock();
            let idx = s
                .queue()
                .used_idx(&*self.mem.memory(), Ordering::Acquire)
                .map_err(|e| HandlerError::Ring(index, e))?;
            s.queue_mut().set_next_used(idx.0);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        log::debug!("vring {index}: base {base}");
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        self.vring(index)?.set_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        log::debug!("vring {index}: stop");
        let vring = self.vring(index)?.clone();
        vring.set_ready(false);
        self.update_registration(index as usize)?;
        self.device.device().reset_queue(index as usize);
        let next_avail = vring.lock().queue().next_avail();
        drop(vring.set_kick(None));
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        log::debug!("vring {index}: kick {:?}", fd.is_some());
        let vring = self.vring(u32::from(index))?.clone();
        let worker = self.workers.for_queue(&self.device, usize::from(index));
        if let Some(old) = vring.set_kick(fd) {
            if let Some(w) = worker {
                w.unwatch_kick(std::os::fd::AsRawFd::as_raw_fd(&old));
            }
        }
        let start = {
            let s = vring.lock();
            s.kick_fd().is_some() && !s.queue().ready()
        };
        if start {
            vring.set_ready(true);
            self.resume(u32::from(index))?;
        }
        self.update_registration(usize::from(index))?;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        log::debug!("vring {index}: call {:?}", fd.is_some());
        self.vring(u32::from(index))?.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, _features: u64) -> VuResult<()> {
        // The vhost crate's BackendReqHandler keeps the acknowledged set and checks it for
        // every request that needs a protocol feature.
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        log::debug!("vring {index}: enable {enable}");
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_registration(index as usize)?;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        Ok(self.device.device().read_config(offset, size))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "the configuration space is read-only",
        ))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let inflight = self
            .device
            .device()
            .inflight()
            .ok_or(HandlerError::NoInflight)?;
        let (file, len) = inflight
            .new_log(msg.num_queues, msg.queue_size)
            .map_err(HandlerError::Inflight)?;
        let reply = VhostUserInflight {
            mmap_size: len,
            mmap_offset: 0,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let inflight = self
            .device
            .device()
            .inflight()
            .ok_or(HandlerError::NoInflight)?;
        inflight
            .adopt_log(
                file,
                (msg.mmap_offset, msg.mmap_size),
                msg.num_queues,
                msg.queue_size,
            )
            .map_err(HandlerError::Inflight)?;
        info!(
            "{}: in-flight log taken over ({} queue(s) of {})",
            self.device.device().name(),
            msg.num_queues,
            msg.queue_size
        );
        self.inflight_adopted = true;
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not served"));
        }
        let mapped = GuestRegionMmap::new(
            region.mmap_region(fd)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or_else(|| HandlerError::Memory("the region does not fit".into()))?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(mapped))
            .map_err(|e| HandlerError::Memory(e.to_string()))?;
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        self.install_memory(mem)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| HandlerError::Memory(e.to_string()))?;
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        self.install_memory(mem)?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("no dirty-page logging"))
    }
}
