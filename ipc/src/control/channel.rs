//! A message channel between domains that carries file descriptors.
//!
//! Each message is one `SOCK_SEQPACKET` datagram: a postcard-encoded [`Envelope`] holding a
//! protocol version and the body, plus at most [`MAX_FDS`] descriptors in one `SCM_RIGHTS`
//! control message. Datagram boundaries mean a peer can never desynchronise the framing, and
//! a datagram larger than [`MAX_MESSAGE`] or carrying more descriptors than allowed is
//! reported as truncated rather than half-read.
//!
//! Decoding is bounded: the buffer is at most [`MAX_MESSAGE`] bytes, postcard never allocates
//! more than the input can describe, and trailing bytes are an error.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, socketpair, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the control protocol; a peer speaking another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest encoded message accepted, in bytes.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 8;

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("control socket I/O")]
    Io(#[source] Errno),
    #[error("peer closed the control channel")]
    Closed,
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("message carries {0} descriptors, more than {MAX_FDS}")]
    TooManyFds(usize),
    #[error("message or its descriptors were truncated by the kernel")]
    Truncated,
    #[error("peer speaks control protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("malformed message")]
    Decode(#[source] postcard::Error),
    #[error("encoding message")]
    Encode(#[source] postcard::Error),
}

/// What goes on the wire: the version first, so any future layout can still be refused cleanly.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u16,
    body: T,
}

/// A connected, message-oriented control channel.
#[derive(Debug)]
pub struct ControlChannel {
    socket: OwnedFd,
}

/// For polling (readable once a message or the peer's close is there).
impl AsFd for ControlChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl ControlChannel {
    /// Two connected ends, both close-on-exec.
    pub fn pair() -> Result<(ControlChannel, ControlChannel), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ChannelError::Io)?;
        Ok((ControlChannel { socket: a }, ControlChannel { socket: b }))
    }

    /// Connects to a [`ControlListener`] at `path`.
    pub fn connect(path: &Path) -> Result<ControlChannel, ChannelError> {
        let socket = seqpacket_socket()?;
        let addr = UnixAddr::new(path).map_err(ChannelError::Io)?;
        connect(socket.as_raw_fd(), &addr).map_err(ChannelError::Io)?;
        Ok(ControlChannel { socket })
    }

    /// Wraps an already connected `SOCK_SEQPACKET` socket (for example one inherited by a
    /// child process).
    pub fn from_fd(socket: OwnedFd) -> ControlChannel {
        ControlChannel { socket }
    }

    /// Sends `body` with `fds` attached.
    pub fn send<T: Serialize>(&self, body: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds(fds.len()));
        }
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            body,
        };
        let bytes = postcard::to_allocvec(&envelope).map_err(ChannelError::Encode)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(bytes.len()));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
        let iov = [IoSlice::new(&bytes)];
        loop {
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(ChannelError::Closed),
                Err(e) => return Err(ChannelError::Io(e)),
            }
        }
    }

    /// Receives one message and the descriptors that came with it. Descriptors are owned
    /// (and closed on drop) even when the message itself is rejected.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        self.receive(MsgFlags::empty())?.ok_or(ChannelError::Closed)
    }

    /// Like [`ControlChannel::recv`], but waits at most `timeout`; `None` if nothing came.
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.try_recv()? {
                return Ok(Some(message));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(ChannelError::Io(e)),
            }
        }
    }

    /// Like [`ControlChannel::recv`], but returns `None` at once when no message is waiting.
    pub fn try_recv<T: DeserializeOwned>(&self) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
        self.receive(MsgFlags::MSG_DONTWAIT)
    }

    fn receive<T: DeserializeOwned>(
        &self,
        flags: MsgFlags,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC | flags,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for cmsg in msg.cmsgs().map_err(ChannelError::Io)? {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            for fd in raw {
                                // SAFETY: the kernel just installed `fd` in this process for us
                                // (SCM_RIGHTS); nothing else owns it, so taking ownership is sound.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                    let truncated = msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    break (msg.bytes, fds, truncated);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::ECONNRESET) => return Err(ChannelError::Closed),
                Err(e) => return Err(ChannelError::Io(e)),
            }
        };
        if truncated {
            return Err(ChannelError::Truncated);
        }
        if len == 0 {
            return Err(ChannelError::Closed);
        }
        let envelope: Envelope<T> = decode(&buf[..len])?;
        Ok(Some((envelope.body, fds)))
    }

    /// The socket, for polling.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Gives the socket up, for example to hand it to a child process.
    pub fn into_fd(self) -> OwnedFd {
        self.socket
    }
}

fn seqpacket_socket() -> Result<OwnedFd, ChannelError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(ChannelError::Io)
}

/// A listening control socket at a path, for management clients (the toolstack's
/// `block-attach`, `block-detach`). Only processes that can reach the path connect; the
/// directory's permissions decide who that is.
#[derive(Debug)]
pub struct ControlListener {
    socket: OwnedFd,
}

impl ControlListener {
    /// Binds and listens at `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<ControlListener, ChannelError> {
        let socket = seqpacket_socket()?;
        let _ = std::fs::remove_file(path);
        let addr = UnixAddr::new(path).map_err(ChannelError::Io)?;
        bind(socket.as_raw_fd(), &addr).map_err(ChannelError::Io)?;
        listen(&socket, Backlog::new(8).map_err(ChannelError::Io)?).map_err(ChannelError::Io)?;
        Ok(ControlListener { socket })
    }

    /// Accepts one connection, waiting at most `timeout`.
    pub fn accept_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Option<ControlChannel>, ChannelError> {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) | Err(Errno::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(ChannelError::Io(e)),
        }
        match accept4(self.socket.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let socket = unsafe { OwnedFd::from_raw_fd(fd) };
                Ok(Some(ControlChannel { socket }))
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => Ok(None),
            Err(e) => Err(ChannelError::Io(e)),
        }
    }
}

