//! The virtio-net backend device: the queue pairs of one switch port, behind
//! [`BackendDevice`] so any transport can serve them.
//!
//! Frames are received on the first queue pair (any enabled RX queue is valid for virtio);
//! every pair transmits. The control queue, when offered, is virtqueue 2N with MQ negotiated
//! (N pairs) and virtqueue 2 without (virtio 1.2, 5.1.2). RX work arrives two ways: the driver's kick (buffers added) and the
//! switch (frames queued for the port), which writes the port's wake eventfd, the device's
//! [`BackendDevice::wake_event`]. One worker serves all queues, so the wake-up reaches it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::info;
use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::config::{Negotiated, NetBackendConfig, NetConfigSpace, NET_F_MQ};
use super::ctrl::CtrlQueue;
use super::queue::{NetQueueError, RxQueue, TxQueue};
use super::switch::SwitchPort;
use crate::virtio_core::counters::DeviceCounters;
use crate::virtio_core::memory::SealPolicy;
use crate::virtio_core::{sync, BackendDevice, QueueProgress};

/// Errors of the net backend's construction.
#[derive(Debug, Error)]
pub enum NetBackendError {
    /// The configuration is unusable.
    #[error("invalid net device configuration: {0}")]
    Config(&'static str),
}

/// A virtio-net device on one switch port (one per frontend connection).
#[derive(Debug)]
pub struct NetBackendDevice {
    name: String,
    cfg: NetBackendConfig,
    config_space: NetConfigSpace,
    port: Arc<SwitchPort>,
    rx: Vec<Mutex<RxQueue>>,
    tx: Vec<Mutex<TxQueue>>,
    ctrl: Option<Mutex<CtrlQueue>>,
    /// Which virtqueue the control queue is (it depends on MQ being negotiated).
    ctrl_index: AtomicUsize,
}

impl NetBackendDevice {
    /// A device with options `cfg` on `port`.
    pub fn new(port: Arc<SwitchPort>, cfg: NetBackendConfig) -> Result<Self, NetBackendError> {
        if cfg.queue_pairs == 0 || cfg.queue_pairs > 16 {
            return Err(NetBackendError::Config("queue pairs must be 1..=16"));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
            return Err(NetBackendError::Config(
                "queue size must be a power of two <= 32768",
            ));
        }
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for p in 0..cfg.queue_pairs {
            rx.push(Mutex::new(RxQueue::new(2 * p, port.clone(), cfg.budget)));
            tx.push(Mutex::new(TxQueue::new(
                2 * p + 1,
                port.clone(),
                cfg.budget,
            )));
        }
        let ctrl_index = 2 * usize::from(cfg.queue_pairs);
        let ctrl = cfg.ctrl_vq.then(|| {
            Mutex::new(CtrlQueue::new(
                &format!("net {}", port.name()),
                2 * cfg.queue_pairs,
                cfg.queue_pairs,
            ))
        });
        Ok(NetBackendDevice {
            ctrl,
            ctrl_index: AtomicUsize::new(ctrl_index),
            name: format!("net port {}", port.id()),
            config_space: NetConfigSpace::new(&cfg),
            cfg,
            port,
            rx,
            tx,
        })
    }

    /// The switch port this device serves.
    pub fn port(&self) -> &Arc<SwitchPort> {
        &self.port
    }
}

impl BackendDevice for NetBackendDevice {
    type QueueError = NetQueueError;

    fn counters(&self) -> Option<&DeviceCounters> {
        Some(&self.cfg.counters)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn ack_features(&self, features: u64) {
        let neg = Negotiated::from_features(features);
        info!(
            "{}: features {features:#x} acked (header {} bytes, mrg_rxbuf {})",
            self.name, neg.hdr_len, neg.mrg_rxbuf
        );
        for q in &self.rx {
            sync::lock(q).set_negotiated(neg);
        }
        for q in &self.tx {
            sync::lock(q).set_negotiated(neg);
        }
        let mq = features & (1u64 << NET_F_MQ) != 0;
        let pairs = if mq { self.cfg.queue_pairs } else { 1 };
        self.ctrl_index
            .store(2 * usize::from(pairs), Ordering::Relaxed);
        if let Some(c) = &self.ctrl {
            sync::lock(c).set_mq(mq);
        }
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space.read(offset, size)
    }

    fn num_queues(&self) -> usize {
        self.cfg.num_queues()
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn seal_policy(&self) -> SealPolicy {
        self.cfg.seal_policy
    }

    fn memory_grant(&self) -> crate::virtio_core::MemoryGrant {
        self.cfg.grant
    }

    fn queue_workers(&self) -> Vec<Vec<usize>> {
        vec![(0..self.cfg.num_queues()).collect()]
    }

    fn process_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, NetQueueError> {
        if let Some(c) = &self.ctrl {
            if index == self.ctrl_index.load(Ordering::Relaxed) {
                return Ok(sync::lock(c).process(queue, mem)?);
            }
        }
        match (index & 1, index / 2) {
            // Only the first pair receives.
            (0, 0) => match self.rx.first() {
                Some(q) => sync::lock(q).process(queue, mem),
                None => Ok(QueueProgress::default()),
            },
            (1, pair) => match self.tx.get(pair) {
                Some(q) => sync::lock(q).process(queue, mem),
                None => Ok(QueueProgress::default()),
            },
            _ => Ok(QueueProgress::default()),
        }
    }

    fn reset_queue(&self, index: usize) {
        if let Some(c) = &self.ctrl {
            if index == self.ctrl_index.load(Ordering::Relaxed) {
                sync::lock(c).reset();
                return;
            }
        }
        let pair = index / 2;
        if index & 1 == 0 {
            if let Some(q) = self.rx.get(pair) {
                sync::lock(q).reset();
            }
        } else if let Some(q) = self.tx.get(pair) {
            sync::lock(q).reset();
        }
    }

    fn wake_event(&self) -> Option<&EventFd> {
        Some(self.port.wake_fd())
    }

    fn poll_window(&self) -> Duration {
        Duration::from_micros(self.cfg.poll_us)
    }

    fn set_polling(&self, on: bool) {
        for q in &self.tx {
            sync::lock(q).set_idle_notify(!on);
        }
        for q in &self.rx {
            sync::lock(q).set_idle_notify(!on);
        }
    }

    fn disconnected(&self) {
        let c = self.port.counters();
        info!(
            "{}: counters tx_frames={} tx_bytes={} tx_invalid={} tx_dropped={} \
             tx_filtered={} tx_spoofed={} rx_frames={} rx_bytes={} rx_dropped={}",
            self.name,
            c.tx_frames,
            c.tx_bytes,
            c.tx_invalid,
            c.tx_dropped,
            c.tx_filtered,
            c.tx_spoofed,
            c.rx_frames,
            c.rx_bytes,
            c.rx_dropped
        );
    }
}
