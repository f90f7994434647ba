//! The node tree, per-node generations, and transactions as overlays on it.
//!
//! Transactions follow C xenstored: the first time a transaction touches a
//! node it copies the node (or its absence) and remembers the node's
//! generation; later accesses see the copy. Commit fails with `EAGAIN` only if
//! one of those nodes has since changed (different generation, or it appeared
//! or vanished) -- a real conflict, never a change elsewhere in the tree.

use std::collections::HashMap;

use super::perms::{DomId, Perms};
use super::wire::XsError;

/// One node: value bytes, ordered child names, permissions, generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub value: Vec<u8>,
    pub children: Vec<String>,
    pub perms: Perms,
    /// Bumped on every change to this node (value, children or permissions).
    pub generation: u64,
}

impl Node {
    /// An empty node with the given permissions.
    pub fn new(perms: Perms) -> Node {
        Node {
            value: Vec::new(),
            children: Vec::new(),
            perms,
            generation: 0,
        }
    }

    /// Approximate stored size, as Xen's node-size quota counts it: value,
    /// child names with their NULs, and 5 bytes per permission entry.
    pub fn stored_size(&self) -> usize {
        self.value.len()
            + self.children.iter().map(|c| c.len() + 1).sum::<usize>()
            + 5 * self.perms.entries().len()
    }

    /// Bytes the store charges for holding this node at `path`: the path,
    /// the stored size and a fixed bookkeeping overhead.
    pub fn charge(&self, path: &str) -> usize {
        path.len() + self.stored_size() + NODE_OVERHEAD
    }
}

/// Bookkeeping bytes charged per stored node, journal entry or recorded change.
pub const NODE_OVERHEAD: usize = 64;

/// How a change is matched against watches (Xen's `enum watch_match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Watches on the node or any ancestor fire, reporting the node's path.
    Subtree,
    /// Only watches on exactly this node fire (descendants of a removed subtree).
    Exact,
}

/// A change to report to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub how: Match,
    /// Permissions deciding who may see the event.
    pub perms: Perms,
    /// Earlier permissions (SET_PERMS): a watcher that could read with either sees it.
    pub old_perms: Option<Perms>,
}

impl Change {
    /// A change at `path` seen by whoever may read under `perms` (no earlier permissions).
    pub fn new(path: impl Into<String>, how: Match, perms: Perms) -> Self {
        Change {
            path: path.into(),
            how,
            perms,
            old_perms: None,
        }
    }
}

/// The live tree.
#[derive(Debug)]
pub struct Tree {
    nodes: HashMap<String, Node>,
    generation: u64,
    owned: HashMap<DomId, usize>,
    /// Bytes of the nodes each domain owns ([`Node::charge`]).
    owned_bytes: HashMap<DomId, usize>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// A tree holding only the root, owned by dom0 with no access for others.
    pub fn new() -> Tree {
        let mut nodes = HashMap::new();
        nodes.insert("/".to_owned(), Node::new(Perms::owned_by(0)));
        Tree {
            nodes,
            generation: 0,
            owned: HashMap::new(),
            owned_bytes: HashMap::new(),
        }
    }

    /// The node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Number of nodes in the tree, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: the root exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How many nodes `domid` owns (the root is not counted).
    pub fn owned_by(&self, domid: DomId) -> usize {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    /// Bytes of the nodes `domid` owns (the root is not counted).
    pub fn bytes_owned_by(&self, domid: DomId) -> usize {
        self.owned_bytes.get(&domid).copied().unwrap_or(0)
    }

    /// Stores `node` at `path` with a fresh generation.
    pub fn put(&mut self, path: &str, mut node: Node) {
        self.generation += 1;
        node.generation = self.generation;
        let new_owner = node.perms.owner();
        let bytes = node.charge(path);
        if let Some(old) = self.nodes.insert(path.to_owned(), node) {
            self.uncount(path, &old);
        }
        if path != "/" {
            *self.owned.entry(new_owner).or_insert(0) += 1;
            *self.owned_bytes.entry(new_owner).or_insert(0) += bytes;
        }
    }

    /// Removes the node at `path` (children are the caller's business).
    pub fn remove(&mut self, path: &str) -> Option<Node> {
        let old = self.nodes.remove(path)?;
        self.uncount(path, &old);
        Some(old)
    }

    fn uncount(&mut self, path: &str, old: &Node) {
        if path == "/" {
            return;
        }
        let owner = old.perms.owner();
        if let Some(n) = self.owned.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.owned.remove(&owner);
            }
        }
        if let Some(b) = self.owned_bytes.get_mut(&owner) {
            *b = b.saturating_sub(old.charge(path));
            if *b == 0 {
                self.owned_bytes.remove(&owner);
            }
        }
    }

    /// XSA-322: drop `domid` from every permission list (dom0 takes over
    /// nodes it owned). Returns how many nodes changed.
    pub fn forget_domain(&mut self, domid: DomId) -> usize {
        let paths: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.perms.entries().iter().any(|p| p.domid == domid))
            .map(|(p, _)| p.clone())
            .collect();
        for path in &paths {
            if let Some(mut node) = self.nodes.get(path).cloned() {
                node.perms.forget_domain(domid);
                self.put(path, node);
            }
        }
        paths.len()
    }

    /// Iterates over all paths (unordered).
    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.nodes.keys()
    }
}

