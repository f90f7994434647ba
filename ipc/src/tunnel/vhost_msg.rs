//! The vhost-user messages that cross the tunnel, as much of them as a relay needs: the
//! 12-byte header, which fds a frontend's request carries and what each is for, the memory
//! table whose `mmap_offset`s the relay rewrites, and the protocol-feature mask. The message
//! layouts are the `vhost` crate's; only the header (private in the crate) is read here.

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserU64, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;

/// Bytes of a vhost-user message header (request, flags, size: native-endian u32s).
pub const HEADER_LEN: usize = 12;
/// SET_VRING_KICK/CALL/ERR: the queue index bits of the u64 body (vhost-user spec; the crate
/// uses the literals).
pub const VRING_INDEX_MASK: u64 = 0xff;
/// SET_VRING_KICK/CALL/ERR: no fd accompanies the message (vhost-user spec).
pub const VRING_NOFD_MASK: u64 = 0x100;

/// The protocol features a relay can carry through the tunnel; GET_PROTOCOL_FEATURES replies
/// are masked to these. INFLIGHT_SHMFD: the relay keeps the log in memory of its own, mapped
/// into the driver VM (docs/protocol.md, "The in-flight log through the tunnel").
pub fn relayable_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Errors of reading a vhost-user message.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum VhostMsgError {
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("header says {said} body bytes, {got} present")]
    SizeMismatch { said: u32, got: usize },
    #[error("body of {0} bytes over the vhost-user maximum")]
    TooLong(usize),
    #[error("header flags {0:#x}: bad version or reserved bits")]
    BadFlags(u32),
    #[error("unknown request {0}")]
    UnknownRequest(u32),
    #[error("{request:?} with a body of {len} bytes")]
    BadBody { request: FrontendReq, len: usize },
    #[error("{request:?} carries {got} fds, {expected} expected")]
    FdCount {
        request: FrontendReq,
        expected: usize,
        got: usize,
    },
    #[error("memory table with {0} regions")]
    RegionCount(u32),
}

/// The header of one vhost-user message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl MsgHeader {
    /// Reads and checks the header of `msg` (header + body): version 1, no reserved flag
    /// bits, `size` equal to the body present and within vhost-user's maximum.
    pub fn parse(msg: &[u8]) -> Result<MsgHeader, VhostMsgError> {
        let Some(h) = msg.first_chunk::<HEADER_LEN>() else {
            return Err(VhostMsgError::Short(msg.len()));
        };
        let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let header = MsgHeader {
            request: word(0),
            flags: word(4),
            size: word(8),
        };
        let body = msg.len() - HEADER_LEN;
        if body > MAX_MSG_SIZE {
            return Err(VhostMsgError::TooLong(body));
        }
        if header.size as usize != body {
            return Err(VhostMsgError::SizeMismatch {
                said: header.size,
                got: body,
            });
        }
        if header.flags & VhostUserHeaderFlag::VERSION.bits() != 1
            || header.flags & VhostUserHeaderFlag::RESERVED_BITS.bits() != 0
        {
            return Err(VhostMsgError::BadFlags(header.flags));
        }
        Ok(header)
    }

    /// The body's size announced by a header read on its own (a stream reader's first step).
    pub fn body_len(header: &[u8; HEADER_LEN]) -> usize {
        u32::from_ne_bytes([header[8], header[9], header[10], header[11]]) as usize
    }

    /// A reply (to a frontend's request)?
    pub fn is_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    }

    /// The frontend's request this header names.
    pub fn frontend_request(&self) -> Result<FrontendReq, VhostMsgError> {
        FrontendReq::try_from(self.request)
            .map_err(|()| VhostMsgError::UnknownRequest(self.request))
    }
}

