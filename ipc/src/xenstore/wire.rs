//! Xen's xenstore wire format (`xs_wire.h`): a 16-byte little-endian header
//! `xsd_sockmsg { type, req_id, tx_id, len }` followed by at most
//! [`PAYLOAD_MAX`] payload bytes, plus an incremental decoder for byte streams.

use std::fmt;

/// Size of the `xsd_sockmsg` header.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload either side may send.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`: the longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: the longest path below a domain's home path.
pub const REL_PATH_MAX: usize = 2048;

/// Errors of the wire layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The header announces more than [`PAYLOAD_MAX`] bytes; the stream cannot be trusted.
    #[error("payload length {0} exceeds the maximum of {PAYLOAD_MAX}")]
    TooLong(u32),
    /// A complete message with a type number Xen does not define. The decoder
    /// has consumed it, so the stream stays in step.
    #[error("unknown message type {ty} (req_id {req_id})")]
    UnknownType { ty: u32, req_id: u32, tx_id: u32 },
}

macro_rules! msg_types {
    ($($name:ident = $num:expr, $text:expr;)*) => {
        /// `enum xsd_sockmsg_type` from Xen's `xs_wire.h`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum MsgType { $($name = $num,)* }

        impl MsgType {
            /// Every type Xen defines.
            pub const ALL: &'static [MsgType] = &[$(MsgType::$name,)*];

            /// Maps a wire number to a type; `None` for numbers Xen does not define.
            pub fn from_u32(n: u32) -> Option<MsgType> {
                match n { $($num => Some(MsgType::$name),)* _ => None }
            }

            /// The name Xen's `xenstored` uses in its logs.
            pub fn name(self) -> &'static str {
                match self { $(MsgType::$name => $text,)* }
            }
        }
    };
}

msg_types! {
    Control = 0, "CONTROL";
    Directory = 1, "DIRECTORY";
    Read = 2, "READ";
    GetPerms = 3, "GET_PERMS";
    Watch = 4, "WATCH";
    Unwatch = 5, "UNWATCH";
    TransactionStart = 6, "TRANSACTION_START";
    TransactionEnd = 7, "TRANSACTION_END";
    Introduce = 8, "INTRODUCE";
    Release = 9, "RELEASE";
    GetDomainPath = 10, "GET_DOMAIN_PATH";
    Write = 11, "WRITE";
    Mkdir = 12, "MKDIR";
    Rm = 13, "RM";
    SetPerms = 14, "SET_PERMS";
    WatchEvent = 15, "WATCH_EVENT";
    Error = 16, "ERROR";
    IsDomainIntroduced = 17, "IS_DOMAIN_INTRODUCED";
    Resume = 18, "RESUME";
    SetTarget = 19, "SET_TARGET";
    // 20 was XS_RESTRICT, removed from Xen and left undefined here.
    ResetWatches = 21, "RESET_WATCHES";
    DirectoryPart = 22, "DIRECTORY_PART";
    GetFeature = 23, "GET_FEATURE";
    SetFeature = 24, "SET_FEATURE";
    GetQuota = 25, "GET_QUOTA";
    SetQuota = 26, "SET_QUOTA";
}

impl MsgType {
    /// `XS_DEBUG` is the old name of `XS_CONTROL` (number 0).
    pub const DEBUG: MsgType = MsgType::Control;
}

macro_rules! errnos {
    ($($name:ident),* $(,)?) => {
        /// The errors Xen's `xsd_errors[]` table names; an `XS_ERROR` reply
        /// carries the name as a NUL-terminated string.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum XsError { $($name,)* }

        impl XsError {
            /// The error's name as sent on the wire (without the NUL).
            pub fn name(self) -> &'static str {
                match self { $(XsError::$name => stringify!($name),)* }
            }

            /// Parses the name of an `XS_ERROR` payload (with or without its NUL).
            pub fn from_name(s: &[u8]) -> Option<XsError> {
                let s = s.strip_suffix(b"\0").unwrap_or(s);
                match s { $(x if x == stringify!($name).as_bytes() => Some(XsError::$name),)* _ => None }
            }
        }
    };
}

impl fmt::Display for XsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for XsError {}

errnos!(
    EINVAL, EACCES, EEXIST, EISDIR, ENOENT, ENOMEM, ENOSPC, EIO, ENOTEMPTY, ENOSYS, EROFS, EBUSY,
    EAGAIN, EISCONN, E2BIG, EPERM,
);

/// The decoded header of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    /// Parses a header from exactly [`HEADER_LEN`] bytes.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }
}