#[derive(Debug)]
struct TxEntry {
    /// Generation of the live node when first touched, `None` if absent then.
    base: Option<u64>,
    node: Option<Node>,
    modified: bool,
}

/// An open transaction.
#[derive(Debug, Default)]
pub struct Transaction {
    entries: HashMap<String, TxEntry>,
    /// Changes to fire at commit: one per node and kind, in order of first
    /// change, with the final permissions (C xenstored fires each modified
    /// node once), so rewriting one node costs one entry however often.
    changes: Vec<Change>,
    change_index: HashMap<(String, bool), usize>,
    owned_delta: HashMap<DomId, isize>,
    /// Bytes held by the journal: copied nodes and recorded changes.
    bytes: usize,
}

impl Transaction {
    /// Number of nodes this transaction has touched.
    pub fn touched(&self) -> usize {
        self.entries.len()
    }

    /// Bytes the journal holds (copied nodes, recorded changes), charged to
    /// the transaction's domain.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn record(&mut self, ch: Change) {
        let key = (ch.path.clone(), ch.how == Match::Subtree);
        match self.change_index.get(&key) {
            Some(&i) => {
                let first = &mut self.changes[i];
                first.perms = ch.perms;
                if first.old_perms.is_none() {
                    first.old_perms = ch.old_perms;
                }
            }
            None => {
                self.bytes += 2 * ch.path.len() + NODE_OVERHEAD;
                self.change_index.insert(key, self.changes.len());
                self.changes.push(ch);
            }
        }
    }

    /// Checks for conflicts and, if there are none, applies the transaction
    /// to `tree`. Returns the changes to report to watchers.
    pub fn commit(self, tree: &mut Tree) -> Result<Vec<Change>, XsError> {
        for (path, e) in &self.entries {
            if tree.get(path).map(|n| n.generation) != e.base {
                return Err(XsError::EAGAIN);
            }
        }
        // Removals first so that owner counts never overshoot.
        let mut puts = Vec::new();
        for (path, e) in self.entries {
            if !e.modified {
                continue;
            }
            match e.node {
                None => {
                    tree.remove(&path);
                }
                Some(node) => puts.push((path, node)),
            }
        }
        for (path, node) in puts {
            tree.put(&path, node);
        }
        Ok(self.changes)
    }
}

/// Read/write access to the tree, either directly or through a transaction.
pub struct View<'a> {
    tree: &'a mut Tree,
    tx: Option<&'a mut Transaction>,
    /// Most nodes a transaction may touch, `None` for no limit.
    tx_limit: Option<usize>,
    /// Changes made directly to the live tree, to be fired by the caller.
    pub fired: Vec<Change>,
}

impl<'a> View<'a> {
    /// Direct access to the live tree.
    pub fn live(tree: &'a mut Tree) -> View<'a> {
        View {
            tree,
            tx: None,
            tx_limit: None,
            fired: Vec::new(),
        }
    }

    /// Access through `tx`, which may touch at most `limit` nodes.
    pub fn transaction(
        tree: &'a mut Tree,
        tx: &'a mut Transaction,
        limit: Option<usize>,
    ) -> View<'a> {
        View {
            tree,
            tx: Some(tx),
            tx_limit: limit,
            fired: Vec::new(),
        }
    }

    /// The node at `path` as this view sees it.
    pub fn get(&mut self, path: &str) -> Result<Option<&Node>, XsError> {
        match &mut self.tx {
            None => Ok(self.tree.get(path)),
            Some(tx) => {
                if !tx.entries.contains_key(path) {
                    if self.tx_limit.is_some_and(|l| tx.entries.len() >= l) {
                        return Err(XsError::ENOSPC);
                    }
                    let live = self.tree.get(path);
                    tx.bytes += live.map_or(path.len() + NODE_OVERHEAD, |n| n.charge(path));
                    let entry = TxEntry {
                        base: live.map(|n| n.generation),
                        node: live.cloned(),
                        modified: false,
                    };
                    tx.entries.insert(path.to_owned(), entry);
                }
                Ok(tx.entries.get(path).and_then(|e| e.node.as_ref()))
            }
        }
    }

