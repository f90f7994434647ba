//! The store engine against Xen's semantics, one rule per test: transactions, quotas,
//! domains and the rest.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

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
