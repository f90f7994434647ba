//! What every binary of splitvmm does first: one log format on stderr, the default SIGPIPE
//! action for the command-line tool, and, for the domain processes `splitvmm up` starts, a check that the descriptors it
//! hands them are there before they are adopted.
//!
//! One format for every process means the toolstack's stderr and the per-domain log files
//! (`<run_dir>/logs/<name>.log`) read the same way:
//! `2026-12-06T11:42:15.123Z WARN  driver[1] driver_domain::managed: message`.

use std::io::Write;
use std::os::fd::{BorrowedFd, RawFd};

use nix::sys::socket::{getsockopt, sockopt, SockType};
use nix::sys::stat::{fstat, SFlag};

use crate::control::messages::fds;

/// Exit status of an internal binary run without what `splitvmm up` hands it (as for a usage
/// error: clap also exits 2).
pub const EXIT_NOT_MANAGED: u8 = 2;

/// Starts logging to stderr in the project's one format, tagged with `who` (a program name,
/// or a domain's `name[domid]`). `RUST_LOG` filters, as env_logger does; without it,
/// `default` (`"warn"`, `"info"`) does.
pub fn init_logging(who: &str, default: &str) {
    let who = who.to_owned();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {:<5} {who} {}: {}",
                buf.timestamp_millis(),
                record.level(),
                record.target(),
                record.args()
            )
        })
        .try_init();
}

/// Restores the default action of SIGPIPE, which the Rust runtime ignores: a program whose
/// output goes to a closed pipe (`splitvmm xs ls / | head`) then ends quietly, as C tools do,
/// instead of failing with "Broken pipe".
///
/// Only for the command-line tool (`splitvmm`), whose sockets all send with MSG_NOSIGNAL. The
/// domain processes (driver domain, VMM, process guest, hardware helper) keep SIGPIPE ignored:
/// a peer that goes away mid-write (a `splitvmm console` client, a vhost-user frontend, a
/// restarted backend) is then an EPIPE for that one connection, never the end of the domain.
pub fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL installs no handler and touches no
    // memory; it runs at the start of main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Why the descriptors a domain process expects are not there.
#[derive(Debug, thiserror::Error)]
pub enum InheritedFdError {
    #[error("fd {fd} ({what}) is not open")]
    NotOpen { fd: RawFd, what: &'static str },
    #[error("fd {fd} ({what}) is not a socket")]
    NotSocket { fd: RawFd, what: &'static str },
    #[error("fd {fd} ({what}) is a socket of the wrong type ({found:?}, expected {expected:?})")]
    WrongType {
        fd: RawFd,
        what: &'static str,
        found: SockType,
        expected: SockType,
    },
}

fn check_socket(fd: RawFd, what: &'static str, expected: SockType) -> Result<(), InheritedFdError> {
    // SAFETY: F_GETFD only asks whether `fd` is open; it neither creates nor closes anything.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(InheritedFdError::NotOpen { fd, what });
    }
    // SAFETY: `fd` was just found open, and the borrow ends before this function returns; no
    // one closes it meanwhile (nothing else in the process knows of it yet).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = fstat(fd).map_err(|_| InheritedFdError::NotOpen { fd, what })?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(InheritedFdError::NotSocket { fd, what });
    }
    let found = getsockopt(&borrowed, sockopt::SockType)
        .map_err(|_| InheritedFdError::NotSocket { fd, what })?;
    if found != expected {
        return Err(InheritedFdError::WrongType {
            fd,
            what,
            found,
            expected,
        });
    }
    Ok(())
}

/// Checks that fd 3 is a stream socket (the store connection) and fd 4 a seqpacket socket (the
/// control channel), as `splitvmm up` hands them to the domains it starts. Call it before
/// adopting them: adopting a descriptor that is not there aborts the process ("IO Safety
/// violation") when it is closed.
pub fn check_inherited_fds() -> Result<(), InheritedFdError> {
    check_socket(fds::STORE, "the store connection", SockType::Stream)?;
    check_socket(fds::CONTROL, "the control channel", SockType::SeqPacket)
}

/// Checks that `fd` is a seqpacket socket (a [`crate::control::ControlChannel`] end handed
/// over at start-up, described as `what`), before it is adopted.
pub fn check_inherited_channel(fd: RawFd, what: &'static str) -> Result<(), InheritedFdError> {
    check_socket(fd, what, SockType::SeqPacket)
}

/// The message an internal binary prints when [`check_inherited_fds`] fails.
pub fn not_managed_message(program: &str, err: &InheritedFdError) -> String {
    format!(
        "{program}: {err}\n{program} is started by `splitvmm up`, which hands it its store \
         connection on fd {} and its control channel on fd {}; run `splitvmm up HOST.toml` \
         instead",
        fds::STORE,
        fds::CONTROL
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn socket_types_are_told_apart() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_socket(a.as_raw_fd(), "x", SockType::Stream).is_ok());
        assert!(matches!(
            check_socket(a.as_raw_fd(), "x", SockType::SeqPacket),
            Err(InheritedFdError::WrongType { .. })
        ));
        let file = tempfile::tempfile().unwrap();
        assert!(matches!(
            check_socket(file.as_raw_fd(), "x", SockType::Stream),
            Err(InheritedFdError::NotSocket { .. })
        ));
        // A number far above anything this test opened.
        assert!(matches!(
            check_socket(100_000, "x", SockType::Stream),
            Err(InheritedFdError::NotOpen { .. })
        ));
    }
}