/// Decodes an envelope, checking the version before the body so that a message of another
/// version is reported as such rather than as garbage.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Envelope<T>, ChannelError> {
    let (version, _) = postcard::take_from_bytes::<u16>(bytes).map_err(ChannelError::Decode)?;
    if version != PROTOCOL_VERSION {
        return Err(ChannelError::Version(version));
    }
    let (envelope, rest) =
        postcard::take_from_bytes::<Envelope<T>>(bytes).map_err(ChannelError::Decode)?;
    if !rest.is_empty() {
        return Err(ChannelError::Decode(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { name: String, id: u32 },
        Bytes(Vec<u8>),
    }

    #[test]
    fn message_round_trip_with_fds() {
        let (a, b) = ControlChannel::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed along").unwrap();
        let msg = Msg::Hello {
            name: "dom1".into(),
            id: 7,
        };
        a.send(&msg, &[file.as_fd()]).unwrap();
        let (got, fds): (Msg, _) = b.recv().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        let mut received = std::fs::File::from(fds.into_iter().next().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed along");
    }

    #[test]
    fn other_version_is_refused() {
        let (a, b) = ControlChannel::pair().unwrap();
        let wrong = Envelope {
            version: PROTOCOL_VERSION + 1,
            body: Msg::Bytes(vec![1, 2, 3]),
        };
        let bytes = postcard::to_allocvec(&wrong).unwrap();
        nix::sys::socket::send(a.socket.as_raw_fd(), &bytes, MsgFlags::empty()).unwrap();
        match b.recv::<Msg>() {
            Err(ChannelError::Version(v)) => assert_eq!(v, PROTOCOL_VERSION + 1),
            other => panic!("expected a version error, got {other:?}"),
        }
    }

    #[test]
    fn garbage_and_trailing_bytes_are_errors_not_panics() {
        let (a, b) = ControlChannel::pair().unwrap();
        // A valid version followed by an enum tag that does not exist.
        let mut bytes = postcard::to_allocvec(&PROTOCOL_VERSION).unwrap();
        bytes.extend_from_slice(&[0x7f, 0xff, 0xff]);
        nix::sys::socket::send(a.socket.as_raw_fd(), &bytes, MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Decode(_))));

        // A valid message with junk after it.
        let mut bytes = postcard::to_allocvec(&Envelope {
            version: PROTOCOL_VERSION,
            body: Msg::Bytes(vec![9]),
        })
        .unwrap();
        bytes.push(0);
        nix::sys::socket::send(a.socket.as_raw_fd(), &bytes, MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Decode(_))));

        // A length prefix claiming far more bytes than were sent must not allocate them.
        let mut bytes = postcard::to_allocvec(&PROTOCOL_VERSION).unwrap();
        bytes.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        nix::sys::socket::send(a.socket.as_raw_fd(), &bytes, MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Decode(_))));

        // The channel still works afterwards.
        a.send(&Msg::Bytes(vec![4]), &[]).unwrap();
        assert_eq!(b.recv::<Msg>().unwrap().0, Msg::Bytes(vec![4]));
    }

    #[test]
    fn oversized_message_is_refused_on_both_sides() {
        let (a, b) = ControlChannel::pair().unwrap();
        let big = Msg::Bytes(vec![0; MAX_MESSAGE]);
        assert!(matches!(a.send(&big, &[]), Err(ChannelError::TooLarge(_))));
        let raw = vec![0u8; MAX_MESSAGE + 100];
        nix::sys::socket::send(a.socket.as_raw_fd(), &raw, MsgFlags::empty()).unwrap();
        assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Truncated)));
    }

    #[test]
    fn too_many_fds_are_refused_by_the_sender() {
        let (a, _b) = ControlChannel::pair().unwrap();
        let files: Vec<_> = (0..MAX_FDS + 1)
            .map(|_| tempfile::tempfile().unwrap())
            .collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        assert!(matches!(
            a.send(&Msg::Bytes(vec![]), &fds),
            Err(ChannelError::TooManyFds(_))
        ));
    }

    #[test]
    fn try_recv_returns_none_when_idle() {
        let (a, b) = ControlChannel::pair().unwrap();
        assert!(b.try_recv::<Msg>().unwrap().is_none());
        a.send(&Msg::Bytes(vec![1]), &[]).unwrap();
        let (msg, fds) = b.try_recv::<Msg>().unwrap().unwrap();
        assert_eq!(msg, Msg::Bytes(vec![1]));
        assert!(fds.is_empty());
        let started = Instant::now();
        assert!(b
            .recv_timeout::<Msg>(Duration::from_millis(50))
            .unwrap()
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
        a.send(&Msg::Bytes(vec![2]), &[]).unwrap();
        let got = b.recv_timeout::<Msg>(Duration::from_secs(5)).unwrap();
        assert_eq!(got.unwrap().0, Msg::Bytes(vec![2]));
        drop(a);
        assert!(matches!(b.try_recv::<Msg>(), Err(ChannelError::Closed)));
    }

    #[test]
    fn listener_accepts_path_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = ControlListener::bind(&path).unwrap();
        assert!(listener
            .accept_timeout(Duration::from_millis(10))
            .unwrap()
            .is_none());
        let client = ControlChannel::connect(&path).unwrap();
        let server = listener
            .accept_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap();
        client.send(&Msg::Bytes(vec![5]), &[]).unwrap();
        assert_eq!(server.recv::<Msg>().unwrap().0, Msg::Bytes(vec![5]));
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = ControlChannel::pair().unwrap();
        drop(a);
        assert!(matches!(b.recv::<Msg>(), Err(ChannelError::Closed)));
    }
}
