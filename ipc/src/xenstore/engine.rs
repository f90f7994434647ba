//! The request engine: connections, domains, watches and transactions around
//! the node tree. It does no I/O and is deterministic: the same calls give the
//! same outputs, which makes it easy to test and to fuzz.

use std::collections::{BTreeMap, HashMap};

use super::ops::{self, Caller};
use super::path;
use super::perms::{DomId, Perms};
use super::tree::{Change, Match, Transaction, Tree, View};
use super::watch::{Watch, INTRODUCE_DOMAIN, RELEASE_DOMAIN};
use super::wire::{split_strings, Message, MsgType, XsError};
use super::Quotas;

/// Identifies one client connection. Chosen by the caller of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Errors of the engine's own API (requests never fail the engine; they get
/// error replies).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("connection {0:?} already exists")]
    DuplicateConn(ConnId),
}

/// Domain lifecycle changes the transport must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainEvent {
    /// INTRODUCE succeeded: the domain may now connect.
    Introduced(DomId),
    /// RELEASE succeeded: close the domain's connections and socket. The
    /// engine has already forgotten its connections.
    Released(DomId),
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    privileged: bool,
    watches: Vec<Watch>,
    transactions: HashMap<u32, Transaction>,
}

#[derive(Debug, Default)]
struct Domain {
    target: Option<DomId>,
}

/// Replies and events produced by one request, in sending order.
pub type Output = Vec<(ConnId, Message)>;

/// The store's state and request handling.
#[derive(Debug)]
pub struct Engine {
    tree: Tree,
    conns: BTreeMap<ConnId, Conn>,
    domains: BTreeMap<DomId, Domain>,
    quotas: Quotas,
    next_tx_id: u32,
    domain_events: Vec<DomainEvent>,
}

const OK: &[u8] = b"OK\0";

fn one_arg(payload: &[u8]) -> Result<&str, XsError> {
    let parts = split_strings(payload).ok_or(XsError::EINVAL)?;
    match parts.as_slice() {
        [one] => std::str::from_utf8(one).map_err(|_| XsError::EINVAL),
        _ => Err(XsError::EINVAL),
    }
}

fn parse_domid(s: &[u8]) -> Result<DomId, XsError> {
    let s = std::str::from_utf8(s).map_err(|_| XsError::EINVAL)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(XsError::EINVAL);
    }
    s.parse().map_err(|_| XsError::EINVAL)
}

fn with_nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Whether a request of this type runs inside the transaction its header names.
fn uses_transaction(ty: MsgType) -> bool {
    matches!(
        ty,
        MsgType::Directory
            | MsgType::DirectoryPart
            | MsgType::Read
            | MsgType::GetPerms
            | MsgType::Write
            | MsgType::Mkdir
            | MsgType::Rm
            | MsgType::SetPerms
            | MsgType::TransactionStart
            | MsgType::TransactionEnd
    )
}

impl Engine {
    /// An engine with an empty tree (only `/`, owned by dom0) and dom0 introduced.
    pub fn new(quotas: Quotas) -> Engine {
        let mut domains = BTreeMap::new();
        domains.insert(0, Domain::default());
        Engine {
            tree: Tree::new(),
            conns: BTreeMap::new(),
            domains,
            quotas,
            next_tx_id: 1,
            domain_events: Vec::new(),
        }
    }

    /// The quotas in force.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The live tree (for inspection).
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Registers a connection speaking for `domid`.
    pub fn connect(
        &mut self,
        id: ConnId,
        domid: DomId,
        privileged: bool,
    ) -> Result<(), EngineError> {
        if self.conns.contains_key(&id) {
            return Err(EngineError::DuplicateConn(id));
        }
        let conn = Conn {
            domid,
            privileged,
            watches: Vec::new(),
            transactions: HashMap::new(),
        };
        self.conns.insert(id, conn);
        Ok(())
    }

    /// Forgets a connection with its watches and open transactions.
    pub fn disconnect(&mut self, id: ConnId) {
        self.conns.remove(&id);
    }

    /// Whether `id` is a live connection.
    pub fn is_connected(&self, id: ConnId) -> bool {
        self.conns.contains_key(&id)
    }

