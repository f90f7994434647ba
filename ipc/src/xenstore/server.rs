//! The store daemon: a single-threaded epoll loop serving the [`Engine`] over
//! Unix stream sockets.
//!
//! A connection's domain id comes from where it connected, never from what it
//! sends: the main socket is dom0 (privileged); INTRODUCE of domain N by dom0
//! opens `<socket>.d/<N>` whose connections speak for N; RELEASE closes that
//! socket and the domain's connections. [`StoreHandle::connect_domain`] hands
//! out one end of a socket pair already registered as a domain.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::{ConnId, DomainEvent, Engine};
use super::perms::DomId;
use super::wire::{Decoder, Message, WireError, XsError};
use super::Quotas;

/// Errors of the store daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind store socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("store socket {0} is in use by a running store")]
    InUse(PathBuf),
    #[error("epoll: {0}")]
    Epoll(io::Error),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("socket pair for domain {domid}: {source}")]
    SocketPair { domid: DomId, source: io::Error },
    #[error("the store has shut down")]
    ShutDown,
    #[error("the store thread panicked")]
    Panicked,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The privileged (dom0) socket. Domain sockets live in `<socket>.d/`.
    pub socket: PathBuf,
    /// Limits for unprivileged domains.
    pub quotas: Quotas,
    /// Most bytes queued towards one client before it is disconnected (1 MiB).
    pub max_output_bytes: usize,
    /// Most simultaneous connections; further ones are refused (1024).
    pub max_connections: usize,
}

impl StoreConfig {
    /// Defaults with the given privileged socket path.
    pub fn new(socket: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            socket: socket.into(),
            ..StoreConfig::default()
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            socket: PathBuf::from("/run/xenstored/socket"),
            quotas: Quotas::default(),
            max_output_bytes: 1 << 20,
            max_connections: 1024,
        }
    }
}

/// The directory holding per-domain sockets for a store socket.
pub fn domain_socket_dir(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".d");
    PathBuf::from(s)
}

/// The socket a domain connects to once introduced.
pub fn domain_socket_path(socket: &Path, domid: DomId) -> PathBuf {
    domain_socket_dir(socket).join(domid.to_string())
}

enum Command {
    Attach(DomId, UnixStream),
    Stats(Sender<StoreStats>),
    Shutdown,
}

/// A snapshot of the store's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Open client connections.
    pub connections: usize,
    /// Bytes queued towards clients, over all connections.
    pub queued_output_bytes: usize,
    /// Bytes received but not yet handled, over all connections.
    pub buffered_input_bytes: usize,
    /// Nodes in the tree, the root included.
    pub nodes: usize,
}

/// A cloneable, sendable handle to a running (or about to run) store.
#[derive(Clone)]
pub struct StoreHandle {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
    socket: PathBuf,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("socket", &self.socket)
            .finish()
    }
}

impl StoreHandle {
    /// A connection already registered as `domid` (privileged if 0), for the
    /// toolstack to hand to a domain's process.
    pub fn connect_domain(&self, domid: DomId) -> Result<UnixStream, ServerError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|source| ServerError::SocketPair { domid, source })?;
        self.tx
            .send(Command::Attach(domid, ours))
            .map_err(|_| ServerError::ShutDown)?;
        self.wake.write(1).map_err(|_| ServerError::ShutDown)?;
        Ok(theirs)
    }

    /// Current resource use, as seen by the store's thread (waits at most `timeout`).
    pub fn stats(&self, timeout: std::time::Duration) -> Result<StoreStats, ServerError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::Stats(tx))
            .map_err(|_| ServerError::ShutDown)?;
        self.wake.write(1).map_err(|_| ServerError::ShutDown)?;
        rx.recv_timeout(timeout).map_err(|_| ServerError::ShutDown)
    }

    /// Asks the store to stop; `run` returns soon after.
    pub fn shutdown(&self) {
        if self.tx.send(Command::Shutdown).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// The privileged socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    MainListener,
    Wake,
    DomainListener(DomId),
    Conn(ConnId),
}

struct Client {
    stream: UnixStream,
    domid: DomId,
    decoder: Decoder,
    /// Bytes read but not yet decoded (kept while the client is throttled),
    /// decoded up to `in_pos`.
    inbuf: Vec<u8>,
    in_pos: usize,
    /// Encoded messages waiting to be written, and whether each is a reply.
    out: VecDeque<(Vec<u8>, bool)>,
    out_offset: usize,
    out_bytes: usize,
    pending_replies: usize,
    interest: EventSet,
    dead: bool,
}