/// One complete message of a known type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub ty: MsgType,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// A message with the given fields.
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        Message {
            ty,
            req_id,
            tx_id,
            payload,
        }
    }

    /// An `XS_ERROR` reply to a request with these ids.
    pub fn error(req_id: u32, tx_id: u32, err: XsError) -> Message {
        let mut payload = err.name().as_bytes().to_vec();
        payload.push(0);
        Message::new(MsgType::Error, req_id, tx_id, payload)
    }

    /// An `XS_WATCH_EVENT` for `path` and `token` (`path\0token\0`).
    pub fn watch_event(path: &str, token: &[u8]) -> Message {
        let mut payload = Vec::with_capacity(path.len() + token.len() + 2);
        payload.extend_from_slice(path.as_bytes());
        payload.push(0);
        payload.extend_from_slice(token);
        payload.push(0);
        Message::new(MsgType::WatchEvent, 0, 0, payload)
    }

    /// Builds a payload from strings, each followed by a NUL.
    pub fn strings<S: AsRef<[u8]>>(parts: &[S]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(p.as_ref());
            out.push(0);
        }
        out
    }

    /// Header plus payload as sent on the wire. Payloads longer than
    /// [`PAYLOAD_MAX`] are never produced by this crate's engine; callers
    /// that build messages themselves must keep to the limit.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded message to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        for w in [self.ty as u32, self.req_id, self.tx_id, len] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.payload);
    }

    /// For an `XS_ERROR` message, the error it names.
    pub fn as_error(&self) -> Option<XsError> {
        if self.ty == MsgType::Error {
            XsError::from_name(&self.payload)
        } else {
            None
        }
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} req {} tx {} {:?}",
            self.ty.name(),
            self.req_id,
            self.tx_id,
            String::from_utf8_lossy(&self.payload)
        )
    }
}

/// An incremental decoder: feed it bytes as they arrive, take messages out.
/// It holds at most one header and one payload (≤ 4112 bytes) of state.
#[derive(Debug, Default)]
pub struct Decoder {
    header_buf: [u8; HEADER_LEN],
    header_fill: usize,
    header: Option<Header>,
    payload: Vec<u8>,
    failed: bool,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// True while a message is partially received.
    pub fn is_mid_message(&self) -> bool {
        self.header_fill > 0 || self.header.is_some()
    }

    /// Consumes bytes from `input` until one message is complete or the input
    /// runs out. Returns the number of bytes consumed and the outcome:
    /// `Ok(Some(msg))` for a complete message, `Ok(None)` if more input is needed.
    /// After [`WireError::TooLong`] the decoder stays failed (the stream is out of step);
    /// after [`WireError::UnknownType`] it continues with the next message.
    pub fn decode(&mut self, input: &[u8]) -> (usize, Result<Option<Message>, WireError>) {
        let mut used = 0;
        if self.failed {
            return (0, Err(WireError::TooLong(u32::MAX)));
        }
        if self.header.is_none() {
            let take = (HEADER_LEN - self.header_fill).min(input.len());
            self.header_buf[self.header_fill..self.header_fill + take]
                .copy_from_slice(&input[..take]);
            self.header_fill += take;
            used += take;
            if self.header_fill < HEADER_LEN {
                return (used, Ok(None));
            }
            let h = Header::parse(&self.header_buf);
            if h.len as usize > PAYLOAD_MAX {
                self.failed = true;
                return (used, Err(WireError::TooLong(h.len)));
            }
            self.header = Some(h);
            self.payload = Vec::with_capacity(h.len as usize);
        }
        let Some(h) = self.header else {
            return (used, Ok(None));
        };
        let want = h.len as usize - self.payload.len();
        let take = want.min(input.len() - used);
        self.payload.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.payload.len() < h.len as usize {
            return (used, Ok(None));
        }
        self.header = None;
        self.header_fill = 0;
        let payload = std::mem::take(&mut self.payload);
        match MsgType::from_u32(h.ty) {
            Some(ty) => (used, Ok(Some(Message::new(ty, h.req_id, h.tx_id, payload)))),
            None => (
                used,
                Err(WireError::UnknownType {
                    ty: h.ty,
                    req_id: h.req_id,
                    tx_id: h.tx_id,
                }),
            ),
        }
    }

    /// Decodes every complete message in `input`, stopping at the first error.
    pub fn decode_all(&mut self, mut input: &[u8]) -> Result<Vec<Message>, WireError> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (used, res) = self.decode(input);
            input = &input[used..];
            match res? {
                Some(m) => out.push(m),
                None => break,
            }
        }
        Ok(out)
    }
}

