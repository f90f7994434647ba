//! The in-VM server end to end on the host: a socketpair stands in for the serial port (the
//! test plays dom0's relay on it), a fake sysfs for the cross-VM device (BAR0 a file whose
//! doorbell registers the test reads, BAR2 a memfd holding the "guest's" memory at an offset),
//! a temporary file for the disk. The test writes the guest's requests into that memory
//! without any kick: only the ring poller can notice them.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::tunnel::vhost_msg::encode_message;
use ipc::tunnel::{Frame, FrameDecoder, FrameKind, Ref};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vhost::vhost_user::message::{FrontendReq, VhostUserVringState};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::rings::tests::{mem_table, vring_addr};
use super::xvm_device::tests::{doorbell_register, fake_device};
use super::{CrossVmDevice, TunnelWriter, VmServer};
use crate::blk::{BlkBackendConfig, BlkBackendDevice, BlkDisk};
use crate::hw::pci::fake::FakeSysfs;
use crate::virtio_core::ring_driver::{DriverRing, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio_core::SealPolicy;

/// Where dom0 "mapped" the guest's memory in BAR2, and how much of it.
pub(super) const GUEST_AT: u64 = 0x10_0000;
pub(super) const GUEST_LEN: u64 = 0x10_0000;
/// The frontend's (VMM's) address of guest physical 0.
pub(super) const UA: u64 = 0x7f00_0000_0000;
/// The disk's first sector.
const SECTOR0: &[u8] = b"driver-vm test disk, sector 0";

/// dom0's end of the fake serial port.
pub(super) struct Dom0 {
    pub(super) sock: UnixStream,
    decoder: FrameDecoder,
}

impl Dom0 {
    pub(super) fn send(&mut self, frame: &Frame) {
        self.sock.write_all(&frame.encode().unwrap()).unwrap();
    }

    pub(super) fn vhost(&mut self, channel: u16, req: FrontendReq, body: &[u8], refs: Vec<Ref>) {
        let msg = encode_message(req.into(), 0, body);
        self.send(&Frame::vhost(channel, refs, msg));
    }

    /// The next frame (10 s at most).
    pub(super) fn recv(&mut self) -> Frame {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(f) = self.decoder.next_frame().unwrap() {
                return f;
            }
            assert!(Instant::now() < end, "no frame from the VM within 10 s");
            let mut buf = [0u8; 4096];
            match self.sock.read(&mut buf) {
                Ok(0) => panic!("the VM side closed the tunnel"),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Whether a frame arrives within `wait` (none expected).
    pub(super) fn quiet_for(&mut self, wait: Duration) -> Option<Frame> {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let got = match self.sock.read(&mut buf) {
            Ok(n) if n > 0 => {
                self.decoder.push(&buf[..n]);
                self.decoder.next_frame().unwrap()
            }
            _ => None,
        };
        self.sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        got
    }
}

/// Everything one test needs; the server runs on its own thread until `dom0.sock` closes.
pub(super) struct Fixture {
    pub(super) dom0: Dom0,
    pub(super) fake: FakeSysfs,
    pub(super) guest: GuestMemoryMmap,
    pub(super) _memfd: File,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.dom0.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.server.take() {
            t.join().unwrap();
        }
    }
}

/// The blk server: channels 0 and 1 serve the test disk.
fn fixture() -> Fixture {
    let image = tempfile::tempfile().unwrap();
    image.set_len(1 << 20).unwrap();
    image.write_all_at(SECTOR0, 0).unwrap();
    let disk = Arc::new(BlkDisk::from_file(image, false).unwrap());
    fixture_with(move |device, writer, vm| {
        let cfg = BlkBackendConfig {
            seal_policy: SealPolicy::RequireSealedOrSysfs,
            ..BlkBackendConfig::default()
        };
        let mut server = VmServer::new(device, writer, |channel| {
            if channel > 1 {
                return Err(format!("no disk for channel {channel}"));
            }
            BlkBackendDevice::new(disk.clone(), cfg.clone()).map_err(|e| e.to_string())
        })
        .unwrap();
        server.run(vm).unwrap();
    })
}

/// The rig (fake device, BAR2 memfd, guest memory, tty pair) with `serve` running the server
/// on the VM's end of the tty; HELLO is checked.
pub(super) fn fixture_with(
    serve: impl FnOnce(Arc<CrossVmDevice>, Arc<TunnelWriter>, UnixStream) + Send + 'static,
) -> Fixture {
    // BAR2: a sealable memfd reached through the fake device's `resource2` (a link to it).
    let memfd = File::from(memfd_create(c"bar2", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap());
    memfd.set_len(GUEST_AT + GUEST_LEN).unwrap();
    let fake = fake_device(256, 4096);
    let res2 = fake
        .dir
        .path()
        .join("devices/pci0000:00/0000:00:04.0/resource2");
    std::fs::remove_file(&res2).unwrap();
    std::os::unix::fs::symlink(
        format!("/proc/{}/fd/{}", std::process::id(), memfd.as_raw_fd()),
        &res2,
    )
    .unwrap();
    let guest = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        GUEST_LEN as usize,
        Some(FileOffset::new(memfd.try_clone().unwrap(), GUEST_AT)),
    )])
    .unwrap();
    let device = Arc::new(CrossVmDevice::open(&fake.sysfs()).unwrap());
    let (dom0, vm) = UnixStream::pair().unwrap();
    dom0.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let writer = Arc::new(TunnelWriter::new(Box::new(vm.try_clone().unwrap())));
    let server = std::thread::spawn(move || serve(device, writer, vm));
    let mut dom0 = Dom0 {
        sock: dom0,
        decoder: FrameDecoder::new(),
    };
    let hello = dom0.recv();
    assert_eq!(hello.hello_version(), Some(1), "HELLO first: {hello:?}");
    Fixture {
        dom0,
        fake,
        guest,
        _memfd: memfd,
        server: Some(server),
    }
}

