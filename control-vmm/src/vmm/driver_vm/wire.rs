//! Reading a frontend's vhost-user messages off its socket: the 12-byte header with the fds
//! that came with it (SCM_RIGHTS), then the body the header announces. Writing the driver
//! VM's replies back (they carry no fds).

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use ipc::tunnel::vhost_msg::{MsgHeader, HEADER_LEN};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};

/// How often a blocked reader looks at its stop flag.
const POLL_MS: u16 = 100;

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

/// Reads exactly `buf.len()` bytes, collecting fds, waiting while `stop` is clear.
fn read_full(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    stop: &AtomicBool,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        if stop.load(Ordering::SeqCst) {
            return Err(WireError::Stopped);
        }
        let mut pfd = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut pfd, PollTimeout::from(POLL_MS)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(WireError::Io(e)),
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
pub fn read_message(stream: &UnixStream, stop: &AtomicBool) -> Result<Incoming, WireError> {
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

/// Writes a message to the frontend (the socket has a write timeout: a frontend that does not
/// read fails its channel, not the relay).
pub fn write_message(mut stream: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes)
}