/// Splits a payload into its NUL-terminated strings. Returns `None` if the
/// payload does not end in NUL (Xen's `get_strings` then rejects the request).
pub fn split_strings(payload: &[u8]) -> Option<Vec<&[u8]>> {
    let body = payload.strip_suffix(b"\0")?;
    Some(body.split(|&b| b == 0).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn type_numbers_match_xs_wire_h() {
        let expect = [
            (MsgType::Control, 0),
            (MsgType::Directory, 1),
            (MsgType::Read, 2),
            (MsgType::GetPerms, 3),
            (MsgType::Watch, 4),
            (MsgType::Unwatch, 5),
            (MsgType::TransactionStart, 6),
            (MsgType::TransactionEnd, 7),
            (MsgType::Introduce, 8),
            (MsgType::Release, 9),
            (MsgType::GetDomainPath, 10),
            (MsgType::Write, 11),
            (MsgType::Mkdir, 12),
            (MsgType::Rm, 13),
            (MsgType::SetPerms, 14),
            (MsgType::WatchEvent, 15),
            (MsgType::Error, 16),
            (MsgType::IsDomainIntroduced, 17),
            (MsgType::Resume, 18),
            (MsgType::SetTarget, 19),
            (MsgType::ResetWatches, 21),
            (MsgType::DirectoryPart, 22),
        ];
        for (t, n) in expect {
            assert_eq!(t as u32, n);
            assert_eq!(MsgType::from_u32(n), Some(t));
        }
        assert_eq!(MsgType::from_u32(20), None);
        assert_eq!(MsgType::from_u32(27), None);
        assert_eq!(MsgType::DEBUG as u32, 0);
    }

    #[test]
    fn error_names_round_trip() {
        let m = Message::error(7, 3, XsError::EAGAIN);
        assert_eq!(m.payload, b"EAGAIN\0");
        assert_eq!(m.as_error(), Some(XsError::EAGAIN));
        assert_eq!(XsError::from_name(b"E2BIG"), Some(XsError::E2BIG));
        assert_eq!(XsError::from_name(b"EWHAT\0"), None);
    }

    #[test]
    fn decodes_byte_by_byte() {
        let m = Message::new(MsgType::Write, 9, 2, b"/a\0value".to_vec());
        let bytes = m.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 8);
        assert_eq!(&bytes[..4], &11u32.to_le_bytes());
        let mut d = Decoder::new();
        let mut got = None;
        for (i, b) in bytes.iter().enumerate() {
            let (used, res) = d.decode(std::slice::from_ref(b));
            assert_eq!(used, 1);
            let r = res.unwrap();
            if i + 1 < bytes.len() {
                assert!(r.is_none());
                assert!(d.is_mid_message());
            } else {
                got = r;
            }
        }
        assert_eq!(got, Some(m));
        assert!(!d.is_mid_message());
    }

    #[test]
    fn decodes_several_in_one_buffer() {
        let mut bytes = Message::new(MsgType::Read, 1, 0, b"/x\0".to_vec()).encode();
        bytes.extend(Message::new(MsgType::Directory, 2, 0, b"/\0".to_vec()).encode());
        bytes.extend_from_slice(&[1, 0, 0]); // start of a third header
        let mut d = Decoder::new();
        let msgs = d.decode_all(&bytes).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].req_id, 2);
        assert!(d.is_mid_message());
    }

    #[test]
    fn rejects_oversized_length_and_stays_failed() {
        let mut bytes = Vec::new();
        for w in [2u32, 1, 0, 4097] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        let mut d = Decoder::new();
        let (_, r) = d.decode(&bytes);
        assert_eq!(r, Err(WireError::TooLong(4097)));
        let (used, r) = d.decode(&[0; 4]);
        assert_eq!(used, 0);
        assert!(r.is_err());
    }

    #[test]
    fn accepts_exactly_payload_max() {
        let m = Message::new(MsgType::Write, 1, 0, vec![b'a'; PAYLOAD_MAX]);
        let mut d = Decoder::new();
        assert_eq!(d.decode_all(&m.encode()).unwrap(), vec![m]);
    }

    #[test]
    fn unknown_type_is_consumed_and_stream_continues() {
        let mut bytes = Vec::new();
        for w in [99u32, 5, 0, 3] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        bytes.extend_from_slice(b"abc");
        bytes.extend(Message::new(MsgType::Read, 6, 0, b"/\0".to_vec()).encode());
        let mut d = Decoder::new();
        let (used, r) = d.decode(&bytes);
        assert_eq!(used, HEADER_LEN + 3);
        assert_eq!(
            r,
            Err(WireError::UnknownType {
                ty: 99,
                req_id: 5,
                tx_id: 0
            })
        );
        let (_, r) = d.decode(&bytes[used..]);
        assert_eq!(r.unwrap().unwrap().req_id, 6);
    }

    #[test]
    fn split_strings_needs_trailing_nul() {
        assert_eq!(split_strings(b"a\0b\0"), Some(vec![&b"a"[..], &b"b"[..]]));
        assert_eq!(split_strings(b"a\0b"), None);
        assert_eq!(split_strings(b"\0"), Some(vec![&b""[..]]));
    }
}
