//! What every virtio transport here checks the same way, whatever registers carry it: the
//! device status a driver may write, and whether a queue's size and rings are usable by a
//! backend that sees only `regions`.

use crate::vmm::vhost_blk::{BlkBackend, SharedRegion, VringSetup};

pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;

/// What a device-status write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// 0: reset the device.
    Reset,
    /// It clears bits the driver set: ignored (logged here).
    Ignored,
    /// The new status; `activate` if DRIVER_OK is newly set (the device may still refuse and
    /// set DEVICE_NEEDS_RESET).
    Set { status: u32, activate: bool },
}

/// The transition `old` -> `value`; `unoffered` are the driver's features the device did not
/// offer (FEATURES_OK then does not stick).
pub fn status_write(what: &str, old: u32, value: u32, unoffered: u64) -> StatusWrite {
    if value == 0 {
        return StatusWrite::Reset;
    }
    if value & old != old & !STATUS_NEEDS_RESET {
        log::warn!("{what}: guest clears status bits {old:#x} -> {value:#x}; ignored");
        return StatusWrite::Ignored;
    }
    let mut status = value | (old & STATUS_NEEDS_RESET);
    if status & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 && unoffered != 0 {
        log::warn!("{what}: guest accepts unoffered features {unoffered:#x}");
        status &= !STATUS_FEATURES_OK;
    }
    StatusWrite::Set {
        status,
        activate: status & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0,
    }
}

/// Whether a split queue of `size` entries (a power of two up to `max`) with its descriptor
/// table, available and used rings at these GPAs is aligned and lies inside `regions`.
pub fn check_queue(
    regions: &[SharedRegion],
    size: u32,
    max: u16,
    desc: u64,
    avail: u64,
    used: u64,
) -> Result<(), String> {
    if size == 0 || size > u32::from(max) || !size.is_power_of_two() {
        return Err(format!("impossible queue size {size}"));
    }
    let n = u64::from(size);
    for (what, gpa, bytes, align) in [
        ("descriptor table", desc, 16 * n, 16),
        ("available ring", avail, 6 + 2 * n, 2),
        ("used ring", used, 6 + 8 * n, 4),
    ] {
        let inside = gpa.is_multiple_of(align)
            && gpa
                .checked_add(bytes)
                .is_some_and(|end| regions.iter().any(|r| gpa >= r.gpa && end <= r.gpa + r.len));
        if !inside {
            return Err(format!(
                "{what} at {gpa:#x} (+{bytes:#x}) is misaligned or outside shared memory"
            ));
        }
    }
    Ok(())
}

/// DRIVER_OK: starts `backend` with the negotiated `features` and the queue (None: no usable
/// queue). Returns the status to keep: DEVICE_NEEDS_RESET added if the device cannot run.
pub fn activate<B: BlkBackend>(
    what: &str,
    backend: &mut B,
    status: u32,
    features: u64,
    queue: Option<VringSetup>,
) -> u32 {
    let Some(q) = queue.filter(|_| status & STATUS_FEATURES_OK != 0) else {
        log::warn!("{what}: DRIVER_OK without negotiated features or a ready queue");
        return status | STATUS_NEEDS_RESET;
    };
    match backend.start(features, q) {
        Ok(()) => {
            log::info!("{what}: running, features {features:#x}, {q:?}");
            status
        }
        Err(e) => {
            log::error!("{what}: starting the backend: {e}");
            status | STATUS_NEEDS_RESET
        }
    }
}
