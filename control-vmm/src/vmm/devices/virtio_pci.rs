//! virtio-pci, modern transport (virtio 1.x), for one virtio-blk device served by a
//! [`BlkBackend`] (the vhost-user session to the driver domain).
//!
//! BAR0 (32-bit memory) holds the common configuration, the ISR, the device configuration, the
//! notification area, the MSI-X table and the PBA, each announced by a vendor capability. The
//! VMM emulates the configuration structures (counted); the data path bypasses it: queue 0's
//! notify address is a KVM ioeventfd on the backend's kick eventfd (registered by the machine),
//! and the MSI-X vector the guest gives the queue is a GSI whose irqfd is the backend's call
//! eventfd (see [`Msix`]). What a guest writes is validated: an impossible queue size or rings
//! outside the memory the backend sees leave the queue disabled; DRIVER_OK without a usable
//! queue sets DEVICE_NEEDS_RESET.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::virtio_rules::{activate, check_queue, status_write, StatusWrite};
use crate::vmm::exits::{Counter, ExitCounters};
use crate::vmm::pci::config::{ConfigSpace, PciId};
use crate::vmm::pci::msix::{IrqWiring, Msix, ENTRY_BYTES};
use crate::vmm::pci::PciDevice;
use crate::vmm::vhost_blk::{BlkBackend, VringSetup};

/// BAR0 layout.
pub const BAR0_BYTES: u32 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
const COMMON_BYTES: u64 = 0x40;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_BYTES: u64 = 0x1000;
/// Queue 0's notify address (notify_off 0; multiplier 4).
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_BYTES: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Vectors: one for configuration changes, one for the queue.
pub const MSIX_VECTORS: u16 = 2;
/// Largest queue the guest may configure.
pub const QUEUE_MAX: u16 = 256;
const NO_VECTOR: u16 = 0xffff;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

const STATUS_FEATURES_OK: u8 = super::virtio_rules::STATUS_FEATURES_OK as u8;

/// Common configuration offsets (virtio 1.2, 4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            size: QUEUE_MAX,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// Re-binds queue 0's notify ioeventfd at a new guest-physical address (the guest moved
/// BAR0). Set by the machine, which owns the VM.
pub struct NotifyBinder(pub Box<dyn FnMut(u64) -> Result<(), String> + Send>);

impl std::fmt::Debug for NotifyBinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyBinder")
    }
}

/// The virtio-blk PCI function.
#[derive(Debug)]
pub struct VirtioPciBlk<B: BlkBackend> {
    notify_binder: Option<NotifyBinder>,
    config: ConfigSpace,
    msix_cap: usize,
    msix: Msix,
    backend: B,
    call: Arc<EventFd>,
    kick: EventFd,
    counters: Arc<ExitCounters>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    queue: Queue,
}

fn cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // After ID and next: cap_len, cfg_type, bar, id, padding[2], offset, length.
    let mut b = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

fn set_half(v: &mut u64, high: bool, w: u32) {
    *v = if high {
        (*v & 0xffff_ffff) | (u64::from(w) << 32)
    } else {
        (*v & !0xffff_ffff) | u64::from(w)
    };
}

