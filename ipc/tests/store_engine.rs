//! The store engine against Xen's semantics, one rule per test.
#![allow(clippy::unwrap_used)]

use ipc::xenstore::engine::{ConnId, DomainEvent, Engine};
use ipc::xenstore::wire::{Message, MsgType, XsError};
use ipc::xenstore::Quotas;

const D0: ConnId = ConnId(1);
const G5: ConnId = ConnId(5);
const G6: ConnId = ConnId(6);

struct H {
    e: Engine,
    req: u32,
}

fn s(parts: &[&str]) -> Vec<u8> {
    Message::strings(parts)
}

impl H {
    /// dom0 plus guests 5 and 6, introduced, with homes owned by themselves.
    fn new() -> H {
        H::with_quotas(Quotas::default())
    }

    fn with_quotas(q: Quotas) -> H {
        let mut h = H {
            e: Engine::new(q),
            req: 0,
        };
        h.e.connect(D0, 0, true).unwrap();
        for (c, d) in [(G5, 5), (G6, 6)] {
            h.ok(D0, MsgType::Introduce, &s(&[&d.to_string(), "0", "0"]));
            let home = format!("/local/domain/{d}");
            h.ok(D0, MsgType::Mkdir, &s(&[&home]));
            h.ok(D0, MsgType::SetPerms, &s(&[&home, &format!("n{d}")]));
            h.e.connect(c, d, false).unwrap();
        }
        h.e.take_domain_events();
        h
    }

    fn send(&mut self, c: ConnId, ty: MsgType, tx: u32, payload: &[u8]) -> Vec<(ConnId, Message)> {
        self.req += 1;
        let out = self
            .e
            .handle(c, Message::new(ty, self.req, tx, payload.to_vec()));
        if let Some((to, reply)) = out.first() {
            assert_eq!(*to, c);
            assert_eq!(reply.req_id, self.req);
            assert_eq!(reply.tx_id, tx);
        }
        out
    }

    fn tx_ok(&mut self, c: ConnId, ty: MsgType, tx: u32, payload: &[u8]) -> Vec<u8> {
        let out = self.send(c, ty, tx, payload);
        let r = &out[0].1;
        assert_eq!(r.ty, ty, "expected success, got {r}");
        r.payload.clone()
    }

    fn tx_err(&mut self, c: ConnId, ty: MsgType, tx: u32, payload: &[u8]) -> XsError {
        let out = self.send(c, ty, tx, payload);
        out[0]
            .1
            .as_error()
            .unwrap_or_else(|| panic!("expected error, got {}", out[0].1))
    }

    fn ok(&mut self, c: ConnId, ty: MsgType, payload: &[u8]) -> Vec<u8> {
        self.tx_ok(c, ty, 0, payload)
    }

    fn err(&mut self, c: ConnId, ty: MsgType, payload: &[u8]) -> XsError {
        self.tx_err(c, ty, 0, payload)
    }

    fn write(&mut self, c: ConnId, path: &str, v: &str) {
        let mut p = s(&[path]);
        p.extend_from_slice(v.as_bytes());
        self.ok(c, MsgType::Write, &p);
    }

    fn write_err(&mut self, c: ConnId, path: &str, v: &str) -> XsError {
        let mut p = s(&[path]);
        p.extend_from_slice(v.as_bytes());
        self.err(c, MsgType::Write, &p)
    }

    fn read(&mut self, c: ConnId, path: &str) -> Result<Vec<u8>, XsError> {
        let out = self.send(c, MsgType::Read, 0, &s(&[path]));
        match out[0].1.as_error() {
            Some(e) => Err(e),
            None => Ok(out[0].1.payload.clone()),
        }
    }

    fn perms(&mut self, c: ConnId, path: &str) -> String {
        let p = self.ok(c, MsgType::GetPerms, &s(&[path]));
        String::from_utf8(p)
            .unwrap()
            .trim_end_matches('\0')
            .replace('\0', " ")
    }