/// The store daemon, bound but not yet running.
pub struct Store {
    cfg: StoreConfig,
    engine: Engine,
    epoll: Epoll,
    listener: UnixListener,
    wake: Arc<EventFd>,
    tx: Sender<Command>,
    rx: Receiver<Command>,
    domain_listeners: BTreeMap<DomId, UnixListener>,
    sources: HashMap<u64, Source>,
    clients: BTreeMap<ConnId, Client>,
    /// Clients holding unprocessed input while too many replies are unread.
    throttled: BTreeSet<ConnId>,
    /// Clients to close at the end of this loop iteration.
    doomed: Vec<ConnId>,
    next_token: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("socket", &self.cfg.socket)
            .field("clients", &self.clients.len())
            .finish()
    }
}

const TOKEN_MAIN: u64 = 0;
const TOKEN_WAKE: u64 = 1;
const READ_CHUNK: usize = 16 * 1024;
const READS_PER_WAKEUP: usize = 4;
const ACCEPTS_PER_WAKEUP: usize = 32;

fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    l.set_nonblocking(true).map_err(bind_err)?;
    Ok(l)
}

impl Store {
    /// Binds the privileged socket; the store serves nothing until [`Store::run`].
    pub fn bind(cfg: StoreConfig) -> Result<Store, ServerError> {
        let listener = bind_socket(&cfg.socket)?;
        let epoll = Epoll::new().map_err(ServerError::Epoll)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ServerError::EventFd)?);
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_MAIN),
            )
            .map_err(ServerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_WAKE),
            )
            .map_err(ServerError::Epoll)?;
        let (tx, rx) = mpsc::channel();
        let mut sources = HashMap::new();
        sources.insert(TOKEN_MAIN, Source::MainListener);
        sources.insert(TOKEN_WAKE, Source::Wake);
        Ok(Store {
            engine: Engine::new(cfg.quotas.clone()),
            cfg,
            epoll,
            listener,
            wake,
            tx,
            rx,
            domain_listeners: BTreeMap::new(),
            sources,
            clients: BTreeMap::new(),
            throttled: BTreeSet::new(),
            doomed: Vec::new(),
            next_token: 2,
        })
    }

    /// A handle to reach the store from other threads.
    pub fn handle(&self) -> StoreHandle {
        StoreHandle {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
            socket: self.cfg.socket.clone(),
        }
    }

    /// Serves clients until [`StoreHandle::shutdown`].
    pub fn run(mut self) -> Result<(), ServerError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServerError::Epoll(e)),
            };
            for ev in &events[..n] {
                let Some(&source) = self.sources.get(&ev.data()) else {
                    continue;
                };
                match source {
                    Source::MainListener => self.accept(None),
                    Source::DomainListener(d) => self.accept(Some(d)),
                    Source::Wake => {
                        let _ = self.wake.read();
                        while let Ok(cmd) = self.rx.try_recv() {
                            match cmd {
                                Command::Shutdown => return Ok(()),
                                Command::Attach(domid, stream) => self.add_client(stream, domid),
                                Command::Stats(reply) => {
                                    let _ = reply.send(self.stats());
                                }
                            }
                        }
                    }
                    Source::Conn(id) => {
                        let set = ev.event_set();
                        if set.intersects(EventSet::OUT) {
                            self.flush(id);
                        }
                        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                            self.read_client(id);
                        }
                    }
                }
            }
            self.resume_throttled();
            self.reap();
        }
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            connections: self.clients.len(),
            queued_output_bytes: self.clients.values().map(|c| c.out_bytes).sum(),
            buffered_input_bytes: self
                .clients
                .values()
                .map(|c| c.inbuf.len() - c.in_pos)
                .sum(),
            nodes: self.engine.tree().len(),
        }
    }

    fn token(&mut self, source: Source) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.sources.insert(t, source);
        t
    }

    fn accept(&mut self, domain: Option<DomId>) {
        // Bounded per wakeup so that a connect storm cannot starve clients.
        for _ in 0..ACCEPTS_PER_WAKEUP {
            let listener = match domain {
                None => &self.listener,
                Some(d) => match self.domain_listeners.get(&d) {
                    Some(l) => l,
                    None => return,
                },
            };
            match listener.accept() {
                Ok((stream, _)) => self.add_client(stream, domain.unwrap_or(0)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("store: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_client(&mut self, stream: UnixStream, domid: DomId) {
        if self.clients.len() >= self.cfg.max_connections {
            log::warn!("store: connection limit reached, refusing a client of domain {domid}");
            return;
        }
        if domid != 0
            && !self.engine.is_introduced(domid)
            && !self.domain_listeners.contains_key(&domid)
        {
            log::debug!("store: domain {domid} connects before INTRODUCE");
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let id = ConnId(token);
        self.sources.insert(token, Source::Conn(id));
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::warn!("store: cannot watch a new connection: {e}");
            self.sources.remove(&token);
            return;
        }
        if self.engine.connect(id, domid, domid == 0).is_err() {
            self.sources.remove(&token);
            return;
        }
        let client = Client {
            stream,
            domid,
            decoder: Decoder::new(),
            inbuf: Vec::new(),
            in_pos: 0,
            out: VecDeque::new(),
            out_offset: 0,
            out_bytes: 0,
            pending_replies: 0,
            interest: EventSet::IN,
            dead: false,
        };
        self.clients.insert(id, client);
    }

    fn read_limit(&self, domid: DomId) -> usize {
        if domid == 0 {
            // dom0 pipelines more deeply; 128 full-size replies still fit
            // well within the default output bound.
            self.cfg.quotas.outstanding_requests.max(128)
        } else {
            self.cfg.quotas.outstanding_requests
        }
    }

    /// Reads what the client sent and handles complete requests, stopping
    /// while too many replies are unread.
    fn read_client(&mut self, id: ConnId) {
        let mut buf = [0u8; READ_CHUNK];
        // A bounded number of reads per wakeup, so one busy client cannot
        // starve the others; epoll reports it again if more is waiting.
        for _ in 0..READS_PER_WAKEUP {
            self.process_input(id);
            let limit = self.read_limit_for(id);
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            if c.dead || c.pending_replies >= limit || c.in_pos < c.inbuf.len() {
                break;
            }
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.dead = true;
                    self.doomed.push(id);
                    break;
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&buf[..n]);
                    if n < buf.len() {
                        // Drained: skip the read that would say WouldBlock.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.dead = true;
                    self.doomed.push(id);
                    break;
                }
            }
        }
        self.process_input(id);
        self.update_interest(id);
    }

    fn read_limit_for(&self, id: ConnId) -> usize {
        self.clients
            .get(&id)
            .map_or(0, |c| self.read_limit(c.domid))
    }

    fn process_input(&mut self, id: ConnId) {
        let limit = self.read_limit_for(id);
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            if c.dead || c.in_pos == c.inbuf.len() {
                c.inbuf.clear();
                c.in_pos = 0;
                self.throttled.remove(&id);
                return;
            }
            if c.pending_replies >= limit {
                self.throttled.insert(id);
                return;
            }
            let (used, res) = c.decoder.decode(&c.inbuf[c.in_pos..]);
            c.in_pos += used;
            match res {
                Ok(None) => {}
                Ok(Some(msg)) => {
                    let out = self.engine.handle(id, msg);
                    // Sockets open/close before the reply leaves, so a client
                    // seeing OK can rely on them.
                    self.domain_events();
                    self.deliver(out);
                }
                Err(WireError::UnknownType { req_id, tx_id, ty }) => {
                    log::debug!("store: {id:?} sent unknown type {ty}");
                    self.deliver(vec![(id, Message::error(req_id, tx_id, XsError::ENOSYS))]);
                }
                Err(e @ WireError::TooLong(_)) => {
                    log::warn!("store: disconnecting {id:?}: {e}");
                    c.dead = true;
                    self.doomed.push(id);
                    return;
                }
            }
        }
    }

    fn deliver(&mut self, out: Vec<(ConnId, Message)>) {
        let mut touched = Vec::new();
        for (i, (cid, msg)) in out.into_iter().enumerate() {
            let Some(c) = self.clients.get_mut(&cid) else {
                continue;
            };
            if c.dead {
                continue;
            }
            let bytes = msg.encode();
            if c.out_bytes + bytes.len() > self.cfg.max_output_bytes {
                log::warn!(
                    "store: disconnecting {cid:?} (domain {}): it does not read its messages",
                    c.domid
                );
                c.dead = true;
                self.doomed.push(cid);
                continue;
            }
            // The first message of an engine output is the reply to the request.
            let is_reply = i == 0 && msg.ty != super::wire::MsgType::WatchEvent;
            c.out_bytes += bytes.len();
            if is_reply {
                c.pending_replies += 1;
            }
            c.out.push_back((bytes, is_reply));
            touched.push(cid);
        }
        touched.dedup();
        for cid in touched {
            self.flush(cid);
        }
    }

    fn flush(&mut self, id: ConnId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.dead {
            return;
        }
        while let Some((front, is_reply)) = c.out.front() {
            let is_reply = *is_reply;
            // MSG_NOSIGNAL: a vanished peer is an error here, never a SIGPIPE.
            let sent = nix::sys::socket::send(
                c.stream.as_raw_fd(),
                &front[c.out_offset..],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from);
            match sent {
                Ok(n) => {
                    c.out_offset += n;
                    if c.out_offset == front.len() {
                        c.out_bytes -= front.len();
                        c.out_offset = 0;
                        c.out.pop_front();
                        if is_reply {
                            c.pending_replies -= 1;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.dead = true;
                    self.doomed.push(id);
                    break;
                }
            }
        }
        self.update_interest(id);
    }

    /// Lets throttled clients whose replies have drained continue with the
    /// requests they already sent. Runs from the main loop, never nested in
    /// request handling, so the stack stays flat.
    fn resume_throttled(&mut self) {
        let ready: Vec<ConnId> = self
            .throttled
            .iter()
            .copied()
            .filter(|id| {
                self.clients
                    .get(id)
                    .is_some_and(|c| c.pending_replies < self.read_limit_for(*id))
            })
            .collect();
        for id in ready {
            self.process_input(id);
            self.update_interest(id);
        }
    }

    fn update_interest(&mut self, id: ConnId) {
        let limit = self.read_limit_for(id);
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.dead {
            return;
        }
        let mut want = EventSet::empty();
        if c.pending_replies < limit && c.in_pos == c.inbuf.len() {
            want |= EventSet::IN;
        }
        if !c.out.is_empty() {
            want |= EventSet::OUT;
        }
        if want != c.interest {
            let ev = EpollEvent::new(want, id.0);
            if self
                .epoll
                .ctl(ControlOperation::Modify, c.stream.as_raw_fd(), ev)
                .is_err()
            {
                c.dead = true;
                self.doomed.push(id);
                return;
            }
            c.interest = want;
        }
    }

    fn domain_events(&mut self) {
        for ev in self.engine.take_domain_events() {
            match ev {
                DomainEvent::Introduced(d) => self.open_domain_socket(d),
                DomainEvent::Released(d) => {
                    if let Some(l) = self.domain_listeners.remove(&d) {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            l.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        self.sources
                            .retain(|_, s| !matches!(s, Source::DomainListener(x) if *x == d));
                    }
                    let _ = std::fs::remove_file(domain_socket_path(&self.cfg.socket, d));
                    for (id, c) in self.clients.iter_mut().filter(|(_, c)| c.domid == d) {
                        c.dead = true;
                        self.doomed.push(*id);
                    }
                }
            }
        }
    }

    fn open_domain_socket(&mut self, domid: DomId) {
        let dir = domain_socket_dir(&self.cfg.socket);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            log::error!("store: cannot create {}: {e}", dir.display());
            return;
        }
        let path = domain_socket_path(&self.cfg.socket, domid);
        match bind_socket(&path) {
            Ok(l) => {
                let token = self.token(Source::DomainListener(domid));
                let ev = EpollEvent::new(EventSet::IN, token);
                if let Err(e) = self.epoll.ctl(ControlOperation::Add, l.as_raw_fd(), ev) {
                    log::error!("store: cannot watch {}: {e}", path.display());
                    self.sources.remove(&token);
                    return;
                }
                self.domain_listeners.insert(domid, l);
            }
            Err(e) => log::error!("store: domain {domid}: {e}"),
        }
    }

    /// Closes connections marked dead.
    fn reap(&mut self) {
        let dead = std::mem::take(&mut self.doomed);
        for id in dead {
            if let Some(c) = self.clients.remove(&id) {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.sources.remove(&id.0);
            self.throttled.remove(&id);
            self.engine.disconnect(id);
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cfg.socket);
        for d in self.domain_listeners.keys() {
            let _ = std::fs::remove_file(domain_socket_path(&self.cfg.socket, *d));
        }
        let _ = std::fs::remove_dir(domain_socket_dir(&self.cfg.socket));
    }
}

/// Binds a store and runs it on a new thread.
pub fn spawn(
    cfg: StoreConfig,
) -> Result<(StoreHandle, JoinHandle<Result<(), ServerError>>), ServerError> {
    let store = Store::bind(cfg)?;
    let handle = store.handle();
    let thread = std::thread::Builder::new()
        .name("xenstore".into())
        .spawn(move || store.run())
        .map_err(|e| ServerError::Bind {
            path: handle.socket.clone(),
            source: e,
        })?;
    Ok((handle, thread))
}
