//! One channel's half of the relay in dom0: each message of the frontend becomes a VHOST
//! frame, its fds turned into references to what this side set up for them (docs/protocol.md,
//! "The driver-VM tunnel"): memory regions mapped into BAR2 (and `mmap_offset` rewritten),
//! call eventfds bound to doorbells, kick eventfds kept for the driver VM to poll for, error
//! eventfds dropped, the in-flight log mapped into BAR2 too (a frontend's own on
//! SET_INFLIGHT_FD; on the reply to GET_INFLIGHT_FD a memfd of this side's, see
//! [`ChannelSession::inflight_reply`]). Anything else with an fd is refused. What a channel set
//! up is undone when it closes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Mutex;

use ipc::tunnel::vhost_msg::{
    encode_message, frontend_fd_roles, inflight_body, mem_table_regions, rewrite_inflight,
    rewrite_mmap_offsets, FdRole, MsgHeader, VhostMsgError, HEADER_LEN, VRING_INDEX_MASK,
};
use ipc::tunnel::{Frame, Ref, RefKind};
use vhost::vhost_user::message::{FrontendReq, VhostUserInflight};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::devices::cross_vm::shm::MappedRegion;
use crate::vmm::devices::cross_vm::{doorbell_index, CrossVmError, CrossVmState};

use super::bar2_space::Bar2Space;