/// What one fd of a frontend's request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdRole {
    /// The backing of memory-table region `region` (SET_MEM_TABLE).
    MemoryRegion { region: usize },
    /// SET_VRING_KICK of `queue`.
    Kick { queue: u32 },
    /// SET_VRING_CALL of `queue`.
    Call { queue: u32 },
    /// SET_VRING_ERR of `queue`.
    Err { queue: u32 },
    /// The in-flight log (SET_INFLIGHT_FD).
    Inflight,
    /// An fd of a request the relay does not carry (log, inflight, backend channel, a memory
    /// slot, device state...).
    Unrelayable,
}

/// The fds a frontend's request `msg` (header + body) carries, in order, given `nfds`
/// received with it. Fails when the count is not the one the request calls for.
pub fn frontend_fd_roles(msg: &[u8], nfds: usize) -> Result<Vec<FdRole>, VhostMsgError> {
    let header = MsgHeader::parse(msg)?;
    let request = header.frontend_request()?;
    let body = &msg[HEADER_LEN..];
    let roles = match request {
        FrontendReq::SET_MEM_TABLE => {
            let n = mem_table_regions(body)?.len();
            (0..n)
                .map(|region| FdRole::MemoryRegion { region })
                .collect()
        }
        FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL | FrontendReq::SET_VRING_ERR => {
            let value = read_pod::<VhostUserU64>(body)
                .ok_or(VhostMsgError::BadBody {
                    request,
                    len: body.len(),
                })?
                .value;
            if value & !(VRING_INDEX_MASK | VRING_NOFD_MASK) != 0 {
                return Err(VhostMsgError::BadBody {
                    request,
                    len: body.len(),
                });
            }
            if value & VRING_NOFD_MASK != 0 {
                Vec::new()
            } else {
                let queue = (value & VRING_INDEX_MASK) as u32;
                vec![match request {
                    FrontendReq::SET_VRING_KICK => FdRole::Kick { queue },
                    FrontendReq::SET_VRING_CALL => FdRole::Call { queue },
                    _ => FdRole::Err { queue },
                }]
            }
        }
        FrontendReq::SET_INFLIGHT_FD => {
            inflight_body(request, body)?;
            vec![FdRole::Inflight]
        }
        // Requests that carry fds the relay cannot map into the driver VM: as many roles as
        // fds came, so the caller refuses them by their role.
        FrontendReq::SET_LOG_BASE
        | FrontendReq::SET_LOG_FD
        | FrontendReq::SET_BACKEND_REQ_FD
        | FrontendReq::ADD_MEM_REG
        | FrontendReq::SET_DEVICE_STATE_FD
        | FrontendReq::GPU_SET_SOCKET => vec![FdRole::Unrelayable; nfds.max(1)],
        _ => Vec::new(),
    };
    if roles.len() != nfds {
        return Err(VhostMsgError::FdCount {
            request,
            expected: roles.len(),
            got: nfds,
        });
    }
    Ok(roles)
}

/// The regions of a SET_MEM_TABLE body.
pub fn mem_table_regions(body: &[u8]) -> Result<Vec<VhostUserMemoryRegion>, VhostMsgError> {
    let request = FrontendReq::SET_MEM_TABLE;
    let bad = VhostMsgError::BadBody {
        request,
        len: body.len(),
    };
    let head = std::mem::size_of::<VhostUserMemory>();
    let table = body
        .get(..head)
        .and_then(read_pod::<VhostUserMemory>)
        .ok_or(bad.clone())?;
    let n = table.num_regions;
    if n == 0 || n as usize > MAX_ATTACHED_FD_ENTRIES || table.padding1 != 0 {
        return Err(VhostMsgError::RegionCount(n));
    }
    let each = std::mem::size_of::<VhostUserMemoryRegion>();
    if body.len() != head + n as usize * each {
        return Err(bad);
    }
    body[head..]
        .chunks_exact(each)
        .map(|c| read_pod::<VhostUserMemoryRegion>(c).ok_or(bad.clone()))
        .collect()
}

