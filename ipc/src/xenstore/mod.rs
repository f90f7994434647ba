//! A xenstore-compatible store: Xen's wire protocol, node tree, permissions,
//! watches, transactions and quotas, served over Unix sockets.
//!
//! Layers, bottom up: [`wire`] (framing), [`perms`] and [`path`] (rules),
//! [`tree`] (nodes and transactions), [`engine`] (I/O-free request handling),
//! [`server`] (epoll daemon; [`store_thread`] runs one for a scope), [`client`] (blocking
//! client). See `docs/store.md`.

pub mod client;
pub mod engine;
pub mod limits;
pub mod ops;
pub mod outqueue;
pub mod path;
pub mod perms;
pub mod server;
pub mod store_handle;
pub mod store_thread;
pub mod tree;
pub mod watch;
pub mod wire;

pub use client::{ClientError, StoreClient, WatchEvent};
pub use engine::{ConnId, DomainEvent, Engine};
pub use perms::{Access, DomId, Perm, Perms};
pub use server::{spawn, ServerError, Store, StoreConfig, StoreHandle, StoreStats};
pub use store_thread::StoreThread;
pub use wire::{Message, MsgType, XsError};

/// Limits for unprivileged domains. The defaults are C xenstored's
/// (`tools/xenstored/core.c`: `quota_nb_entry_per_domain` etc.).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    /// Nodes a domain may own (1000).
    pub nodes_per_domain: usize,
    /// Watches a domain may hold over all its connections (128).
    pub watches_per_domain: usize,
    /// Largest node: value + child names + permissions (2048 bytes).
    pub node_size: usize,
    /// Open transactions per connection (10).
    pub transactions: usize,
    /// Permission entries per node (5).
    pub perms_per_node: usize,
    /// Nodes one transaction may touch (1024).
    pub transaction_nodes: usize,
    /// Path length below `/local/domain/<id>/` (XENSTORE_REL_PATH_MAX, 2048).
    pub path_len: usize,
    /// Outstanding requests of a domain before the server stops reading its
    /// connections: replies it has not read plus watch events it caused that
    /// their receivers have not read (20, C xenstored's `quota_req_outstanding`).
    pub outstanding_requests: usize,
    /// Bytes a domain may hold: nodes it owns, its transaction journals and
    /// its watches (2.5 MiB, C xenstored's `quota_memory_per_domain_hard`).
    pub memory_per_domain: usize,
    /// Simultaneous connections of one domain (32).
    pub connections_per_domain: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            nodes_per_domain: 1000,
            watches_per_domain: 128,
            node_size: 2048,
            transactions: 10,
            perms_per_node: 5,
            transaction_nodes: 1024,
            path_len: wire::REL_PATH_MAX,
            outstanding_requests: 20,
            memory_per_domain: 2560 * 1024,
            connections_per_domain: 32,
        }
    }
}
