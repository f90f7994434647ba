//! A tunnel frame: its header, its references and its payload, and the one encoder both sides
//! use. All integers are little-endian:
//!
//! ```text
//!  u32 magic "TUNL" | u16 channel | u8 kind | u8 nrefs | u32 len | nrefs × ref | len bytes
//!  ref: u8 ref_kind | u8[3] zero | u32 index | u64 value
//! ```

/// `"TUNL"` read as a little-endian u32: the first four bytes of every frame.
pub const MAGIC: u32 = 0x4c4e_5554;
/// Bytes of the fixed header (magic, channel, kind, nrefs, len).
pub const HEADER_LEN: usize = 12;
/// Bytes of one reference.
pub const REF_LEN: usize = 16;
/// The largest payload a frame may carry.
pub const PAYLOAD_MAX: usize = 65536;
/// The most references a frame may carry (vhost-user's limit of fds per message).
pub const REFS_MAX: usize = 32;
/// The largest frame on the wire.
pub const FRAME_MAX: usize = HEADER_LEN + REFS_MAX * REF_LEN + PAYLOAD_MAX;
/// The tunnel version a HELLO announces.
pub const VERSION: u32 = 1;

/// Errors of the tunnel's framing. None of them is fatal to the stream: the decoder has
/// consumed the bad bytes (a whole frame when its header could be trusted, otherwise it scans
/// for the next magic).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TunnelError {
    /// The bytes where a frame should start are not the magic; the decoder resynchronises.
    #[error("bad frame magic {0:#010x}: resynchronising")]
    BadMagic(u32),
    /// The header announces more than [`PAYLOAD_MAX`] payload bytes.
    #[error("payload length {0} over the limit of {PAYLOAD_MAX}")]
    PayloadTooLong(u32),
    /// The header announces more than [`REFS_MAX`] references.
    #[error("{0} references over the limit of {REFS_MAX}")]
    TooManyRefs(u8),
    /// The header's kind is none of HELLO, OPEN, CLOSE, VHOST, STORE, CONTROL.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A reference's kind is none of MEMORY, DOORBELL, POLLED, NONE.
    #[error("channel {channel}: unknown reference kind {kind}")]
    UnknownRefKind { channel: u16, kind: u8 },
    /// A reference's three reserved bytes are not zero.
    #[error("channel {channel}: reference with non-zero reserved bytes")]
    RefReserved { channel: u16 },
    /// A frame whose kind does not allow its references or payload length (HELLO: 4 bytes,
    /// OPEN and CLOSE: empty, only VHOST carries references and at least a vhost-user header;
    /// STORE and CONTROL: on channel 0, not empty, no references).
    #[error("channel {channel}: {kind:?} frame with {nrefs} references and {len} payload bytes")]
    BadShape {
        channel: u16,
        kind: FrameKind,
        nrefs: usize,
        len: usize,
    },
}

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// VM -> dom0: the in-VM server is ready (payload: u32 version).
    Hello = 1,
    /// dom0 -> VM: a channel opened (empty).
    Open = 2,
    /// Either way: the channel's peer went away (empty).
    Close = 3,
    /// Either way: one whole vhost-user message, its fds replaced by references.
    Vhost = 4,
    /// Either way, channel 0: bytes of the in-VM driver domain's store connection, in order
    /// (a managed driver VM; 1 to [`PAYLOAD_MAX`] bytes).
    Store = 5,
    /// Either way, channel 0: one message of the in-VM driver domain's control channel
    /// ([`super::control::TunnelControl`], postcard; a managed driver VM).
    Control = 6,
}

impl FrameKind {
    /// The kind with wire number `n`.
    pub fn from_u8(n: u8) -> Option<FrameKind> {
        match n {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Open),
            3 => Some(FrameKind::Close),
            4 => Some(FrameKind::Vhost),
            5 => Some(FrameKind::Store),
            6 => Some(FrameKind::Control),
            _ => None,
        }
    }
}

/// What an fd of a vhost-user message became on its way through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RefKind {
    /// A memory region dom0 mapped into the cross-VM device's BAR2; value = its BAR2 offset
    /// (also written into the region's `mmap_offset`).
    Memory = 1,
    /// A call fd bound to a doorbell register; index = the doorbell's number.
    Doorbell = 2,
    /// A kick fd dom0 kept: the VM side polls the ring; index = the queue.
    Polled = 3,
    /// An fd dom0 dropped (an error fd, for example).
    None = 4,
}

impl RefKind {
    /// The kind with wire number `n`.
    pub fn from_u8(n: u8) -> Option<RefKind> {
        match n {
            1 => Some(RefKind::Memory),
            2 => Some(RefKind::Doorbell),
            3 => Some(RefKind::Polled),
            4 => Some(RefKind::None),
            _ => None,
        }
    }
}

/// One reference: an fd of the message, as the other side must rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ref {
    pub kind: RefKind,
    pub index: u32,
    pub value: u64,
}

impl Ref {
    /// A memory region mapped at `bar2_offset` of BAR2.
    pub fn memory(bar2_offset: u64) -> Ref {
        Ref {
            kind: RefKind::Memory,
            index: 0,
            value: bar2_offset,
        }
    }

    /// A call fd bound to doorbell `n`.
    pub fn doorbell(n: u32) -> Ref {
        Ref {
            kind: RefKind::Doorbell,
            index: n,
            value: 0,
        }
    }

    /// A kick fd of queue `queue` that the VM side polls for.
    pub fn polled(queue: u32) -> Ref {
        Ref {
            kind: RefKind::Polled,
            index: queue,
            value: 0,
        }
    }

