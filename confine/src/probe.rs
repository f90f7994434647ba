//! Denial probes: what a confined domain tries and must not be able to do. Each domain
//! binary runs them, under its own confinement, from a hidden command (`driver-domain
//! confinement-probe`, `process-guest --confinement-probe`), so the tests judge the very
//! confinement each domain gets, from outside: one line per probe on stdout, `denied: why`
//! or `ALLOWED`, and the process's end (a forbidden system call kills it with SIGSYS).

use std::io::Read;
use std::os::unix::net::UnixStream;

/// One probe, as written on the command line (`open:PATH`, `connect:PATH`, `mem:PID`,
/// `process-vm-readv:PID`, `forbidden-syscall`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Open a file by path for reading (a guest's image).
    Open(String),
    /// Connect to a Unix socket by path (the store, another guest's console).
    Connect(String),
    /// Read another process's memory through `/proc/PID/mem`.
    Mem(u32),
    /// Read another process's memory with process_vm_readv (not in any allowlist: kills).
    ProcessVmReadv(u32),
    /// A system call outside the allowlist (ptrace): kills.
    ForbiddenSyscall,
    /// `clone3`, which must fail with ENOSYS (so that glibc falls back to `clone`); without
    /// the filter, its empty arguments get EINVAL instead.
    Clone3,
}

/// Errors of reading a probe.
#[derive(Debug, thiserror::Error)]
#[error("unknown probe `{0}` (open:PATH, connect:PATH, mem:PID, process-vm-readv:PID, forbidden-syscall, clone3)")]
pub struct ProbeError(String);

impl std::str::FromStr for Probe {
    type Err = ProbeError;
    fn from_str(s: &str) -> Result<Probe, ProbeError> {
        let bad = || ProbeError(s.to_owned());
        let pid = |v: &str| v.parse::<u32>().map_err(|_| bad());
        match s.split_once(':') {
            Some(("open", path)) => Ok(Probe::Open(path.to_owned())),
            Some(("connect", path)) => Ok(Probe::Connect(path.to_owned())),
            Some(("mem", p)) => Ok(Probe::Mem(pid(p)?)),
            Some(("process-vm-readv", p)) => Ok(Probe::ProcessVmReadv(pid(p)?)),
            None if s == "forbidden-syscall" => Ok(Probe::ForbiddenSyscall),
            None if s == "clone3" => Ok(Probe::Clone3),
            _ => Err(bad()),
        }
    }
}

fn outcome(r: std::io::Result<()>) -> Result<(), String> {
    match r {
        Ok(()) => Err("ALLOWED".to_owned()),
        Err(e) => Ok(format!("denied: {e}")).map(|line| println!("{line}")),
    }
}

/// Runs one probe; `Err` if it was allowed.
pub fn run(probe: &Probe) -> Result<(), String> {
    print!("{probe:?}: ");
    match probe {
        Probe::Open(path) => outcome(std::fs::File::open(path).and_then(|mut f| {
            let mut byte = [0u8; 1];
            f.read(&mut byte).map(drop)
        })),
        Probe::Connect(path) => outcome(UnixStream::connect(path).map(drop)),
        Probe::Mem(pid) => outcome(std::fs::File::open(format!("/proc/{pid}/mem")).and_then(
            |mut f| {
                let mut byte = [0u8; 1];
                f.read(&mut byte).map(drop)
            },
        )),
        Probe::ProcessVmReadv(pid) => {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let mut byte = 0u8;
            let local = libc::iovec {
                iov_base: (&mut byte as *mut u8).cast(),
                iov_len: 1,
            };
            let remote = libc::iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: 1,
            };
            let pid = libc::pid_t::try_from(*pid).unwrap_or(0);
            // SAFETY: one local iovec pointing at `byte`; the remote address is only read
            // by the kernel in the other process (if it allowed the call at all).
            let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            outcome(if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            })
        }
        Probe::Clone3 => {
            // SAFETY: clone3 with a null argument block and size 0 creates nothing: the
            // filter answers ENOSYS, an unfiltered kernel EINVAL.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
            let err = std::io::Error::last_os_error();
            if rc < 0 && err.raw_os_error() == Some(libc::ENOSYS) {
                println!("denied: {err}");
                Ok(())
            } else {
                Err(format!("ALLOWED (not ENOSYS: {rc}, {err})"))
            }
        }
        Probe::ForbiddenSyscall => {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            // SAFETY: PTRACE_TRACEME takes no pointers; a confined process never gets here
            // alive (the filter kills it), an unconfined one just becomes traceable.
            let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            outcome(if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            })
        }
    }
}

/// Runs every probe (all of them, even after one was allowed); false if any was allowed.
pub fn run_all(probes: &[Probe]) -> bool {
    let mut all_denied = true;
    for probe in probes {
        if let Err(what) = run(probe) {
            println!("{what}");
            all_denied = false;
        }
    }
    all_denied
}

/// The hidden probe command of a domain binary: confines this process as `profile` (the plan
/// must be in the environment, as the toolstack puts it) and runs `probes`. Exit status 0 if
/// every probe was denied, 1 if one was allowed, 2 if the process could not be confined.
pub fn main(profile: crate::Profile, probes: &[String]) -> i32 {
    let parsed: Result<Vec<Probe>, ProbeError> = probes.iter().map(|p| p.parse()).collect();
    let probes = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    match crate::enter_if_planned(profile, &[]) {
        Ok(Some(_)) => {}
        Ok(None) => {
            eprintln!(
                "confinement probes need a plan ({} is not set)",
                crate::plan::ENV
            );
            return 2;
        }
        Err(e) => {
            eprintln!("confining: {e}");
            return 2;
        }
    }
    if run_all(&probes) {
        0
    } else {
        1
    }
}
