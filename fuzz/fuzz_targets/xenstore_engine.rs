//! Sequences of requests from several connections (dom0 and two guests,
//! with disconnects and reconnects) into the store engine. Checks: no panic,
//! output only to live connections, the reply goes first to the requester
//! with its ids, payloads within the limit, and the tree stays consistent
//! (every child exists, every node is listed by its parent, per-domain
//! node counts match the owners in the tree).
#![no_main]

use ipc::xenstore::engine::{ConnId, Engine};
use ipc::xenstore::path;
use ipc::xenstore::wire::{Message, MsgType, PAYLOAD_MAX};
use ipc::xenstore::Quotas;
use libfuzzer_sys::fuzz_target;

const CONNS: [(u64, u32, bool); 4] = [(1, 0, true), (2, 5, false), (3, 6, false), (4, 0, true)];

fn check_tree(e: &Engine) {
    let t = e.tree();
    assert!(t.get("/").is_some(), "root vanished");
    let mut owned = std::collections::HashMap::new();
    for p in t.paths() {
        if p != "/" {
            let Some(n) = t.get(p) else { unreachable!() };
            *owned.entry(n.perms.owner()).or_insert(0usize) += 1;
        }
    }
    for (dom, count) in owned {
        assert_eq!(t.owned_by(dom), count, "owner count of domain {dom}");
    }
    for p in t.paths() {
        let Some(n) = t.get(p) else { unreachable!() };
        for c in &n.children {
            assert!(t.get(&path::join(p, c)).is_some(), "dangling child {c} of {p}");
        }
        if p != "/" {
            let parent = t.get(path::parent(p)).expect("orphan node");
            assert!(parent.children.iter().any(|c| c == path::basename(p)), "{p} not listed");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut e = Engine::new(Quotas { nodes_per_domain: 50, transaction_nodes: 64, ..Quotas::default() });
    e.connect(ConnId(1), 0, true).expect("fresh engine");
    // Introduce the guests and give them homes, as a toolstack would.
    for d in [5u32, 6] {
        let intro = Message::strings(&[d.to_string(), "0".into(), "0".into()]);
        e.handle(ConnId(1), Message::new(MsgType::Introduce, 0, 0, intro));
        let home = format!("/local/domain/{d}");
        e.handle(ConnId(1), Message::new(MsgType::Mkdir, 0, 0, Message::strings(&[&home])));
        let perms = Message::strings(&[home, format!("n{d}")]);
        e.handle(ConnId(1), Message::new(MsgType::SetPerms, 0, 0, perms));
    }
    for &(id, dom, privileged) in &CONNS[1..] {
        let _ = e.connect(ConnId(id), dom, privileged);
    }
    let mut rest = data;
    let mut req_id = 0u32;
    while rest.len() >= 4 {
        let (conn_b, ty_b, tx_b, len_b) = (rest[0], rest[1], rest[2], rest[3]);
        rest = &rest[4..];
        let len = usize::from(len_b).min(rest.len());
        let payload = rest[..len].to_vec();
        rest = &rest[len..];
        let (id, dom, privileged) = CONNS[usize::from(conn_b % 4)];
        let conn = ConnId(id);
        if ty_b == 255 {
            e.disconnect(conn);
            let _ = e.connect(conn, dom, privileged);
            continue;
        }
        let Some(ty) = MsgType::from_u32(u32::from(ty_b % 28)) else { continue };
        // Small transaction ids so that real ones get hit.
        let tx_id = u32::from(tx_b % 8);
        req_id = req_id.wrapping_add(1);
        let live = e.is_connected(conn);
        let out = e.handle(conn, Message::new(ty, req_id, tx_id, payload));
        if !live {
            assert!(out.is_empty());
            continue;
        }
        let (first_to, reply) = out.first().expect("a reply");
        assert_eq!(*first_to, conn);
        assert_eq!((reply.req_id, reply.tx_id), (req_id, tx_id));
        assert!(reply.ty == ty || reply.ty == MsgType::Error);
        for (to, m) in &out {
            assert!(e.is_connected(*to) || *to == conn, "message to a dead connection");
            assert!(m.payload.len() <= PAYLOAD_MAX);
        }
        for ev in e.take_domain_events() {
            let _ = ev;
        }
    }
    check_tree(&e);
});
