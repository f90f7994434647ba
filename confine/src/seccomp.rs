//! The seccomp allowlists, as data: one per [`Profile`], every other system call kills the
//! process (SECCOMP_RET_KILL_PROCESS; the kernel's audit log and the toolstack's log record
//! it: "killed by SIGSYS").
//!
//! Applied on the domain's only thread before it starts any other, so every thread inherits
//! it. Two filters: the allowlist, and one that answers `clone3` with ENOSYS, so that glibc
//! falls back to `clone`, whose flags a filter can inspect (clone3 passes them in memory): a
//! domain may start threads (CLONE_THREAD) but no processes. io_uring is not allowed at all
//! (its submissions would bypass the filter; no domain uses it).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::plan::Profile;

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the filter")]
    Install(#[from] seccompiler::Error),
    #[error("this architecture has no allowlist")]
    Arch,
}

/// Allowed with any arguments, in every domain.
const COMMON: &[libc::c_long] = &[
    // descriptors the domain holds
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ftruncate,
    // opening by path: the mount namespace and Landlock decide what there is to open
    libc::SYS_openat,
    // memory
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    // threads and time
    libc::SYS_clone3, // answered with ENOSYS by the second filter
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // signals (Landlock keeps them inside the domain where the kernel can)
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    // waiting
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    // the sockets it was handed (no socket(2): it makes none)
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Allowed to the domains that serve disks or accept connections (the driver domain: images
/// and the listeners it is handed; a VMM: its console listener), not to process guests.
const DISKS_AND_LISTENERS: &[libc::c_long] = &[
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_accept4,
];

/// A backend's queue worker (the threads that parse guest rings and move data): besides its
/// memory and its wake-ups, only I/O on the descriptors it already has. No new descriptors
/// (no `openat`, `recvmsg`, `accept4`, `memfd_create`, `dup`), no threads, no sockets.
const BACKEND_WORKER: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    // its queue's ring, made before the thread started (no io_uring_setup or _register)
    libc::SYS_io_uring_enter,
    libc::SYS_fstat,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// A class of thread that gets a narrower filter than its process when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadClass {
    /// A backend's queue worker ([`BACKEND_WORKER`]).
    BackendWorker,
}

/// The allowlist of threads of `class` (stacked on the process's: both must allow a call).
pub fn thread_allowlist(
    class: ThreadClass,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let ThreadClass::BackendWorker = class;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        BACKEND_WORKER.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_ioctl,
        one_of(1, SeccompCmpArgLen::Qword, PLAIN_IOCTLS)?,
    );
    Ok(rules)
}

/// Narrows the calling thread (and threads it starts) to `class`'s allowlist, on top of the
/// process's filter. Call it where such a thread starts, before it touches guest data.
pub fn restrict_thread(class: ThreadClass) -> Result<(), SeccompError> {
    let filter = SeccompFilter::new(
        thread_allowlist(class)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch()?,
    )?;
    let program: BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}

/// ioctls a domain without KVM makes (terminal probes of the standard streams, O_NONBLOCK).
const PLAIN_IOCTLS: &[u64] = &[libc::TCGETS, libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX];

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        op,
        value,
    )?)
}

/// One rule per allowed value of argument `index`; `len` is Dword for C `int` arguments,
/// whose upper half a caller may leave undefined.
fn one_of(
    index: u8,
    len: SeccompCmpArgLen,
    values: &[u64],
) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|v| {
            let condition = SeccompCondition::new(index, len.clone(), SeccompCmpOp::Eq, *v)?;
            Ok(SeccompRule::new(vec![condition])?)
        })
        .collect()
}

