//! Giving up root: no supplementary groups, the domain's own gid and uid (real, effective and
//! saved), an empty bounding set, no ambient, inheritable, permitted or effective
//! capabilities, and no_new_privs (so nothing the domain could execute gains any back).
//! [`keep_only`] narrows a process that must stay root (the hardware helper) instead.

/// Errors of dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{0}")]
    Call(&'static str, #[source] std::io::Error),
    #[error("capabilities remain after dropping them (effective {effective:#x}, permitted {permitted:#x})")]
    CapabilitiesRemain { effective: u64, permitted: u64 },
    #[error("capabilities {wanted:#x} are not all held (effective {effective:#x}, permitted {permitted:#x})")]
    CapabilitiesMissing {
        wanted: u64,
        effective: u64,
        permitted: u64,
    },
}

fn check(what: &'static str, rc: libc::c_long) -> Result<(), PrivilegeError> {
    if rc < 0 {
        return Err(PrivilegeError::Call(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `struct __user_cap_header_struct` of capget/capset.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (capabilities 0-31, 32-63).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's (effective, permitted) capability sets.
pub fn current_capabilities() -> Result<(u64, u64), PrivilegeError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two CapData, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    check("capget", rc)?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Empties the bounding set of every capability not in `keep`.
fn narrow_bounding_set(keep: u64) -> Result<(), PrivilegeError> {
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: a prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(PrivilegeError::Call(
                "PR_CAPBSET_DROP",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Keeps the capabilities in `keep` (bits by capability number, effective and permitted)
/// and drops every other one, from the bounding set too; clears the ambient and inheritable
/// sets and sets no_new_privs. The uid stays what it is (root, for a process that writes
/// root's sysfs files). Must run in a process with a single thread.
pub fn keep_only(keep: u64) -> Result<(), PrivilegeError> {
    narrow_bounding_set(keep)?;
    clear_ambient()?;
    set_capabilities(keep)?;
    set_no_new_privs()?;
    expect_capabilities(keep)
}

/// Drops everything. Must run in a process with a single thread (capabilities are per
/// thread), as root, after the mounts are built (they need CAP_SYS_ADMIN).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    // The bounding set: every capability the kernel knows (until prctl says EINVAL).
    narrow_bounding_set(0)?;
    // SAFETY: (each call below) plain system calls with integer arguments or a null list.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()).into())?;
    }
    clear_ambient()?;
    // SAFETY: (each call below) plain system calls with integer arguments.
    unsafe {
        check("setresgid", libc::setresgid(gid, gid, gid).into())?;
        // Leaving uid 0 clears the permitted and effective sets (no SECBIT_KEEP_CAPS).
        check("setresuid", libc::setresuid(uid, uid, uid).into())?;
    }
    set_capabilities(0)?;
    set_no_new_privs()?;
    expect_capabilities(0)
}

fn clear_ambient() -> Result<(), PrivilegeError> {
    // SAFETY: a prctl with integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check("PR_CAP_AMBIENT_CLEAR_ALL", rc.into())
}

/// Sets the effective and permitted sets to `keep` and the inheritable set to nothing.
fn set_capabilities(keep: u64) -> Result<(), PrivilegeError> {
    // Truncation intended: the low and high halves of the 64-bit set.
    let (lo, hi) = (keep as u32, (keep >> 32) as u32);
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads the header and two data entries, both local and of the right type.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check("capset", rc)
}

fn set_no_new_privs() -> Result<(), PrivilegeError> {
    // SAFETY: a prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check("PR_SET_NO_NEW_PRIVS", rc.into())
}

/// Checks from the kernel that exactly `keep` is effective and permitted.
fn expect_capabilities(keep: u64) -> Result<(), PrivilegeError> {
    let (effective, permitted) = current_capabilities()?;
    if effective & !keep != 0 || permitted & !keep != 0 {
        return Err(PrivilegeError::CapabilitiesRemain {
            effective,
            permitted,
        });
    }
    if effective & keep != keep {
        return Err(PrivilegeError::CapabilitiesMissing {
            wanted: keep,
            effective,
            permitted,
        });
    }
    Ok(())
}
