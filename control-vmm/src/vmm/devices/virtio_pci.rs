//! virtio-pci, modern transport (virtio 1.x), for one virtio device (a disk or a network
//! interface) served by a [`VirtioBackend`] (the vhost-user session to the driver domain).
//!
//! BAR0 (32-bit memory) holds the common configuration, the ISR, the device configuration, the
//! notification area, the MSI-X table and the PBA, each announced by a vendor capability. The
//! VMM emulates the configuration structures (counted); the data path bypasses it: queue q's
//! notify address (`NOTIFY_OFFSET + 4q`) is a KVM ioeventfd on the backend's kick eventfd of
//! that queue (registered by the machine), and the MSI-X vector the guest gives each queue is a
//! GSI whose irqfd is that queue's call eventfd (see [`Msix`]): one vector per queue, plus one
//! for configuration changes. What a guest writes is validated: an impossible queue size or rings
//! outside the memory the backend sees leave the queue disabled; DRIVER_OK without a usable
//! queue sets DEVICE_NEEDS_RESET.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::virtio_rules::{activate, check_queue, status_write, StatusWrite};
use crate::vmm::exits::{Counter, ExitCounters};
use crate::vmm::pci::config::{ConfigSpace, PciId};
use crate::vmm::pci::msix::{IrqWiring, Msix, ENTRY_BYTES};
use crate::vmm::pci::PciDevice;
use crate::vmm::vhost_device::{VirtioBackend, VirtioDeviceType, VringSetup};

/// BAR0 layout.
pub const BAR0_BYTES: u32 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
const COMMON_BYTES: u64 = 0x40;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_BYTES: u64 = 0x1000;
/// Queue 0's notify address; queue q's is `NOTIFY_OFFSET + q * NOTIFY_MULTIPLIER`
/// (notify_off q).
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_BYTES: u64 = 0x1000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Most queues a function has (MSI-X table and notify area sized for it).
pub const MAX_QUEUES: usize = 16;
const _: () = assert!(crate::vmm::vhost_device::MAX_BLK_QUEUES as usize <= MAX_QUEUES);
/// Largest queue the guest may configure.
pub const QUEUE_MAX: u16 = 256;
const NO_VECTOR: u16 = 0xffff;

/// Queue q's notify offset in BAR0.
pub fn notify_offset(q: usize) -> u64 {
    NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER)
}

/// MSI-X vectors of a function with `queues` queues: one per queue and one for configuration
/// changes.
pub fn msix_vectors(queues: usize) -> u16 {
    // At most MAX_QUEUES + 1.
    (queues.min(MAX_QUEUES) + 1) as u16
}

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

/// Re-binds the queues' notify ioeventfds when the guest moves BAR0 (the argument is the new
/// BAR0 address). Set by the machine, which owns the VM.
pub struct NotifyBinder(pub Box<dyn FnMut(u64) -> Result<(), String> + Send>);

impl std::fmt::Debug for NotifyBinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyBinder")
    }
}

