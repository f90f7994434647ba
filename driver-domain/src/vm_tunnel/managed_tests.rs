//! The managed server on the host (`vm-serve --managed` without the child): the rig of
//! [`super::tests`] (a socketpair as the tty, the fake cross-VM device, a memfd as BAR2), and
//! the test holding the driver domain's ends of the store connection and control channel.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::Duration;

use ipc::control::messages::{BackendEvent, BackendRequest, MemoryGrant};
use ipc::control::ControlChannel;
use ipc::tunnel::vhost_msg::encode_message;
use ipc::tunnel::{Frame, FrameKind, Ref, TunnelControl, PAYLOAD_MAX};
use vhost::vhost_user::message::FrontendReq;

use super::rings::tests::mem_table;
use super::tests::{fixture_with, Fixture, GUEST_AT, GUEST_LEN, UA};
use super::vhost_stream;
use super::{Ended, ManagedLink, VmServer};

const WAIT: Duration = Duration::from_secs(10);

/// A managed server, and the driver domain's ends, held by the test.
struct Managed {
    fx: Fixture,
    store: UnixStream,
    control: ControlChannel,
    ended: mpsc::Receiver<Ended>,
}

fn managed() -> Managed {
    let (link, ends) = ManagedLink::pairs().unwrap();
    let (tx, ended) = mpsc::channel();
    let fx = fixture_with(move |device, writer, vm| {
        let mut server = VmServer::managed(device, writer, link).unwrap();
        let _ = tx.send(server.run(vm).unwrap());
    });
    Managed {
        fx,
        store: UnixStream::from(ends.store),
        control: ControlChannel::from_fd(ends.control),
        ended,
    }
}

fn request(request: BackendRequest, channel: Option<u16>) -> Frame {
    TunnelControl::Request { request, channel }
        .to_frame()
        .unwrap()
}

/// The message of a CONTROL frame.
fn control_of(f: &Frame) -> TunnelControl {
    assert_eq!((f.channel, f.kind), (0, FrameKind::Control), "{f:?}");
    TunnelControl::decode(&f.payload).unwrap()
}

fn serve_block(devid: u32, device: &str, readonly: bool) -> BackendRequest {
    BackendRequest::ServeBlock {
        frontend: 2,
        devid,
        readonly,
        grant: MemoryGrant::AllRam,
        queues: 1,
        device: Some(device.to_owned()),
    }
}

fn serve_net(devid: u32) -> BackendRequest {
    BackendRequest::ServeNet {
        frontend: 2,
        devid,
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        grant: MemoryGrant::AllRam,
        offloads: false,
    }
}

/// What the driver domain was handed next (10 s at most).
fn handed(control: &ControlChannel) -> (BackendRequest, Vec<std::os::fd::OwnedFd>) {
    control
        .recv_timeout::<BackendRequest>(WAIT)
        .unwrap()
        .expect("a request for the driver domain within 10 s")
}

/// A directory whose file system takes `O_DIRECT` (tmpfs before Linux 6.6 refuses it): the
/// temporary directory, else one in this crate's directory (the worktree's file system).
fn direct_io_dir() -> tempfile::TempDir {
    let takes_direct = |dir: &std::path::Path| {
        let probe = dir.join("probe");
        File::create(&probe).unwrap();
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok()
    };
    let dir = tempfile::tempdir().unwrap();
    if takes_direct(dir.path()) {
        return dir;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    assert!(
        takes_direct(dir.path()),
        "no file system here takes O_DIRECT"
    );
    dir
}

fn inode(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_fd().as_raw_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

#[test]
fn store_bytes_cross_both_ways_in_frames_of_at_most_the_payload_limit() {
    let mut m = managed();
    let bytes = b"\x01\x00\x00\x00 a store request".to_vec();
    m.fx.dom0.send(&Frame::store(bytes.clone()));
    let mut got = vec![0u8; bytes.len()];
    m.store.read_exact(&mut got).unwrap();
    assert_eq!(got, bytes);
    // More than one frame holds, written while dom0 reads.
    let big: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = m.store.try_clone().unwrap();
    let sent = big.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = Vec::new();
    let mut frames = 0;
    while back.len() < big.len() {
        let f = m.fx.dom0.recv();
        assert_eq!((f.channel, f.kind), (0, FrameKind::Store), "{f:?}");
        assert!(!f.payload.is_empty() && f.payload.len() <= PAYLOAD_MAX);
        back.extend_from_slice(&f.payload);
        frames += 1;
    }
    w.join().unwrap();
    assert_eq!(back, big);
    assert!(frames >= 3, "150,000 bytes in {frames} frame(s)");
}

#[test]
fn a_block_request_hands_the_device_and_a_listener_whose_connection_is_the_channel() {
    let mut m = managed();
    let dir = direct_io_dir();
    let img = dir.path().join("nvme0n1");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let req = serve_block(51712, img.to_str().unwrap(), false);
    let d = &mut m.fx.dom0;
    d.send(&request(req.clone(), Some(3)));
    d.send(&Frame::open(3));
    let (got, fds) = handed(&m.control);
    assert_eq!(got, req, "the request goes on unchanged");
    assert_eq!(fds.len(), 2, "[device, listener]");
    let mut fds = fds.into_iter();
    let device = File::from(fds.next().unwrap());
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(inode(&device), (meta.dev(), meta.ino()), "the named device");
    let flags = nix::fcntl::fcntl(device.as_raw_fd(), nix::fcntl::F_GETFL).unwrap();
    assert_ne!(flags & libc::O_DIRECT, 0, "opened O_DIRECT");
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR, "writable");
    let listener = UnixListener::from(fds.next().unwrap());
    let (conn, _) = listener.accept().unwrap();
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "one pending connection only");
    // Frontend messages on channel 3 arrive on that connection...
    d.vhost(3, FrontendReq::GET_FEATURES, &[], Vec::new());
    let msg = vhost_stream::recv(&conn).unwrap().unwrap();
    assert_eq!(
        msg.bytes,
        encode_message(FrontendReq::GET_FEATURES.into(), 0, &[])
    );
    assert!(msg.fds.is_empty());
    // ... with references made descriptors: a memory region is BAR2's file.
    d.vhost(
        3,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[(0, GUEST_LEN, UA, GUEST_AT)])[12..],
        vec![Ref::memory(GUEST_AT)],
    );
    let msg = vhost_stream::recv(&conn).unwrap().unwrap();
    assert_eq!(msg.fds.len(), 1);
    assert_eq!(inode(&msg.fds[0]), inode(&m.fx._memfd), "BAR2");
    // The backend's replies go back as VHOST frames on channel 3.
    let reply = encode_message(
        FrontendReq::GET_FEATURES.into(),
        0x4,
        &(1u64 << 32).to_le_bytes(),
    );
    vhost_stream::send(&conn, &reply, &[]).unwrap();
    let f = d.recv();
    assert_eq!((f.channel, f.kind), (3, FrameKind::Vhost), "{f:?}");
    assert_eq!(f.payload, reply);
    // dom0's CLOSE ends the driver domain's connection, with no echo.
    d.send(&Frame::close(3));
    assert!(vhost_stream::recv(&conn).unwrap().is_none());
    assert!(d.quiet_for(Duration::from_millis(300)).is_none());
    // A read-only device is opened read-only.
    let req = serve_block(51728, img.to_str().unwrap(), true);
    d.send(&request(req, Some(4)));
    let (_, fds) = handed(&m.control);
    let flags = nix::fcntl::fcntl(fds[0].as_raw_fd(), nix::fcntl::F_GETFL).unwrap();
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    // The driver domain going away ends the server.
    drop(m.control);
    drop(m.store);
    assert_eq!(m.ended.recv_timeout(WAIT).unwrap(), Ended::DriverDomain);
}