/// The allowlist of `profile`: system call number to the rules of which one must match (an
/// empty list allows any arguments).
pub fn allowlist(profile: Profile) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|nr| (*nr, Vec::new())).collect();
    // Threads only: CLONE_THREAD set (no new processes, no namespaces).
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Thread names; no_new_privs (already set: a no-op, which installing a thread's own
    // filter makes).
    rules.insert(
        libc::SYS_prctl,
        one_of(
            0,
            SeccompCmpArgLen::Dword,
            &[
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                libc::PR_SET_NO_NEW_PRIVS as u64,
            ],
        )?,
    );
    // Adding a filter, which only ever narrows what a thread may do (a thread class's own).
    rules.insert(
        libc::SYS_seccomp,
        one_of(
            0,
            SeccompCmpArgLen::Dword,
            &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
        )?,
    );
    // Reading limits (the runtime sizes the main stack); never raising them.
    rules.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![arg(2, SeccompCmpOp::Eq, 0)?])?],
    );
    if profile != Profile::ProcessGuest {
        rules.extend(DISKS_AND_LISTENERS.iter().map(|nr| (*nr, Vec::new())));
    }
    if profile == Profile::DriverDomain {
        // A disk queue's ring (driver-domain's blk::uring): created and locked down to reads
        // and writes (IORING_REGISTER_RESTRICTIONS) when the queue is set up; its workers may
        // only enter it. Requests in a ring are not filtered here, but Landlock and the
        // namespaces apply to them as to system calls.
        rules.extend(
            [
                libc::SYS_io_uring_setup,
                libc::SYS_io_uring_register,
                libc::SYS_io_uring_enter,
            ]
            .iter()
            .map(|nr| (*nr, Vec::new())),
        );
    }
    match profile {
        Profile::DriverDomain | Profile::ProcessGuest => {
            rules.insert(
                libc::SYS_ioctl,
                one_of(1, SeccompCmpArgLen::Qword, PLAIN_IOCTLS)?,
            );
        }
        Profile::Vmm => {
            // KVM's ioctls on the VM, vCPU and device descriptors it holds (it has no other
            // device to issue them to: /dev/kvm was opened before confinement).
            rules.insert(libc::SYS_ioctl, Vec::new());
        }
    }
    Ok(rules)
}

fn arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::Arch)
    }
}

/// The two programs of `profile`: clone3 -> ENOSYS, and the allowlist (in the order they
/// are installed: the allowlist last, since installing one needs prctl, which it forbids).
pub fn programs(profile: Profile) -> Result<[BpfProgram; 2], SeccompError> {
    let arch = arch()?;
    let allow = SeccompFilter::new(
        allowlist(profile)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok([clone3.try_into()?, allow.try_into()?])
}

/// Installs the filters of `profile` on the calling thread (and the threads it starts).
pub fn install(profile: Profile) -> Result<(), SeccompError> {
    for program in programs(profile)? {
        seccompiler::apply_filter(&program)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_compiles_and_none_allows_processes_or_tracing() {
        for profile in [Profile::DriverDomain, Profile::ProcessGuest, Profile::Vmm] {
            let rules = allowlist(profile).unwrap();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_process_vm_readv,
                libc::SYS_socket,
                libc::SYS_mount,
            ] {
                assert!(!rules.contains_key(&forbidden), "{profile}: {forbidden}");
            }
            // Rings (whose requests seccomp does not see) only for the driver domain's disks.
            assert_eq!(
                rules.contains_key(&libc::SYS_io_uring_setup),
                profile == Profile::DriverDomain,
                "{profile}: io_uring_setup"
            );
            // clone only with CLONE_THREAD (one conditional rule).
            assert_eq!(rules[&libc::SYS_clone].len(), 1);
            assert!(programs(profile).is_ok());
        }
        let worker = thread_allowlist(ThreadClass::BackendWorker).unwrap();
        for fresh_descriptors in [
            libc::SYS_openat,
            libc::SYS_recvmsg,
            libc::SYS_accept4,
            libc::SYS_memfd_create,
            libc::SYS_clone,
            libc::SYS_dup,
            // a worker enters its queue's locked-down ring; it makes and changes none
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
        ] {
            assert!(
                !worker.contains_key(&fresh_descriptors),
                "{fresh_descriptors}"
            );
        }
        let guest = allowlist(Profile::ProcessGuest).unwrap();
        assert!(!guest.contains_key(&libc::SYS_accept4));
        assert!(allowlist(Profile::DriverDomain)
            .unwrap()
            .contains_key(&libc::SYS_accept4));
    }
}
