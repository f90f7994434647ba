//! Confinement of splitvmm's domain processes: the driver domain, process guests and VMMs.
//!
//! The toolstack starts each domain process with [`spawn`] in its own pid, mount, IPC,
//! network and UTS namespaces (the process is pid 1 of its pid namespace) and with a [`Plan`]
//! in its environment: its own unprivileged uid and gid. The process, once it holds every
//! descriptor it needs (they are handed to it, or opened before this point) and before it
//! starts a thread or reads any guest data, calls [`enter`]:
//!
//! 1. a mount namespace of its own with a minimal, read-only root (`mounts`): `/dev/null`,
//!    `/dev/zero`, `/dev/full`, `/dev/urandom`, its own `/proc`, nothing else;
//! 2. resource limits (`limits`): its threads bounded (RLIMIT_NPROC counts its own uid's), no
//!    locked memory, no core dumps;
//! 3. no supplementary groups, its own gid and uid, no capabilities in any set (the bounding
//!    set emptied), no_new_privs (`privileges`);
//! 4. Landlock (`filesystem`): nothing opened by path but the files it was handed to read, no
//!    TCP, no abstract sockets or signals outside its sandbox (where the kernel has it);
//! 5. a seccomp allowlist for its kind of process (`seccomp`), with clone3 answered ENOSYS.
//!
//! This crate depends on no other crate of the workspace: it is used by all the binaries.

pub mod cgroup;
mod filesystem;
mod limits;
mod mounts;
pub mod plan;
mod privileges;
pub mod probe;
pub mod seccomp;
pub mod spawn;
pub mod support;

use std::os::fd::BorrowedFd;

pub use filesystem::Enforced;
pub use mounts::RootSwitch;
pub use plan::{Feature, Plan, Profile};
pub use privileges::{keep_only as keep_only_capabilities, PrivilegeError};
pub use spawn::{spawn, SpawnSpec, DOMAIN_NAMESPACES};

/// Why a domain process could not be confined (it must then not run).
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{0} threads are running; confinement must come before the first thread")]
    Threads(usize),
    #[error("not pid 1 of a pid namespace of its own (pid {0}): start it with `splitvmm up`")]
    NotInPidNamespace(u32),
    #[error("unsharing namespaces")]
    Unshare(#[source] nix::Error),
    #[error("building the minimal root")]
    Mounts(#[from] mounts::MountError),
    #[error("dropping privileges")]
    Privileges(#[from] privileges::PrivilegeError),
    #[error("landlock")]
    Landlock(#[from] filesystem::LandlockError),
    #[error("this kernel has no Landlock; the host file may allow that with `[confinement] allow_missing = [\"landlock\"]`")]
    NoLandlock,
    #[error("seccomp")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("resource limits")]
    Limits(#[from] limits::LimitError),
    #[error("installing the termination handlers of pid 1")]
    Signals(#[source] nix::Error),
}

/// How a process was confined, for its start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confined {
    pub root: RootSwitch,
    pub landlock: Enforced,
}

/// Set once this process is confined.
static CONFINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process confined itself ([`enter`], [`enter_standalone`]): threads with a
/// class of their own narrow their filter then ([`seccomp::restrict_thread`]).
pub fn is_confined() -> bool {
    CONFINED.load(std::sync::atomic::Ordering::Acquire)
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

extern "C" fn exit_on_termination(signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + signal) }
}

/// The kernel drops signals to a pid namespace's init that it has no handler for (SIGKILL
/// from outside excepted): give SIGTERM, SIGINT and SIGHUP the default action's effect where
/// the program has not taken them over (a program that blocks them for `sigwait` still gets
/// them queued, blocked signals are never dropped).
fn terminate_on_signals_as_pid_1() -> Result<(), ConfineError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(exit_on_termination),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only calls _exit, which is async-signal-safe.
        let old = unsafe { sigaction(signal, &action) }.map_err(ConfineError::Signals)?;
        if old.handler() != SigHandler::SigDfl {
            // SAFETY: puts back the handler that was there.
            unsafe { sigaction(signal, &old) }.map_err(ConfineError::Signals)?;
        }
    }
    Ok(())
}

/// Confines the calling process as `plan` and `profile` say. `read_only` are files it may
/// still open by path (through `/proc/self/fd/N`) for reading: a kernel, an initrd.
///
/// Must be called before the process starts any thread. On error the process must exit.
pub fn enter(
    plan: &Plan,
    profile: Profile,
    read_only: &[BorrowedFd<'_>],
) -> Result<Confined, ConfineError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ConfineError::Threads(threads));
    }
    let pid = std::process::id();
    if pid != 1 {
        return Err(ConfineError::NotInPidNamespace(pid));
    }
    terminate_on_signals_as_pid_1()?;
    use nix::sched::CloneFlags;
    // Never touch the mounts of a namespace shared with anyone: make sure this one is ours.
    confine_self(
        plan,
        profile,
        read_only,
        CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC,
    )
}

/// Confines a backend run by hand (`driver-domain serve --confine-uid`), which no toolstack
/// started in namespaces: it unshares its own mount, IPC, UTS and network namespaces (its
/// sockets are bound already) but stays in the host's pid namespace (it would have to fork to
/// leave it). Everything else is as [`enter`].
pub fn enter_standalone(plan: &Plan, profile: Profile) -> Result<Confined, ConfineError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ConfineError::Threads(threads));
    }
    use nix::sched::CloneFlags;
    confine_self(
        plan,
        profile,
        &[],
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
}

fn confine_self(
    plan: &Plan,
    profile: Profile,
    read_only: &[BorrowedFd<'_>],
    unshare: nix::sched::CloneFlags,
) -> Result<Confined, ConfineError> {
    nix::sched::unshare(unshare).map_err(ConfineError::Unshare)?;
    let root = mounts::enter_minimal_root()?;
    limits::apply(profile, plan.memlock)?;
    privileges::drop_to(plan.uid, plan.gid)?;
    let landlock = filesystem::restrict(read_only)?;
    if landlock == Enforced::Not {
        if !plan.allows_missing(Feature::Landlock) {
            return Err(ConfineError::NoLandlock);
        }
        log::warn!(
            "{profile}: this kernel has no Landlock; running without it as the host file allows"
        );
    }
    seccomp::install(profile)?;
    CONFINED.store(true, std::sync::atomic::Ordering::Release);
    log::info!(
        "{profile}: confined as uid {} gid {} ({root:?}, landlock {landlock:?}, seccomp on)",
        plan.uid,
        plan.gid
    );
    Ok(Confined { root, landlock })
}

/// [`enter`] if the toolstack asked for confinement ([`plan::ENV`] is set); `Ok(None)` when it
/// did not (a domain binary run by a test or by hand).
pub fn enter_if_planned(
    profile: Profile,
    read_only: &[BorrowedFd<'_>],
) -> Result<Option<Confined>, String> {
    match Plan::from_env() {
        Ok(Some(plan)) => enter(&plan, profile, read_only)
            .map(Some)
            .map_err(|e| error_chain(&e)),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// `e` and its sources, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
