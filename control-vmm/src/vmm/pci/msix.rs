//! MSI-X for an emulated PCI function whose interrupts are raised outside the VMM: each
//! vector is a KVM GSI routed to its MSI message, and the eventfd that raises it (a vhost-user
//! backend's call eventfd) is bound to that GSI with an irqfd only while the vector may
//! deliver (MSI-X enabled, function and vector unmasked). While it may not, the eventfd keeps
//! counting: that count *is* the pending bit (the PBA reads it without consuming it), and
//! binding the irqfd again on unmask makes KVM inject at once if it is set, as hardware
//! delivers a pending message on unmask.
//!
//! The table and the PBA are accessed by the guest through the VMM (counted); the interrupts
//! themselves never pass through it.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Bytes per table entry.
pub const ENTRY_BYTES: u64 = 16;
const VECTOR_MASKED: u32 = 1;
/// Message control bits in the capability.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// What MSI-X needs from the hypervisor: GSI routes and irqfds. KVM in a machine; a recorder
/// in unit tests.
pub trait IrqWiring: Send + Sync + std::fmt::Debug {
    /// Routes `gsi` to the MSI message (`address`, `data`).
    fn route_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String>;
    /// Removes `gsi`'s route.
    fn unroute(&self, gsi: u32) -> Result<(), String>;
    /// Binds `source` to `gsi` (KVM_IRQFD).
    fn attach(&self, source: &EventFd, gsi: u32) -> Result<(), String>;
    /// Unbinds it.
    fn detach(&self, source: &EventFd, gsi: u32) -> Result<(), String>;
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// One function's MSI-X table, PBA and vector bindings.
#[derive(Debug)]
pub struct Msix {
    entries: Vec<Entry>,
    /// Which eventfd raises each vector (none: the VMM never raises it).
    sources: Vec<Option<Arc<EventFd>>>,
    /// Whether each vector's irqfd is bound now.
    live: Vec<bool>,
    gsi_base: u32,
    enabled: bool,
    function_masked: bool,
    wiring: Arc<dyn IrqWiring>,
}

/// Whether an eventfd has a count (without consuming it).
fn signalled(efd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; the result is checked.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

impl Msix {
    /// `vectors` entries, all masked, using GSIs `gsi_base..gsi_base + vectors`.
    pub fn new(vectors: u16, gsi_base: u32, wiring: Arc<dyn IrqWiring>) -> Self {
        let n = usize::from(vectors);
        Self {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                n
            ],
            sources: vec![None; n],
            live: vec![false; n],
            gsi_base,
            enabled: false,
            function_masked: false,
            wiring,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes of table and of PBA.
    pub fn table_bytes(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_BYTES
    }

    pub fn pba_bytes(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// A read at BAR offset `offset` of a function whose table sits at `table_at` and PBA at
    /// `pba_at` in that BAR: served, and true, when it falls in either; false otherwise.
    pub fn bar_read(&self, (table_at, pba_at): (u64, u64), offset: u64, data: &mut [u8]) -> bool {
        if (table_at..table_at + self.table_bytes()).contains(&offset) {
            self.table_read(offset - table_at, data);
        } else if (pba_at..pba_at + self.pba_bytes()).contains(&offset) {
            self.pba_read(offset - pba_at, data);
        } else {
            return false;
        }
        true
    }

    /// A write at BAR offset `offset` into the table placed at `table_at`: served, and true,
    /// when it falls in the table (the PBA is read-only); false otherwise.
    pub fn bar_write(&mut self, table_at: u64, offset: u64, data: &[u8]) -> bool {
        if !(table_at..table_at + self.table_bytes()).contains(&offset) {
            return false;
        }
        self.table_write(offset - table_at, data);
        true
    }

    fn gsi(&self, v: usize) -> u32 {
        self.gsi_base + v as u32
    }

    fn may_deliver(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[v].masked()
    }

    /// Binds or unbinds vector `v`'s irqfd to match its state.
    fn sync(&mut self, v: usize) {
        let Some(source) = self.sources[v].clone() else {
            return;
        };
        let want = self.may_deliver(v);
        let gsi = self.gsi(v);
        if want && !self.live[v] {
            let e = self.entries[v];
            let r = self
                .wiring
                .route_msi(gsi, e.address, e.data)
                .and_then(|()| self.wiring.attach(&source, gsi));
            match r {
                Ok(()) => self.live[v] = true,
                Err(err) => log::error!("MSI-X vector {v}: binding GSI {gsi}: {err}"),
            }
        } else if !want && self.live[v] {
            if let Err(err) = self.wiring.detach(&source, gsi) {
                log::error!("MSI-X vector {v}: unbinding GSI {gsi}: {err}");
            }
            self.live[v] = false;
        }
    }

    fn sync_all(&mut self) {
        for v in 0..self.entries.len() {
            self.sync(v);
        }
    }

    /// Sets which eventfd raises vector `v` (None: nothing); out-of-range vectors are ignored.
    /// Returns whether `v` is a vector of this table.
    pub fn set_source(&mut self, v: u16, source: Option<Arc<EventFd>>) -> bool {
        let v = usize::from(v);
        if v >= self.entries.len() {
            return false;
        }
        if self.live[v] {
            if let Some(old) = &self.sources[v] {
                if let Err(err) = self.wiring.detach(old, self.gsi(v)) {
                    log::error!("MSI-X vector {v}: unbinding: {err}");
                }
            }
            self.live[v] = false;
        }
        self.sources[v] = source;
        self.sync(v);
        true
    }

    /// Takes the sources away (device reset); entries keep their contents.
    pub fn clear_sources(&mut self) {
        for v in 0..self.entries.len() {
            let _ = self.set_source(v as u16, None);
        }
    }

    /// The capability's message control bits changed.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.sync_all();
    }

    /// After a guest write at `offset` of `config`: if it touched the message control dword
    /// of the capability at `cap`, takes the new control bits.
    pub fn config_written(
        &mut self,
        config: &super::config::ConfigSpace,
        cap: usize,
        offset: usize,
    ) {
        if (cap..cap + 4).contains(&offset) {
            self.set_control((config.raw_dword(cap / 4) >> 16) as u16);
        }
    }

    /// A table read at `offset` (4 or 8 bytes, aligned).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let v = (offset / ENTRY_BYTES) as usize;
        let field = offset % ENTRY_BYTES;
        let Some(e) = self.entries.get(v) else {
            data.fill(0xff);
            return;
        };
        let words = [
            e.address as u32,
            (e.address >> 32) as u32,
            e.data,
            e.control,
        ];
        match (data.len(), field) {
            (4, f) if f % 4 == 0 => data.copy_from_slice(&words[f as usize / 4].to_le_bytes()),
            (8, f) if f % 8 == 0 => {
                let i = f as usize / 4;
                data[..4].copy_from_slice(&words[i].to_le_bytes());
                data[4..].copy_from_slice(&words[i + 1].to_le_bytes());
            }
            _ => data.fill(0xff),
        }
    }

    /// A table write at `offset` (4 or 8 bytes, aligned); others are ignored.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let v = (offset / ENTRY_BYTES) as usize;
        let field = offset % ENTRY_BYTES;
        if v >= self.entries.len() {
            log::warn!("MSI-X: write beyond the table at {offset:#x} ignored");
            return;
        }
        let words: Vec<u32> = match (data.len(), field) {
            (4, f) if f % 4 == 0 => vec![u32::from_le_bytes([data[0], data[1], data[2], data[3]])],
            (8, f) if f % 8 == 0 => data
                .chunks(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            _ => {
                log::warn!("MSI-X: {}-byte write at {offset:#x} ignored", data.len());
                return;
            }
        };
        let before = self.entries[v];
        for (i, w) in words.into_iter().enumerate() {
            let e = &mut self.entries[v];
            match field / 4 + i as u64 {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(w),
                1 => e.address = (e.address & 0xffff_ffff) | (u64::from(w) << 32),
                2 => e.data = w,
                _ => e.control = w & VECTOR_MASKED,
            }
        }
        let after = self.entries[v];
        if self.live[v] && (after.address != before.address || after.data != before.data) {
            // Reprogrammed while deliverable (undefined for the guest; follow it anyway).
            if let Err(err) = self
                .wiring
                .route_msi(self.gsi(v), after.address, after.data)
            {
                log::error!("MSI-X vector {v}: rerouting: {err}");
            }
        }
        self.sync(v);
    }

    /// A PBA read: bit v is set while vector v may not deliver and its eventfd has a count.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let mut bits = 0u64;
        let first = (offset / 8) as usize * 64;
        for (i, v) in (first..self.entries.len().min(first + 64)).enumerate() {
            let pending = !self.live[v] && self.sources[v].as_deref().is_some_and(signalled);
            bits |= u64::from(pending) << i;
        }
        let bytes = bits.to_le_bytes();
        let start = (offset % 8) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        self.clear_sources();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what MSI-X asked of the hypervisor.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub routes: Mutex<Vec<(u32, u64, u32)>>,
        pub attached: Mutex<Vec<u32>>,
    }

    impl IrqWiring for Recorder {
        fn route_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
            self.routes.lock().unwrap().push((gsi, address, data));
            Ok(())
        }
        fn unroute(&self, _gsi: u32) -> Result<(), String> {
            Ok(())
        }
        fn attach(&self, _: &EventFd, gsi: u32) -> Result<(), String> {
            self.attached.lock().unwrap().push(gsi);
            Ok(())
        }
        fn detach(&self, _: &EventFd, gsi: u32) -> Result<(), String> {
            let mut a = self.attached.lock().unwrap();
            let i = a
                .iter()
                .position(|g| *g == gsi)
                .expect("detach of a bound GSI");
            a.remove(i);
            Ok(())
        }
    }

