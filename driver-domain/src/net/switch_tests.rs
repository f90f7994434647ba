//! Unit tests of the switch: learning, ageing, flooding, no hairpin, bounded queues.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::net::frame::BROADCAST;

fn mac(n: u8) -> Mac {
    [0x02, 0, 0, 0, 0, n]
}

fn send(p: &SwitchPort, dst: Mac, src: Mac, payload: u8) -> Forwarded {
    let mut b = p.take_buffer().unwrap();
    let mut f = vec![payload; 60];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    b.fill(&f);
    p.transmit(b)
}

fn drain(p: &SwitchPort) -> Vec<Vec<u8>> {
    let mut q = VecDeque::new();
    p.receive(&mut q, usize::MAX);
    let out = q.iter().map(|b| b.frame().to_vec()).collect();
    p.recycle_all(q.into_iter());
    out
}

fn three(cfg: SwitchConfig) -> (Arc<Switch>, SwitchPort, SwitchPort, SwitchPort) {
    let sw = Switch::new(cfg);
    let a = sw.attach("a").unwrap();
    let b = sw.attach("b").unwrap();
    let c = sw.attach("c").unwrap();
    (sw, a, b, c)
}

#[test]
fn unknown_and_broadcast_flood_to_all_but_the_source() {
    let (_sw, a, b, c) = three(SwitchConfig::default());
    assert_eq!(send(&a, BROADCAST, mac(1), 7), Forwarded::Flooded(2));
    assert_eq!(send(&a, mac(9), mac(1), 8), Forwarded::Flooded(2));
    assert!(drain(&a).is_empty(), "no hairpin on flood");
    for p in [&b, &c] {
        let got = drain(p);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0][12], 7);
        assert_eq!(got[1][12], 8);
    }
}

#[test]
fn learned_unicast_goes_to_one_port() {
    let (sw, a, b, c) = three(SwitchConfig::default());
    send(&b, BROADCAST, mac(2), 0);
    assert_eq!(sw.lookup(&mac(2)), Some(b.id()));
    drain(&a);
    drain(&c);
    assert_eq!(send(&a, mac(2), mac(1), 5), Forwarded::Unicast(b.id()));
    assert_eq!(drain(&b).len(), 1);
    assert!(drain(&c).is_empty());
    assert_eq!(a.counters().tx_frames, 1);
    assert_eq!(a.counters().tx_bytes, 60);
    // A MAC moving to another port follows it.
    send(&c, BROADCAST, mac(2), 0);
    assert_eq!(sw.lookup(&mac(2)), Some(c.id()));
}

#[test]
fn unicast_to_own_port_is_filtered() {
    let (_sw, a, b, c) = three(SwitchConfig::default());
    send(&a, BROADCAST, mac(1), 0);
    send(&a, BROADCAST, mac(3), 0);
    drain(&b);
    drain(&c);
    assert_eq!(send(&a, mac(3), mac(1), 0), Forwarded::Filtered);
    assert!(drain(&a).is_empty() && drain(&b).is_empty() && drain(&c).is_empty());
    assert_eq!(a.counters().tx_filtered, 1);
}

#[test]
fn group_source_address_is_invalid() {
    let (sw, a, b, _c) = three(SwitchConfig::default());
    assert_eq!(send(&a, mac(2), BROADCAST, 0), Forwarded::Invalid);
    assert!(drain(&b).is_empty());
    assert_eq!(a.counters().tx_invalid, 1);
    assert_eq!(sw.mac_entries(), 0);
}

#[test]
fn entries_age_out() {
    let cfg = SwitchConfig {
        ageing: Duration::from_millis(50),
        ..SwitchConfig::default()
    };
    let (sw, a, b, c) = three(cfg);
    send(&b, BROADCAST, mac(2), 0);
    assert_eq!(send(&a, mac(2), mac(1), 0), Forwarded::Unicast(b.id()));
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(sw.lookup(&mac(2)), None);
    // Aged out: flooded again, and the next learning pass sweeps the stale entry.
    assert_eq!(send(&a, mac(2), mac(1), 0), Forwarded::Flooded(2));
    drain(&c);
    assert_eq!(
        sw.mac_entries(),
        1,
        "only the fresh entry of mac(1) is left"
    );
}

#[test]
fn a_flooding_sender_drops_only_its_own_frames() {
    let cfg = SwitchConfig {
        queue_limit: 8,
        ..SwitchConfig::default()
    };
    let (_sw, a, b, c) = three(cfg);
    send(&b, BROADCAST, mac(2), 0);
    drain(&a);
    drain(&c);
    // b never drains: a floods it far past its share.
    for _ in 0..100 {
        send(&a, mac(2), mac(1), 1);
    }
    assert_eq!(a.counters().tx_dropped, 92);
    // c still gets its frames to b.
    for _ in 0..8 {
        assert_eq!(send(&c, mac(2), mac(3), 3), Forwarded::Unicast(b.id()));
    }
    assert_eq!(c.counters().tx_dropped, 0);
    let got = drain(&b);
    assert_eq!(got.len(), 16);
    assert_eq!(got.iter().filter(|f| f[12] == 3).count(), 8);
    // After draining, a's share is free again.
    assert_eq!(send(&a, mac(2), mac(1), 1), Forwarded::Unicast(b.id()));
}

#[test]
fn detach_forgets_macs_and_frees_frames() {
    let (sw, a, b, c) = three(SwitchConfig::default());
    send(&b, BROADCAST, mac(2), 0);
    send(&a, mac(2), mac(1), 0);
    let free_before = sw.pool().free();
    drop(b);
    assert_eq!(sw.lookup(&mac(2)), None);
    assert!(sw.pool().free() > free_before);
    // Now unknown: flooded to the only other port.
    drain(&c);
    assert_eq!(send(&a, mac(2), mac(1), 0), Forwarded::Flooded(1));
    assert_eq!(sw.ports().len(), 2);
    // The slot is reused.
    let d = sw.attach("d").unwrap();
    assert_eq!(sw.ports().len(), 3);
    assert!(d.id() < 3);
}

#[test]
fn wake_fd_fires_once_armed() {
    let (_sw, a, b, _c) = three(SwitchConfig::default());
    assert!(!b.arm());
    send(&a, BROADCAST, mac(1), 0);
    assert_eq!(b.wake_fd().read().unwrap(), 1);
    // Not re-armed: no further writes.
    send(&a, BROADCAST, mac(1), 0);
    assert!(b.wake_fd().read().is_err());
    assert!(b.arm(), "frames are pending, so arming reports them");
    drain(&b);
}

#[test]
fn mac_table_is_bounded() {
    let cfg = SwitchConfig {
        max_macs: 4,
        ..SwitchConfig::default()
    };
    let (sw, a, b, c) = three(cfg);
    for i in 0..20 {
        send(&a, BROADCAST, mac(100 + i), 0);
    }
    assert_eq!(sw.mac_entries(), 4);
    drain(&b);
    drain(&c);
}