    /// Watch events in an output, as (conn, path, token).
    fn events(out: &[(ConnId, Message)]) -> Vec<(ConnId, String, String)> {
        out.iter()
            .filter(|(_, m)| m.ty == MsgType::WatchEvent)
            .map(|(c, m)| {
                let t = String::from_utf8(m.payload.clone()).unwrap();
                let mut it = t.split('\0');
                (
                    *c,
                    it.next().unwrap().to_owned(),
                    it.next().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn watch(&mut self, c: ConnId, path: &str, token: &str) {
        let out = self.send(c, MsgType::Watch, 0, &s(&[path, token]));
        assert_eq!(out[0].1.payload, b"OK\0", "{}", out[0].1);
    }

    fn write_events(&mut self, c: ConnId, path: &str, v: &str) -> Vec<(ConnId, String, String)> {
        let mut p = s(&[path]);
        p.extend_from_slice(v.as_bytes());
        let out = self.send(c, MsgType::Write, 0, &p);
        assert!(out[0].1.as_error().is_none());
        H::events(&out)
    }

    fn tx_start(&mut self, c: ConnId) -> u32 {
        let r = self.ok(c, MsgType::TransactionStart, b"\0");
        String::from_utf8(r)
            .unwrap()
            .trim_end_matches('\0')
            .parse()
            .unwrap()
    }
}

// ---- basic node operations ----

#[test]
fn write_then_read_returns_value() {
    let mut h = H::new();
    h.write(D0, "/a", "hello");
    assert_eq!(h.read(D0, "/a").unwrap(), b"hello");
}

#[test]
fn write_ack_is_ok_with_nul() {
    let mut h = H::new();
    let mut p = s(&["/a"]);
    p.extend_from_slice(b"v");
    assert_eq!(h.ok(D0, MsgType::Write, &p), b"OK\0");
}

#[test]
fn write_creates_missing_ancestors_and_directory_lists_in_order() {
    let mut h = H::new();
    h.write(D0, "/x/y/b", "1");
    h.write(D0, "/x/y/a", "2");
    assert_eq!(h.ok(D0, MsgType::Directory, &s(&["/x/y"])), b"b\0a\0");
    assert_eq!(h.read(D0, "/x").unwrap(), b"");
}

#[test]
fn read_missing_node_is_enoent() {
    let mut h = H::new();
    assert_eq!(h.read(D0, "/nope"), Err(XsError::ENOENT));
}

#[test]
fn mkdir_on_existing_node_keeps_value() {
    let mut h = H::new();
    h.write(D0, "/m", "keep");
    h.ok(D0, MsgType::Mkdir, &s(&["/m"]));
    assert_eq!(h.read(D0, "/m").unwrap(), b"keep");
}

#[test]
fn rm_removes_whole_subtree() {
    let mut h = H::new();
    h.write(D0, "/r/a/b", "1");
    h.write(D0, "/r/c", "2");
    h.ok(D0, MsgType::Rm, &s(&["/r"]));
    for p in ["/r", "/r/a", "/r/a/b", "/r/c"] {
        assert_eq!(h.read(D0, p), Err(XsError::ENOENT), "{p}");
    }
    assert_eq!(h.ok(D0, MsgType::Directory, &s(&["/"])), b"local\0");
}

#[test]
fn rm_of_missing_node_succeeds_only_if_parent_exists() {
    let mut h = H::new();
    h.ok(D0, MsgType::Rm, &s(&["/ghost"]));
    assert_eq!(
        h.err(D0, MsgType::Rm, &s(&["/ghost/child"])),
        XsError::ENOENT
    );
}

#[test]
fn rm_of_root_is_einval() {
    let mut h = H::new();
    assert_eq!(h.err(D0, MsgType::Rm, &s(&["/"])), XsError::EINVAL);
}

#[test]
fn invalid_paths_are_einval() {
    let mut h = H::new();
    for bad in ["/a/", "/a//b", "/a b", "/a.b", "/\u{e9}"] {
        assert_eq!(
            h.err(D0, MsgType::Read, &s(&[bad])),
            XsError::EINVAL,
            "{bad:?}"
        );
        assert_eq!(h.write_err(D0, bad, "x"), XsError::EINVAL, "{bad:?}");
    }
}

#[test]
fn payload_must_be_one_nul_terminated_string() {
    let mut h = H::new();
    assert_eq!(h.err(D0, MsgType::Read, b"/a"), XsError::EINVAL);
    assert_eq!(h.err(D0, MsgType::Read, b"/a\0/b\0"), XsError::EINVAL);
    assert_eq!(h.err(D0, MsgType::Write, b"/a"), XsError::EINVAL);
}

#[test]
fn relative_paths_resolve_below_the_callers_home() {
    let mut h = H::new();
    h.write(G5, "data/x", "5");
    assert_eq!(h.read(D0, "/local/domain/5/data/x").unwrap(), b"5");
    assert_eq!(h.read(G5, "/local/domain/5/data/x").unwrap(), b"5");
}

// ---- permissions ----

#[test]
fn guest_cannot_read_dom0_only_node() {
    let mut h = H::new();
    h.write(D0, "/secret", "s");
    assert_eq!(h.read(G5, "/secret"), Err(XsError::EACCES));
}

#[test]
fn missing_node_under_unreadable_parent_is_eacces_not_enoent() {
    let mut h = H::new();
    h.write(D0, "/hidden/a", "1");
    assert_eq!(h.read(G5, "/hidden/b"), Err(XsError::EACCES));
    assert_eq!(h.read(G5, "/local/domain/5/nope"), Err(XsError::ENOENT));
    // Nearest existing ancestor decides: /hidden/b/c/d -> /hidden.
    assert_eq!(h.read(G5, "/hidden/b/c/d"), Err(XsError::EACCES));
}

#[test]
fn guest_cannot_write_into_dom0_tree() {
    let mut h = H::new();
    assert_eq!(h.write_err(G5, "/vm/x", "1"), XsError::EACCES);
    assert_eq!(
        h.read(D0, "/vm"),
        Err(XsError::ENOENT),
        "nothing was created"
    );
}

#[test]
fn new_nodes_inherit_parent_perms_and_guest_becomes_owner() {
    let mut h = H::new();
    h.ok(D0, MsgType::SetPerms, &s(&["/local/domain/5", "n5", "r6"]));
    h.write(G5, "/local/domain/5/a/b", "1");
    assert_eq!(h.perms(D0, "/local/domain/5/a/b"), "n5 r6");
    assert_eq!(h.read(G6, "/local/domain/5/a/b").unwrap(), b"1");
}

#[test]
fn privileged_creator_keeps_parent_owner() {
    let mut h = H::new();
    h.write(D0, "/local/domain/5/fromdom0", "x");
    assert_eq!(h.perms(D0, "/local/domain/5/fromdom0"), "n5");
}

#[test]
fn per_domain_entry_overrides_default() {
    let mut h = H::new();
    h.write(D0, "/p", "v");
    h.ok(D0, MsgType::SetPerms, &s(&["/p", "r0", "n5", "w6"]));
    assert_eq!(h.read(G5, "/p"), Err(XsError::EACCES));
    assert_eq!(h.read(G6, "/p"), Err(XsError::EACCES), "w does not imply r");
    h.write(G6, "/p", "by6");
    assert_eq!(h.read(D0, "/p").unwrap(), b"by6");
}

#[test]
fn only_owner_may_set_perms() {
    let mut h = H::new();
    h.write(D0, "/shared", "v");
    h.ok(D0, MsgType::SetPerms, &s(&["/shared", "b0"]));
    assert_eq!(
        h.err(G5, MsgType::SetPerms, &s(&["/shared", "b0", "n6"])),
        XsError::EACCES
    );
}

#[test]
fn unprivileged_owner_cannot_give_node_away() {
    let mut h = H::new();
    h.write(G5, "mine", "v");
    assert_eq!(
        h.err(G5, MsgType::SetPerms, &s(&["mine", "n6"])),
        XsError::EPERM
    );
    h.ok(G5, MsgType::SetPerms, &s(&["mine", "n5", "r6"]));
    assert_eq!(h.perms(G5, "mine"), "n5 r6");
}

#[test]
fn privileged_may_change_owner() {
    let mut h = H::new();
    h.write(D0, "/o", "v");
    h.ok(D0, MsgType::SetPerms, &s(&["/o", "n6"]));
    assert_eq!(h.perms(D0, "/o"), "n6");
    assert_eq!(h.read(G6, "/o").unwrap(), b"v");
}

#[test]
fn get_perms_wire_form() {
    let mut h = H::new();
    h.write(D0, "/g", "v");
    h.ok(D0, MsgType::SetPerms, &s(&["/g", "r0", "b7"]));
    assert_eq!(h.ok(D0, MsgType::GetPerms, &s(&["/g"])), b"r0\0b7\0");
}

#[test]
fn malformed_perms_are_einval() {
    let mut h = H::new();
    h.write(D0, "/g", "v");
    for bad in [&["/g"][..], &["/g", "x0"], &["/g", "r"], &["/g", "rq"]] {
        assert_eq!(
            h.err(D0, MsgType::SetPerms, &s(bad)),
            XsError::EINVAL,
            "{bad:?}"
        );
    }
}

#[test]
fn perms_per_node_quota() {
    let mut h = H::new();
    h.write(G5, "q", "v");
    let too_many = ["q", "n5", "r1", "r2", "r3", "r4", "r6"];
    assert_eq!(h.err(G5, MsgType::SetPerms, &s(&too_many)), XsError::ENOSPC);
    h.ok(G5, MsgType::SetPerms, &s(&too_many[..6]));
}

// ---- watches ----

#[test]
fn watch_fires_once_on_registration() {
    let mut h = H::new();
    let out = h.send(D0, MsgType::Watch, 0, &s(&["/w", "tok"]));
    assert_eq!(out[0].1.payload, b"OK\0");
    assert_eq!(H::events(&out), vec![(D0, "/w".into(), "tok".into())]);
}

#[test]
fn watch_matches_subtree_not_prefix_siblings() {
    let mut h = H::new();
    h.watch(D0, "/w", "t");
    assert_eq!(
        h.write_events(D0, "/w/a/b", "1"),
        vec![(D0, "/w/a/b".into(), "t".into())]
    );
    assert!(h.write_events(D0, "/wx", "1").is_empty());
}

#[test]
fn relative_watch_reports_relative_path() {
    let mut h = H::new();
    let out = h.send(G5, MsgType::Watch, 0, &s(&["device", "t"]));
    assert_eq!(H::events(&out), vec![(G5, "device".into(), "t".into())]);
    let ev = h.write_events(D0, "/local/domain/5/device/vbd", "1");
    assert_eq!(ev, vec![(G5, "device/vbd".into(), "t".into())]);
}

#[test]
fn watch_events_only_reach_connections_that_can_read() {
    let mut h = H::new();
    h.watch(G5, "/", "root5");
    h.watch(D0, "/", "root0");
    let ev = h.write_events(D0, "/private", "x");
    assert_eq!(ev, vec![(D0, "/private".into(), "root0".into())]);
    h.ok(D0, MsgType::SetPerms, &s(&["/private", "r0"]));
    let ev = h.write_events(D0, "/private", "y");
    assert_eq!(ev.len(), 2, "now readable by 5: {ev:?}");
}

#[test]
fn rm_fires_ancestor_watches_with_root_and_exact_watches_below() {
    let mut h = H::new();
    h.write(D0, "/t/a/b", "1");
    h.watch(D0, "/t", "anc");
    h.watch(D0, "/t/a/b", "exact");
    h.watch(D0, "/t/a/zz", "absent");
    let out = h.send(D0, MsgType::Rm, 0, &s(&["/t/a"]));
    let mut ev = H::events(&out);
    ev.sort();
    assert_eq!(
        ev,
        vec![
            (D0, "/t/a".into(), "anc".into()),
            (D0, "/t/a/b".into(), "exact".into())
        ]
    );
}

#[test]
fn duplicate_watch_is_eexist_and_unwatch_removes() {
    let mut h = H::new();
    h.watch(D0, "/d", "t");
    assert_eq!(h.err(D0, MsgType::Watch, &s(&["/d", "t"])), XsError::EEXIST);
    h.ok(D0, MsgType::Unwatch, &s(&["/d", "t"]));
    assert!(h.write_events(D0, "/d", "1").is_empty());
    assert_eq!(
        h.err(D0, MsgType::Unwatch, &s(&["/d", "t"])),
        XsError::ENOENT
    );
}

#[test]
fn watch_quota_per_domain_is_e2big() {
    let mut h = H::with_quotas(Quotas {
        watches_per_domain: 3,
        ..Quotas::default()
    });
    for i in 0..3 {
        h.watch(G5, &format!("w{i}"), "t");
    }
    assert_eq!(h.err(G5, MsgType::Watch, &s(&["w9", "t"])), XsError::E2BIG);
    h.watch(D0, "/any", "t"); // dom0 is not limited
}

#[test]
fn oversized_watch_token_is_rejected() {
    let mut h = H::new();
    let tok = "k".repeat(2000);
    assert_eq!(h.err(G5, MsgType::Watch, &s(&["w", &tok])), XsError::E2BIG);
}

#[test]
fn watch_with_invalid_path_is_einval() {
    let mut h = H::new();
    assert_eq!(
        h.err(D0, MsgType::Watch, &s(&["/a//b", "t"])),
        XsError::EINVAL
    );
    assert_eq!(h.err(D0, MsgType::Watch, &s(&["/a"])), XsError::EINVAL);
}

#[test]
fn special_domain_watches_reach_privileged_watchers_only() {
    let mut h = H::new();
    h.watch(D0, "@introduceDomain", "i");
    h.watch(G5, "@introduceDomain", "i5");
    h.watch(D0, "@releaseDomain", "r");
    let out = h.send(D0, MsgType::Introduce, 0, &s(&["9", "1", "2"]));
    assert_eq!(
        H::events(&out),
        vec![(D0, "@introduceDomain".into(), "i".into())]
    );
    let out = h.send(D0, MsgType::Release, 0, &s(&["9"]));
    assert_eq!(
        H::events(&out),
        vec![(D0, "@releaseDomain".into(), "r".into())]
    );
}

#[test]
fn reset_watches_drops_all_watches() {
    let mut h = H::new();
    h.watch(D0, "/a", "1");
    h.watch(D0, "/b", "2");
    h.ok(D0, MsgType::ResetWatches, b"");
    assert!(h.write_events(D0, "/a", "x").is_empty());
}

#[test]
fn disconnected_connection_gets_no_events() {
    let mut h = H::new();
    h.watch(G5, "w", "t");
    h.e.disconnect(G5);
    assert!(h.write_events(D0, "/local/domain/5/w", "x").is_empty());
    assert!(h
        .e
        .handle(G5, Message::new(MsgType::Read, 1, 0, s(&["w"])))
        .is_empty());
}

// ---- transactions ----

#[test]
fn transaction_writes_are_invisible_until_commit() {
    let mut h = H::new();
    let tx = h.tx_start(D0);
    assert_ne!(tx, 0);
    let mut p = s(&["/t"]);
    p.extend_from_slice(b"in-tx");
    h.tx_ok(D0, MsgType::Write, tx, &p);
    assert_eq!(h.read(D0, "/t"), Err(XsError::ENOENT));
    assert_eq!(h.tx_ok(D0, MsgType::Read, tx, &s(&["/t"])), b"in-tx");
    h.tx_ok(D0, MsgType::TransactionEnd, tx, b"T\0");
    assert_eq!(h.read(D0, "/t").unwrap(), b"in-tx");
}

#[test]
fn aborted_transaction_changes_nothing() {
    let mut h = H::new();
    h.write(D0, "/k", "old");
    let tx = h.tx_start(D0);
    h.tx_ok(D0, MsgType::Rm, tx, &s(&["/k"]));
    h.tx_ok(D0, MsgType::TransactionEnd, tx, b"F\0");
    assert_eq!(h.read(D0, "/k").unwrap(), b"old");
    assert_eq!(
        h.tx_err(D0, MsgType::Read, tx, &s(&["/k"])),
        XsError::ENOENT,
        "tx is gone"
    );
}

#[test]
fn commit_conflicts_with_eagain_when_a_read_node_changed() {
    let mut h = H::new();
    h.write(D0, "/c", "1");
    let tx = h.tx_start(D0);
    h.tx_ok(D0, MsgType::Read, tx, &s(&["/c"]));
    h.write(D0, "/c", "2");
    assert_eq!(
        h.tx_err(D0, MsgType::TransactionEnd, tx, b"T\0"),
        XsError::EAGAIN
    );
}

#[test]
fn commit_succeeds_when_only_untouched_nodes_changed() {
    let mut h = H::new();
    h.write(D0, "/c", "1");
    h.write(D0, "/other", "1");
    let tx = h.tx_start(D0);
    h.tx_ok(D0, MsgType::Read, tx, &s(&["/c"]));
    h.write(D0, "/other", "2");
    h.tx_ok(D0, MsgType::TransactionEnd, tx, b"T\0");
}

#[test]
fn two_transactions_writing_the_same_node_conflict() {
    let mut h = H::new();
    h.write(G5, "n", "0");
    let a = h.tx_start(G5);
    let b = h.tx_start(G5);
    let w = |v: &str| {
        let mut p = s(&["n"]);
        p.extend_from_slice(v.as_bytes());
        p
    };
    h.tx_ok(G5, MsgType::Write, a, &w("a"));
    h.tx_ok(G5, MsgType::Write, b, &w("b"));
    h.tx_ok(G5, MsgType::TransactionEnd, a, b"T\0");
    assert_eq!(
        h.tx_err(G5, MsgType::TransactionEnd, b, b"T\0"),
        XsError::EAGAIN
    );
    assert_eq!(h.read(G5, "n").unwrap(), b"a");
}

#[test]
fn transaction_watch_events_fire_at_commit() {
    let mut h = H::new();
    h.watch(D0, "/tw", "t");
    let tx = h.tx_start(D0);
    let mut p = s(&["/tw/x"]);
    p.extend_from_slice(b"1");
    let out = h.send(D0, MsgType::Write, tx, &p);
    assert!(H::events(&out).is_empty());
    let out = h.send(D0, MsgType::TransactionEnd, tx, b"T\0");
    assert_eq!(H::events(&out), vec![(D0, "/tw/x".into(), "t".into())]);
}

#[test]
fn unknown_transaction_id_is_enoent() {
    let mut h = H::new();
    assert_eq!(
        h.tx_err(D0, MsgType::Read, 777, &s(&["/"])),
        XsError::ENOENT
    );
    assert_eq!(
        h.tx_err(D0, MsgType::TransactionEnd, 777, b"T\0"),
        XsError::ENOENT
    );
}

#[test]
fn nested_transaction_start_is_ebusy() {
    let mut h = H::new();
    let tx = h.tx_start(D0);
    assert_eq!(
        h.tx_err(D0, MsgType::TransactionStart, tx, b"\0"),
        XsError::EBUSY
    );
}

#[test]
fn transaction_quota_per_connection() {
    let mut h = H::new();
    for _ in 0..10 {
        h.tx_start(G5);
    }
    assert_eq!(h.err(G5, MsgType::TransactionStart, b"\0"), XsError::ENOSPC);
    h.tx_start(G6);
    for _ in 0..20 {
        h.tx_start(D0);
    }
}

#[test]
fn transaction_end_needs_t_or_f() {
    let mut h = H::new();
    let tx = h.tx_start(D0);
    assert_eq!(
        h.tx_err(D0, MsgType::TransactionEnd, tx, b"X\0"),
        XsError::EINVAL
    );
}

#[test]
fn transaction_node_quota() {
    let mut h = H::with_quotas(Quotas {
        transaction_nodes: 4,
        ..Quotas::default()
    });
    let tx = h.tx_start(G5);
    for i in 0..4 {
        let _ = h.send(G5, MsgType::Read, tx, &s(&[&format!("n{i}")]));
    }
    assert_eq!(
        h.tx_err(G5, MsgType::Read, tx, &s(&["n9"])),
        XsError::ENOSPC
    );
}

#[test]
fn directory_inside_transaction_sees_its_own_changes() {
    let mut h = H::new();
    h.write(D0, "/dt/old", "1");
    let tx = h.tx_start(D0);
    h.tx_ok(D0, MsgType::Rm, tx, &s(&["/dt/old"]));
    h.tx_ok(D0, MsgType::Mkdir, tx, &s(&["/dt/new"]));
    assert_eq!(h.tx_ok(D0, MsgType::Directory, tx, &s(&["/dt"])), b"new\0");
    assert_eq!(h.ok(D0, MsgType::Directory, &s(&["/dt"])), b"old\0");
}

// ---- quotas ----

#[test]
fn node_count_quota_is_enospc() {
    let mut h = H::with_quotas(Quotas {
        nodes_per_domain: 5,
        ..Quotas::default()
    });
    // The home node already counts as one of 5's nodes.
    for i in 0..4 {
        h.write(G5, &format!("n{i}"), "x");
    }
    assert_eq!(h.write_err(G5, "n9", "x"), XsError::ENOSPC);
    h.ok(G5, MsgType::Rm, &s(&["n0"]));
    h.write(G5, "n9", "x");
}

#[test]
fn node_size_quota_applies_to_guests_only() {
    let mut h = H::new();
    let big = "v".repeat(2100);
    assert_eq!(h.write_err(G5, "big", &big), XsError::ENOSPC);
    h.write(D0, "/local/domain/5/big", &big);
}

#[test]
fn path_length_quota_counts_below_domain_home() {
    let mut h = H::with_quotas(Quotas {
        path_len: 20,
        ..Quotas::default()
    });
    h.write(G5, &"a".repeat(20), "x");
    assert_eq!(h.write_err(G5, &"a".repeat(21), "x"), XsError::EINVAL);
    h.write(D0, &format!("/local/domain/5/{}", "a".repeat(40)), "x");
}

// ---- domains ----

#[test]
fn get_domain_path_and_is_introduced() {
    let mut h = H::new();
    assert_eq!(
        h.ok(G5, MsgType::GetDomainPath, &s(&["42"])),
        b"/local/domain/42\0"
    );
    assert_eq!(h.ok(G5, MsgType::IsDomainIntroduced, &s(&["5"])), b"T\0");
    assert_eq!(h.ok(G5, MsgType::IsDomainIntroduced, &s(&["42"])), b"F\0");
    assert_eq!(
        h.err(G5, MsgType::GetDomainPath, &s(&["x"])),
        XsError::EINVAL
    );
}

#[test]
fn introduce_is_privileged_and_once() {
    let mut h = H::new();
    assert_eq!(
        h.err(G5, MsgType::Introduce, &s(&["7", "0", "0"])),
        XsError::EACCES
    );
    h.ok(D0, MsgType::Introduce, &s(&["7", "0", "0"]));
    assert_eq!(h.e.take_domain_events(), vec![DomainEvent::Introduced(7)]);
    assert_eq!(
        h.err(D0, MsgType::Introduce, &s(&["7", "0", "0"])),
        XsError::EEXIST
    );
    assert_eq!(h.err(D0, MsgType::Introduce, &s(&["8"])), XsError::EINVAL);
}

#[test]
fn release_removes_home_connections_and_reports() {
    let mut h = H::new();
    h.write(G5, "data", "x");
    h.ok(D0, MsgType::Release, &s(&["5"]));
    assert_eq!(h.e.take_domain_events(), vec![DomainEvent::Released(5)]);
    assert_eq!(h.read(D0, "/local/domain/5"), Err(XsError::ENOENT));
    assert!(!h.e.is_connected(G5));
    assert_eq!(h.err(D0, MsgType::Release, &s(&["5"])), XsError::ENOENT);
    assert_eq!(h.err(G6, MsgType::Release, &s(&["6"])), XsError::EACCES);
}

#[test]
fn release_scrubs_domain_from_every_permission_list_xsa322() {
    let mut h = H::new();
    h.write(D0, "/vm/shared", "secret");
    h.ok(D0, MsgType::SetPerms, &s(&["/vm/shared", "n0", "r5"]));
    h.write(D0, "/vm/owned", "o");
    h.ok(D0, MsgType::SetPerms, &s(&["/vm/owned", "n5"]));
    h.ok(D0, MsgType::Release, &s(&["5"]));
    assert_eq!(h.perms(D0, "/vm/shared"), "n0");
    assert_eq!(h.perms(D0, "/vm/owned"), "n0");
    // A new domain reusing id 5 inherits nothing.
    h.ok(D0, MsgType::Introduce, &s(&["5", "0", "0"]));
    h.e.connect(ConnId(50), 5, false).unwrap();
    assert_eq!(h.read(ConnId(50), "/vm/shared"), Err(XsError::EACCES));
    assert_eq!(h.read(ConnId(50), "/vm/owned"), Err(XsError::EACCES));
}

#[test]
fn set_target_grants_the_targets_rights() {
    let mut h = H::new();
    h.write(G6, "t", "six");
    assert_eq!(h.read(G5, "/local/domain/6/t"), Err(XsError::EACCES));
    assert_eq!(
        h.err(G5, MsgType::SetTarget, &s(&["5", "6"])),
        XsError::EACCES
    );
    h.ok(D0, MsgType::SetTarget, &s(&["5", "6"]));
    assert_eq!(h.read(G5, "/local/domain/6/t").unwrap(), b"six");
    assert_eq!(
        h.err(D0, MsgType::SetTarget, &s(&["5", "99"])),
        XsError::ENOENT
    );
}

// ---- misc ----

#[test]
fn unsupported_types_are_enosys() {
    let mut h = H::new();
    for ty in [
        MsgType::GetFeature,
        MsgType::SetQuota,
        MsgType::WatchEvent,
        MsgType::Error,
        MsgType::Resume,
    ] {
        assert_eq!(h.err(D0, ty, b"\0"), XsError::ENOSYS, "{ty:?}");
    }
}

#[test]
fn control_is_privileged() {
    let mut h = H::new();
    assert_eq!(h.ok(D0, MsgType::Control, &s(&["check"])), b"OK\0");
    assert_eq!(h.err(G5, MsgType::Control, &s(&["check"])), XsError::EACCES);
    assert_eq!(h.err(D0, MsgType::Control, &s(&["bogus"])), XsError::EINVAL);
}

#[test]
fn directory_part_pages_through_large_directories() {
    let mut h = H::new();
    let names: Vec<String> = (0..300)
        .map(|i| format!("child-with-a-long-name-{i:04}"))
        .collect();
    for n in &names {
        h.ok(D0, MsgType::Mkdir, &s(&[&format!("/big/{n}")]));
    }
    assert_eq!(h.err(D0, MsgType::Directory, &s(&["/big"])), XsError::E2BIG);
    let mut got = Vec::new();
    let mut offset = 0usize;
    let mut gens = Vec::new();
    let mut pages = 0;
    loop {
        let r = h.ok(
            D0,
            MsgType::DirectoryPart,
            &s(&["/big", &offset.to_string()]),
        );
        assert!(r.len() <= 4096);
        pages += 1;
        let gen_end = r.iter().position(|&b| b == 0).unwrap();
        gens.push(String::from_utf8(r[..gen_end].to_vec()).unwrap());
        let body = &r[gen_end + 1..];
        let done = body.ends_with(b"\0\0") || body == b"\0";
        let list = if done { &body[..body.len() - 1] } else { body };
        for n in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            got.push(String::from_utf8(n.to_vec()).unwrap());
        }
        offset += list.len();
        if done {
            break;
        }
    }
    assert!(pages >= 2);
    assert_eq!(got, names);
    assert!(gens.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn unknown_connection_gets_no_output() {
    let mut h = H::new();
    assert!(h
        .e
        .handle(ConnId(999), Message::new(MsgType::Read, 1, 0, s(&["/"])))
        .is_empty());
}

#[test]
fn a_node_changed_twice_in_a_transaction_fires_once() {
    let mut h = H::new();
    h.watch(D0, "/twice", "t");
    let tx = h.tx_start(D0);
    for v in ["1", "2"] {
        let mut p = s(&["/twice"]);
        p.extend_from_slice(v.as_bytes());
        h.tx_ok(D0, MsgType::Write, tx, &p);
    }
    let out = h.send(D0, MsgType::TransactionEnd, tx, b"T\0");
    assert_eq!(H::events(&out), vec![(D0, "/twice".into(), "t".into())]);
}

#[test]
fn mkdir_on_existing_node_without_write_access_is_eacces() {
    let mut h = H::new();
    h.write(D0, "/ro", "v");
    h.ok(D0, MsgType::SetPerms, &s(&["/ro", "r0"]));
    assert_eq!(h.err(G5, MsgType::Mkdir, &s(&["/ro"])), XsError::EACCES);
    assert_eq!(h.write_err(G5, "/ro", "w"), XsError::EACCES);
    assert_eq!(h.err(G5, MsgType::Rm, &s(&["/ro"])), XsError::EACCES);
}

#[test]
fn get_perms_needs_read_access() {
    let mut h = H::new();
    h.write(D0, "/gp", "v");
    assert_eq!(h.err(G5, MsgType::GetPerms, &s(&["/gp"])), XsError::EACCES);
    assert_eq!(h.err(G5, MsgType::Directory, &s(&["/gp"])), XsError::EACCES);
}

#[test]
fn dom0_is_always_introduced() {
    let mut h = H::new();
    assert_eq!(h.ok(G5, MsgType::IsDomainIntroduced, &s(&["0"])), b"T\0");
    assert_eq!(
        h.err(D0, MsgType::Introduce, &s(&["0", "0", "0"])),
        XsError::EEXIST
    );
    assert_eq!(h.err(D0, MsgType::Release, &s(&["0"])), XsError::EINVAL);
}

#[test]
fn directory_part_past_the_end_is_an_empty_final_chunk() {
    let mut h = H::new();
    h.write(D0, "/dp/a", "1");
    let r = h.ok(D0, MsgType::DirectoryPart, &s(&["/dp", "0"]));
    let gen_end = r.iter().position(|&b| b == 0).unwrap();
    assert_eq!(&r[gen_end + 1..], b"a\0\0");
    let r = h.ok(D0, MsgType::DirectoryPart, &s(&["/dp", "99"]));
    assert_eq!(&r[gen_end + 1..], b"\0");
    assert_eq!(
        h.err(D0, MsgType::DirectoryPart, &s(&["/dp", "x"])),
        XsError::EINVAL
    );
}