/// Rewrites the `mmap_offset` of each region of a SET_MEM_TABLE message (header + body),
/// in table order.
pub fn rewrite_mmap_offsets(msg: &mut [u8], offsets: &[u64]) -> Result<(), VhostMsgError> {
    let header = MsgHeader::parse(msg)?;
    let request = header.frontend_request()?;
    let body = &mut msg[HEADER_LEN..];
    if request != FrontendReq::SET_MEM_TABLE {
        return Err(VhostMsgError::BadBody {
            request,
            len: body.len(),
        });
    }
    let regions = mem_table_regions(body)?;
    if regions.len() != offsets.len() {
        return Err(VhostMsgError::FdCount {
            request,
            expected: regions.len(),
            got: offsets.len(),
        });
    }
    let head = std::mem::size_of::<VhostUserMemory>();
    let each = std::mem::size_of::<VhostUserMemoryRegion>();
    for (i, (mut region, &offset)) in regions.into_iter().zip(offsets).enumerate() {
        region.mmap_offset = offset;
        let at = head + i * each;
        body[at..at + each].copy_from_slice(region.as_slice());
    }
    Ok(())
}

/// The body of a SET_INFLIGHT_FD request or a GET_INFLIGHT_FD reply.
pub fn inflight_body(
    request: FrontendReq,
    body: &[u8],
) -> Result<VhostUserInflight, VhostMsgError> {
    read_pod::<VhostUserInflight>(body).ok_or(VhostMsgError::BadBody {
        request,
        len: body.len(),
    })
}

/// Replaces the body of an in-flight message (header + body: SET_INFLIGHT_FD, or the reply to
/// GET_INFLIGHT_FD) with `inflight`.
pub fn rewrite_inflight(msg: &mut [u8], inflight: &VhostUserInflight) -> Result<(), VhostMsgError> {
    let header = MsgHeader::parse(msg)?;
    let request = header.frontend_request()?;
    let body = &mut msg[HEADER_LEN..];
    if !matches!(
        request,
        FrontendReq::SET_INFLIGHT_FD | FrontendReq::GET_INFLIGHT_FD
    ) || body.len() != std::mem::size_of::<VhostUserInflight>()
    {
        return Err(VhostMsgError::BadBody {
            request,
            len: body.len(),
        });
    }
    body.copy_from_slice(inflight.as_slice());
    Ok(())
}

/// Masks a GET_PROTOCOL_FEATURES reply (header + u64 body) to
/// [`relayable_protocol_features`]; true when `msg` was such a reply. Other messages are left
/// alone.
pub fn mask_protocol_features_reply(msg: &mut [u8]) -> Result<bool, VhostMsgError> {
    let header = MsgHeader::parse(msg)?;
    if !header.is_reply() || header.request != u32::from(FrontendReq::GET_PROTOCOL_FEATURES) {
        return Ok(false);
    }
    let request = FrontendReq::GET_PROTOCOL_FEATURES;
    let body = &mut msg[HEADER_LEN..];
    let mut value = read_pod::<VhostUserU64>(body).ok_or(VhostMsgError::BadBody {
        request,
        len: body.len(),
    })?;
    value.value &= relayable_protocol_features().bits();
    body.copy_from_slice(value.as_slice());
    Ok(true)
}

/// Encodes a message: header (flags with version 1) and body.
pub fn encode_message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&request.to_ne_bytes());
    out.extend_from_slice(&((flags & !VhostUserHeaderFlag::VERSION.bits()) | 1).to_ne_bytes());
    out.extend_from_slice(&(body.len() as u32).to_ne_bytes());
    out.extend_from_slice(body);
    out
}

/// A copy of a plain-data message struct from bytes of exactly its size (the structs are
/// packed or u64-aligned; the bytes need not be aligned).
pub fn read_pod<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut value = T::default();
    if bytes.len() != std::mem::size_of::<T>() {
        return None;
    }
    value.as_mut_slice().copy_from_slice(bytes);
    Some(value)
}