impl<B: BlkBackend> VirtioPciBlk<B> {
    /// The function with BAR0 at `bar0` (32-bit, [`BAR0_BYTES`]-aligned), its MSI-X vectors on
    /// GSIs from `gsi_base`. `kick` and `call` are the backend's eventfds (the machine binds
    /// `kick` to the notify address with an ioeventfd).
    pub fn new(
        backend: B,
        kick: EventFd,
        call: EventFd,
        bar0: u32,
        gsi_base: u32,
        wiring: Arc<dyn IrqWiring>,
        counters: Arc<ExitCounters>,
    ) -> Self {
        let id = PciId {
            vendor: 0x1af4,
            device: 0x1040 + 2,
            class: [0x01, 0x80, 0x00],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        let mut config = ConfigSpace::new(id, 0);
        config.add_mem_bar(0, BAR0_BYTES, bar0);
        let msix = Msix::new(MSIX_VECTORS, gsi_base, wiring);
        config.add_capability(
            CAP_VENDOR,
            &cap(CFG_COMMON, COMMON_OFFSET, COMMON_BYTES, &[]),
            &[],
        );
        config.add_capability(
            CAP_VENDOR,
            &cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_BYTES,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        config.add_capability(CAP_VENDOR, &cap(CFG_ISR, ISR_OFFSET, 4, &[]), &[]);
        config.add_capability(
            CAP_VENDOR,
            &cap(CFG_DEVICE, DEVICE_OFFSET, DEVICE_BYTES, &[]),
            &[],
        );
        // Message control (table size - 1; enable and function mask writable), table, PBA.
        let mut body = (MSIX_VECTORS - 1).to_le_bytes().to_vec();
        body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(CAP_MSIX, &body, &[0, 0, 0, 0xc0]);
        Self {
            notify_binder: None,
            config,
            msix_cap,
            msix,
            backend,
            call: Arc::new(call),
            kick,
            counters,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queue: Queue::default(),
        }
    }

    /// Follows BAR0 moves with the notify ioeventfd (without it, notifies at a moved BAR reach
    /// the VMM and are forwarded, counted as notify exits).
    pub fn with_notify_binder(mut self, binder: NotifyBinder) -> Self {
        self.notify_binder = Some(binder);
        self
    }

    /// Features the guest is offered: the backend's, one queue only.
    fn offered(&self) -> u64 {
        self.backend.device_features() & !VIRTIO_BLK_F_MQ
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Stops the backend's queue (GET_VRING_BASE) if it runs: on reset and before guest
    /// memory goes away. Returns the avail index it stopped at.
    pub fn quiesce(&mut self) -> Option<u32> {
        match self.backend.stop() {
            Ok(base) => base,
            Err(e) => {
                log::error!("virtio-pci blk: stopping the backend: {e}");
                None
            }
        }
    }

    fn reset(&mut self) {
        if let Some(base) = self.quiesce() {
            log::info!("virtio-pci blk: reset; backend stopped at avail index {base}");
        }
        self.msix.clear_sources();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.queue = Queue::default();
    }

    fn queue_valid(&self) -> Result<(), String> {
        let q = &self.queue;
        let regions = self.backend.regions();
        check_queue(regions, q.size.into(), QUEUE_MAX, q.desc, q.avail, q.used)
    }

    fn set_status(&mut self, value: u8) {
        let unoffered = self.driver_features & !self.offered();
        match status_write(
            "virtio-pci blk",
            self.status.into(),
            value.into(),
            unoffered,
        ) {
            StatusWrite::Reset => self.reset(),
            StatusWrite::Ignored => {}
            StatusWrite::Set { status, activate } => {
                // Every status bit fits in the byte-wide register.
                let status = status as u8;
                self.status = if activate {
                    self.activate(status)
                } else {
                    status
                };
            }
        }
    }

    fn activate(&mut self, status: u8) -> u8 {
        let q = self.queue.enabled.then_some(VringSetup {
            size: self.queue.size,
            desc: self.queue.desc,
            avail: self.queue.avail,
            used: self.queue.used,
        });
        let features = self.driver_features;
        let what = "virtio-pci blk";
        log::info!(
            "{what}: DRIVER_OK, queue on MSI-X vector {}",
            self.queue.vector
        );
        // Every status bit fits in the byte-wide register.
        activate(what, &mut self.backend, status.into(), features, q) as u8
    }

    fn driver_ok(&self) -> bool {
        u32::from(self.status) & super::virtio_rules::STATUS_DRIVER_OK != 0
    }

    fn configurable(&self) -> bool {
        self.queue_select == 0 && !self.queue.enabled && !self.driver_ok()
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        use common::*;
        let q0 = self.queue_select == 0;
        let v: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => self.offered() & 0xffff_ffff,
                1 => self.offered() >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (CONFIG_MSIX_VECTOR, 2) => self.config_vector.into(),
            (NUM_QUEUES, 2) => 1,
            (DEVICE_STATUS, 1) => self.status.into(),
            (CONFIG_GENERATION, 1) => 0,
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            (QUEUE_SIZE, 2) if q0 => self.queue.size.into(),
            (QUEUE_MSIX_VECTOR, 2) if q0 => self.queue.vector.into(),
            (QUEUE_MSIX_VECTOR, 2) => NO_VECTOR.into(),
            (QUEUE_ENABLE, 2) if q0 => self.queue.enabled.into(),
            (QUEUE_NOTIFY_OFF, 2) => 0,
            (QUEUE_DESC | 0x24, 4) if q0 => self.queue.desc >> (8 * (offset & 4)),
            (QUEUE_DRIVER | 0x2c, 4) if q0 => self.queue.avail >> (8 * (offset & 4)),
            (QUEUE_DEVICE | 0x34, 4) if q0 => self.queue.used >> (8 * (offset & 4)),
            (QUEUE_SIZE | QUEUE_ENABLE | 0x20..0x38, _) => 0,
            _ => {
                log::warn!(
                    "virtio-pci blk: {}-byte read of common config {offset:#x}",
                    data.len()
                );
                u64::MAX
            }
        };
        let bytes = v.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        use common::*;
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        let configurable = self.configurable();
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    s @ (0 | 1) => set_half(&mut self.driver_features, s == 1, v as u32),
                    s => log::warn!("virtio-pci blk: driver features word {s} ignored"),
                }
            }
            (CONFIG_MSIX_VECTOR, 2) => {
                // The VMM never raises a configuration interrupt: accept any table vector.
                self.config_vector = if v < u64::from(MSIX_VECTORS) {
                    v as u16
                } else {
                    NO_VECTOR
                };
            }
            (DEVICE_STATUS, 1) => self.set_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_SIZE, 2) if configurable => self.queue.size = v as u16,
            (QUEUE_MSIX_VECTOR, 2) if self.queue_select == 0 => self.set_queue_vector(v as u16),
            (QUEUE_ENABLE, 2) if self.queue_select == 0 => self.write_queue_enable(v as u16),
            (QUEUE_DESC | 0x24, 4) if configurable => {
                set_half(&mut self.queue.desc, offset & 4 != 0, v as u32)
            }
            (QUEUE_DRIVER | 0x2c, 4) if configurable => {
                set_half(&mut self.queue.avail, offset & 4 != 0, v as u32)
            }
            (QUEUE_DEVICE | 0x34, 4) if configurable => {
                set_half(&mut self.queue.used, offset & 4 != 0, v as u32)
            }
            _ => log::warn!(
                "virtio-pci blk: {}-byte write {v:#x} to common config {offset:#x} ignored \
                 (read-only, unknown or not now)",
                data.len()
            ),
        }
    }

    /// Binds the queue's interrupt (the backend's call eventfd) to MSI-X vector `v`.
    fn set_queue_vector(&mut self, v: u16) {
        if self.queue.vector != NO_VECTOR {
            self.msix.set_source(self.queue.vector, None);
        }
        self.queue.vector = if self.msix.set_source(v, Some(Arc::clone(&self.call))) {
            v
        } else {
            NO_VECTOR
        };
    }

    fn write_queue_enable(&mut self, v: u16) {
        match (v, self.queue.enabled) {
            (1, false) if !self.driver_ok() => match self.queue_valid() {
                Ok(()) => self.queue.enabled = true,
                Err(why) => log::warn!("virtio-pci blk: queue 0 not enabled: {why}"),
            },
            _ => log::warn!(
                "virtio-pci blk: queue_enable={v} ignored in state {:#x}",
                self.status
            ),
        }
    }

    /// Whether the driver gave up on the device or it needs a reset.
    pub fn status(&self) -> u8 {
        self.status
    }
}