    /// A copy of the node at `path`.
    pub fn get_cloned(&mut self, path: &str) -> Result<Option<Node>, XsError> {
        Ok(self.get(path)?.cloned())
    }

    /// Stores `node` at `path`.
    pub fn put(&mut self, path: &str, node: Node) -> Result<(), XsError> {
        let old_owner = self.get(path)?.map(|n| n.perms.owner());
        match &mut self.tx {
            None => self.tree.put(path, node),
            Some(tx) => {
                if path != "/" {
                    if let Some(o) = old_owner {
                        *tx.owned_delta.entry(o).or_insert(0) -= 1;
                    }
                    *tx.owned_delta.entry(node.perms.owner()).or_insert(0) += 1;
                }
                if let Some(e) = tx.entries.get_mut(path) {
                    let old = e.node.as_ref().map_or(0, |n| n.stored_size());
                    tx.bytes = (tx.bytes + node.stored_size()).saturating_sub(old);
                    e.node = Some(node);
                    e.modified = true;
                }
            }
        }
        Ok(())
    }

    /// Removes the node at `path`.
    pub fn remove(&mut self, path: &str) -> Result<(), XsError> {
        let old_owner = self.get(path)?.map(|n| n.perms.owner());
        match &mut self.tx {
            None => {
                self.tree.remove(path);
            }
            Some(tx) => {
                if let Some(o) = old_owner {
                    *tx.owned_delta.entry(o).or_insert(0) -= 1;
                }
                if let Some(e) = tx.entries.get_mut(path) {
                    let old = e.node.as_ref().map_or(0, |n| n.stored_size());
                    tx.bytes = tx.bytes.saturating_sub(old);
                    e.node = None;
                    e.modified = true;
                }
            }
        }
        Ok(())
    }

    /// How many nodes `domid` owns as this view sees it.
    pub fn owned_by(&self, domid: DomId) -> usize {
        let live = self.tree.owned_by(domid) as isize;
        let delta = self
            .tx
            .as_ref()
            .and_then(|t| t.owned_delta.get(&domid).copied())
            .unwrap_or(0);
        (live + delta).max(0) as usize
    }

    /// Records a change for watchers: fired now, or at commit in a transaction.
    pub fn changed(&mut self, change: Change) {
        match &mut self.tx {
            None => self.fired.push(change),
            Some(tx) => tx.record(change),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(v: &str) -> Node {
        let mut n = Node::new(Perms::owned_by(0));
        n.value = v.as_bytes().to_vec();
        n
    }

    #[test]
    fn generations_increase_and_owners_are_counted() {
        let mut t = Tree::new();
        t.put("/a", node("1"));
        let g1 = t.get("/a").unwrap().generation;
        t.put("/a", node("2"));
        assert!(t.get("/a").unwrap().generation > g1);
        assert_eq!(t.owned_by(0), 1);
        t.remove("/a");
        assert_eq!(t.owned_by(0), 0);
    }

    #[test]
    fn transaction_conflicts_only_on_touched_nodes() {
        let mut t = Tree::new();
        t.put("/a", node("1"));
        t.put("/b", node("1"));
        let mut tx = Transaction::default();
        {
            let mut v = View::transaction(&mut t, &mut tx, None);
            assert_eq!(v.get("/a").unwrap().unwrap().value, b"1");
            v.put("/a", node("tx")).unwrap();
        }
        t.put("/b", node("outside"));
        tx.commit(&mut t).unwrap();
        assert_eq!(t.get("/a").unwrap().value, b"tx");

        let mut tx = Transaction::default();
        View::transaction(&mut t, &mut tx, None).get("/b").unwrap();
        t.put("/b", node("again"));
        assert_eq!(tx.commit(&mut t), Err(XsError::EAGAIN));
    }

    #[test]
    fn absent_node_appearing_is_a_conflict() {
        let mut t = Tree::new();
        let mut tx = Transaction::default();
        assert!(View::transaction(&mut t, &mut tx, None)
            .get("/new")
            .unwrap()
            .is_none());
        t.put("/new", node("x"));
        assert_eq!(tx.commit(&mut t), Err(XsError::EAGAIN));
    }

    #[test]
    fn transaction_node_limit() {
        let mut t = Tree::new();
        let mut tx = Transaction::default();
        let mut v = View::transaction(&mut t, &mut tx, Some(2));
        v.get("/a").unwrap();
        v.get("/b").unwrap();
        v.get("/a").unwrap();
        assert_eq!(v.get("/c").err(), Some(XsError::ENOSPC));
    }
}
