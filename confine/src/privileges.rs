//! Giving up root: no supplementary groups, the domain's own gid and uid (real, effective and
//! saved), an empty bounding set, no ambient, inheritable, permitted or effective
//! capabilities, and no_new_privs (so nothing the domain could execute gains any back).

/// Errors of dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{0}")]
    Call(&'static str, #[source] std::io::Error),
    #[error("capabilities remain after dropping them (effective {effective:#x}, permitted {permitted:#x})")]
    CapabilitiesRemain { effective: u64, permitted: u64 },
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

/// Drops everything. Must run in a process with a single thread (capabilities are per
/// thread), as root, after the mounts are built (they need CAP_SYS_ADMIN).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    // SAFETY: (each call below) plain system calls with integer arguments or pointers to
    // local data of the right type.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()).into())?;
        // The bounding set: every capability the kernel knows (until prctl says EINVAL).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(PrivilegeError::Call(
                    "PR_CAPBSET_DROP",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        check(
            "PR_CAP_AMBIENT_CLEAR_ALL",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
        )?;
        check("setresgid", libc::setresgid(gid, gid, gid).into())?;
        // Leaving uid 0 clears the permitted and effective sets (no SECBIT_KEEP_CAPS).
        check("setresuid", libc::setresuid(uid, uid, uid).into())?;
        let mut header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(
            "capset",
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
        )?;
        check(
            "PR_SET_NO_NEW_PRIVS",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
        )?;
    }
    let (effective, permitted) = current_capabilities()?;
    if effective != 0 || permitted != 0 {
        return Err(PrivilegeError::CapabilitiesRemain {
            effective,
            permitted,
        });
    }
    Ok(())
}
