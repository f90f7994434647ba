//! A guest's virtio-net driver side for tests that drive the net core directly: split rings
//! in the guest's own GuestMemoryMmap, frames written as a driver would, read back from the
//! used ring.

#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;

use driver_domain::net::config::NET_F_MRG_RXBUF;
use driver_domain::net::header::HDR_LEN;
use driver_domain::net::{Negotiated, RxQueue, Switch, SwitchPort, TxQueue};
use driver_domain::virtio_core::ring_driver::{DriverRing, DESC_F_WRITE};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM: usize = 1 << 20;
pub const QSIZE: u16 = 64;
pub const TX_BUF: u64 = 0x10000;
pub const RX_BUF: u64 = 0x60000;
pub const SLOT: u64 = 2048;
pub const LARGE_BUF: u64 = 0x80000;

pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub rx_ring: DriverRing,
    pub tx_ring: DriverRing,
    pub rxq: Queue,
    pub txq: Queue,
    pub rx: RxQueue,
    pub tx: TxQueue,
    pub port: Arc<SwitchPort>,
    pub tx_next: u16,
    pub rx_next: u16,
    pub rx_seen: u16,
}

pub fn guest(sw: &Arc<Switch>, name: &str, mrg: bool) -> Guest {
    let mut features = 1u64 << VIRTIO_F_VERSION_1;
    if mrg {
        features |= 1 << NET_F_MRG_RXBUF;
    }
    guest_with(sw, name, features)
}

/// A guest whose driver acked `features`.
pub fn guest_with(sw: &Arc<Switch>, name: &str, features: u64) -> Guest {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let port = Arc::new(sw.attach(name).unwrap());
    let rx_ring = DriverRing::new(GuestAddress(0x1000), QSIZE);
    let tx_ring = DriverRing::new(GuestAddress(0x4000), QSIZE);
    let mut rxq = Queue::new(QSIZE).unwrap();
    let mut txq = Queue::new(QSIZE).unwrap();
    rx_ring.configure(&mut rxq, false);
    tx_ring.configure(&mut txq, false);
    let neg = Negotiated::from_features(features);
    let mut rx = RxQueue::new(0, port.clone(), 64);
    let mut tx = TxQueue::new(1, port.clone(), 64);
    rx.set_negotiated(neg);
    tx.set_negotiated(neg);
    Guest {
        mem,
        rx_ring,
        tx_ring,
        rxq,
        txq,
        rx,
        tx,
        port,
        tx_next: 0,
        rx_next: 0,
        rx_seen: 0,
    }
}

pub fn frame(dst: u8, src: u8, len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, dst]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, src]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

pub fn bcast(src: u8, len: usize) -> Vec<u8> {
    let mut f = frame(0, src, len, 0x11);
    f[0..6].copy_from_slice(&[0xff; 6]);
    f
}

impl Guest {
    /// Post one TX descriptor as given (`addr`, `len`, `flags`, `next`: hostile ones too) as
    /// the next chain's head and run TX.
    pub fn send_desc(&mut self, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.tx_next % QSIZE;
        self.tx_next = self.tx_next.wrapping_add(1);
        self.tx_ring
            .write_desc(&self.mem, d, addr, len, flags, next)
            .unwrap();
        self.tx_ring.push_avail(&self.mem, d).unwrap();
        self.tx.process(&mut self.txq, &self.mem).unwrap();
    }

    /// Post one TX chain of `hdr` + `frame` as a single descriptor and run TX.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let d = self.tx_next % QSIZE;
        self.tx_next = self.tx_next.wrapping_add(1);
        let addr = TX_BUF + u64::from(d) * SLOT * 2;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx_ring
            .write_desc(&self.mem, d, addr, bytes.len() as u32, 0, 0)
            .unwrap();
        self.tx_ring.push_avail(&self.mem, d).unwrap();
        self.tx.process(&mut self.txq, &self.mem).unwrap();
    }

    /// Post `bytes` (header and frame, up to 512 KiB) as one descriptor at the top half of
    /// memory, away from the other buffers, and run TX.
    pub fn send_large(&mut self, bytes: &[u8]) {
        let d = self.tx_next % QSIZE;
        self.tx_next = self.tx_next.wrapping_add(1);
        let addr = LARGE_BUF;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx_ring
            .write_desc(&self.mem, d, addr, bytes.len() as u32, 0, 0)
            .unwrap();
        self.tx_ring.push_avail(&self.mem, d).unwrap();
        self.tx.process(&mut self.txq, &self.mem).unwrap();
    }

    /// Run RX and return every newly received frame, header included, its mergeable buffers
    /// joined (`num_buffers` of the 12-byte header).
    pub fn receive_frames(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut pending = 0u16;
        for b in self.receive() {
            if pending == 0 {
                pending = num_buffers(&b);
                out.push(b);
            } else {
                out.last_mut().unwrap().extend_from_slice(&b);
            }
            pending = pending.saturating_sub(1);
        }
        out
    }

    pub fn send(&mut self, f: &[u8]) {
        let mut b = vec![0u8; HDR_LEN];
        b.extend_from_slice(f);
        self.send_raw(&b);
    }

    /// Post `n` RX buffers of `len` bytes.
    pub fn refill(&mut self, n: u16, len: u32) {
        for _ in 0..n {
            let d = self.rx_next % QSIZE;
            self.rx_next = self.rx_next.wrapping_add(1);
            let addr = RX_BUF + u64::from(d) * SLOT;
            self.rx_ring
                .write_desc(&self.mem, d, addr, len, DESC_F_WRITE, 0)
                .unwrap();
            self.rx_ring.push_avail(&self.mem, d).unwrap();
        }
    }

    /// Run RX and return every newly used (buffer bytes) entry.
    pub fn receive(&mut self) -> Vec<Vec<u8>> {
        self.rx.process(&mut self.rxq, &self.mem).unwrap();
        let mut out = Vec::new();
        let used = self.rx_ring.used_idx(&self.mem).unwrap();
        while self.rx_seen != used {
            let (id, len) = self.rx_ring.used_elem(&self.mem, self.rx_seen).unwrap();
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_BUF + u64::from(id) * SLOT))
                .unwrap();
            out.push(b);
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }
}

pub fn num_buffers(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[10], b[11]])
}