/// GET_FEATURES on `channel`; its reply's feature bits.
fn features(dom0: &mut Dom0, channel: u16) -> u64 {
    dom0.vhost(channel, FrontendReq::GET_FEATURES, &[], Vec::new());
    let reply = dom0.recv();
    assert_eq!(
        (reply.channel, reply.kind),
        (channel, FrameKind::Vhost),
        "{reply:?}"
    );
    u64::from_le_bytes(reply.payload[12..20].try_into().unwrap())
}

fn u64_body(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

#[test]
fn a_request_written_to_the_ring_is_served_without_a_kick_and_its_call_rings_the_doorbell() {
    let mut fx = fixture();
    let d = &mut fx.dom0;
    d.send(&Frame::open(0));
    let offered = features(d, 0);
    assert_ne!(offered & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
    d.vhost(0, FrontendReq::SET_FEATURES, &u64_body(1 << 32), Vec::new());
    d.vhost(0, FrontendReq::SET_OWNER, &[], Vec::new());
    d.vhost(
        0,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[(0, GUEST_LEN, UA, GUEST_AT)])[12..],
        vec![Ref::memory(GUEST_AT)],
    );
    let mut ring = DriverRing::new(GuestAddress(0x1000), 16);
    d.vhost(
        0,
        FrontendReq::SET_VRING_NUM,
        VhostUserVringState::new(0, 16).as_slice(),
        Vec::new(),
    );
    let addr = vring_addr(0, UA + ring.avail.0);
    let mut body = addr[12..].to_vec();
    // vring_addr lays desc and used out around avail; put them where DriverRing has them.
    body[8..16].copy_from_slice(&(UA + ring.desc.0).to_le_bytes());
    body[16..24].copy_from_slice(&(UA + ring.used.0).to_le_bytes());
    d.vhost(0, FrontendReq::SET_VRING_ADDR, &body, Vec::new());
    d.vhost(
        0,
        FrontendReq::SET_VRING_BASE,
        VhostUserVringState::new(0, 0).as_slice(),
        Vec::new(),
    );
    d.vhost(
        0,
        FrontendReq::SET_VRING_CALL,
        &u64_body(0),
        vec![Ref::doorbell(0)],
    );
    d.vhost(
        0,
        FrontendReq::SET_VRING_KICK,
        &u64_body(0),
        vec![Ref::polled(0)],
    );
    // The guest: a read of sector 0 (header, 512-byte buffer, status), published in the
    // avail ring; nobody kicks.
    let g = &fx.guest;
    let (hdr, data, status) = (0x8000u64, 0x9000u64, 0xa000u64);
    g.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
    g.write_obj(0xffu8, GuestAddress(status)).unwrap();
    ring.write_desc(g, 0, hdr, 16, DESC_F_NEXT, 1).unwrap();
    ring.write_desc(g, 1, data, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        .unwrap();
    ring.write_desc(g, 2, status, 1, DESC_F_WRITE, 0).unwrap();
    ring.push_avail(g, 0).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while ring.used_idx(g).unwrap() != 1 {
        assert!(
            Instant::now() < end,
            "the request was not served within 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut got = vec![0u8; SECTOR0.len()];
    g.read_slice(&mut got, GuestAddress(data)).unwrap();
    assert_eq!(got, SECTOR0);
    assert_eq!(
        g.read_obj::<u8>(GuestAddress(status)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
    while doorbell_register(&fx.fake, 0) != 1 {
        assert!(
            Instant::now() < end,
            "the completion did not ring doorbell 0"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(doorbell_register(&fx.fake, 1), 0);
}

#[test]
fn a_bad_message_fails_its_channel_only() {
    let mut fx = fixture();
    let d = &mut fx.dom0;
    d.send(&Frame::open(0));
    d.send(&Frame::open(1));
    // A memory reference that is not where the table says: channel 0 is closed...
    d.vhost(
        0,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[(0, GUEST_LEN, UA, GUEST_AT)])[12..],
        vec![Ref::memory(0)],
    );
    let f = d.recv();
    assert_eq!((f.channel, f.kind), (0, FrameKind::Close), "{f:?}");
    // ... channel 1 goes on, past garbage on the stream too.
    d.sock.write_all(b"garbage that is no frame").unwrap();
    assert_ne!(features(d, 1), 0);
    // A call bound to another channel's doorbell fails channel 1.
    d.vhost(
        1,
        FrontendReq::SET_VRING_CALL,
        &u64_body(0),
        vec![Ref::doorbell(0)],
    );
    let f = d.recv();
    assert_eq!((f.channel, f.kind), (1, FrameKind::Close), "{f:?}");
    // A kick before its ring's address, on a fresh channel 0: closed too.
    d.send(&Frame::open(0));
    d.vhost(
        0,
        FrontendReq::SET_VRING_KICK,
        &u64_body(0),
        vec![Ref::polled(0)],
    );
    let f = d.recv();
    assert_eq!((f.channel, f.kind), (0, FrameKind::Close), "{f:?}");
    // No disk for channel 2: refused with CLOSE.
    d.send(&Frame::open(2));
    let f = d.recv();
    assert_eq!((f.channel, f.kind), (2, FrameKind::Close), "{f:?}");
    // The server still serves.
    d.send(&Frame::open(1));
    assert_ne!(features(d, 1), 0);
}

#[test]
fn a_table_the_backend_refuses_ends_the_session_and_dom0_hears_close() {
    let mut fx = fixture();
    let d = &mut fx.dom0;
    d.send(&Frame::open(0));
    // Consistent references, but the region reaches past the end of BAR2: the backend's own
    // check refuses the table and ends the session; the tunnel tells dom0.
    let past = GUEST_AT + 0x1000;
    d.vhost(0, FrontendReq::SET_OWNER, &[], Vec::new());
    d.vhost(
        0,
        FrontendReq::SET_MEM_TABLE,
        &mem_table(&[(0, GUEST_LEN, UA, past)])[12..],
        vec![Ref::memory(past)],
    );
    let f = d.recv();
    assert_eq!((f.channel, f.kind), (0, FrameKind::Close), "{f:?}");
}

#[test]
fn close_from_dom0_ends_the_channel_without_an_echo_and_it_can_open_again() {
    let mut fx = fixture();
    let d = &mut fx.dom0;
    d.send(&Frame::open(0));
    assert_ne!(features(d, 0), 0);
    d.send(&Frame::close(0));
    assert!(
        d.quiet_for(Duration::from_millis(300)).is_none(),
        "no CLOSE goes back for dom0's own"
    );
    // Messages for the closed channel are dropped, not answered.
    d.vhost(0, FrontendReq::GET_FEATURES, &[], Vec::new());
    assert!(d.quiet_for(Duration::from_millis(300)).is_none());
    d.send(&Frame::open(0));
    assert_ne!(features(d, 0), 0);
}

#[test]
fn the_backends_log_stays_in_the_vm_and_the_one_dom0_maps_into_bar2_is_adopted() {
    use vhost::vhost_user::message::VhostUserInflight;
    use vhost::vhost_user::VhostUserProtocolFeatures;
    let mut fx = fixture();
    let d = &mut fx.dom0;
    d.send(&Frame::open(0));
    let offered = features(d, 0);
    d.vhost(0, FrontendReq::SET_OWNER, &[], Vec::new());
    d.vhost(
        0,
        FrontendReq::SET_FEATURES,
        &u64_body(offered & ((1 << 32) | (1 << 30))),
        Vec::new(),
    );
    let inflight = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
    d.vhost(
        0,
        FrontendReq::SET_PROTOCOL_FEATURES,
        &u64_body(inflight),
        Vec::new(),
    );
    // GET_INFLIGHT_FD: the reply crosses with a NONE for the backend's own log.
    d.vhost(
        0,
        FrontendReq::GET_INFLIGHT_FD,
        VhostUserInflight::new(0, 0, 1, 16).as_slice(),
        Vec::new(),
    );
    let reply = d.recv();
    assert_eq!(reply.kind, FrameKind::Vhost, "{reply:?}");
    assert_eq!(reply.refs, vec![Ref::none()]);
    let size = u64::from_le_bytes(reply.payload[12..20].try_into().unwrap());
    assert!(size > 0 && size <= 4096, "one queue of 16: {size} bytes");
    // dom0's log, zeroed, at a page of BAR2 below the guest's memory: adopted as fresh (its
    // header written there).
    const LOG_AT: u64 = 0x2000;
    d.vhost(
        0,
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(4096, LOG_AT, 1, 16).as_slice(),
        vec![Ref::memory(LOG_AT)],
    );
    let end = Instant::now() + Duration::from_secs(10);
    let mut header = [0u8; 4];
    loop {
        fx._memfd.read_exact_at(&mut header, LOG_AT + 8).unwrap();
        if header == [1, 0, 16, 0] {
            break;
        }
        assert!(
            Instant::now() < end,
            "the log in BAR2 was not adopted: {header:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A log whose reference does not match its offset fails the channel.
    d.vhost(
        0,
        FrontendReq::SET_INFLIGHT_FD,
        VhostUserInflight::new(4096, LOG_AT, 1, 16).as_slice(),
        vec![Ref::memory(LOG_AT + 4096)],
    );
    assert_eq!(d.recv(), Frame::close(0));
}
