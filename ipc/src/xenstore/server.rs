//! The store daemon: a single-threaded epoll loop serving the [`Engine`] over
//! Unix stream sockets.
//!
//! A connection's domain id comes from where it connected, never from what it
//! sends: the main socket is dom0 (privileged); INTRODUCE of domain N by dom0
//! opens `<socket>.d/<N>` whose connections speak for N; RELEASE closes that
//! socket and the domain's connections. [`StoreHandle::connect_domain`] hands
//! out one end of a socket pair already registered as a domain.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::engine::{ConnId, DomainEvent, Engine};
use super::limits::{ConnLimits, DomainBooks};
use super::outqueue::{OutQueue, Queued};
use super::perms::DomId;
use super::store_handle::Command;
pub use super::store_handle::{
    domain_socket_dir, domain_socket_path, StoreConfig, StoreHandle, StoreStats,
};
use super::wire::{Decoder, Message, WireError, XsError};

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
    out: OutQueue,
    pending_replies: usize,
    /// When the message the decoder holds in part began to arrive.
    partial_since: Option<Instant>,
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
    books: DomainBooks,
    /// When to next look for half-sent messages and stale watch events.
    next_sweep: Instant,
    counters: Counters,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    refused: u64,
    timed_out: u64,
    dropped_events: u64,
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
            books: DomainBooks::default(),
            next_sweep: Instant::now(),
            counters: Counters::default(),
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
            let wait = self
                .next_sweep
                .saturating_duration_since(Instant::now())
                .as_millis()
                .saturating_add(1);
            let wait = i32::try_from(wait).unwrap_or(i32::MAX);
            let n = match self.epoll.wait(wait, &mut events) {
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
            if Instant::now() >= self.next_sweep {
                self.sweep();
            }
            self.resume_throttled();
            self.reap();
        }
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            connections: self.clients.len(),
            queued_output_bytes: self.clients.values().map(|c| c.out.bytes()).sum(),
            buffered_input_bytes: self
                .clients
                .values()
                .map(|c| c.inbuf.len() - c.in_pos)
                .sum(),
            nodes: self.engine.tree().len(),
            refused_connections: self.counters.refused,
            timed_out_messages: self.counters.timed_out,
            dropped_events: self.counters.dropped_events,
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
        let lim = ConnLimits {
            total: self.cfg.max_connections,
            reserved_for_dom0: self.cfg.reserved_for_dom0,
            per_domain: self.cfg.quotas.connections_per_domain,
        };
        if !self.books.may_connect(domid, self.clients.len(), lim) {
            log::warn!("store: connection limit reached, refusing a client of domain {domid}");
            self.counters.refused += 1;
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
            out: OutQueue::default(),
            pending_replies: 0,
            partial_since: None,
            interest: EventSet::IN,
            dead: false,
        };
        self.books.connected(domid);
        self.clients.insert(id, client);
    }

    /// Unread replies one connection may have before the store stops reading it.
    fn read_limit(&self, domid: DomId) -> usize {
        if domid == 0 {
            // dom0 pipelines more deeply; 128 full-size replies still fit
            // well within the default output bound.
            self.cfg.quotas.outstanding_requests.max(128)
        } else {
            self.cfg.quotas.outstanding_requests
        }
    }

    /// Whether the store may handle another request of `id`: its connection
    /// is under its reply limit and (guests) its domain under its
    /// outstanding-request quota, which also counts the watch events it caused.
    fn may_read(&self, id: ConnId) -> bool {
        let Some(c) = self.clients.get(&id) else {
            return false;
        };
        c.pending_replies < self.read_limit(c.domid)
            && (c.domid == 0
                || self.books.outstanding(c.domid) < self.cfg.quotas.outstanding_requests)
    }

    /// Reads what the client sent and handles complete requests, stopping
    /// while too many replies are unread.
    fn read_client(&mut self, id: ConnId) {
        let mut buf = [0u8; READ_CHUNK];
        // A bounded number of reads per wakeup, so one busy client cannot
        // starve the others; epoll reports it again if more is waiting.
        for _ in 0..READS_PER_WAKEUP {
            self.process_input(id);
            let may_read = self.may_read(id);
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            if c.dead || !may_read || c.in_pos < c.inbuf.len() {
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

    fn process_input(&mut self, id: ConnId) {
        loop {
            let may_read = self.may_read(id);
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            if c.dead || c.in_pos == c.inbuf.len() {
                c.inbuf.clear();
                c.in_pos = 0;
                if c.decoder.is_mid_message() {
                    c.partial_since.get_or_insert_with(Instant::now);
                }
                self.throttled.remove(&id);
                return;
            }
            if !may_read {
                self.throttled.insert(id);
                return;
            }
            let (used, res) = c.decoder.decode(&c.inbuf[c.in_pos..]);
            c.in_pos += used;
            if !matches!(res, Ok(None)) {
                c.partial_since = None;
            }
            let domid = c.domid;
            match res {
                Ok(None) => {}
                Ok(Some(msg)) => {
                    let out = self.engine.handle(id, msg);
                    // Sockets open/close before the reply leaves, so a client
                    // seeing OK can rely on them.
                    self.domain_events();
                    self.deliver(out, (domid != 0).then_some(domid));
                }
                Err(WireError::UnknownType { req_id, tx_id, ty }) => {
                    log::debug!("store: {id:?} sent unknown type {ty}");
                    let err = Message::error(req_id, tx_id, XsError::ENOSYS);
                    self.deliver(vec![(id, err)], None);
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

    /// Queues an engine output: the reply first, then watch events, which
    /// are charged to `causer` (the unprivileged domain whose request caused
    /// them, `None` for dom0).
    fn deliver(&mut self, out: Vec<(ConnId, Message)>, causer: Option<DomId>) {
        let mut touched = Vec::new();
        let now = Instant::now();
        for (i, (cid, msg)) in out.into_iter().enumerate() {
            let Some(c) = self.clients.get_mut(&cid) else {
                continue;
            };
            if c.dead {
                continue;
            }
            let bytes = msg.encode();
            // The first message of an engine output is the reply to the request.
            let is_reply = i == 0 && msg.ty != super::wire::MsgType::WatchEvent;
            if is_reply {
                // Replies are bounded by the reply limit, never dropped.
                c.pending_replies += 1;
                if c.domid != 0 {
                    self.books.charge(c.domid);
                }
                c.out.push(bytes, Queued::Reply);
                touched.push(cid);
                continue;
            }
            if c.out.bytes() + bytes.len() > self.cfg.max_output_bytes {
                if c.domid != 0 {
                    // C xenstored drops events beyond a guest's memory quota.
                    log::debug!(
                        "store: dropping a watch event for {cid:?} (domain {})",
                        c.domid
                    );
                    self.counters.dropped_events += 1;
                    continue;
                }
                if causer.is_none() {
                    log::warn!(
                        "store: disconnecting {cid:?} (domain 0): it does not read its messages"
                    );
                    c.dead = true;
                    self.doomed.push(cid);
                    continue;
                }
                // dom0 receives every event a guest causes: the guest waits
                // (outstanding quota) until dom0 has read or they time out.
            }
            if let Some(d) = causer {
                self.books.charge(d);
            }
            c.out.push(
                bytes,
                Queued::Event {
                    causer,
                    queued_at: now,
                },
            );
            touched.push(cid);
        }
        touched.dedup();
        for cid in touched {
            self.flush(cid);
        }
    }

    /// Discharges a message that left (or was dropped from) `receiver`'s queue.
    fn discharge(&mut self, receiver: DomId, kind: Queued) {
        let limit = self.cfg.quotas.outstanding_requests;
        match kind {
            Queued::Reply if receiver != 0 => self.books.discharge(receiver, limit),
            Queued::Event {
                causer: Some(d), ..
            } => self.books.discharge(d, limit),
            _ => {}
        }
    }

    fn flush(&mut self, id: ConnId) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.dead {
            return;
        }
        let mut done = Vec::new();
        while let Some(front) = c.out.unsent() {
            // MSG_NOSIGNAL: a vanished peer is an error here, never a SIGPIPE.
            let sent = nix::sys::socket::send(
                c.stream.as_raw_fd(),
                front,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from);
            match sent {
                Ok(n) => {
                    if let Some(kind) = c.out.advance(n) {
                        if kind == Queued::Reply {
                            c.pending_replies -= 1;
                        }
                        done.push(kind);
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
        let domid = c.domid;
        for kind in done {
            self.discharge(domid, kind);
        }
        self.update_interest(id);
    }

    /// Lets throttled clients whose replies have drained, and clients of
    /// domains whose outstanding count dropped, continue. Runs from the main
    /// loop, never nested in request handling, so the stack stays flat.
    fn resume_throttled(&mut self) {
        let woken = self.books.take_woken();
        let ready: Vec<ConnId> = self
            .clients
            .iter()
            .filter(|(id, c)| self.throttled.contains(id) || woken.contains(&c.domid))
            .map(|(id, _)| *id)
            .filter(|id| self.may_read(*id))
            .collect();
        for id in ready {
            self.process_input(id);
            self.update_interest(id);
        }
    }

    /// Closes connections whose message stayed half-sent too long and drops
    /// watch events unread too long; schedules the next sweep.
    fn sweep(&mut self) {
        let now = Instant::now();
        let (partial, events) = (
            self.cfg.partial_message_timeout,
            self.cfg.watch_event_timeout,
        );
        let mut next = now + partial.min(events);
        let mut discharges = Vec::new();
        for (id, c) in self.clients.iter_mut().filter(|(_, c)| !c.dead) {
            if let Some(since) = c.partial_since {
                if now.saturating_duration_since(since) >= partial {
                    log::warn!(
                        "store: closing {id:?} (domain {}): half-sent message timed out",
                        c.domid
                    );
                    self.counters.timed_out += 1;
                    c.dead = true;
                    self.doomed.push(*id);
                    continue;
                }
                next = next.min(since + partial);
            }
            for kind in c.out.expire(now, events) {
                self.counters.dropped_events += 1;
                discharges.push((c.domid, kind));
            }
            if let Some(oldest) = c.out.oldest_event() {
                next = next.min(oldest + events);
            }
        }
        for (domid, kind) in discharges {
            self.discharge(domid, kind);
        }
        self.next_sweep = next;
    }

    fn update_interest(&mut self, id: ConnId) {
        let may_read = self.may_read(id);
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.dead {
            return;
        }
        let mut want = EventSet::empty();
        if may_read && c.in_pos == c.inbuf.len() {
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
            if let Some(mut c) = self.clients.remove(&id) {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.books.disconnected(c.domid);
                for kind in c.out.clear() {
                    self.discharge(c.domid, kind);
                }
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
