//! Issue 18's attacks on the switch: a guest sending from addresses that are not its own,
//! and a port spraying source addresses to fill or poison the MAC table.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use driver_domain::net::{Forwarded, Mac, Switch, SwitchConfig, SwitchPort};

const BROADCAST: Mac = [0xff; 6];

fn mac(n: u16) -> Mac {
    let [hi, lo] = n.to_be_bytes();
    [0x02, 0, 0, 0, hi, lo]
}

fn send(p: &SwitchPort, dst: Mac, src: Mac) -> Forwarded {
    let mut b = p.take_buffer().unwrap();
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    b.fill(&f);
    p.transmit(b)
}

fn drain(p: &SwitchPort) -> usize {
    let mut q = VecDeque::new();
    let n = p.receive(&mut q, usize::MAX);
    p.recycle_all(q.into_iter());
    n
}

#[test]
fn spoofed_source_addresses_are_dropped_and_counted() {
    let sw = Switch::new(SwitchConfig::default());
    let a = sw.attach_guest("vif1.0", mac(1)).unwrap();
    let b = sw.attach_guest("vif2.0", mac(2)).unwrap();
    // a pretends to be b, and a third host.
    assert_eq!(send(&a, BROADCAST, mac(2)), Forwarded::Spoofed);
    assert_eq!(send(&a, mac(2), mac(77)), Forwarded::Spoofed);
    assert_eq!(drain(&b), 0);
    let c = a.counters();
    assert_eq!((c.tx_spoofed, c.tx_frames), (2, 0));
    // b's address still leads to b; a's own frames pass.
    assert_eq!(sw.lookup(&mac(2)), Some(b.id()));
    assert_eq!(send(&a, mac(2), mac(1)), Forwarded::Unicast(b.id()));
    assert_eq!(drain(&b), 1);
    // The port counters report it where the others are.
    let (_, name, snap) = sw.ports().into_iter().find(|p| p.0 == a.id()).unwrap();
    assert_eq!((name.as_str(), snap.tx_spoofed), ("vif1.0", 2));
}

#[test]
fn the_uplink_carries_many_hosts_but_cannot_steal_a_guests_address() {
    let sw = Switch::new(SwitchConfig::default());
    let guest = sw.attach_guest("vif1.0", mac(1)).unwrap();
    let uplink = sw.attach("tap:tap0").unwrap();
    for n in 100..110 {
        assert!(matches!(
            send(&uplink, BROADCAST, mac(n)),
            Forwarded::Flooded(1)
        ));
    }
    drain(&guest);
    assert_eq!(uplink.counters().tx_spoofed, 0);
    assert_eq!(sw.lookup(&mac(105)), Some(uplink.id()));
    // A frame from outside claiming the guest's address does not move it.
    send(&uplink, BROADCAST, mac(1));
    assert_eq!(sw.lookup(&mac(1)), Some(guest.id()));
    assert_eq!(
        send(&uplink, mac(1), mac(100)),
        Forwarded::Unicast(guest.id())
    );
}

#[test]
fn a_port_spraying_source_addresses_fills_only_its_own_share() {
    let cfg = SwitchConfig {
        max_macs: 64,
        max_macs_per_port: 16,
        ..SwitchConfig::default()
    };
    let sw = Switch::new(cfg);
    let g1 = sw.attach_guest("vif1.0", mac(1)).unwrap();
    let up1 = sw.attach("up1").unwrap();
    let up2 = sw.attach("up2").unwrap();
    for n in 200..210 {
        send(&up2, BROADCAST, mac(n));
    }
    // up1 sprays 10,000 addresses, and the guest's.
    for n in 0..10_000u16 {
        send(&up1, BROADCAST, mac(1000 + n));
    }
    send(&up1, BROADCAST, mac(1));
    assert!(sw.mac_entries() <= 1 + 10 + 16, "{}", sw.mac_entries());
    for n in 200..210 {
        assert_eq!(sw.lookup(&mac(n)), Some(up2.id()), "up2's entries kept");
    }
    assert_eq!(sw.lookup(&mac(1)), Some(g1.id()));
    // up1 is still served: its frames go out, they are just not learned.
    drain(&g1);
    assert!(matches!(
        send(&up1, mac(1), mac(9999)),
        Forwarded::Unicast(_)
    ));
}
