use vm_memory::GuestMemoryMmap;

use super::*;
use crate::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};

const CMD: u64 = 0x8000;
const ACK: u64 = 0x9000;

struct Rig {
    mem: GuestMemoryMmap,
    ring: DriverRing,
    queue: Queue,
    ctrl: CtrlQueue,
    next: u16,
}

fn rig(max_pairs: u16, mq: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let ring = DriverRing::new(GuestAddress(0x1000), 16);
    let mut queue = Queue::new(16).unwrap();
    ring.configure(&mut queue, false);
    let mut ctrl = CtrlQueue::new("net test", 2, max_pairs);
    ctrl.set_mq(mq);
    Rig {
        mem,
        ring,
        queue,
        ctrl,
        next: 0,
    }
}

impl Rig {
    /// Send `cmd` (header + data) as one readable descriptor and a one-byte status; returns
    /// the status byte and the used length.
    fn send(&mut self, cmd: &[u8]) -> (u8, u32) {
        self.mem.write_slice(cmd, GuestAddress(CMD)).unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(ACK)).unwrap();
        let d = (self.next * 2) % 16;
        self.ring
            .write_desc(&self.mem, d, CMD, cmd.len() as u32, DESC_F_NEXT, d + 1)
            .unwrap();
        self.ring
            .write_desc(&self.mem, d + 1, ACK, 1, DESC_F_WRITE, 0)
            .unwrap();
        self.ring.push_avail(&self.mem, d).unwrap();
        let p = self.ctrl.process(&mut self.queue, &self.mem).unwrap();
        assert_eq!(p.completed, 1);
        let (id, len) = self.ring.used_elem(&self.mem, self.next).unwrap();
        assert_eq!(id, u32::from(d));
        self.next += 1;
        (self.mem.read_obj(GuestAddress(ACK)).unwrap(), len)
    }
}

fn mac_table(uni: u32, multi: u32) -> Vec<u8> {
    let mut c = vec![CTRL_MAC, CTRL_MAC_TABLE_SET];
    c.extend_from_slice(&uni.to_le_bytes());
    c.extend(std::iter::repeat_n(0x02, 6 * uni as usize));
    c.extend_from_slice(&multi.to_le_bytes());
    c.extend(std::iter::repeat_n(0x01, 6 * multi as usize));
    c
}

#[test]
fn receive_filters_and_mac_table_are_acknowledged() {
    let mut r = rig(1, false);
    assert_eq!(r.send(&[CTRL_RX, CTRL_RX_PROMISC, 1]), (VIRTIO_NET_OK, 1));
    assert_eq!(r.send(&[CTRL_RX, CTRL_RX_ALLMULTI, 1]), (VIRTIO_NET_OK, 1));
    assert!(r.ctrl.filter().promisc && r.ctrl.filter().allmulti);
    assert_eq!(r.send(&[CTRL_RX, CTRL_RX_PROMISC, 0]), (VIRTIO_NET_OK, 1));
    assert!(!r.ctrl.filter().promisc);
    assert_eq!(r.send(&mac_table(2, 3)), (VIRTIO_NET_OK, 1));
    assert_eq!((r.ctrl.filter().unicast, r.ctrl.filter().multicast), (2, 3));
    assert_eq!(r.send(&mac_table(0, 0)), (VIRTIO_NET_OK, 1));
    assert_eq!(r.ctrl.refused(), 0);
}

#[test]
fn queue_pairs_within_the_device_and_only_with_mq() {
    let mut r = rig(4, true);
    assert_eq!(
        r.send(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 4, 0]).0,
        VIRTIO_NET_OK
    );
    assert_eq!(r.ctrl.filter().pairs, 4);
    assert_eq!(
        r.send(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 5, 0]).0,
        VIRTIO_NET_ERR
    );
    assert_eq!(
        r.send(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0]).0,
        VIRTIO_NET_ERR
    );
    assert_eq!(
        r.send(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1]).0,
        VIRTIO_NET_ERR
    );
    assert_eq!(r.ctrl.filter().pairs, 4, "refused commands change nothing");
    let mut r = rig(4, false);
    assert_eq!(
        r.send(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0]).0,
        VIRTIO_NET_ERR
    );
}

#[test]
fn unknown_and_malformed_commands_are_refused() {
    let mut r = rig(1, false);
    for cmd in [
        vec![9u8, 0],                                // unknown class
        vec![CTRL_RX, 7, 1],                         // unknown command
        vec![CTRL_RX, CTRL_RX_PROMISC],              // no data
        vec![CTRL_RX, CTRL_RX_PROMISC, 1, 1],        // too much data
        vec![CTRL_MAC],                              // short header
        vec![CTRL_MAC, CTRL_MAC_TABLE_SET, 1, 0, 0], // short count
        vec![
            CTRL_MAC,
            CTRL_MAC_TABLE_SET,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0,
            0,
            0,
        ],
        {
            let mut t = mac_table(1, 1);
            t.push(0);
            t // trailing byte
        },
        {
            let mut t = mac_table(1, 2);
            t.truncate(t.len() - 1);
            t // second table short
        },
        vec![CTRL_RX; MAX_COMMAND + 1], // too long
    ] {
        assert_eq!(
            r.send(&cmd),
            (VIRTIO_NET_ERR, 1),
            "{:?}",
            &cmd[..cmd.len().min(8)]
        );
    }
    assert_eq!(r.ctrl.refused(), 10);
    assert_eq!(
        *r.ctrl.filter(),
        RxFilter {
            pairs: 1,
            ..RxFilter::default()
        }
    );
}

#[test]
fn a_command_without_a_status_byte_is_returned_empty() {
    let mut r = rig(1, false);
    r.mem
        .write_slice(&[CTRL_RX, CTRL_RX_PROMISC, 1], GuestAddress(CMD))
        .unwrap();
    r.ring.write_desc(&r.mem, 0, CMD, 3, 0, 0).unwrap();
    r.ring.push_avail(&r.mem, 0).unwrap();
    let p = r.ctrl.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(p.completed, 1);
    assert_eq!(r.ring.used_elem(&r.mem, 0).unwrap(), (0, 0));
    assert_eq!(r.ctrl.refused(), 1);
    // A status byte outside guest memory: the same, and the queue goes on.
    r.next = 1;
    r.ring
        .write_desc(&r.mem, 2, CMD, 3, DESC_F_NEXT, 3)
        .unwrap();
    r.ring
        .write_desc(&r.mem, 3, 0x10_0000, 1, DESC_F_WRITE, 0)
        .unwrap();
    r.ring.push_avail(&r.mem, 2).unwrap();
    r.ctrl.process(&mut r.queue, &r.mem).unwrap();
    assert_eq!(r.ring.used_elem(&r.mem, 1).unwrap(), (2, 0));
    assert_eq!(r.send(&[CTRL_RX, CTRL_RX_PROMISC, 1]).0, VIRTIO_NET_OK);
}