impl<B: BlkBackend + std::fmt::Debug> PciDevice for VirtioPciBlk<B> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if let Some(m) = self.config.write(offset, data) {
            crate::vmm::pci::log_bar_move("virtio-pci blk", m);
            if let (0, Some(NotifyBinder(bind))) = (m.bar, self.notify_binder.as_mut()) {
                if let Err(e) = bind(m.to + NOTIFY_OFFSET) {
                    log::error!("virtio-pci blk: moving the notify ioeventfd: {e}");
                }
            }
        }
        if (self.msix_cap..self.msix_cap + 4).contains(&offset) {
            let control = (self.config.raw_dword(self.msix_cap / 4) >> 16) as u16;
            self.msix.set_control(control);
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_BYTES => {
                self.counters.bump(Counter::VirtioPciConfig);
                self.common_read(o - COMMON_OFFSET, data);
            }
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                self.counters.bump(Counter::VirtioIsrRead);
                // With the backend's completions going straight to KVM the VMM cannot tell
                // what an interrupt was: report "queue" while the device runs (INTx only).
                data.fill(0);
                if o == ISR_OFFSET && self.backend.running() {
                    data[0] = 1;
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_BYTES).contains(&o) => {
                self.counters.bump(Counter::VirtioPciConfig);
                let cfg = self.backend.config();
                let start = (o - DEVICE_OFFSET) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg.get(start + i).copied().unwrap_or(0);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_bytes()).contains(&o) => {
                self.counters.bump(Counter::MsixTableAccess);
                self.msix.table_read(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.msix.pba_bytes()).contains(&o) => {
                self.counters.bump(Counter::MsixTableAccess);
                self.msix.pba_read(o - MSIX_PBA_OFFSET, data);
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_BYTES => {
                self.counters.bump(Counter::VirtioPciConfig);
                self.common_write(o - COMMON_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_BYTES).contains(&o) => {
                // Queue 0's notify normally never gets here (ioeventfd); forward it if it does.
                self.counters.bump(Counter::VirtioNotifyExit);
                if o == NOTIFY_OFFSET && data.first() == Some(&0) {
                    if let Err(e) = self.kick.write(1) {
                        log::error!("virtio-pci blk: forwarding a notify: {e}");
                    }
                } else {
                    log::warn!("virtio-pci blk: notify {data:02x?} at {o:#x} names no queue");
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix.table_bytes()).contains(&o) => {
                self.counters.bump(Counter::MsixTableAccess);
                self.msix.table_write(o - MSIX_TABLE_OFFSET, data);
            }
            o => {
                self.counters.bump(Counter::VirtioPciConfig);
                log::warn!("virtio-pci blk: write {data:02x?} to BAR0 {o:#x} ignored");
            }
        }
    }
}

/// Bytes of MSI-X table for [`MSIX_VECTORS`] (checked against the BAR layout).
const _: () = assert!(MSIX_TABLE_OFFSET + MSIX_VECTORS as u64 * ENTRY_BYTES <= MSIX_PBA_OFFSET);

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