/// Why a message closes its channel.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("malformed message: {0}")]
    Message(#[from] VhostMsgError),
    #[error("{0:?} carries an fd this relay cannot carry to the driver VM")]
    Unrelayable(FrontendReq),
    #[error("a reply from the frontend")]
    Reply,
    #[error("BAR2 is full ({0} bytes asked)")]
    Bar2Full(u64),
    #[error("cross-VM device: {0}")]
    Device(#[from] CrossVmError),
    #[error("an in-flight log of {0} bytes (at most {MAX_INFLIGHT_BYTES})")]
    InflightSize(u64),
    #[error("the reply to GET_INFLIGHT_FD came with {0} reference(s), not one NONE")]
    InflightReply(usize),
    #[error("creating the in-flight log: {0}")]
    InflightMemfd(#[from] crate::vmm::memory::MemoryError),
}

/// The largest in-flight log the relay maps (a log for 64 queues of 1024 entries is about
/// 1 MiB).
pub const MAX_INFLIGHT_BYTES: u64 = 16 << 20;
/// Page size: what BAR2 mappings are made of.
const PAGE: u64 = 4096;

/// What a channel holds in dom0 while it is open.
#[derive(Debug)]
pub struct ChannelSession {
    channel: u16,
    /// BAR2 offsets of the current memory table's regions.
    regions: Vec<u64>,
    /// Doorbells bound to this channel's call eventfds.
    doorbells: BTreeSet<u32>,
    /// Kick eventfds by queue: kept open (their ioeventfds in the guest's VM stay valid);
    /// nobody in dom0 reads them.
    kicks: BTreeMap<u32, OwnedFd>,
    /// BAR2 offset of the in-flight log, once mapped.
    inflight: Option<u64>,
}

impl ChannelSession {
    pub fn new(channel: u16) -> Self {
        Self {
            channel,
            regions: Vec::new(),
            doorbells: BTreeSet::new(),
            kicks: BTreeMap::new(),
            inflight: None,
        }
    }

    /// The frame that carries `msg` (header + body) and its `fds` to the driver VM, after
    /// setting up what the fds stand for.
    pub fn translate(
        &mut self,
        device: &CrossVmState,
        space: &Mutex<Bar2Space>,
        mut msg: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> Result<Frame, SessionError> {
        let roles = frontend_fd_roles(&msg, fds.len())?;
        let header = MsgHeader::parse(&msg)?;
        let request = header.frontend_request()?;
        if header.is_reply() {
            return Err(SessionError::Reply);
        }
        let mut refs = Vec::with_capacity(fds.len());
        if request == FrontendReq::SET_MEM_TABLE {
            let offsets = self.map_table(device, space, &msg, fds)?;
            rewrite_mmap_offsets(&mut msg, &offsets)?;
            refs.extend(offsets.into_iter().map(Ref::memory));
        } else if request == FrontendReq::SET_INFLIGHT_FD {
            // A frontend hands back the log it kept (a restarted driver VM, or a reconnect).
            let mut shape = inflight_body(request, &msg[HEADER_LEN..])?;
            let fd = fds.into_iter().next().ok_or(VhostMsgError::FdCount {
                request,
                expected: 1,
                got: 0,
            })?;
            let offset = self.map_inflight(device, space, File::from(fd), &shape)?;
            shape.mmap_offset = offset;
            rewrite_inflight(&mut msg, &shape)?;
            refs.push(Ref::memory(offset));
        } else {
            for (role, fd) in roles.into_iter().zip(fds) {
                refs.push(self.vring_fd(device, request, role, fd)?);
            }
            if refs.is_empty() && request == FrontendReq::SET_VRING_CALL {
                // No fd: the frontend polls; the doorbell rings nothing any more.
                let queue = vring_queue(&msg);
                if let Ok(n) = doorbell_index(self.channel, queue) {
                    device.unbind_doorbell(n);
                    self.doorbells.remove(&n);
                }
            }
        }
        Ok(Frame::vhost(self.channel, refs, msg))
    }

    /// Maps each region of a SET_MEM_TABLE into BAR2; returns their offsets. The previous
    /// table's regions go once the new one is mapped; on failure, what this table mapped
    /// goes and the previous table stays.
    fn map_table(
        &mut self,
        device: &CrossVmState,
        space: &Mutex<Bar2Space>,
        msg: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<u64>, SessionError> {
        let regions = mem_table_regions(&msg[HEADER_LEN..])?;
        let mut offsets = Vec::with_capacity(regions.len());
        let mut result = Ok(());
        for (region, fd) in regions.iter().zip(fds) {
            let len = region.memory_size;
            let Some(offset) = lock(space).allocate(len) else {
                result = Err(SessionError::Bar2Full(len));
                break;
            };
            let mapped = MappedRegion::map(File::from(fd), region.mmap_offset, len)
                .and_then(|m| device.map_region(offset, m));
            if let Err(e) = mapped {
                lock(space).free(offset);
                result = Err(e.into());
                break;
            }
            offsets.push(offset);
        }
        if let Err(e) = result {
            release_regions(device, space, &offsets);
            return Err(e);
        }
        let old = std::mem::replace(&mut self.regions, offsets.clone());
        release_regions(device, space, &old);
        Ok(offsets)
    }

    /// The driver VM's reply to GET_INFLIGHT_FD (`msg`, header + body; `refs` must be one NONE:
    /// the backend's own log cannot cross). Its log would live in the driver VM and die with
    /// it, so this side makes the log instead: a zeroed memfd of the size the backend asked
    /// for (rounded up to whole pages), sealed against shrinking and growing, mapped into
    /// BAR2. Returns that memfd for the frontend (the reply's `mmap_offset` 0) and the
    /// SET_INFLIGHT_FD frame that makes the backend adopt the log at its BAR2 offset (a zeroed
    /// log has nothing in flight; the backend writes its header, as libvhost-user does).
    pub fn inflight_reply(
        &mut self,
        device: &CrossVmState,
        space: &Mutex<Bar2Space>,
        msg: &mut [u8],
        refs: &[Ref],
    ) -> Result<(File, Frame), SessionError> {
        if refs.len() != 1 || refs[0].kind != RefKind::None {
            return Err(SessionError::InflightReply(refs.len()));
        }
        let request = FrontendReq::GET_INFLIGHT_FD;
        let mut shape = inflight_body(request, &msg[HEADER_LEN..])?;
        let len = page_len(shape.mmap_size)?;
        let file = crate::vmm::memory::memfd("splitvmm-blk-inflight", len, true)?;
        shape.mmap_size = len;
        shape.mmap_offset = 0;
        let offset = self.map_inflight(device, space, file.try_clone().map_err(io_err)?, &shape)?;
        rewrite_inflight(msg, &shape)?;
        let adopt = VhostUserInflight {
            mmap_offset: offset,
            ..shape
        };
        let set = encode_message(FrontendReq::SET_INFLIGHT_FD.into(), 0, adopt.as_slice());
        Ok((
            file,
            Frame::vhost(self.channel, vec![Ref::memory(offset)], set),
        ))
    }

    /// Maps the in-flight log `file` (`shape.mmap_size` bytes from `shape.mmap_offset`) into
    /// BAR2 in place of the channel's previous log; returns its offset.
    fn map_inflight(
        &mut self,
        device: &CrossVmState,
        space: &Mutex<Bar2Space>,
        file: File,
        shape: &VhostUserInflight,
    ) -> Result<u64, SessionError> {
        let len = page_len(shape.mmap_size)?;
        let offset = lock(space)
            .allocate(len)
            .ok_or(SessionError::Bar2Full(len))?;
        let mapped = MappedRegion::map(file, shape.mmap_offset, len)
            .and_then(|m| device.map_region(offset, m));
        if let Err(e) = mapped {
            lock(space).free(offset);
            return Err(e.into());
        }
        if let Some(old) = self.inflight.replace(offset) {
            release_regions(device, space, &[old]);
        }
        Ok(offset)
    }

    /// The reference of a vring fd: a call bound to its doorbell, a kick kept, an error fd
    /// dropped.
    fn vring_fd(
        &mut self,
        device: &CrossVmState,
        request: FrontendReq,
        role: FdRole,
        fd: OwnedFd,
    ) -> Result<Ref, SessionError> {
        match role {
            FdRole::Call { queue } => {
                let n = doorbell_index(self.channel, queue)?;
                // SAFETY: `fd` is ours (received with the message) and given up here; a
                // descriptor that is no eventfd fails KVM_IOEVENTFD and closes the channel.
                let call = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
                device.bind_doorbell(n, call)?;
                self.doorbells.insert(n);
                Ok(Ref::doorbell(n))
            }
            FdRole::Kick { queue } => {
                self.kicks.insert(queue, fd);
                Ok(Ref::polled(queue))
            }
            FdRole::Err { .. } => Ok(Ref::none()),
            FdRole::MemoryRegion { .. } | FdRole::Inflight | FdRole::Unrelayable => {
                Err(SessionError::Unrelayable(request))
            }
        }
    }

    /// Undoes what the channel set up: its BAR2 regions and doorbells, its kick eventfds.
    pub fn close(&mut self, device: &CrossVmState, space: &Mutex<Bar2Space>) {
        release_regions(device, space, &std::mem::take(&mut self.regions));
        if let Some(offset) = self.inflight.take() {
            release_regions(device, space, &[offset]);
        }
        for n in std::mem::take(&mut self.doorbells) {
            device.unbind_doorbell(n);
        }
        self.kicks.clear();
    }

    /// Kick eventfds kept, by queue (for tests and the log).
    pub fn kicks(&self) -> impl Iterator<Item = (&u32, &OwnedFd)> {
        self.kicks.iter()
    }
}

impl Drop for ChannelSession {
    fn drop(&mut self) {
        if !self.regions.is_empty() || !self.doorbells.is_empty() || self.inflight.is_some() {
            log::error!(
                "driver-VM channel {}: dropped without close: BAR2 regions and doorbells leak",
                self.channel
            );
        }
    }
}

fn lock(space: &Mutex<Bar2Space>) -> std::sync::MutexGuard<'_, Bar2Space> {
    space.lock().unwrap_or_else(|p| p.into_inner())
}

fn release_regions(device: &CrossVmState, space: &Mutex<Bar2Space>, offsets: &[u64]) {
    for &offset in offsets {
        device.unmap_region(offset);
        lock(space).free(offset);
    }
}

/// `size` rounded up to whole pages; an empty or oversized log is refused.
fn page_len(size: u64) -> Result<u64, SessionError> {
    match size.checked_next_multiple_of(PAGE) {
        Some(len) if len > 0 && len <= MAX_INFLIGHT_BYTES => Ok(len),
        _ => Err(SessionError::InflightSize(size)),
    }
}

fn io_err(source: std::io::Error) -> SessionError {
    SessionError::Device(CrossVmError::Io {
        op: "dup (in-flight log)",
        source,
    })
}

/// The queue a SET_VRING_* message with a u64 body names (checked by `frontend_fd_roles`).
fn vring_queue(msg: &[u8]) -> u32 {
    msg.get(HEADER_LEN..HEADER_LEN + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(u32::MAX, |b: [u8; 8]| {
            (u64::from_ne_bytes(b) & VRING_INDEX_MASK) as u32
        })
}
