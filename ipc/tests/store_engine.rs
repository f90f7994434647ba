//! The store engine against Xen's semantics, one rule per test: nodes, permissions,
//! watches. (Transactions, quotas and domains: store_engine_tx.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

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
