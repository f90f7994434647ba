//! The backend's end of a vhost-user connection, watched while a frontend waits: its end
//! (a hang-up, or end of file) means the backend is gone, which no completion would ever say.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A duplicate of a session's socket, polled next to a call eventfd.
#[derive(Debug)]
pub(super) struct BackendPeer(OwnedFd);

impl BackendPeer {
    pub(super) fn new(socket: OwnedFd) -> BackendPeer {
        BackendPeer(socket)
    }

    /// The descriptor to put in a poll set.
    pub(super) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Whether poll's `revents` for this descriptor mean the backend is gone: a hang-up, an
    /// error, or readable with nothing to read (a vhost-user backend sends nothing unasked on
    /// this socket).
    pub(super) fn ended(&self, revents: libc::c_short) -> bool {
        if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
        if revents & libc::POLLIN == 0 {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: peeks at most one byte into `byte`, a valid buffer of one byte.
        let n = unsafe {
            libc::recv(
                self.raw(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
    }

    /// Polls without waiting: whether the backend is gone now.
    pub(super) fn gone_now(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r == 1 && self.ended(pfd.revents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_closed_backend_is_gone_a_live_one_is_not() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let peer = BackendPeer::new(OwnedFd::from(ours));
        assert!(!peer.gone_now(), "a connected, silent backend is not gone");
        // Data waiting is not an end of file.
        theirs.write_all(b"x").unwrap();
        assert!(!peer.gone_now());
        drop(theirs);
        // With the byte still unread, the hang-up says it.
        assert!(peer.gone_now());
    }
}
