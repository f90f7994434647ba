//! What this machine can do for confinement, checked by the toolstack before it starts a
//! domain, so that what is missing is said once, loudly, at `splitvmm up`.

use crate::plan::Feature;

/// The Landlock ABI of the running kernel, if it has Landlock.
pub fn landlock_abi() -> Option<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute and size 0 and the VERSION flag, landlock_create_ruleset
    // only returns the ABI version; it reads and writes no memory.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(abi).ok().filter(|v| *v > 0)
}

/// Whether the kernel has seccomp filters.
pub fn has_seccomp() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer; it reports the calling thread's mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 }
}

/// Whether the namespaces a domain is started in exist here.
pub fn has_namespaces() -> bool {
    ["pid", "mnt", "ipc", "net", "uts"]
        .iter()
        .all(|ns| std::path::Path::new("/proc/self/ns").join(ns).exists())
}

/// Where cgroup v2 is mounted with the memory and pids controllers, if it is.
pub fn cgroup2_with_controllers() -> Option<std::path::PathBuf> {
    cgroup2_root().filter(|root| crate::cgroup::has_controllers(root))
}

/// Where cgroup v2 is mounted, if it is.
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| std::path::PathBuf::from(dir))
    })
}

/// What is missing, by optional feature (the rest is required and reported by [`required`]).
pub fn missing_optional() -> Vec<Feature> {
    let mut missing = Vec::new();
    if landlock_abi().is_none() {
        missing.push(Feature::Landlock);
    }
    missing
}

/// What is missing among the features confinement cannot do without.
pub fn required() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !has_seccomp() {
        missing.push("seccomp filters");
    }
    if !has_namespaces() {
        missing.push("pid, mount, IPC, network and UTS namespaces");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_reports_its_landlock_abi_consistently() {
        // Whatever the kernel has, the version is positive or absent, and agrees with the
        // list of missing features.
        let abi = landlock_abi();
        assert_eq!(
            abi.is_none(),
            missing_optional().contains(&Feature::Landlock)
        );
    }
}
