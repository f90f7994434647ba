//! Checks on shared memory supplied by a peer.
//!
//! A peer hands the backend file descriptors plus (offset, size) pairs to map. Two attacks
//! matter: mapping past the end of the file (any access raises `SIGBUS`) and shrinking the file
//! after the backend mapped it (same effect, later). The checks here:
//!
//! 1. `fstat` size must cover `offset + size` (checked arithmetic), else the region is refused.
//! 2. If the file carries `F_SEAL_SHRINK`, it can never shrink: safe.
//! 3. Otherwise the backend tries to add `F_SEAL_SHRINK` itself (works on memfds created with
//!    `MFD_ALLOW_SEALING` that are not `F_SEAL_SEAL`ed); from then on the peer cannot shrink it.
//! 4. Otherwise, under [`SealPolicy::RequireSealed`] the region is refused; under
//!    [`SealPolicy::AllowUnsealedChecked`] it is accepted with a logged warning: a peer that
//!    later truncates the file can still make a userspace access (ring reads) raise `SIGBUS`.
//!    Data transfers go through `preadv`/`pwritev`, which get `EFAULT` instead.
//!    [`SealPolicy::RequireSealedOrSysfs`] (the driver VM's tunnel) accepts a sysfs file
//!    unsealed: a PCI BAR's `resource` file, whose size nobody can change.
//!
//! Before any of that, a table must be what the toolstack granted for the device
//! ([`MemoryGrant`]): in managed mode, one region exactly at the guest's I/O window, unless the
//! guest shares all of its RAM (`share = "all-ram"`).
//!
//! [`CheckedMemory`] keeps a transport's current memory table together with its verdict: a
//! refused table stops the device (its queues are not served) until a good one arrives.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;

use log::{error, info, warn};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use thiserror::Error;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::sync;

pub use ipc::control::messages::MemoryGrant;

/// What to do with shared memory that is not sealed against shrinking and cannot be sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealPolicy {
    /// Refuse it.
    RequireSealed,
    /// Accept it if its current size covers the mapping, and log that shrinking it would
    /// fault the backend (needed for peers that create memfds without `MFD_ALLOW_SEALING`).
    AllowUnsealedChecked,
    /// Refuse it, unless it is a sysfs file: the driver VM's tunnel maps a BAR of the
    /// cross-VM device through its sysfs `resource` file, whose size is the BAR's and which
    /// nobody can truncate (nor seal). The region must still lie within it.
    RequireSealedOrSysfs,
}

/// How a region is protected against shrinking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealState {
    /// Not file-backed (the backend's own anonymous memory).
    Anonymous,
    /// The peer sealed it.
    Sealed,
    /// The backend added `F_SEAL_SHRINK`.
    SealedByBackend,
    /// Accepted without a seal (see [`SealPolicy::AllowUnsealedChecked`]).
    Unsealed,
    /// A sysfs file (a PCI BAR's `resource` file): fixed size (see
    /// [`SealPolicy::RequireSealedOrSysfs`]).
    Sysfs,
}

/// Why a region is refused.
#[derive(Debug, Error)]
pub enum PeerMemoryError {
    /// `fstat` failed.
    #[error("cannot stat a memory region's file: {0}")]
    Stat(#[source] std::io::Error),
    /// The mapping would reach past the end of the file.
    #[error(
        "region [{offset:#x}, +{size:#x}) reaches past the end of its file ({file_size:#x} bytes)"
    )]
    PastEnd {
        /// Offset into the file.
        offset: u64,
        /// Mapping length.
        size: u64,
        /// Real file size.
        file_size: u64,
    },
    /// The file may shrink and the policy requires a seal.
    #[error("region file is not sealed against shrinking (F_SEAL_SHRINK) and cannot be sealed")]
    NotSealed,
    /// The table is not the window granted for the device.
    #[error(
        "the memory table is not the granted I/O window (one region at {guest_address:#x}, at \
         most {max_bytes:#x} bytes): {found}"
    )]
    OutsideGrant {
        guest_address: u64,
        max_bytes: u64,
        found: String,
    },
}

/// Checks that `mem` is what `grant` allows: with a window, exactly one region, starting at
/// the window's address and no longer than it.
pub fn check_grant<M>(mem: &M, grant: MemoryGrant) -> Result<(), PeerMemoryError>
where
    M: GuestMemoryBackend,
{
    let MemoryGrant::Window {
        guest_address,
        max_bytes,
    } = grant
    else {
        return Ok(());
    };
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let refuse = |found: String| PeerMemoryError::OutsideGrant {
        guest_address,
        max_bytes,
        found,
    };
    match regions.as_slice() {
        [(start, len)] if *start == guest_address && *len <= max_bytes => Ok(()),
        [(start, len)] => Err(refuse(format!("one region at {start:#x}, {len:#x} bytes"))),
        more => Err(refuse(format!("{} regions", more.len()))),
    }
}

