//! A small blocking store client over a Unix stream, covering every operation
//! this project needs (watches and permissions included). Watch events that
//! arrive while a reply is awaited are queued for [`StoreClient::read_watch_event`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::perms::{DomId, Perms};
use super::wire::{split_strings, Decoder, Message, MsgType, WireError, XsError, PAYLOAD_MAX};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("store I/O: {0}")]
    Io(#[from] io::Error),
    #[error("store replied {err} to {op}")]
    Store { op: &'static str, err: XsError },
    #[error("store sent a malformed reply: {0}")]
    Protocol(String),
    #[error("store closed the connection")]
    Closed,
    #[error("timed out waiting for the store")]
    Timeout,
    #[error("request payload of {0} bytes exceeds {PAYLOAD_MAX}")]
    TooLarge(usize),
}

impl ClientError {
    /// The store's error code, if the store refused the request.
    pub fn xs_error(&self) -> Option<XsError> {
        match self {
            ClientError::Store { err, .. } => Some(*err),
            _ => None,
        }
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// A fired watch: the path that changed (as the watch reports it) and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// A blocking connection to the store.
#[derive(Debug)]
pub struct StoreClient {
    stream: UnixStream,
    decoder: Decoder,
    inbuf: Vec<u8>,
    events: VecDeque<WatchEvent>,
    next_req: u32,
}

type Result<T> = std::result::Result<T, ClientError>;

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b.strip_suffix(b"\0").unwrap_or(b)).into_owned()
}

impl StoreClient {
    /// Connects to a store socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<StoreClient> {
        Ok(StoreClient::from_stream(UnixStream::connect(path)?))
    }

    /// Uses an already connected stream (e.g. from `StoreHandle::connect_domain`).
    pub fn from_stream(stream: UnixStream) -> StoreClient {
        StoreClient {
            stream,
            decoder: Decoder::new(),
            inbuf: Vec::new(),
            events: VecDeque::new(),
            next_req: 1,
        }
    }

    /// Reads the next message, waiting at most until `deadline`.
    fn next_message(&mut self, deadline: Option<Instant>) -> Result<Message> {
        let mut buf = [0u8; 8192];
        loop {
            while !self.inbuf.is_empty() {
                let (used, res) = self.decoder.decode(&self.inbuf);
                self.inbuf.drain(..used);
                if let Some(m) = res? {
                    return Ok(m);
                }
            }
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout);
                    }
                    Some(left)
                }
            };
            self.stream.set_read_timeout(timeout)?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn queue_event(&mut self, m: &Message) -> Result<()> {
        let parts =
            split_strings(&m.payload).ok_or_else(|| ClientError::Protocol("watch event".into()))?;
        match parts.as_slice() {
            [p, t, ..] => {
                self.events.push_back(WatchEvent {
                    path: text(p),
                    token: text(t),
                });
                Ok(())
            }
            _ => Err(ClientError::Protocol("watch event without token".into())),
        }
    }

    /// Sends one request and returns the reply payload; an error reply becomes
    /// [`ClientError::Store`].
    pub fn request(&mut self, ty: MsgType, tx_id: u32, payload: Vec<u8>) -> Result<Vec<u8>> {
        if payload.len() > PAYLOAD_MAX {
            return Err(ClientError::TooLarge(payload.len()));
        }
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        self.stream
            .write_all(&Message::new(ty, req_id, tx_id, payload).encode())?;
        loop {
            let m = self.next_message(None)?;
            if m.ty == MsgType::WatchEvent {
                self.queue_event(&m)?;
                continue;
            }
            if m.req_id != req_id {
                return Err(ClientError::Protocol(format!(
                    "reply to request {} while awaiting {req_id}",
                    m.req_id
                )));
            }
            if let Some(err) = m.as_error() {
                return Err(ClientError::Store { op: ty.name(), err });
            }
            if m.ty == MsgType::Error {
                return Err(ClientError::Protocol(format!(
                    "unknown error {:?}",
                    text(&m.payload)
                )));
            }
            if m.ty != ty {
                return Err(ClientError::Protocol(format!(
                    "{} reply to {}",
                    m.ty.name(),
                    ty.name()
                )));
            }
            return Ok(m.payload);
        }
    }

    /// Waits for the next watch event (at most `timeout`, or forever).
    pub fn read_watch_event(&mut self, timeout: Option<Duration>) -> Result<WatchEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            let m = self.next_message(deadline)?;
            if m.ty == MsgType::WatchEvent {
                self.queue_event(&m)?;
            } else {
                return Err(ClientError::Protocol(format!(
                    "unexpected {} while waiting for a watch event",
                    m.ty.name()
                )));
            }
        }
    }

    /// Watch events received so far and not yet taken.
    pub fn pending_watch_events(&self) -> usize {
        self.events.len()
    }

    pub fn read(&mut self, path: &str) -> Result<Vec<u8>> {
        self.tx_read(0, path)
    }
    pub fn tx_read(&mut self, tx: u32, path: &str) -> Result<Vec<u8>> {
        self.request(MsgType::Read, tx, nul(path))
    }

    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<()> {
        self.tx_write(0, path, value)
    }
    pub fn tx_write(&mut self, tx: u32, path: &str, value: &[u8]) -> Result<()> {
        let mut p = nul(path);
        p.extend_from_slice(value);
        self.request(MsgType::Write, tx, p).map(drop)
    }

    pub fn mkdir(&mut self, path: &str) -> Result<()> {
        self.tx_mkdir(0, path)
    }
    pub fn tx_mkdir(&mut self, tx: u32, path: &str) -> Result<()> {
        self.request(MsgType::Mkdir, tx, nul(path)).map(drop)
    }

    pub fn rm(&mut self, path: &str) -> Result<()> {
        self.tx_rm(0, path)
    }
    pub fn tx_rm(&mut self, tx: u32, path: &str) -> Result<()> {
        self.request(MsgType::Rm, tx, nul(path)).map(drop)
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>> {
        self.tx_directory(0, path)
    }
    /// Child names; directories too large for one reply are fetched with
    /// DIRECTORY_PART, as libxenstore does.
    pub fn tx_directory(&mut self, tx: u32, path: &str) -> Result<Vec<String>> {
        let r = match self.request(MsgType::Directory, tx, nul(path)) {
            Err(ClientError::Store {
                err: XsError::E2BIG,
                ..
            }) => return self.directory_parts(tx, path),
            r => r?,
        };
        if r.is_empty() {
            return Ok(Vec::new());
        }
        let parts = split_strings(&r).ok_or_else(|| ClientError::Protocol("directory".into()))?;
        Ok(parts.into_iter().map(text).collect())
    }

    /// Reads a directory in DIRECTORY_PART chunks, restarting if it changes
    /// (its generation differs) between chunks.
    fn directory_parts(&mut self, tx: u32, path: &str) -> Result<Vec<String>> {
        const RESTARTS: usize = 8;
        for _ in 0..RESTARTS {
            let mut names = Vec::new();
            let mut offset = 0usize;
            let mut generation: Option<Vec<u8>> = None;
            loop {
                let r = self.request(
                    MsgType::DirectoryPart,
                    tx,
                    Message::strings(&[path, &offset.to_string()]),
                )?;
                let bad = || ClientError::Protocol("directory part".into());
                let gen_end = r.iter().position(|&b| b == 0).ok_or_else(bad)?;
                let gen = r[..gen_end].to_vec();
                if generation.get_or_insert_with(|| gen.clone()) != &gen {
                    break;
                }
                let body = &r[gen_end + 1..];
                let last = body == b"\0" || body.ends_with(b"\0\0");
                let list = if last { &body[..body.len() - 1] } else { body };
                if !last && list.is_empty() {
                    return Err(bad());
                }
                offset += list.len();
                names.extend(list.split(|&b| b == 0).filter(|n| !n.is_empty()).map(text));
                if last {
                    return Ok(names);
                }
            }
        }
        Err(ClientError::Store {
            op: MsgType::DirectoryPart.name(),
            err: XsError::EAGAIN,
        })
    }

    pub fn get_perms(&mut self, path: &str) -> Result<Perms> {
        self.tx_get_perms(0, path)
    }
    pub fn tx_get_perms(&mut self, tx: u32, path: &str) -> Result<Perms> {
        let r = self.request(MsgType::GetPerms, tx, nul(path))?;
        text(&r)
            .parse()
            .map_err(|e| ClientError::Protocol(format!("perms: {e}")))
    }

    pub fn set_perms(&mut self, path: &str, perms: &Perms) -> Result<()> {
        self.tx_set_perms(0, path, perms)
    }
    pub fn tx_set_perms(&mut self, tx: u32, path: &str, perms: &Perms) -> Result<()> {
        let mut p = nul(path);
        p.extend(perms.to_wire());
        self.request(MsgType::SetPerms, tx, p).map(drop)
    }

    pub fn watch(&mut self, path: &str, token: &str) -> Result<()> {
        self.request(MsgType::Watch, 0, Message::strings(&[path, token]))
            .map(drop)
    }
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<()> {
        self.request(MsgType::Unwatch, 0, Message::strings(&[path, token]))
            .map(drop)
    }

    /// Starts a transaction and returns its id.
    pub fn transaction_start(&mut self) -> Result<u32> {
        let r = self.request(MsgType::TransactionStart, 0, vec![0])?;
        text(&r)
            .parse()
            .map_err(|_| ClientError::Protocol("transaction id".into()))
    }
    /// Commits (`commit = true`) or aborts a transaction. A conflicting
    /// commit fails with `XsError::EAGAIN`.
    pub fn transaction_end(&mut self, tx: u32, commit: bool) -> Result<()> {
        let arg: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.request(MsgType::TransactionEnd, tx, arg.to_vec())
            .map(drop)
    }

    pub fn get_domain_path(&mut self, domid: DomId) -> Result<String> {
        Ok(text(&self.request(
            MsgType::GetDomainPath,
            0,
            nul(&domid.to_string()),
        )?))
    }
    /// Introduces a domain; over sockets `mfn` and `evtchn` are carried but unused.
    pub fn introduce(&mut self, domid: DomId, mfn: u64, evtchn: u32) -> Result<()> {
        let args = [domid.to_string(), mfn.to_string(), evtchn.to_string()];
        self.request(MsgType::Introduce, 0, Message::strings(&args))
            .map(drop)
    }
    pub fn release(&mut self, domid: DomId) -> Result<()> {
        self.request(MsgType::Release, 0, nul(&domid.to_string()))
            .map(drop)
    }
    pub fn is_domain_introduced(&mut self, domid: DomId) -> Result<bool> {
        Ok(self.request(MsgType::IsDomainIntroduced, 0, nul(&domid.to_string()))? == b"T\0")
    }
    pub fn set_target(&mut self, domid: DomId, target: DomId) -> Result<()> {
        let args = [domid.to_string(), target.to_string()];
        self.request(MsgType::SetTarget, 0, Message::strings(&args))
            .map(drop)
    }
}