/// A virtio PCI function (disk or network interface).
#[derive(Debug)]
pub struct VirtioPciDevice<B: VirtioBackend> {
    /// `virtio-pci blk` or `virtio-pci net`, for logs.
    what: &'static str,
    notify_binder: Option<NotifyBinder>,
    config: ConfigSpace,
    msix_cap: usize,
    msix: Msix,
    backend: B,
    /// Per queue: the backend's call eventfd (an MSI-X vector's source) and kick eventfd.
    calls: Vec<Arc<EventFd>>,
    kicks: Vec<EventFd>,
    counters: Arc<ExitCounters>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<Queue>,
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

impl<B: VirtioBackend> VirtioPciDevice<B> {
    /// The function with BAR0 at `bar0` (32-bit, [`BAR0_BYTES`]-aligned), its MSI-X vectors on
    /// GSIs from `gsi_base` ([`msix_vectors`] of them). `kicks` and `calls` are the backend's
    /// eventfds, one per queue (the machine binds each kick to its queue's notify address
    /// with an ioeventfd); a backend with more than [`MAX_QUEUES`] queues shows the first.
    pub fn new(
        backend: B,
        kicks: Vec<EventFd>,
        calls: Vec<EventFd>,
        bar0: u32,
        gsi_base: u32,
        wiring: Arc<dyn IrqWiring>,
        counters: Arc<ExitCounters>,
    ) -> Self {
        let kind = backend.device_type();
        let n = backend
            .num_queues()
            .min(kicks.len())
            .min(calls.len())
            .min(MAX_QUEUES);
        let (what, class) = match kind {
            VirtioDeviceType::Blk => ("virtio-pci blk", [0x01, 0x80, 0x00]),
            VirtioDeviceType::Net => ("virtio-pci net", [0x02, 0x00, 0x00]),
        };
        let id = PciId {
            vendor: 0x1af4,
            device: 0x1040 + kind.device_id(),
            class,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        let mut config = ConfigSpace::new(id, 0);
        config.add_mem_bar(0, BAR0_BYTES, bar0);
        let vectors = msix_vectors(n);
        let msix = Msix::new(vectors, gsi_base, wiring);
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
        let mut body = (vectors - 1).to_le_bytes().to_vec();
        body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(CAP_MSIX, &body, &[0, 0, 0, 0xc0]);
        Self {
            what,
            notify_binder: None,
            config,
            msix_cap,
            msix,
            backend,
            calls: calls.into_iter().take(n).map(Arc::new).collect(),
            kicks: kicks.into_iter().take(n).collect(),
            counters,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: vec![Queue::default(); n],
        }
    }

    /// Follows BAR0 moves with the notify ioeventfds (without it, notifies at a moved BAR reach
    /// the VMM and are forwarded, counted as notify exits).
    pub fn with_notify_binder(mut self, binder: NotifyBinder) -> Self {
        self.notify_binder = Some(binder);
        self
    }

    /// Features the guest is offered: the backend's (which hides what this VMM does not
    /// serve: several queue pairs, the control queue).
    fn offered(&self) -> u64 {
        self.backend.device_features()
    }

    /// The number of queues the guest sees.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to resume it on a restarted driver domain (the guest's rings, the
    /// eventfds bound in KVM and the MSI-X routes stay as they are).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Stops the backend's queue (GET_VRING_BASE) if it runs: on reset and before guest
    /// memory goes away. Returns the avail index it stopped at.
    pub fn quiesce(&mut self) -> Option<u32> {
        match self.backend.stop() {
            Ok(base) => base,
            Err(e) => {
                log::error!("{}: stopping the backend: {e}", self.what);
                None
            }
        }
    }

    /// The function leaves the bus (hot-unplug): the backend's queues stop, the MSI-X
    /// vectors are unbound and the notify ioeventfds unregistered. The session itself goes
    /// when the device is dropped.
    pub fn unplug(&mut self) {
        if let Some(base) = self.quiesce() {
            log::info!(
                "{}: unplugged; backend stopped at avail index {base}",
                self.what
            );
        }
        self.msix.clear_sources();
        if let Some(NotifyBinder(bind)) = self.notify_binder.as_mut() {
            // An address outside the PCI window unregisters them.
            if let Err(e) = bind(0) {
                log::error!("{}: unregistering the notify ioeventfds: {e}", self.what);
            }
        }
        self.status = 0;
        self.queues.fill(Queue::default());
    }

    fn reset(&mut self) {
        if let Some(base) = self.quiesce() {
            log::info!(
                "{}: reset; backend stopped at avail index {base}",
                self.what
            );
        }
        self.msix.clear_sources();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.queues.fill(Queue::default());
    }

    /// The selected queue, if it exists.
    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn queue_valid(&self, q: &Queue) -> Result<(), String> {
        let regions = self.backend.regions();
        check_queue(regions, q.size.into(), QUEUE_MAX, q.desc, q.avail, q.used)
    }

    fn set_status(&mut self, value: u8) {
        let unoffered = self.driver_features & !self.offered();
        match status_write(self.what, self.status.into(), value.into(), unoffered) {
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
        let rings: Vec<Option<VringSetup>> = self
            .queues
            .iter()
            .map(|q| {
                q.enabled.then_some(VringSetup {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                })
            })
            .collect();
        let features = self.driver_features;
        let what = self.what;
        let vectors: Vec<u16> = self.queues.iter().map(|q| q.vector).collect();
        log::info!("{what}: DRIVER_OK, queues on MSI-X vectors {vectors:?}");
        // Every status bit fits in the byte-wide register.
        activate(what, &mut self.backend, status.into(), features, &rings) as u8
    }

    fn driver_ok(&self) -> bool {
        u32::from(self.status) & super::virtio_rules::STATUS_DRIVER_OK != 0
    }

    fn configurable(&self) -> bool {
        self.selected().is_some_and(|q| !q.enabled) && !self.driver_ok()
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        use common::*;
        let sel = self.selected();
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
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => self.status.into(),
            (CONFIG_GENERATION, 1) => 0,
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            (QUEUE_MSIX_VECTOR, 2) => sel.map_or(NO_VECTOR, |q| q.vector).into(),
            (QUEUE_NOTIFY_OFF, 2) => self.queue_select.into(),
            (QUEUE_SIZE, 2) | (QUEUE_ENABLE, 2) | (0x20..0x38, 4) if sel.is_some() => {
                let q = sel.copied().unwrap_or_default();
                match offset {
                    QUEUE_SIZE => q.size.into(),
                    QUEUE_ENABLE => q.enabled.into(),
                    QUEUE_DESC | 0x24 => q.desc >> (8 * (offset & 4)),
                    QUEUE_DRIVER | 0x2c => q.avail >> (8 * (offset & 4)),
                    QUEUE_DEVICE | 0x34 => q.used >> (8 * (offset & 4)),
                    _ => 0,
                }
            }
            (QUEUE_SIZE | QUEUE_ENABLE | 0x20..0x38, _) => 0,
            _ => {
                log::warn!(
                    "{}: {}-byte read of common config {offset:#x}",
                    self.what,
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
                    s => log::warn!("{}: driver features word {s} ignored", self.what),
                }
            }
            (CONFIG_MSIX_VECTOR, 2) => {
                // The VMM never raises a configuration interrupt: accept any table vector.
                self.config_vector = if v < u64::from(self.msix.vectors()) {
                    v as u16
                } else {
                    NO_VECTOR
                };
            }
            (DEVICE_STATUS, 1) => self.set_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_MSIX_VECTOR, 2) if self.selected().is_some() => self.set_queue_vector(v as u16),
            (QUEUE_ENABLE, 2) if self.selected().is_some() => self.write_queue_enable(v as u16),
            (QUEUE_SIZE, 2) | (0x20..0x38, 4) if configurable => {
                let high = offset & 4 != 0;
                if let Some(q) = self.selected_mut() {
                    match offset {
                        QUEUE_SIZE => q.size = v as u16,
                        QUEUE_DESC | 0x24 => set_half(&mut q.desc, high, v as u32),
                        QUEUE_DRIVER | 0x2c => set_half(&mut q.avail, high, v as u32),
                        QUEUE_DEVICE | 0x34 => set_half(&mut q.used, high, v as u32),
                        _ => log::warn!("{}: unaligned queue address write", self.what),
                    }
                }
            }
            _ => log::warn!(
                "{}: {}-byte write {v:#x} to common config {offset:#x} ignored \
                 (read-only, unknown or not now)",
                self.what,
                data.len()
            ),
        }
    }

