//! Starting a domain process in its own namespaces (the toolstack's side).
//!
//! `std::process::Command` forks with `fork`/`vfork`; a process that is to be pid 1 of its own
//! pid namespace must be created by `clone(CLONE_NEWPID)`. So this forks with the raw `clone`
//! system call (fork semantics: the child continues here, on a copy of the address space),
//! and the child, which may only make async-signal-safe calls in a multi-threaded parent,
//! moves its descriptors into place and `execve`s. Every allocation happens before the fork.
//! An `execve` that fails is reported through a close-on-exec pipe.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Errors of starting a process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0:?} holds a NUL byte")]
    Nul(OsString),
    #[error("at most {MAX_HANDED} descriptors can be handed over")]
    TooManyFds,
    #[error("creating the exec status pipe")]
    Pipe(#[source] std::io::Error),
    #[error("clone")]
    Clone(#[source] std::io::Error),
    #[error("executing {program}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// The most descriptors a child can be handed.
pub const MAX_HANDED: usize = 16;

/// The namespaces a confined domain process is created in: its own pid namespace (it is pid
/// 1 there), mount namespace (it builds a minimal root in it), IPC, network (it has no
/// interface but loopback: everything it reaches comes as a descriptor) and UTS namespaces.
pub const DOMAIN_NAMESPACES: libc::c_int = libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS;

/// What to start.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    /// argv[1..].
    pub args: Vec<OsString>,
    /// The whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// Standard output and error (inherited when `None`).
    pub output: Option<(&'a OwnedFd, &'a OwnedFd)>,
    /// Handed over as fds 3, 4, ...; everything else above 2 is closed at exec.
    pub fds: &'a [OwnedFd],
    /// `clone` namespace flags (0, or [`DOMAIN_NAMESPACES`]).
    pub namespaces: libc::c_int,
    /// Signals to unblock in the child (the parent may block termination signals for sigwait).
    pub unblock: libc::sigset_t,
    /// The signal the child gets when the forking thread dies (PR_SET_PDEATHSIG).
    pub parent_death_signal: libc::c_int,
    /// A cgroup's `cgroup.procs`, open for writing: the child enters that group before exec.
    pub cgroup_procs: Option<&'a OwnedFd>,
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul(s.to_owned()))
}

/// The first handed descriptor number.
pub const FIRST_HANDED_FD: RawFd = 3;

/// Starts `spec`; returns the child's pid (in the caller's pid namespace) once it has
/// executed the program.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<libc::pid_t, SpawnError> {
    if spec.fds.len() > MAX_HANDED {
        return Err(SpawnError::TooManyFds);
    }
    let program = cstring(spec.program.as_os_str())?;
    let mut argv_owned = vec![program.clone()];
    for a in &spec.args {
        argv_owned.push(cstring(a)?);
    }
    let mut envp_owned = Vec::with_capacity(spec.env.len());
    for (k, v) in &spec.env {
        let mut kv = k.clone();
        kv.push("=");
        kv.push(v);
        envp_owned.push(cstring(&kv)?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_owned.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut handed = [0 as RawFd; MAX_HANDED];
    for (slot, fd) in handed.iter_mut().zip(spec.fds) {
        *slot = fd.as_raw_fd();
    }
    let count = spec.fds.len();
    let output = spec.output.map(|(o, e)| (o.as_raw_fd(), e.as_raw_fd()));
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: `pipe` is an array of two descriptors, as pipe2 expects.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(SpawnError::Pipe(std::io::Error::last_os_error()));
    }
    let (status_read, status_write) = (pipe[0], pipe[1]);
    let flags = libc::c_ulong::try_from(spec.namespaces | libc::SIGCHLD).unwrap_or(0);
    // SAFETY: clone without CLONE_VM and a null stack behaves as fork: the child gets a copy
    // of the address space and continues here. It runs only `child_exec`, which makes only
    // async-signal-safe system calls on data prepared above and never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid == 0 {
        // SAFETY: in the child; everything `child_exec` reads was built before the fork.
        unsafe {
            child_exec(ChildArgs {
                program: program.as_ptr(),
                argv: argv.as_ptr(),
                envp: envp.as_ptr(),
                handed: &handed[..count],
                output,
                status_write,
                unblock: &spec.unblock,
                parent_death_signal: spec.parent_death_signal,
                cgroup_procs: spec.cgroup_procs.map(|f| f.as_raw_fd()),
            })
        }
    }
    // SAFETY: the write end is ours; the child has its own copy.
    unsafe { libc::close(status_write) };
    if pid < 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: the read end is ours and closed once.
        unsafe { libc::close(status_read) };
        return Err(SpawnError::Clone(err));
    }
    let pid = libc::pid_t::try_from(pid).unwrap_or(-1);
    let mut errno = [0u8; 4];
    let read = loop {
        // SAFETY: reads at most 4 bytes into `errno`.
        let n = unsafe { libc::read(status_read, errno.as_mut_ptr().cast(), errno.len()) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    // SAFETY: the read end is ours and closed once.
    unsafe { libc::close(status_read) };
    if read == 4 {
        let mut status = 0;
        // SAFETY: reaps the child that failed to execute; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(SpawnError::Exec {
            program: spec.program.display().to_string(),
            source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
        });
    }
    Ok(pid)
}