/// Check one (file, offset, size) region against `policy`.
pub fn check_region_file(
    file: &File,
    offset: u64,
    size: u64,
    policy: SealPolicy,
) -> Result<SealState, PeerMemoryError> {
    let file_size = file.metadata().map_err(PeerMemoryError::Stat)?.len();
    let end = offset.checked_add(size).ok_or(PeerMemoryError::PastEnd {
        offset,
        size,
        file_size,
    })?;
    if end > file_size {
        return Err(PeerMemoryError::PastEnd {
            offset,
            size,
            file_size,
        });
    }
    let fd = file.as_raw_fd();
    if let Ok(seals) = fcntl(fd, FcntlArg::F_GET_SEALS) {
        if seals & libc::F_SEAL_SHRINK != 0 {
            return Ok(SealState::Sealed);
        }
        if fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).is_ok() {
            info!("added F_SEAL_SHRINK to a peer memory region ({size:#x} bytes)");
            return Ok(SealState::SealedByBackend);
        }
    }
    match policy {
        SealPolicy::RequireSealed => Err(PeerMemoryError::NotSealed),
        SealPolicy::RequireSealedOrSysfs if is_sysfs(file) => Ok(SealState::Sysfs),
        SealPolicy::RequireSealedOrSysfs => Err(PeerMemoryError::NotSealed),
        // The caller logs (once per memory table, not once per region and update).
        SealPolicy::AllowUnsealedChecked => Ok(SealState::Unsealed),
    }
}

/// Whether `file` lives on sysfs (`SYSFS_MAGIC`).
fn is_sysfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::SYSFS_MAGIC)
        .unwrap_or(false)
}

/// Check every file-backed region of `mem`.
pub fn check_guest_memory<M>(mem: &M, policy: SealPolicy) -> Result<Vec<SealState>, PeerMemoryError>
where
    M: GuestMemoryBackend,
{
    let mut states = Vec::new();
    for region in mem.iter() {
        let state = match region.file_offset() {
            None => SealState::Anonymous,
            Some(fo) => check_region_file(fo.file(), fo.start(), region.len(), policy)?,
        };
        states.push(state);
    }
    Ok(states)
}

/// Guest memory as a transport hands it to a device: swappable while queues run.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The current memory table of one device and its verdict.
///
/// The transport checks a table before installing it ([`CheckedMemory::precheck`]); the
/// device keeps its own view here and serves queues only while [`CheckedMemory::usable`]
/// holds.
pub struct CheckedMemory {
    mem: RwLock<Option<GuestMem>>,
    usable: AtomicBool,
    /// Unsealed regions in the current table (to log changes only).
    unsealed: AtomicUsize,
}

impl Default for CheckedMemory {
    fn default() -> Self {
        CheckedMemory {
            mem: RwLock::new(None),
            usable: AtomicBool::new(false),
            unsealed: AtomicUsize::new(0),
        }
    }
}

impl CheckedMemory {
    /// The current table, if any.
    pub fn current(&self) -> Option<GuestMem> {
        sync::read(&self.mem).clone()
    }