    /// The domain a connection speaks for.
    pub fn conn_domain(&self, id: ConnId) -> Option<DomId> {
        self.conns.get(&id).map(|c| c.domid)
    }

    /// Whether `domid` is introduced (dom0 always is).
    pub fn is_introduced(&self, domid: DomId) -> bool {
        self.domains.contains_key(&domid)
    }

    /// Domain lifecycle changes since the last call.
    pub fn take_domain_events(&mut self) -> Vec<DomainEvent> {
        std::mem::take(&mut self.domain_events)
    }

    /// Number of watches held by connections of `domid`.
    fn domain_watches(&self, domid: DomId) -> usize {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.watches.len())
            .sum()
    }

    /// Bytes charged to `domid`: the nodes it owns, the journals of its open
    /// transactions and its watches.
    pub fn domain_memory(&self, domid: DomId) -> usize {
        let conns: usize = self
            .conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| {
                let tx: usize = c.transactions.values().map(Transaction::bytes).sum();
                let w: usize = c.watches.iter().map(|w| w.path.len() + w.token.len()).sum();
                tx + w
            })
            .sum();
        self.tree.bytes_owned_by(domid) + conns
    }

    /// Whether a request may grow the caller's memory: writes, watches,
    /// transaction starts and anything inside a transaction (its journal).
    fn may_grow(ty: MsgType, tx_id: u32) -> bool {
        matches!(
            ty,
            MsgType::Write
                | MsgType::Mkdir
                | MsgType::SetPerms
                | MsgType::Watch
                | MsgType::TransactionStart
        ) || (tx_id != 0 && uses_transaction(ty) && ty != MsgType::TransactionEnd)
    }

    /// Handles one request from `id`. Returns the reply (first) and any watch
    /// events, addressed to their connections. Unknown connections get nothing.
    pub fn handle(&mut self, id: ConnId, msg: Message) -> Output {
        let Some(conn) = self.conns.get(&id) else {
            return Vec::new();
        };
        let domid = conn.domid;
        let caller = Caller {
            domid,
            privileged: conn.privileged,
            target: self.domains.get(&domid).and_then(|d| d.target),
        };
        let (req_id, tx_id, ty) = (msg.req_id, msg.tx_id, msg.ty);
        let mut out = Vec::new();
        let mut changes = Vec::new();
        let mut initial_event = None;
        let result = self.dispatch(id, &caller, &msg, &mut changes, &mut initial_event);
        let reply = match result {
            Ok(payload) => Message::new(ty, req_id, tx_id, payload),
            Err(e) => Message::error(req_id, tx_id, e),
        };
        out.push((id, reply));
        if let Some(ev) = initial_event {
            out.push((id, ev));
        }
        self.fire(&changes, &mut out);
        out
    }

    fn dispatch(
        &mut self,
        id: ConnId,
        caller: &Caller,
        msg: &Message,
        changes: &mut Vec<Change>,
        initial_event: &mut Option<Message>,
    ) -> Result<Vec<u8>, XsError> {
        let tx_id = if uses_transaction(msg.ty) {
            msg.tx_id
        } else {
            0
        };
        // Checked before the request, as C xenstored's hard memory quota: a
        // domain overshoots it by at most one request's worth.
        if !caller.privileged
            && Self::may_grow(msg.ty, tx_id)
            && self.domain_memory(caller.domid) >= self.quotas.memory_per_domain
        {
            return Err(XsError::ENOMEM);
        }
        match msg.ty {
            MsgType::TransactionStart => return self.transaction_start(id, caller, tx_id),
            MsgType::TransactionEnd => {
                return self.transaction_end(id, tx_id, &msg.payload, changes)
            }
            MsgType::Watch => return self.watch(id, caller, &msg.payload, initial_event),
            MsgType::Unwatch => return self.unwatch(id, caller, &msg.payload),
            MsgType::ResetWatches => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.watches.clear();
                    c.transactions.clear();
                }
                return Ok(OK.to_vec());
            }
            MsgType::GetDomainPath => {
                let d = parse_domid(one_arg(&msg.payload)?.as_bytes())?;
                return Ok(with_nul(&path::domain_path(d)));
            }
            MsgType::IsDomainIntroduced => {
                let d = parse_domid(one_arg(&msg.payload)?.as_bytes())?;
                return Ok(if self.is_introduced(d) {
                    b"T\0".to_vec()
                } else {
                    b"F\0".to_vec()
                });
            }
            MsgType::Introduce => return self.introduce(caller, &msg.payload, changes),
            MsgType::Release => return self.release(caller, &msg.payload, changes),
            MsgType::SetTarget => return self.set_target(caller, &msg.payload),
            MsgType::Control => return self.control(caller, &msg.payload),
            MsgType::Directory
            | MsgType::DirectoryPart
            | MsgType::Read
            | MsgType::GetPerms
            | MsgType::Write
            | MsgType::Mkdir
            | MsgType::Rm
            | MsgType::SetPerms => {}
            MsgType::WatchEvent
            | MsgType::Error
            | MsgType::Resume
            | MsgType::GetFeature
            | MsgType::SetFeature
            | MsgType::GetQuota
            | MsgType::SetQuota => return Err(XsError::ENOSYS),
        }
        self.node_op(id, caller, msg, tx_id, changes)
    }

    fn node_op(
        &mut self,
        id: ConnId,
        caller: &Caller,
        msg: &Message,
        tx_id: u32,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<u8>, XsError> {
        let max_rel = (!caller.privileged).then_some(self.quotas.path_len);
        let quotas = self.quotas.clone();
        let conn = self.conns.get_mut(&id).ok_or(XsError::EINVAL)?;
        let mut view = if tx_id == 0 {
            View::live(&mut self.tree)
        } else {
            let tx = conn.transactions.get_mut(&tx_id).ok_or(XsError::ENOENT)?;
            let limit = (!caller.privileged).then_some(quotas.transaction_nodes);
            View::transaction(&mut self.tree, tx, limit)
        };
        let name = |raw: &[u8]| -> Result<String, XsError> {
            let s = std::str::from_utf8(raw).map_err(|_| XsError::EINVAL)?;
            let p = path::canonicalize(s, caller.domid);
            if path::is_valid_node_name(&p, max_rel) {
                Ok(p)
            } else {
                Err(XsError::EINVAL)
            }
        };
        let result = match msg.ty {
            MsgType::Read => {
                ops::read(&mut view, caller, &name(one_arg(&msg.payload)?.as_bytes())?)
            }
            MsgType::Directory => {
                ops::directory(&mut view, caller, &name(one_arg(&msg.payload)?.as_bytes())?)
            }
            MsgType::GetPerms => {
                ops::get_perms(&mut view, caller, &name(one_arg(&msg.payload)?.as_bytes())?)
            }
            MsgType::DirectoryPart => {
                let parts = split_strings(&msg.payload).ok_or(XsError::EINVAL)?;
                let [p, off] = parts.as_slice() else {
                    return Err(XsError::EINVAL);
                };
                let off = std::str::from_utf8(off)
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok());
                ops::directory_part(&mut view, caller, &name(p)?, off.ok_or(XsError::EINVAL)?)
            }
            MsgType::Write => {
                let nul = msg
                    .payload
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(XsError::EINVAL)?;
                let p = name(&msg.payload[..nul])?;
                ops::write(&mut view, caller, &quotas, &p, &msg.payload[nul + 1..])
                    .map(|()| OK.to_vec())
            }
            MsgType::Mkdir => ops::mkdir(
                &mut view,
                caller,
                &quotas,
                &name(one_arg(&msg.payload)?.as_bytes())?,
            )
            .map(|()| OK.to_vec()),
            MsgType::Rm => ops::rm(&mut view, caller, &name(one_arg(&msg.payload)?.as_bytes())?)
                .map(|()| OK.to_vec()),
            MsgType::SetPerms => {
                let parts = split_strings(&msg.payload).ok_or(XsError::EINVAL)?;
                let (p, perm_strs) = parts.split_first().ok_or(XsError::EINVAL)?;
                let strs: Vec<&str> = perm_strs
                    .iter()
                    .map(|s| std::str::from_utf8(s).map_err(|_| XsError::EINVAL))
                    .collect::<Result<_, _>>()?;
                let perms = Perms::from_strs(&strs).map_err(|_| XsError::EINVAL)?;
                ops::set_perms(&mut view, caller, &quotas, &name(p)?, perms).map(|()| OK.to_vec())
            }
            _ => Err(XsError::ENOSYS),
        };
        changes.append(&mut view.fired);
        result
    }

    fn transaction_start(
        &mut self,
        id: ConnId,
        caller: &Caller,
        tx_id: u32,
    ) -> Result<Vec<u8>, XsError> {
        let conn = self.conns.get_mut(&id).ok_or(XsError::EINVAL)?;
        if tx_id != 0 {
            return Err(if conn.transactions.contains_key(&tx_id) {
                XsError::EBUSY
            } else {
                XsError::ENOENT
            });
        }
        if !caller.privileged && conn.transactions.len() >= self.quotas.transactions {
            return Err(XsError::ENOSPC);
        }
        let mut new_id = self.next_tx_id;
        while new_id == 0 || conn.transactions.contains_key(&new_id) {
            new_id = new_id.wrapping_add(1);
        }
        self.next_tx_id = new_id.wrapping_add(1);
        conn.transactions.insert(new_id, Transaction::default());
        Ok(with_nul(&new_id.to_string()))
    }

    fn transaction_end(
        &mut self,
        id: ConnId,
        tx_id: u32,
        payload: &[u8],
        changes: &mut Vec<Change>,
    ) -> Result<Vec<u8>, XsError> {
        let commit = match one_arg(payload)? {
            "T" => true,
            "F" => false,
            _ => return Err(XsError::EINVAL),
        };
        let conn = self.conns.get_mut(&id).ok_or(XsError::EINVAL)?;
        let tx = conn.transactions.remove(&tx_id).ok_or(XsError::ENOENT)?;
        if commit {
            changes.extend(tx.commit(&mut self.tree)?);
        }
        Ok(OK.to_vec())
    }

    fn watch(
        &mut self,
        id: ConnId,
        caller: &Caller,
        payload: &[u8],
        initial_event: &mut Option<Message>,
    ) -> Result<Vec<u8>, XsError> {
        let parts = split_strings(payload).ok_or(XsError::EINVAL)?;
        let [p, token, ..] = parts.as_slice() else {
            return Err(XsError::EINVAL);
        };
        let max_rel = (!caller.privileged).then_some(self.quotas.path_len);
        let w = Watch::parse(p, token, caller.domid, max_rel)?;
        let count = self.domain_watches(caller.domid);
        let conn = self.conns.get_mut(&id).ok_or(XsError::EINVAL)?;
        if conn
            .watches
            .iter()
            .any(|x| x.path == w.path && x.token == w.token)
        {
            return Err(XsError::EEXIST);
        }
        if !caller.privileged && count >= self.quotas.watches_per_domain {
            return Err(XsError::E2BIG);
        }
        // Xen fires every new watch once, so clients need not read state first.
        *initial_event = Some(Message::watch_event(
            &w.report(&w.path, caller.domid),
            &w.token,
        ));
        conn.watches.push(w);
        Ok(OK.to_vec())
    }

    fn unwatch(&mut self, id: ConnId, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        let parts = split_strings(payload).ok_or(XsError::EINVAL)?;
        let [p, token, ..] = parts.as_slice() else {
            return Err(XsError::EINVAL);
        };
        let w = Watch::parse(p, token, caller.domid, None)?;
        let conn = self.conns.get_mut(&id).ok_or(XsError::EINVAL)?;
        let before = conn.watches.len();
        conn.watches
            .retain(|x| !(x.path == w.path && x.token == w.token));
        if conn.watches.len() == before {
            return Err(XsError::ENOENT);
        }
        Ok(OK.to_vec())
    }

    fn special_change(name: &str) -> Change {
        Change::new(name, Match::Subtree, Perms::owned_by(0))
    }

    fn introduce(
        &mut self,
        caller: &Caller,
        payload: &[u8],
        changes: &mut Vec<Change>,
    ) -> Result<Vec<u8>, XsError> {
        if !caller.privileged {
            return Err(XsError::EACCES);
        }
        let parts = split_strings(payload).ok_or(XsError::EINVAL)?;
        let [d, _mfn, _evtchn, ..] = parts.as_slice() else {
            return Err(XsError::EINVAL);
        };
        let domid = parse_domid(d)?;
        if self.domains.contains_key(&domid) {
            return Err(XsError::EEXIST);
        }
        self.domains.insert(domid, Domain::default());
        self.domain_events.push(DomainEvent::Introduced(domid));
        changes.push(Self::special_change(INTRODUCE_DOMAIN));
        Ok(OK.to_vec())
    }

    /// RELEASE: forget the domain's connections, watches and transactions,
    /// remove its home subtree, scrub its id from every permission list
    /// (XSA-322) and fire `@releaseDomain`.
    fn release(
        &mut self,
        caller: &Caller,
        payload: &[u8],
        changes: &mut Vec<Change>,
    ) -> Result<Vec<u8>, XsError> {
        if !caller.privileged {
            return Err(XsError::EACCES);
        }
        let domid = parse_domid(one_arg(payload)?.as_bytes())?;
        if domid == 0 {
            return Err(XsError::EINVAL);
        }
        if self.domains.remove(&domid).is_none() {
            return Err(XsError::ENOENT);
        }
        self.conns.retain(|_, c| c.domid != domid);
        for d in self.domains.values_mut() {
            if d.target == Some(domid) {
                d.target = None;
            }
        }
        let home = path::domain_path(domid);
        let mut view = View::live(&mut self.tree);
        if view.get(&home).ok().flatten().is_some() {
            // Removing from the live tree cannot fail.
            let _ = ops::remove_subtree(&mut view, &home);
        }
        changes.append(&mut view.fired);
        self.tree.forget_domain(domid);
        self.domain_events.push(DomainEvent::Released(domid));
        changes.push(Self::special_change(RELEASE_DOMAIN));
        Ok(OK.to_vec())
    }

    fn set_target(&mut self, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        if !caller.privileged {
            return Err(XsError::EACCES);
        }
        let parts = split_strings(payload).ok_or(XsError::EINVAL)?;
        let [d, t] = parts.as_slice() else {
            return Err(XsError::EINVAL);
        };
        let (domid, target) = (parse_domid(d)?, parse_domid(t)?);
        if !self.domains.contains_key(&target) {
            return Err(XsError::ENOENT);
        }
        let dom = self.domains.get_mut(&domid).ok_or(XsError::ENOENT)?;
        dom.target = Some(target);
        Ok(OK.to_vec())
    }

    /// CONTROL (XS_DEBUG): privileged only; supports `check`, `print <text>` and `help`.
    fn control(&mut self, caller: &Caller, payload: &[u8]) -> Result<Vec<u8>, XsError> {
        if !caller.privileged {
            return Err(XsError::EACCES);
        }
        let parts = split_strings(payload).ok_or(XsError::EINVAL)?;
        match parts.first().copied() {
            Some(b"check") => Ok(OK.to_vec()),
            Some(b"print") => {
                let text = parts
                    .get(1)
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                log::info!("xenstore control print: {text}");
                Ok(OK.to_vec())
            }
            Some(b"help") => Ok(b"check\nprint <text>\nhelp\n\0".to_vec()),
            _ => Err(XsError::EINVAL),
        }
    }

    /// Sends watch events for `changes` to every connection that may read the
    /// changed node; special events only reach privileged connections.
    fn fire(&self, changes: &[Change], out: &mut Output) {
        for ch in changes {
            let special = ch.path.starts_with('@');
            for (&cid, conn) in &self.conns {
                if conn.watches.is_empty() {
                    continue;
                }
                let target = self.domains.get(&conn.domid).and_then(|d| d.target);
                let allowed = if special {
                    conn.privileged
                } else {
                    let can = |p: &Perms| p.rights_for(conn.domid, conn.privileged, target).read;
                    can(&ch.perms) || ch.old_perms.as_ref().is_some_and(can)
                };
                if !allowed {
                    continue;
                }
                for w in &conn.watches {
                    if let Some(p) = w.event_path(ch, conn.domid) {
                        out.push((cid, Message::watch_event(&p, &w.token)));
                    }
                }
            }
        }
    }
}
