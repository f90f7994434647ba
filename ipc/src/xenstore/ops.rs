//! Node operations (READ, WRITE, MKDIR, RM, DIRECTORY[_PART], GET/SET_PERMS)
//! on a [`View`], with Xen's permission and quota checks.

use super::path;
use super::perms::{DomId, Perms, Rights};
use super::tree::{Change, Match, Node, View};
use super::wire::{XsError, PAYLOAD_MAX};
use super::Quotas;

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub domid: DomId,
    pub privileged: bool,
    /// The domain this one acts for (SET_TARGET), if any.
    pub target: Option<DomId>,
}

impl Caller {
    fn rights(&self, node: &Node) -> Rights {
        node.perms
            .rights_for(self.domid, self.privileged, self.target)
    }
}

/// The access an operation needs on a node.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    Read,
    Write,
    /// Write access and ownership (SET_PERMS).
    WriteOwner,
}

impl Need {
    fn granted(self, r: Rights) -> bool {
        match self {
            Need::Read => r.read,
            Need::Write => r.write,
            Need::WriteOwner => r.write && r.owner,
        }
    }
    /// Xen's `errno_from_parents` tests `parent_perm & perm`: any bit suffices.
    fn any_bit(self, r: Rights) -> bool {
        match self {
            Need::Read => r.read,
            Need::Write => r.write,
            Need::WriteOwner => r.write || r.owner,
        }
    }
}

/// Xen's `get_node`: the node if it exists and `caller` has `need` on it.
/// A node that exists without permission gives `EACCES`. A missing node gives
/// `ENOENT` only if the caller's rights on the nearest existing ancestor include
/// the needed access; otherwise `EACCES`, so nothing leaks about hidden nodes.
pub fn get_node(
    view: &mut View<'_>,
    caller: &Caller,
    p: &str,
    need: Need,
) -> Result<Node, XsError> {
    if let Some(node) = view.get(p)? {
        return if need.granted(caller.rights(node)) {
            Ok(node.clone())
        } else {
            Err(XsError::EACCES)
        };
    }
    let mut cur = p;
    loop {
        cur = path::parent(cur);
        if let Some(anc) = view.get(cur)? {
            return if need.any_bit(caller.rights(anc)) {
                Err(XsError::ENOENT)
            } else {
                Err(XsError::EACCES)
            };
        }
        if cur == "/" {
            return Err(XsError::EIO);
        }
    }
}

fn check_node_size(caller: &Caller, quotas: &Quotas, node: &Node) -> Result<(), XsError> {
    if !caller.privileged && node.stored_size() > quotas.node_size {
        return Err(XsError::ENOSPC);
    }
    Ok(())
}

/// Creates `p` (and missing ancestors) holding `value`. New nodes inherit
/// their parent's permissions; an unprivileged creator becomes the owner.
/// All checks happen before anything changes.
fn create(
    view: &mut View<'_>,
    caller: &Caller,
    quotas: &Quotas,
    p: &str,
    value: &[u8],
) -> Result<(), XsError> {
    let mut missing = vec![p.to_owned()];
    let mut anc = path::parent(p).to_owned();
    let mut parent = loop {
        if let Some(n) = view.get_cloned(&anc)? {
            break n;
        }
        if anc == "/" {
            return Err(XsError::EIO);
        }
        missing.push(anc.clone());
        anc = path::parent(&anc).to_owned();
    };
    if !caller.privileged && view.owned_by(caller.domid) + missing.len() > quotas.nodes_per_domain {
        return Err(XsError::ENOSPC);
    }
    let mut parent_path = anc;
    let mut built = Vec::new();
    for name in missing.iter().rev() {
        parent.children.push(path::basename(name).to_owned());
        check_node_size(caller, quotas, &parent)?;
        let mut perms = parent.perms.clone();
        if !caller.privileged {
            perms.set_owner(caller.domid);
        }
        let mut node = Node::new(perms);
        if name == p {
            node.value = value.to_vec();
        }
        check_node_size(caller, quotas, &node)?;
        built.push((parent_path, parent));
        parent_path = name.clone();
        parent = node;
    }
    built.push((parent_path, parent));
    let perms = built
        .last()
        .map(|(_, n)| n.perms.clone())
        .unwrap_or_else(|| Perms::owned_by(0));
    for (bp, node) in built {
        view.put(&bp, node)?;
    }
    view.changed(Change::new(p, Match::Subtree, perms));
    Ok(())
}

/// READ: the node's value.
pub fn read(view: &mut View<'_>, caller: &Caller, p: &str) -> Result<Vec<u8>, XsError> {
    Ok(get_node(view, caller, p, Need::Read)?.value)
}

/// WRITE: replaces the value, creating the node if needed.
pub fn write(
    view: &mut View<'_>,
    caller: &Caller,
    quotas: &Quotas,
    p: &str,
    value: &[u8],
) -> Result<(), XsError> {
    match get_node(view, caller, p, Need::Write) {
        Ok(mut node) => {
            node.value = value.to_vec();
            check_node_size(caller, quotas, &node)?;
            let perms = node.perms.clone();
            view.put(p, node)?;
            view.changed(Change::new(p, Match::Subtree, perms));
            Ok(())
        }
        Err(XsError::ENOENT) => create(view, caller, quotas, p, value),
        Err(e) => Err(e),
    }
}

