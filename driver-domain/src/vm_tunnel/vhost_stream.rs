//! Whole vhost-user messages, with their descriptors, on the tunnel's end of a channel's
//! socketpair (the backend session has the other end): a message goes out in one `sendmsg`
//! with its descriptors attached to its first byte, as a frontend sends it; one comes back as
//! its 12-byte header, then the body the header announces.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use ipc::tunnel::vhost_msg::{MsgHeader, HEADER_LEN};
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use thiserror::Error;
use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};

/// Errors of the message stream.
#[derive(Debug, Error)]
pub enum VhostStreamError {
    /// The socket failed.
    #[error("vhost-user socket: {0}")]
    Io(#[source] Errno),
    /// The peer closed the connection in the middle of a message.
    #[error("the backend closed its socket in the middle of a message")]
    Partial,
    /// The header announces a body over vhost-user's maximum.
    #[error("message body of {0} bytes over the vhost-user maximum")]
    TooLong(usize),
    /// More descriptors came than a message may carry (some were lost).
    #[error("descriptors truncated")]
    Truncated,
}

/// One vhost-user message: header and body, and the descriptors that came with it.
#[derive(Debug, Default)]
pub struct VhostMessage {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Sends `bytes` (one whole message) with `fds` attached to its first byte.
pub fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<(), VhostStreamError> {
    let mut sent = 0;
    while sent < bytes.len() {
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&bytes[sent..])],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(VhostStreamError::Io(e)),
        }
    }
    Ok(())
}

/// Reads into `buf` completely, collecting descriptors; `Ok(false)` on a clean end of stream
/// before the first byte.
fn read_full(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<bool, VhostStreamError> {
    let mut got = 0;
    let mut space = nix::cmsg_space!([RawFd; MAX_ATTACHED_FD_ENTRIES]);
    while got < buf.len() {
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) if got == 0 => return Ok(false),
            Err(e) => return Err(VhostStreamError::Io(e)),
        };
        for cmsg in msg.cmsgs().map_err(VhostStreamError::Io)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for this message
                    // (SCM_RIGHTS); nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(VhostStreamError::Truncated);
        }
        if msg.bytes == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(VhostStreamError::Partial)
            };
        }
        got += msg.bytes;
    }
    Ok(true)
}

/// The next whole message, or `None` when the peer closed the connection between messages.
pub fn recv(stream: &UnixStream) -> Result<Option<VhostMessage>, VhostStreamError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    if !read_full(stream, &mut header, &mut fds)? {
        return Ok(None);
    }
    let body = MsgHeader::body_len(&header);
    if body > MAX_MSG_SIZE {
        return Err(VhostStreamError::TooLong(body));
    }
    let mut bytes = vec![0u8; HEADER_LEN + body];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    if body > 0 && !read_full(stream, &mut bytes[HEADER_LEN..], &mut fds)? {
        return Err(VhostStreamError::Partial);
    }
    Ok(Some(VhostMessage { bytes, fds }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ipc::tunnel::vhost_msg::encode_message;
    use std::io::Write;

    #[test]
    fn a_message_and_its_descriptors_cross_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let msg = encode_message(12, 0, &5u64.to_le_bytes());
        send(&a, &msg, &[f.as_raw_fd()]).unwrap();
        let got = recv(&b).unwrap().unwrap();
        assert_eq!(got.bytes, msg);
        assert_eq!(got.fds.len(), 1);
        // Two messages back to back stay apart; a body-less one too.
        let empty = encode_message(3, 0, &[]);
        send(&a, &empty, &[]).unwrap();
        send(&a, &msg, &[]).unwrap();
        assert_eq!(recv(&b).unwrap().unwrap().bytes, empty);
        let second = recv(&b).unwrap().unwrap();
        assert_eq!((second.bytes, second.fds.len()), (msg, 0));
        drop(a);
        assert!(
            recv(&b).unwrap().is_none(),
            "closed between messages: the end"
        );
    }

    #[test]
    fn a_cut_message_or_an_oversized_body_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let msg = encode_message(1, 0, &[0u8; 8]);
        a.write_all(&msg[..15]).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(VhostStreamError::Partial)));
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut header = encode_message(1, 0, &[]);
        header[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_ne_bytes());
        a.write_all(&header).unwrap();
        assert!(matches!(recv(&b), Err(VhostStreamError::TooLong(_))));
    }
}