    /// Binds the selected queue's interrupt (the backend's call eventfd) to MSI-X vector `v`.
    /// A vector another queue already uses is refused (NO_VECTOR reads back): each queue
    /// has a vector of its own, and the table has one per queue.
    fn set_queue_vector(&mut self, v: u16) {
        let qi = usize::from(self.queue_select);
        let Some(old) = self.queues.get(qi).map(|q| q.vector) else {
            return;
        };
        if old != NO_VECTOR {
            self.msix.set_source(old, None);
        }
        let shared = self
            .queues
            .iter()
            .enumerate()
            .any(|(i, q)| i != qi && q.vector == v && v != NO_VECTOR);
        let bound = !shared && self.msix.set_source(v, Some(Arc::clone(&self.calls[qi])));
        if shared {
            log::warn!(
                "{}: queue {qi} asks for vector {v}, which another queue has; refused",
                self.what
            );
        }
        if let Some(q) = self.queues.get_mut(qi) {
            q.vector = if bound { v } else { NO_VECTOR };
        }
    }

    fn write_queue_enable(&mut self, v: u16) {
        let qi = usize::from(self.queue_select);
        let Some(q) = self.queues.get(qi).copied() else {
            return;
        };
        match (v, q.enabled) {
            (1, false) if !self.driver_ok() => match self.queue_valid(&q) {
                Ok(()) => self.queues[qi].enabled = true,
                Err(why) => log::warn!("{}: queue {qi} not enabled: {why}", self.what),
            },
            _ => log::warn!(
                "{}: queue {qi}: queue_enable={v} ignored in state {:#x}",
                self.what,
                self.status
            ),
        }
    }