    fn w32(m: &mut Msix, off: u64, v: u32) {
        m.table_write(off, &v.to_le_bytes());
    }

    fn pba(m: &Msix) -> u64 {
        let mut b = [0u8; 8];
        m.pba_read(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn a_vector_delivers_only_when_enabled_and_unmasked_and_pends_otherwise() {
        let rec = Arc::new(Recorder::default());
        let mut m = Msix::new(2, 24, rec.clone());
        let call = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert!(m.set_source(1, Some(call.clone())));
        assert!(!m.set_source(2, None), "no vector 2");
        // Program vector 1 while masked: nothing bound yet.
        w32(&mut m, 16, 0xfee0_0000);
        w32(&mut m, 20, 0);
        w32(&mut m, 24, 0x4041);
        let mut b = [0u8; 4];
        m.table_read(28, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "vectors start masked");
        w32(&mut m, 28, 0);
        assert!(rec.attached.lock().unwrap().is_empty(), "MSI-X not enabled");
        // The backend signals while the vector cannot deliver: pending.
        call.write(1).unwrap();
        assert_eq!(pba(&m), 0b10);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(rec.attached.lock().unwrap().is_empty(), "function masked");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(*rec.attached.lock().unwrap(), [25]);
        assert_eq!(*rec.routes.lock().unwrap(), [(25, 0xfee0_0000, 0x4041)]);
        assert_eq!(
            pba(&m),
            0,
            "a bound vector is never pending here (KVM delivers)"
        );
        // Mask the vector: unbound, and the count shows as pending again.
        w32(&mut m, 28, 1);
        assert!(rec.attached.lock().unwrap().is_empty());
        assert_eq!(pba(&m), 0b10);
        call.read().unwrap();
        assert_eq!(pba(&m), 0);
        // Only the mask bit of vector control is writable; odd widths are ignored.
        w32(&mut m, 28, 0xffff_fffe);
        m.table_read(28, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        m.table_write(17, &[1, 2]);
        m.table_write(0x100, &[0; 4]);
        m.table_read(0x100, &mut b);
        assert_eq!(b, [0xff; 4]);
        // A 64-bit address write, then a reset takes the source away.
        m.table_write(16, &0x1_fee0_1000u64.to_le_bytes());
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        m.clear_sources();
        assert!(rec.attached.lock().unwrap().is_empty());
    }
}