#[test]
fn bad_requests_are_refused_and_the_server_goes_on() {
    let mut m = managed();
    let d = &mut m.fx.dom0;
    // Malformed CONTROL payloads and an event from dom0: dropped.
    d.send(&Frame::control(vec![0xff, 0xff, 0xff]));
    let mut trailing = request(BackendRequest::Stats, None).payload;
    trailing.push(0);
    d.send(&Frame::control(trailing));
    d.send(
        &TunnelControl::Event(BackendEvent::Ready)
            .to_frame()
            .unwrap(),
    );
    // A device that is not there: DeviceFailed, and CLOSE for its channel's OPEN (once).
    d.send(&request(
        serve_block(51712, "/nonexistent/nvme9n1", false),
        Some(5),
    ));
    d.send(&Frame::open(5));
    match control_of(&d.recv()) {
        TunnelControl::Event(BackendEvent::DeviceFailed {
            frontend: 2,
            devid: 51712,
            reason,
        }) => assert!(reason.contains("/nonexistent/nvme9n1"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.recv(), Frame::close(5));
    assert!(d.quiet_for(Duration::from_millis(300)).is_none());
    // ServeNet without a channel, ServeBlock without a device: refused.
    d.send(&request(serve_net(0), None));
    assert!(matches!(
        control_of(&d.recv()),
        TunnelControl::Event(BackendEvent::DeviceFailed { devid: 0, .. })
    ));
    let mut no_device = serve_block(51744, "x", false);
    if let BackendRequest::ServeBlock { device, .. } = &mut no_device {
        *device = None;
    }
    d.send(&request(no_device, Some(6)));
    assert!(matches!(
        control_of(&d.recv()),
        TunnelControl::Event(BackendEvent::DeviceFailed { devid: 51744, .. })
    ));
    assert!(
        d.quiet_for(Duration::from_millis(300)).is_none(),
        "no CLOSE before the channel is open"
    );
    d.send(&Frame::open(6));
    assert_eq!(d.recv(), Frame::close(6));
    // OPEN of a channel nothing prepared: CLOSE.
    d.send(&Frame::open(8));
    assert_eq!(d.recv(), Frame::close(8));
    // None of that reached the driver domain; other requests pass on without descriptors,
    // ServeNet with a channel with its listener.
    d.send(&request(BackendRequest::Stats, None));
    let (got, fds) = handed(&m.control);
    assert_eq!((got, fds.len()), (BackendRequest::Stats, 0));
    d.send(&request(serve_net(1), Some(7)));
    let (got, fds) = handed(&m.control);
    assert_eq!((got, fds.len()), (serve_net(1), 1));
    // The driver domain's events cross; a descriptor with one stays behind.
    let file = tempfile::tempfile().unwrap();
    m.control
        .send(&BackendEvent::Ready, &[file.as_fd()])
        .unwrap();
    assert_eq!(
        control_of(&d.recv()),
        TunnelControl::Event(BackendEvent::Ready)
    );
    // Still serving.
    d.send(&Frame::store(b"still here".to_vec()));
    let mut got = [0u8; 10];
    m.store.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    assert!(m.ended.try_recv().is_err(), "the server runs");
}