    /// Whether the current table passed its check (queues may be served).
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Checks a table before the transport installs it: if it is refused, the device stops
    /// at once (the current table is no longer served either) and the transport keeps the
    /// refused table away from the queues. `device` names the device in logs.
    pub fn precheck(
        &self,
        mem: &GuestMemoryMmap,
        grant: MemoryGrant,
        policy: SealPolicy,
        device: &str,
    ) -> io::Result<()> {
        match check_grant(mem, grant).and_then(|()| check_guest_memory(mem, policy)) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.usable.store(false, Ordering::Release);
                error!("{device}: refusing the memory table, device stopped: {e}");
                Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
            }
        }
    }

    /// Takes a new table from the peer and checks it against `grant` and `policy`; `device`
    /// names the device in logs.
    pub fn update(
        &self,
        mem: GuestMem,
        grant: MemoryGrant,
        policy: SealPolicy,
        device: &str,
    ) -> io::Result<()> {
        let checked = check_grant(&*mem.memory(), grant)
            .and_then(|()| check_guest_memory(&*mem.memory(), policy));
        *sync::write(&self.mem) = Some(mem);
        match checked {
            Ok(states) => {
                let unsealed = states.iter().filter(|s| **s == SealState::Unsealed).count();
                if self.unsealed.swap(unsealed, Ordering::AcqRel) != unsealed && unsealed > 0 {
                    warn!(
                        "{device}: {unsealed} shared memory region(s) cannot be sealed against \
                         shrinking; a frontend that truncates them can fault this backend"
                    );
                }
                self.usable.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // The transport has already installed the table; refuse to touch it.
                self.usable.store(false, Ordering::Release);
                error!("{device}: refusing the memory table, device stopped: {e}");
                Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    fn memfd(len: u64, sealing: bool) -> File {
        let flags = if sealing {
            MemFdCreateFlag::MFD_ALLOW_SEALING
        } else {
            MemFdCreateFlag::empty()
        };
        let f = File::from(memfd_create(c"t", flags).unwrap());
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn past_end_is_refused() {
        let f = memfd(4096, true);
        assert!(matches!(
            check_region_file(&f, 4096, 1, SealPolicy::AllowUnsealedChecked),
            Err(PeerMemoryError::PastEnd { .. })
        ));
        assert!(matches!(
            check_region_file(&f, u64::MAX, 2, SealPolicy::AllowUnsealedChecked),
            Err(PeerMemoryError::PastEnd { .. })
        ));
    }

    #[test]
    fn backend_seals_sealable_memfd() {
        let f = memfd(8192, true);
        let st = check_region_file(&f, 0, 8192, SealPolicy::RequireSealed).unwrap();
        assert_eq!(st, SealState::SealedByBackend);
        // The peer can no longer shrink it.
        assert!(f.set_len(4096).is_err());
        let st = check_region_file(&f, 0, 8192, SealPolicy::RequireSealed).unwrap();
        assert_eq!(st, SealState::Sealed);
    }

    #[test]
    fn require_sealed_or_sysfs_takes_a_sysfs_file_within_its_size_and_nothing_unsealed() {
        // Unsealable and not sysfs: refused, as under RequireSealed; a sealable one is sealed.
        let policy = SealPolicy::RequireSealedOrSysfs;
        assert!(matches!(
            check_region_file(&memfd(8192, false), 0, 8192, policy),
            Err(PeerMemoryError::NotSealed)
        ));
        let tmp = tempfile::tempfile().unwrap();
        tmp.set_len(8192).unwrap();
        assert!(matches!(
            check_region_file(&tmp, 0, 8192, policy),
            Err(PeerMemoryError::NotSealed)
        ));
        assert_eq!(
            check_region_file(&memfd(8192, true), 0, 8192, policy).unwrap(),
            SealState::SealedByBackend
        );
        // A sysfs attribute (4096 bytes by stat, as a BAR's resource file is its BAR's size).
        let Ok(sysfs) = File::open("/sys/kernel/uevent_seqnum") else {
            test_support::skip(
                "require_sealed_or_sysfs_takes_a_sysfs_file_within_its_size_and_nothing_unsealed",
                "no /sys/kernel/uevent_seqnum (sysfs not mounted)",
            );
            return;
        };
        assert_eq!(
            check_region_file(&sysfs, 0, 4096, policy).unwrap(),
            SealState::Sysfs
        );
        assert!(matches!(
            check_region_file(&sysfs, 4096, 1, policy),
            Err(PeerMemoryError::PastEnd { .. })
        ));
        assert!(matches!(
            check_region_file(&sysfs, 0, 4096, SealPolicy::RequireSealed),
            Err(PeerMemoryError::NotSealed)
        ));
    }

    #[test]
    fn unsealable_follows_policy() {
        let f = memfd(8192, false);
        assert!(matches!(
            check_region_file(&f, 0, 8192, SealPolicy::RequireSealed),
            Err(PeerMemoryError::NotSealed)
        ));
        assert_eq!(
            check_region_file(&f, 0, 8192, SealPolicy::AllowUnsealedChecked).unwrap(),
            SealState::Unsealed
        );
    }

    fn mmap(regions: &[(u64, usize)]) -> GuestMemoryMmap {
        let ranges: Vec<(vm_memory::GuestAddress, usize)> = regions
            .iter()
            .map(|(a, l)| (vm_memory::GuestAddress(*a), *l))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn only_the_granted_window_passes() {
        let grant = MemoryGrant::Window {
            guest_address: 0x1_0000_0000,
            max_bytes: 0x10_0000,
        };
        // The window itself, or a smaller one at its address.
        assert!(check_grant(&mmap(&[(0x1_0000_0000, 0x10_0000)]), grant).is_ok());
        assert!(check_grant(&mmap(&[(0x1_0000_0000, 0x1000)]), grant).is_ok());
        // Elsewhere, larger, or more than one region (all of a guest's RAM, say).
        for bad in [
            mmap(&[(0, 0x10_0000)]),
            mmap(&[(0x1_0000_0000, 0x20_0000)]),
            mmap(&[(0, 0x1000), (0x1_0000_0000, 0x1000)]),
        ] {
            assert!(matches!(
                check_grant(&bad, grant),
                Err(PeerMemoryError::OutsideGrant { .. })
            ));
        }
        // share = "all-ram": any table.
        assert!(check_grant(
            &mmap(&[(0, 0x1000), (0x10_0000, 0x1000)]),
            MemoryGrant::AllRam
        )
        .is_ok());
    }
}