    /// An fd dropped by dom0.
    pub fn none() -> Ref {
        Ref {
            kind: RefKind::None,
            index: 0,
            value: 0,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
    }

    /// Reads one reference of `channel`'s frame from exactly [`REF_LEN`] bytes.
    pub(crate) fn decode(channel: u16, b: &[u8; REF_LEN]) -> Result<Ref, TunnelError> {
        let kind = RefKind::from_u8(b[0]).ok_or(TunnelError::UnknownRefKind {
            channel,
            kind: b[0],
        })?;
        if b[1..4] != [0; 3] {
            return Err(TunnelError::RefReserved { channel });
        }
        let index = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let value = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        Ok(Ref { kind, index, value })
    }
}

/// One frame of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u16,
    pub kind: FrameKind,
    pub refs: Vec<Ref>,
    pub payload: Vec<u8>,
}

impl Frame {
    /// HELLO with this side's [`VERSION`] (the channel is 0).
    pub fn hello() -> Frame {
        Frame {
            channel: 0,
            kind: FrameKind::Hello,
            refs: Vec::new(),
            payload: VERSION.to_le_bytes().to_vec(),
        }
    }

    /// OPEN of `channel`.
    pub fn open(channel: u16) -> Frame {
        Frame {
            channel,
            kind: FrameKind::Open,
            refs: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// CLOSE of `channel`.
    pub fn close(channel: u16) -> Frame {
        Frame {
            channel,
            kind: FrameKind::Close,
            refs: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// VHOST: one vhost-user message (header + body) and the references of its fds, in order.
    pub fn vhost(channel: u16, refs: Vec<Ref>, message: Vec<u8>) -> Frame {
        Frame {
            channel,
            kind: FrameKind::Vhost,
            refs,
            payload: message,
        }
    }

    /// STORE: bytes of the store connection (not empty, at most [`PAYLOAD_MAX`]).
    pub fn store(bytes: Vec<u8>) -> Frame {
        Frame {
            channel: 0,
            kind: FrameKind::Store,
            refs: Vec::new(),
            payload: bytes,
        }
    }

    /// CONTROL: one encoded [`super::control::TunnelControl`].
    pub fn control(message: Vec<u8>) -> Frame {
        Frame {
            channel: 0,
            kind: FrameKind::Control,
            refs: Vec::new(),
            payload: message,
        }
    }

    /// The version a HELLO announces; `None` for another kind.
    pub fn hello_version(&self) -> Option<u32> {
        match (self.kind, self.payload.as_slice()) {
            (FrameKind::Hello, &[a, b, c, d]) => Some(u32::from_le_bytes([a, b, c, d])),
            _ => None,
        }
    }

    /// Checks that the frame's kind allows its references and payload length.
    pub fn check_shape(&self) -> Result<(), TunnelError> {
        check_shape(self.channel, self.kind, self.refs.len(), self.payload.len())
    }

    /// The frame's bytes on the wire. Fails, writing nothing, when the frame breaks a limit
    /// or its kind's shape.
    pub fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        let mut out = Vec::with_capacity(self.wire_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the frame's bytes to `out` (see [`Frame::encode`]).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), TunnelError> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(TunnelError::PayloadTooLong(
                u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
            ));
        }
        let nrefs = u8::try_from(self.refs.len()).unwrap_or(u8::MAX);
        if self.refs.len() > REFS_MAX {
            return Err(TunnelError::TooManyRefs(nrefs));
        }
        self.check_shape()?;
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.channel.to_le_bytes());
        out.push(self.kind as u8);
        out.push(nrefs);
        // At most PAYLOAD_MAX, checked above.
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        for r in &self.refs {
            r.encode_into(out);
        }
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// Bytes of the encoded frame.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.refs.len() * REF_LEN + self.payload.len()
    }
}

/// The shape each kind allows (see [`TunnelError::BadShape`]).
pub(crate) fn check_shape(
    channel: u16,
    kind: FrameKind,
    nrefs: usize,
    len: usize,
) -> Result<(), TunnelError> {
    let ok = match kind {
        FrameKind::Hello => nrefs == 0 && len == 4,
        FrameKind::Open | FrameKind::Close => nrefs == 0 && len == 0,
        FrameKind::Vhost => len >= super::vhost_msg::HEADER_LEN,
        FrameKind::Store | FrameKind::Control => nrefs == 0 && len > 0 && channel == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(TunnelError::BadShape {
            channel,
            kind,
            nrefs,
            len,
        })
    }
}

/// A header whose limits and kind were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub channel: u16,
    pub kind: FrameKind,
    pub nrefs: usize,
    pub len: usize,
}

impl Header {
    /// Bytes of the whole frame this header starts.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.nrefs * REF_LEN + self.len
    }

    /// Reads and checks a header (the limits and the kind; not the shape, which needs the
    /// frame to be skipped whole).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, TunnelError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(TunnelError::BadMagic(magic));
        }
        let channel = u16::from_le_bytes([b[4], b[5]]);
        let kind = FrameKind::from_u8(b[6]).ok_or(TunnelError::UnknownKind(b[6]))?;
        let nrefs = b[7];
        if usize::from(nrefs) > REFS_MAX {
            return Err(TunnelError::TooManyRefs(nrefs));
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if len as usize > PAYLOAD_MAX {
            return Err(TunnelError::PayloadTooLong(len));
        }
        Ok(Header {
            channel,
            kind,
            nrefs: usize::from(nrefs),
            len: len as usize,
        })
    }
}
