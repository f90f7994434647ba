//! The boot-info page: what the VMM tells the guest kernel, and where the guest reports back.
//!
//! The VMM writes [`BootInfo::encode`]'s bytes at [`BOOT_INFO_GPA`] and enters the kernel with
//! that address in `rdi`; the kernel reads them with [`BootInfo::decode`]. The guest leaves
//! [`GUEST_REPORT_SLOTS`] little-endian u64 counters at `BOOT_INFO_GPA + GUEST_REPORT_OFFSET`
//! before it powers off by writing its status byte to [`POWEROFF_PORT`].

/// Guest-physical address of the boot-info page.
pub const BOOT_INFO_GPA: u64 = 0x7000;
/// Bytes of the encoded boot info.
pub const BOOT_INFO_BYTES: usize = 0x60;
/// Offset, within the boot-info page, of the counters the guest reports back.
pub const GUEST_REPORT_OFFSET: u64 = 0x100;
/// Number of guest-reported counters.
pub const GUEST_REPORT_SLOTS: usize = 7;

/// A byte written to this port powers the guest off with that byte as its status.
pub const POWEROFF_PORT: u16 = 0xf4;
/// A byte written to this port marks a measurement [`Phase`]; the VMM snapshots its exit
/// counters there.
pub const PHASE_PORT: u16 = 0xf5;

/// Ring flag: negotiate VIRTIO_RING_F_EVENT_IDX.
pub const RING_EVENT_IDX: u32 = 1;
/// Ring flag: busy-poll the used ring, interrupts off.
pub const RING_POLL: u32 = 2;

const MAGIC: u64 = 0x4f46_4e49_4d4d_5653; // "SVMMINFO"
const VERSION: u32 = 1;

/// Measurement phases the guest marks on [`PHASE_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    IoStart = 1,
    IoEnd = 2,
    IdleStart = 3,
    IdleEnd = 4,
}

impl Phase {
    /// The phase a byte on the port marks, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        let all = [Self::IoStart, Self::IoEnd, Self::IdleStart, Self::IdleEnd];
        all.into_iter().find(|p| *p as u8 == b)
    }
}

/// What the guest kernel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GuestMode {
    /// Say hello and power off.
    Hello = 0,
    /// Write and verify a pattern on the virtio-blk disk.
    Disk = 1,
    /// Triple-fault on purpose.
    TripleFault = 2,
    /// Garbage to ports, MMIO and the virtio registers; then the disk check.
    BadInput = 3,
    /// Sleep forever with interrupts enabled (for stop-from-outside tests).
    Halt = 4,
}

impl GuestMode {
    /// The mode numbered `v`, if there is one.
    pub fn from_u32(v: u32) -> Option<Self> {
        let all = [
            Self::Hello,
            Self::Disk,
            Self::TripleFault,
            Self::BadInput,
            Self::Halt,
        ];
        all.into_iter().find(|m| *m as u32 == v)
    }
}

/// What the VMM tells the guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub mode: GuestMode,
    /// The virtio-mmio device and its I/O APIC pin.
    pub mmio_base: u64,
    pub mmio_irq: u32,
    /// `RING_*` flags.
    pub ring_flags: u32,
    /// The I/O window: the only guest memory the driver domain sees by default.
    pub window_gpa: u64,
    pub window_len: u64,
    pub requests: u32,
    pub batch: u32,
    /// I/O APIC pin of the idle-baseline wake-up; 0: no idle phase.
    pub wake_irq: u32,
    /// Disk pattern seed.
    pub seed: u64,
    /// Only read and verify (the pattern is already there).
    pub verify_only: bool,
    /// Sectors per request (1..=8).
    pub sectors_per_request: u32,
    /// Sectors to check from sector 0; 0: `requests / 2`.
    pub check_sectors: u32,
}

