//! Issue 18's memory attacks on the engine, replayed: the bytes charged to a
//! domain (its nodes, transaction journals and watches) stay within
//! `Quotas::memory_per_domain`, and rewriting one node inside a transaction
//! costs once.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

const G7: ConnId = ConnId(7);

#[test]
fn rewriting_one_node_in_a_transaction_costs_once() {
    let mut h = H::new();
    let tx = h.tx_start(G5);
    let path = format!("/local/domain/5/{}", "p".repeat(2000));
    let mut first = s(&[&path]);
    first.push(b'v');
    h.tx_ok(G5, MsgType::Write, tx, &first);
    let after_one = h.e.domain_memory(5);
    for i in 0..30_000u32 {
        let v = (i % 10).to_string();
        let mut payload = s(&[&path]);
        payload.extend_from_slice(v.as_bytes());
        h.tx_ok(G5, MsgType::Write, tx, &payload);
    }
    assert_eq!(
        h.e.domain_memory(5),
        after_one,
        "journal grew with rewrites"
    );
    let out = h.send(G5, MsgType::TransactionEnd, tx, b"T\0");
    assert_eq!(out[0].1.payload, b"OK\0");
}

#[test]
fn transaction_journals_are_charged_and_bounded() {
    let q = Quotas::default();
    let limit = q.memory_per_domain;
    let mut h = H::new();
    // More connections of domain 5, each filling all its transactions.
    let mut conns = vec![G5];
    for i in 0..8 {
        let c = ConnId(100 + i);
        h.e.connect(c, 5, false).unwrap();
        conns.push(c);
    }
    let value = "v".repeat(1500);
    let mut refused = None;
    'attack: for &c in &conns {
        for _ in 0..q.transactions {
            let out = h.send(c, MsgType::TransactionStart, 0, b"\0");
            if let Some(e) = out[0].1.as_error() {
                refused = Some(e);
                break 'attack;
            }
            let id = String::from_utf8_lossy(&out[0].1.payload).into_owned();
            let tx: u32 = id.trim_end_matches('\0').parse().unwrap();
            for n in 0..900 {
                // Few children per directory: the node-size quota stays out of the way.
                let p = format!("/local/domain/5/c{}/g{}/{}", c.0, n / 100, n % 100);
                let mut payload = s(&[&p]);
                payload.extend_from_slice(value.as_bytes());
                let out = h.send(c, MsgType::Write, tx, &payload);
                if let Some(e) = out[0].1.as_error() {
                    refused = Some(e);
                    break 'attack;
                }
                // One request overshoots by at most a node and its path.
                assert!(h.e.domain_memory(5) <= limit + 8192);
            }
        }
    }
    assert_eq!(refused, Some(XsError::ENOMEM));
    // Other domains are unaffected; dom0 is never limited.
    h.write(G6, "/local/domain/6/ok", "1");
    h.write(D0, "/big", &"x".repeat(4000));
    // Closing the connections frees their journals.
    for &c in &conns {
        h.e.disconnect(c);
    }
    assert!(h.e.domain_memory(5) < 1024, "{}", h.e.domain_memory(5));
    h.e.connect(G7, 5, false).unwrap();
    h.write(G7, "/local/domain/5/again", "1");
}

#[test]
fn owned_nodes_are_charged_until_removed() {
    let mut h = H::new();
    let before = h.e.domain_memory(5);
    let mut written = 0;
    let err = loop {
        let long = "l".repeat(1400);
        let p = format!("/local/domain/5/g{}/{long}/{}", written / 50, written % 50);
        let mut payload = s(&[&p]);
        payload.extend_from_slice("x".repeat(2000).as_bytes());
        let out = h.send(G5, MsgType::Write, 0, &payload);
        if let Some(e) = out[0].1.as_error() {
            break e;
        }
        written += 1;
        assert!(written < 2000);
    };
    // 2000 B values hit the memory quota before the 1000-node quota.
    assert_eq!(err, XsError::ENOMEM);
    assert!(written < 1000);
    h.ok(G5, MsgType::Rm, &s(&["/local/domain/5/g0"]));
    assert!(h.e.domain_memory(5) < Quotas::default().memory_per_domain);
    h.write(G5, "/local/domain/5/small", "1");
    for g in 1..=written / 50 {
        h.ok(G5, MsgType::Rm, &s(&[&format!("/local/domain/5/g{g}")]));
    }
    h.ok(G5, MsgType::Rm, &s(&["/local/domain/5/small"]));
    assert_eq!(h.e.domain_memory(5), before);
}
