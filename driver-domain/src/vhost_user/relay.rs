//! Relaying an already-connected vhost-user stream into a private listener.
//!
//! vhost-user-backend 0.24 starts a session only by accepting on a `Listener`. To serve a
//! stream that a toolstack connected and handed over, we bind a listener in a fresh 0700
//! directory, connect to it ourselves, let the daemon accept, and copy bytes and passed file
//! descriptors (SCM_RIGHTS) between the handed-over stream and our side. Only vhost-user
//! control messages cross the relay; memory and eventfds are used directly by the backend.

use std::io::{IoSlice, IoSliceMut};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use log::debug;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use thiserror::Error;
use vhost::vhost_user::Listener;

/// Errors of the relay.
#[derive(Debug, Error)]
pub enum RelayError {
    /// Creating the private directory, listener or connection failed.
    #[error("cannot set up the relay: {0}")]
    Setup(String),
    /// The daemon did not accept the relayed connection.
    #[error("the vhost-user daemon did not start: {0}")]
    Start(String),
}

/// A running relay thread.
#[derive(Debug)]
pub struct Relay {
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Wait for the relay to end (it ends when either side closes).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bind a private listener, connect to it, call `start` (which must accept exactly one
/// connection on it), then relay between `outer` and the accepted connection.
pub fn relay_to_listener<F>(outer: UnixStream, start: F) -> Result<Relay, RelayError>
where
    F: FnOnce(&mut Listener) -> Result<(), RelayError>,
{
    let template = std::env::temp_dir().join("splitvmm-relay-XXXXXX");
    let dir: PathBuf =
        nix::unistd::mkdtemp(&template).map_err(|e| RelayError::Setup(e.to_string()))?;
    let path = dir.join("sock");
    let cleanup = |dir: &PathBuf, path: &PathBuf| {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir(dir);
    };
    let mut listener = match Listener::new(&path, true) {
        Ok(l) => l,
        Err(e) => {
            cleanup(&dir, &path);
            return Err(RelayError::Setup(e.to_string()));
        }
    };
    let inner = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            cleanup(&dir, &path);
            return Err(RelayError::Setup(e.to_string()));
        }
    };
    let started = start(&mut listener);
    drop(listener);
    cleanup(&dir, &path);
    started?;
    let thread = std::thread::Builder::new()
        .name("blk-relay".into())
        .spawn(move || relay_loop(&outer, &inner))
        .map_err(|e| RelayError::Setup(e.to_string()))?;
    Ok(Relay {
        thread: Some(thread),
    })
}

const MAX_FDS: usize = 32;

/// Copy one chunk (with its fds) from `from` to `to`; false at end of stream or on error.
fn forward(from: RawFd, to: RawFd, buf: &mut [u8]) -> bool {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(from, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => return true,
            Err(e) => {
                debug!("relay: recvmsg: {e}");
                return false;
            }
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed `fd` in this process for us;
                        // nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return false;
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0usize;
    while sent < len {
        let iov = [IoSlice::new(&buf[sent..len])];
        let rights = [ControlMessage::ScmRights(&raw)];
        let cm: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(to, &iov, cm, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::Error::EINTR) => {}
            Err(e) => {
                debug!("relay: sendmsg: {e}");
                return false;
            }
        }
    }
    true
}

fn relay_loop(outer: &UnixStream, inner: &UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (o_ready, i_ready) = {
            let mut fds = [
                PollFd::new(outer.as_fd(), PollFlags::POLLIN),
                PollFd::new(inner.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => break,
            }
            let r = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (r(&fds[0]), r(&fds[1]))
        };
        if o_ready && !forward(outer.as_raw_fd(), inner.as_raw_fd(), &mut buf) {
            break;
        }
        if i_ready && !forward(inner.as_raw_fd(), outer.as_raw_fd(), &mut buf) {
            break;
        }
    }
    let _ = outer.shutdown(Shutdown::Both);
    let _ = inner.shutdown(Shutdown::Both);
}