/// Field offsets in the encoded page.
mod at {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x08;
    pub const MODE: usize = 0x0c;
    pub const MMIO_BASE: usize = 0x10;
    pub const MMIO_IRQ: usize = 0x18;
    pub const RING_FLAGS: usize = 0x1c;
    pub const WINDOW_GPA: usize = 0x20;
    pub const WINDOW_LEN: usize = 0x28;
    pub const REQUESTS: usize = 0x30;
    pub const BATCH: usize = 0x34;
    pub const WAKE_IRQ: usize = 0x38;
    pub const SEED: usize = 0x40;
    pub const VERIFY_ONLY: usize = 0x48;
    pub const SECTORS_PER_REQUEST: usize = 0x4c;
    pub const CHECK_SECTORS: usize = 0x50;
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn get32(b: &[u8; BOOT_INFO_BYTES], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn get64(b: &[u8; BOOT_INFO_BYTES], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl BootInfo {
    /// The page's bytes (little-endian).
    pub fn encode(&self) -> [u8; BOOT_INFO_BYTES] {
        let mut b = [0u8; BOOT_INFO_BYTES];
        put(&mut b, at::MAGIC, &MAGIC.to_le_bytes());
        put(&mut b, at::VERSION, &VERSION.to_le_bytes());
        put(&mut b, at::MODE, &(self.mode as u32).to_le_bytes());
        put(&mut b, at::MMIO_BASE, &self.mmio_base.to_le_bytes());
        put(&mut b, at::MMIO_IRQ, &self.mmio_irq.to_le_bytes());
        put(&mut b, at::RING_FLAGS, &self.ring_flags.to_le_bytes());
        put(&mut b, at::WINDOW_GPA, &self.window_gpa.to_le_bytes());
        put(&mut b, at::WINDOW_LEN, &self.window_len.to_le_bytes());
        put(&mut b, at::REQUESTS, &self.requests.to_le_bytes());
        put(&mut b, at::BATCH, &self.batch.to_le_bytes());
        put(&mut b, at::WAKE_IRQ, &self.wake_irq.to_le_bytes());
        put(&mut b, at::SEED, &self.seed.to_le_bytes());
        let verify_only = u32::from(self.verify_only);
        put(&mut b, at::VERIFY_ONLY, &verify_only.to_le_bytes());
        let spr = self.sectors_per_request;
        put(&mut b, at::SECTORS_PER_REQUEST, &spr.to_le_bytes());
        put(&mut b, at::CHECK_SECTORS, &self.check_sectors.to_le_bytes());
        b
    }

    /// Reads a page; None if it is not one (magic, version) or names an unknown mode.
    pub fn decode(b: &[u8; BOOT_INFO_BYTES]) -> Option<Self> {
        if get64(b, at::MAGIC) != MAGIC || get32(b, at::VERSION) != VERSION {
            return None;
        }
        Some(Self {
            mode: GuestMode::from_u32(get32(b, at::MODE))?,
            mmio_base: get64(b, at::MMIO_BASE),
            mmio_irq: get32(b, at::MMIO_IRQ),
            ring_flags: get32(b, at::RING_FLAGS),
            window_gpa: get64(b, at::WINDOW_GPA),
            window_len: get64(b, at::WINDOW_LEN),
            requests: get32(b, at::REQUESTS),
            batch: get32(b, at::BATCH),
            wake_irq: get32(b, at::WAKE_IRQ),
            seed: get64(b, at::SEED),
            verify_only: get32(b, at::VERIFY_ONLY) != 0,
            sectors_per_request: get32(b, at::SECTORS_PER_REQUEST),
            check_sectors: get32(b, at::CHECK_SECTORS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BootInfo {
        BootInfo {
            mode: GuestMode::BadInput,
            mmio_base: 0xd000_0000,
            mmio_irq: 5,
            ring_flags: RING_POLL,
            window_gpa: 0x4000_0000,
            window_len: 0x10_0000,
            requests: 32,
            batch: 8,
            wake_irq: 6,
            seed: 0x1122_3344_5566_7788,
            verify_only: true,
            sectors_per_request: 8,
            check_sectors: 2048,
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        let b = sample().encode();
        assert_eq!(&b[0..8], b"SVMMINFO");
        assert_eq!(get32(&b, 0x08), 1);
        assert_eq!(get32(&b, 0x0c), 3);
        assert_eq!(get64(&b, 0x10), 0xd000_0000);
        assert_eq!((get32(&b, 0x18), get32(&b, 0x1c)), (5, RING_POLL));
        assert_eq!(get64(&b, 0x20), 0x4000_0000);
        assert_eq!(get64(&b, 0x28), 0x10_0000);
        assert_eq!(
            (get32(&b, 0x30), get32(&b, 0x34), get32(&b, 0x38)),
            (32, 8, 6)
        );
        assert_eq!(get64(&b, 0x40), 0x1122_3344_5566_7788);
        assert_eq!(
            (get32(&b, 0x48), get32(&b, 0x4c), get32(&b, 0x50)),
            (1, 8, 2048)
        );
    }

    #[test]
    fn phases_are_the_port_bytes() {
        for (byte, phase) in [
            (1, Phase::IoStart),
            (2, Phase::IoEnd),
            (3, Phase::IdleStart),
            (4, Phase::IdleEnd),
        ] {
            assert_eq!(Phase::from_byte(byte), Some(phase));
        }
        assert_eq!(Phase::from_byte(0), None);
        assert_eq!(Phase::from_byte(5), None);
    }

    #[test]
    fn decode_reads_what_encode_wrote_and_refuses_other_pages() {
        let info = sample();
        assert_eq!(BootInfo::decode(&info.encode()), Some(info));
        assert_eq!(BootInfo::decode(&[0; BOOT_INFO_BYTES]), None);
        let mut bad_version = info.encode();
        bad_version[at::VERSION] = 2;
        assert_eq!(BootInfo::decode(&bad_version), None);
        let mut bad_mode = info.encode();
        bad_mode[at::MODE] = 9;
        assert_eq!(BootInfo::decode(&bad_mode), None);
    }
}