/// MKDIR: creates an empty node; an existing node is left alone.
pub fn mkdir(
    view: &mut View<'_>,
    caller: &Caller,
    quotas: &Quotas,
    p: &str,
) -> Result<(), XsError> {
    match get_node(view, caller, p, Need::Write) {
        Ok(_) => Ok(()),
        Err(XsError::ENOENT) => create(view, caller, quotas, p, &[]),
        Err(e) => Err(e),
    }
}

/// RM: removes the node and its subtree. Removing a missing node whose
/// parent exists succeeds, as in Xen.
pub fn rm(view: &mut View<'_>, caller: &Caller, p: &str) -> Result<(), XsError> {
    match get_node(view, caller, p, Need::Write) {
        Ok(_) => {}
        Err(XsError::ENOENT) => {
            return if view.get(path::parent(p))?.is_some() {
                Ok(())
            } else {
                Err(XsError::ENOENT)
            };
        }
        Err(e) => return Err(e),
    }
    if p == "/" {
        return Err(XsError::EINVAL);
    }
    remove_subtree(view, p)
}

/// Removes `p` and everything below it without permission checks, reporting
/// each removed node to watchers (the root of the subtree as a subtree
/// change, the others as exact changes, as C xenstored does).
pub fn remove_subtree(view: &mut View<'_>, p: &str) -> Result<(), XsError> {
    // Depth-first, children before parents.
    let mut order = Vec::new();
    let mut stack = vec![p.to_owned()];
    while let Some(cur) = stack.pop() {
        if let Some(n) = view.get(&cur)? {
            for c in &n.children {
                stack.push(path::join(&cur, c));
            }
            order.push(cur);
        }
    }
    for cur in order.iter().rev() {
        let Some(node) = view.get_cloned(cur)? else {
            continue;
        };
        let how = if cur == p {
            Match::Subtree
        } else {
            Match::Exact
        };
        view.changed(Change::new(cur.clone(), how, node.perms));
        view.remove(cur)?;
    }
    let parent_path = path::parent(p);
    if let Some(mut parent) = view.get_cloned(parent_path)? {
        let base = path::basename(p);
        parent.children.retain(|c| c != base);
        view.put(parent_path, parent)?;
    }
    Ok(())
}

/// DIRECTORY: child names, each followed by a NUL.
pub fn directory(view: &mut View<'_>, caller: &Caller, p: &str) -> Result<Vec<u8>, XsError> {
    let node = get_node(view, caller, p, Need::Read)?;
    let mut out = Vec::new();
    for c in &node.children {
        out.extend_from_slice(c.as_bytes());
        out.push(0);
    }
    if out.len() > PAYLOAD_MAX {
        return Err(XsError::E2BIG);
    }
    Ok(out)
}

/// DIRECTORY_PART: `<generation>\0` followed by the children starting at byte
/// `offset` of the NUL-separated child list, as many as fit; an extra NUL
/// marks the end of the list.
pub fn directory_part(
    view: &mut View<'_>,
    caller: &Caller,
    p: &str,
    offset: usize,
) -> Result<Vec<u8>, XsError> {
    let node = get_node(view, caller, p, Need::Read)?;
    let mut all = Vec::new();
    for c in &node.children {
        all.extend_from_slice(c.as_bytes());
        all.push(0);
    }
    let mut out = format!("{}", node.generation).into_bytes();
    out.push(0);
    if offset >= all.len() {
        out.push(0);
        return Ok(out);
    }
    let room = PAYLOAD_MAX - out.len() - 1;
    let mut end = offset;
    // Offsets must fall on a name boundary.
    if offset > 0 && all[offset - 1] != 0 {
        return Err(XsError::EINVAL);
    }
    while end < all.len() {
        let name_end = all[end..]
            .iter()
            .position(|&b| b == 0)
            .map_or(all.len(), |i| end + i + 1);
        if name_end - offset > room {
            break;
        }
        end = name_end;
    }
    if end == offset {
        // Cannot happen with valid names (< 3072 bytes), but never answer
        // with an empty, unfinished chunk that would make a client loop.
        return Err(XsError::E2BIG);
    }
    out.extend_from_slice(&all[offset..end]);
    if end == all.len() {
        out.push(0);
    }
    Ok(out)
}

/// GET_PERMS: the permission list in wire form.
pub fn get_perms(view: &mut View<'_>, caller: &Caller, p: &str) -> Result<Vec<u8>, XsError> {
    Ok(get_node(view, caller, p, Need::Read)?.perms.to_wire())
}

/// SET_PERMS: only the owner (or a privileged caller) may change permissions,
/// and only a privileged caller may hand the node to another owner.
pub fn set_perms(
    view: &mut View<'_>,
    caller: &Caller,
    quotas: &Quotas,
    p: &str,
    perms: Perms,
) -> Result<(), XsError> {
    if !caller.privileged && perms.entries().len() > quotas.perms_per_node {
        return Err(XsError::ENOSPC);
    }
    let mut node = get_node(view, caller, p, Need::WriteOwner)?;
    if !caller.privileged && perms.owner() != node.perms.owner() {
        return Err(XsError::EPERM);
    }
    let old = std::mem::replace(&mut node.perms, perms.clone());
    check_node_size(caller, quotas, &node)?;
    view.put(p, node)?;
    view.changed(Change {
        path: p.to_owned(),
        how: Match::Subtree,
        perms,
        old_perms: Some(old),
    });
    Ok(())
}
