//! Resource limits a confined domain gets, set while it is still root (a process cannot raise
//! its hard limits afterwards). Every domain has a uid of its own, so RLIMIT_NPROC, which
//! counts the threads of a uid, bounds each domain's threads on its own: a pids limit that
//! needs no cgroup. RLIMIT_MEMLOCK is what the plan says: 0, except for a VMM whose guest has
//! an assigned PCI function (VFIO pins all of its RAM); no domain dumps core (a core file would
//! hold guest memory).

use crate::plan::Profile;

/// Errors of setting a limit.
#[derive(Debug, thiserror::Error)]
#[error("setting {0}")]
pub struct LimitError(&'static str, #[source] std::io::Error);

/// The most threads a domain of `profile` may have: a VMM runs a thread per vCPU (at most 32)
/// plus its devices'; the driver domain a few per device (one vhost-user session thread and
/// its queue workers).
pub fn max_threads(profile: Profile) -> u64 {
    match profile {
        Profile::DriverDomain => 1024,
        Profile::ProcessGuest => 128,
        Profile::Vmm => 256,
    }
}

fn set(
    what: &'static str,
    resource: libc::__rlimit_resource_t,
    value: u64,
) -> Result<(), LimitError> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit struct from a valid reference.
    if unsafe { libc::setrlimit(resource, &limit) } < 0 {
        return Err(LimitError(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the limits of `profile` (soft and hard alike), with `memlock` bytes of locked memory.
pub fn apply(profile: Profile, memlock: u64) -> Result<(), LimitError> {
    set("RLIMIT_NPROC", libc::RLIMIT_NPROC, max_threads(profile))?;
    set("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK, memlock)?;
    set("RLIMIT_CORE", libc::RLIMIT_CORE, 0)
}