    /// Whether the driver gave up on the device or it needs a reset.
    pub fn status(&self) -> u8 {
        self.status
    }
}

impl<B: VirtioBackend + std::fmt::Debug> PciDevice for VirtioPciDevice<B> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if let Some(m) = self.config.write(offset, data) {
            crate::vmm::pci::log_bar_move(self.what, m);
            if let (0, Some(NotifyBinder(bind))) = (m.bar, self.notify_binder.as_mut()) {
                if let Err(e) = bind(m.to) {
                    log::error!("{}: moving the notify ioeventfds: {e}", self.what);
                }
            }
        }
        self.msix
            .config_written(&self.config, self.msix_cap, offset);
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        if self
            .msix
            .bar_read((MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET), offset, data)
        {
            self.counters.bump(Counter::MsixTableAccess);
            return;
        }
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
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        if self.msix.bar_write(MSIX_TABLE_OFFSET, offset, data) {
            self.counters.bump(Counter::MsixTableAccess);
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_BYTES => {
                self.counters.bump(Counter::VirtioPciConfig);
                self.common_write(o - COMMON_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_BYTES).contains(&o) => {
                // A queue's notify normally never gets here (ioeventfd); forward it if it does.
                self.counters.bump(Counter::VirtioNotifyExit);
                let rel = o - NOTIFY_OFFSET;
                let q = (rel / u64::from(NOTIFY_MULTIPLIER)) as usize;
                let named = data.first().map(|b| usize::from(*b)) == Some(q);
                match self.kicks.get(q) {
                    Some(kick) if rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) && named => {
                        if let Err(e) = kick.write(1) {
                            log::error!("{}: forwarding a notify: {e}", self.what);
                        }
                    }
                    _ => log::warn!("{}: notify {data:02x?} at {o:#x} names no queue", self.what),
                }
            }
            o => {
                self.counters.bump(Counter::VirtioPciConfig);
                log::warn!("{}: write {data:02x?} to BAR0 {o:#x} ignored", self.what);
            }
        }
    }
}

/// The MSI-X table and the notify area hold [`MAX_QUEUES`] queues (checked against the BAR
/// layout).
const _: () = assert!(MSIX_TABLE_OFFSET + (MAX_QUEUES as u64 + 1) * ENTRY_BYTES <= MSIX_PBA_OFFSET);
const _: () = assert!(MAX_QUEUES as u64 * NOTIFY_MULTIPLIER as u64 <= NOTIFY_BYTES);

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
