//! Reading a frontend's vhost-user messages off its socket: the 12-byte header with the fds
//! that came with it (SCM_RIGHTS), then the body the header announces. Writing the driver
//! VM's replies back (they carry no fds).

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ipc::tunnel::vhost_msg::{MsgHeader, HEADER_LEN};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::eventfd::EventFd;

/// Why no message came.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("stopped")]
    Stopped,
    #[error("message body of {0} bytes over the vhost-user maximum")]
    TooLong(usize),
    #[error("more than {MAX_ATTACHED_FD_ENTRIES} fds, or fds cut off")]
    Fds,
    #[error("socket: {0}")]
    Io(Errno),
}

/// One message from the frontend: header + body, and its fds in order.
#[derive(Debug)]
pub struct Incoming {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// How a blocked reader learns that it must stop: a flag, and an eventfd that becomes
/// readable (and stays so) when the flag is set. Waiting costs no wake-ups.
#[derive(Debug)]
pub struct Stop {
    pub flag: Arc<AtomicBool>,
    pub wake: EventFd,
}

impl Stop {
    pub fn new(flag: Arc<AtomicBool>) -> std::io::Result<Self> {
        Ok(Self {
            flag,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Sets the flag and wakes every waiter.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // Nobody reads it: it stays readable.
        let _ = self.wake.write(1);
    }

    pub fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits until `fd` is readable (true) or the stop is set (false).
    pub fn wait_readable(&self, fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        loop {
            if self.stopped() {
                return Ok(false);
            }
            // SAFETY: the eventfd lives as long as `self`, past this call.
            let wake = unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) };
            let mut pfd = [
                PollFd::new(fd, PollFlags::POLLIN),
                PollFd::new(wake, PollFlags::POLLIN),
            ];
            match poll(&mut pfd, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let ready = |p: &PollFd<'_>| {
                p.revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                })
            };
            if ready(&pfd[1]) || self.stopped() {
                return Ok(false);
            }
            if ready(&pfd[0]) {
                return Ok(true);
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes, collecting fds, until `stop`.
fn read_full(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    stop: &Stop,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        if !stop.wait_readable(stream.as_fd()).map_err(WireError::Io)? {
            return Err(WireError::Stopped);
        }
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_ATTACHED_FD_ENTRIES]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
            Err(Errno::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        };
        for cmsg in msg.cmsgs().map_err(WireError::Io)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process (SCM_RIGHTS);
                    // nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(WireError::Fds);
        }
        if msg.bytes == 0 {
            return Err(WireError::Closed);
        }
        got += msg.bytes;
    }
    Ok(())
}

/// Reads the next whole message; fds that came with it are owned (closed on drop) whatever
/// becomes of it.
pub fn read_message(stream: &UnixStream, stop: &Stop) -> Result<Incoming, WireError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    read_full(stream, &mut header, &mut fds, stop)?;
    let len = MsgHeader::body_len(&header);
    if len > MAX_MSG_SIZE {
        return Err(WireError::TooLong(len));
    }
    let mut bytes = vec![0u8; HEADER_LEN + len];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    read_full(stream, &mut bytes[HEADER_LEN..], &mut fds, stop)?;
    Ok(Incoming { bytes, fds })
}

/// Writes a message to the frontend, with `fd` attached to its first byte (the in-flight log
/// of a GET_INFLIGHT_FD reply). The socket has a write timeout: a frontend that does not read
/// fails its channel, not the relay.
pub fn write_message(
    mut stream: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let Some(fd) = fd else {
        return stream.write_all(bytes);
    };
    let raw = [fd.as_raw_fd()];
    let rights = [ControlMessage::ScmRights(&raw)];
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &rights,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    stream.write_all(&bytes[sent..])
}