struct ChildArgs<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    handed: &'a [RawFd],
    output: Option<(RawFd, RawFd)>,
    status_write: RawFd,
    unblock: &'a libc::sigset_t,
    parent_death_signal: libc::c_int,
    cgroup_procs: Option<RawFd>,
}

/// Reports errno on the status pipe and exits: the child's end when a step fails.
///
/// # Safety
/// Child only (async-signal-safe calls).
unsafe fn fail(status_write: RawFd) -> ! {
    // SAFETY: reading errno and writing 4 bytes from a local array are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(status_write, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// The child between clone and exec: async-signal-safe calls only, no allocation.
///
/// # Safety
/// Must run only in the child of [`spawn`]'s clone, with pointers valid there.
unsafe fn child_exec(a: ChildArgs<'_>) -> ! {
    // SAFETY: (whole body) plain system calls on descriptors and pointers prepared before
    // the fork; on failure the errno goes to the status pipe and the child exits.
    unsafe {
        // Into its cgroup first, so it runs under its limits from its first instruction.
        if let Some(procs) = a.cgroup_procs {
            if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                fail(a.status_write);
            }
        }
        if let Some((out, err)) = a.output {
            if libc::dup2(out, 1) < 0 || libc::dup2(err, 2) < 0 {
                fail(a.status_write);
            }
        }
        // Move the sources out of the way first, so a source numbered like a target is not
        // clobbered, then into place (dup2 clears FD_CLOEXEC: exactly these survive exec).
        let mut moved = [0 as RawFd; MAX_HANDED];
        for (i, fd) in a.handed.iter().enumerate() {
            let copy = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
            if copy < 0 {
                fail(a.status_write);
            }
            moved[i] = copy;
        }
        let mut target = FIRST_HANDED_FD;
        for fd in moved.iter().take(a.handed.len()) {
            if libc::dup2(*fd, target) < 0 {
                fail(a.status_write);
            }
            target += 1;
        }
        // Everything else closes at exec, including descriptors inherited without
        // FD_CLOEXEC (a jobserver pipe, say), but the status pipe stays open until then.
        let first = libc::c_uint::try_from(target).unwrap_or(libc::c_uint::MAX);
        if libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            fail(a.status_write);
        }
        if a.parent_death_signal != 0
            && libc::prctl(libc::PR_SET_PDEATHSIG, a.parent_death_signal) < 0
        {
            fail(a.status_write);
        }
        if libc::sigprocmask(libc::SIG_UNBLOCK, a.unblock, std::ptr::null_mut()) < 0 {
            fail(a.status_write);
        }
        libc::execve(a.program, a.argv, a.envp);
        fail(a.status_write)
    }
}
