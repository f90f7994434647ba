//! The relay with a fake COM2 (the frames it sends are decoded here; frames "from the driver
//! VM" are handed to it directly), the cross-VM device on a fake KVM, and real sockets with
//! real fds from the frontend's side.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use ipc::tunnel::vhost_msg::{encode_message, mem_table_regions, HEADER_LEN};
use ipc::tunnel::{Frame, FrameKind, Ref};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::relay::Relay;
use crate::vmm::arch::{PCI_MMIO64_GPA, PCI_MMIO_GPA};
use crate::vmm::devices::cross_vm::kvm::fake::{same_eventfd, FakeKvm};
use crate::vmm::devices::cross_vm::tests::memfd;
use crate::vmm::devices::cross_vm::{CrossVmDevice, CrossVmState};

const BAR0: u64 = PCI_MMIO_GPA;
const BAR2: u64 = PCI_MMIO64_GPA;

struct Harness {
    relay: Arc<Relay>,
    device: Arc<CrossVmState>,
    kvm: Arc<FakeKvm>,
    com2: mpsc::Receiver<Vec<u8>>,
    _stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Harness {
    fn new(channels: usize) -> Self {
        let kvm = Arc::new(FakeKvm::default());
        let dev = CrossVmDevice::new(Arc::clone(&kvm) as _, BAR0, BAR2, 64 << 20);
        let device = dev.state();
        let (tx, com2) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let relay = Relay::new(Arc::clone(&device), channels, tx, Arc::clone(&stop), None).unwrap();
        let relay = Arc::new(relay);
        Self {
            relay,
            device,
            kvm,
            com2,
            _stop: stop,
            threads: Vec::new(),
        }
    }

    /// A frontend connected on `channel` (the relay's end served by a thread).
    fn connect(&mut self, channel: u16) -> UnixStream {
        let (frontend, ours) = UnixStream::pair().unwrap();
        let relay = Arc::clone(&self.relay);
        self.threads.push(std::thread::spawn(move || {
            relay.serve_connection(channel, ours)
        }));
        assert_eq!(self.frame(), Frame::open(channel));
        frontend
    }

    /// The next frame the relay sent to the driver VM.
    fn frame(&self) -> Frame {
        let bytes = self
            .com2
            .recv_timeout(Duration::from_secs(10))
            .expect("a frame for the driver VM");
        let mut d = ipc::tunnel::FrameDecoder::new();
        d.push(&bytes);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(d.buffered(), 0, "one frame per send");
        f
    }

    fn no_frame(&self) {
        assert!(self.com2.recv_timeout(Duration::from_millis(300)).is_err());
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.relay.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn send(stream: &UnixStream, msg: &[u8], fds: &[&dyn AsRawFd]) {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(msg)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(n, msg.len());
}

fn request(req: FrontendReq, body: &[u8]) -> Vec<u8> {
    encode_message(req.into(), 0, body)
}

fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut body = VhostUserMemory::new(regions.len() as u32)
        .as_slice()
        .to_vec();
    for &(gpa, size, ua, off) in regions {
        body.extend_from_slice(VhostUserMemoryRegion::new(gpa, size, ua, off).as_slice());
    }
    request(FrontendReq::SET_MEM_TABLE, &body)
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// Whether the frontend's end sees its connection closed.
fn closed(frontend: &mut UnixStream) -> bool {
    frontend
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(frontend.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn each_message_kind_is_translated_and_undone_at_close() {
    let mut h = Harness::new(2);
    let mut fe = h.connect(1);

    // No fds: the message as it is.
    let get = request(FrontendReq::GET_FEATURES, &[]);
    send(&fe, &get, &[]);
    assert_eq!(h.frame(), Frame::vhost(1, vec![], get));

    // The memory table: two sealed memfds at their own offsets.
    let (a, b) = (memfd(0x3000, 0xa1, true), memfd(0x40_0000, 0xb2, true));
    let table = mem_table(&[
        (0, 0x2000, 0x7f00_0000, 0x1000),
        (0x10_0000, 0x20_0000, 0x7f10_0000, 0x20_0000),
    ]);
    send(&fe, &table, &[&a, &b]);
    let f = h.frame();
    assert_eq!(f.kind, FrameKind::Vhost);
    assert_eq!(f.refs.len(), 2);
    let offsets: Vec<u64> = f.refs.iter().map(|r| r.value).collect();
    assert_eq!(f.refs[0], Ref::memory(offsets[0]));
    assert_eq!(f.refs[1], Ref::memory(offsets[1]));
    let regions = mem_table_regions(&f.payload[HEADER_LEN..]).unwrap();
    assert_eq!(
        { regions[0].mmap_offset },
        offsets[0],
        "mmap_offset rewritten"
    );
    assert_eq!({ regions[1].mmap_offset }, offsets[1]);
    assert_eq!({ regions[1].user_addr }, 0x7f10_0000, "the rest untouched");
    assert_eq!(offsets[1] % (2 << 20), 0, "a 2 MiB region is 2 MiB-aligned");
    let mut byte = [0u8; 1];
    h.device.read_region(offsets[0], 0x1fff, &mut byte);
    assert_eq!(byte, [0xa1]);
    h.device.read_region(offsets[1], 0, &mut byte);
    assert_eq!(byte, [0xb2]);
    let gpas: Vec<u64> = h.kvm.state().slots.values().map(|s| s.0).collect();
    assert!(gpas.contains(&(BAR2 + offsets[0])) && gpas.contains(&(BAR2 + offsets[1])));

    // Call: doorbell channel * 16 + queue, the frontend's own eventfd bound there.
    let call = eventfd();
    send(
        &fe,
        &request(FrontendReq::SET_VRING_CALL, &2u64.to_ne_bytes()),
        &[&call],
    );
    let f = h.frame();
    assert_eq!(f.refs, vec![Ref::doorbell(18)]);
    assert!(same_eventfd(
        &h.kvm.state().doorbells[&(BAR0 + 0x100 + 4 * 18)],
        &call
    ));
    // Kick: kept, polled; error fd: dropped.
    let kick = eventfd();
    send(
        &fe,
        &request(FrontendReq::SET_VRING_KICK, &2u64.to_ne_bytes()),
        &[&kick],
    );
    assert_eq!(h.frame().refs, vec![Ref::polled(2)]);
    let err = eventfd();
    send(
        &fe,
        &request(FrontendReq::SET_VRING_ERR, &2u64.to_ne_bytes()),
        &[&err],
    );
    assert_eq!(h.frame().refs, vec![Ref::none()]);
    // A call without fd: the doorbell is unbound.
    send(
        &fe,
        &request(FrontendReq::SET_VRING_CALL, &0x102u64.to_ne_bytes()),
        &[],
    );
    assert_eq!(h.frame().refs, vec![]);
    assert!(h.kvm.state().doorbells.is_empty());
    send(
        &fe,
        &request(FrontendReq::SET_VRING_CALL, &2u64.to_ne_bytes()),
        &[&call],
    );
    assert_eq!(h.frame().refs, vec![Ref::doorbell(18)]);

    // Replies from the driver VM reach the frontend; protocol features masked.
    let ask = request(FrontendReq::GET_PROTOCOL_FEATURES, &[]);
    send(&fe, &ask, &[]);
    assert_eq!(h.frame(), Frame::vhost(1, vec![], ask));
    let all = VhostUserProtocolFeatures::all().bits();
    let reply = encode_message(
        FrontendReq::GET_PROTOCOL_FEATURES.into(),
        VhostUserHeaderFlag::REPLY.bits(),
        &all.to_ne_bytes(),
    );
    h.relay.from_vm(Frame::vhost(1, vec![], reply.clone()));
    let mut got = vec![0u8; reply.len()];
    fe.read_exact(&mut got).unwrap();
    assert_eq!(got[..HEADER_LEN], reply[..HEADER_LEN]);
    let kept = u64::from_ne_bytes(got[HEADER_LEN..].try_into().unwrap());
    assert_eq!(
        kept,
        (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            .bits()
    );
    // Other replies pass as they are; one reply per request, and only to the request the
    // frontend waits for.
    let ask = request(FrontendReq::GET_FEATURES, &[]);
    send(&fe, &ask, &[]);
    assert_eq!(h.frame(), Frame::vhost(1, vec![], ask));
    let features = encode_message(
        FrontendReq::GET_FEATURES.into(),
        VhostUserHeaderFlag::REPLY.bits(),
        &u64::MAX.to_ne_bytes(),
    );
    let stale = encode_message(
        FrontendReq::GET_VRING_BASE.into(),
        VhostUserHeaderFlag::REPLY.bits(),
        &[0; 8],
    );
    h.relay.from_vm(Frame::vhost(1, vec![], stale));
    h.relay.from_vm(Frame::vhost(1, vec![], features.clone()));
    h.relay.from_vm(Frame::vhost(1, vec![], features.clone()));
    let mut got = vec![0u8; features.len()];
    fe.read_exact(&mut got).unwrap();
    assert_eq!(got, features, "the stale reply before it was dropped");
    fe.set_nonblocking(true).unwrap();
    assert!(
        fe.read(&mut [0u8; 1]).is_err(),
        "and the second reply after it"
    );
    fe.set_nonblocking(false).unwrap();
    h.no_frame();

    // A new table replaces the old: the old regions go.
    let c = memfd(0x1000, 0xc3, true);
    send(&fe, &mem_table(&[(0, 0x1000, 0x7f00_0000, 0)]), &[&c]);
    let f = h.frame();
    assert_eq!(h.device.regions(), vec![(f.refs[0].value, 0x1000)]);
    assert_eq!(h.relay.bar2_used(), 0x1000);

    // The frontend leaves: CLOSE, and everything the channel held is undone.
    fe.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(h.frame(), Frame::close(1));
    for t in h.threads.drain(..) {
        t.join().unwrap();
    }
    assert!(h.kvm.state().slots.is_empty());
    assert!(h.kvm.state().doorbells.is_empty());
    assert!(h.device.regions().is_empty());
    assert_eq!(h.relay.bar2_used(), 0);
    drop(fe);
}

#[test]
fn a_malformed_or_unrelayable_message_closes_that_channel_only() {
    let mut h = Harness::new(2);
    let mut other = h.connect(1);
    let log = memfd(0x1000, 0, true);
    let mut bad_version = request(FrontendReq::GET_FEATURES, &[]);
    bad_version[4] = 2;
    let long_header = {
        let mut m = request(FrontendReq::SET_CONFIG, &[]);
        m[8..12].copy_from_slice(&0x2000u32.to_ne_bytes());
        m
    };
    let unsealed = memfd(0x1000, 0, false);
    let not_eventfd = memfd(0x1000, 0, true);
    let cases: Vec<(&str, Vec<u8>, Vec<&dyn AsRawFd>)> = vec![
        (
            "a log fd",
            request(FrontendReq::SET_LOG_FD, &[]),
            vec![&log],
        ),
        (
            "an in-flight log of 0 bytes",
            request(FrontendReq::SET_INFLIGHT_FD, &[0; 24]),
            vec![&log],
        ),
        (
            "an unsealed in-flight log",
            request(
                FrontendReq::SET_INFLIGHT_FD,
                VhostUserInflight::new(0x1000, 0, 1, 128).as_slice(),
            ),
            vec![&unsealed],
        ),
        (
            "a backend channel",
            request(FrontendReq::SET_BACKEND_REQ_FD, &[]),
            vec![&log],
        ),
        (
            "an fd on GET_FEATURES",
            request(FrontendReq::GET_FEATURES, &[]),
            vec![&log],
        ),
        ("version 2", bad_version, vec![]),
        ("a body over the maximum", long_header, vec![]),
        ("an unknown request", encode_message(999, 0, &[]), vec![]),
        (
            "an unsealed region",
            mem_table(&[(0, 0x1000, 0, 0)]),
            vec![&unsealed],
        ),
        (
            "a region past its file",
            mem_table(&[(0, 0x2000, 0, 0)]),
            vec![&log],
        ),
        (
            "a region larger than BAR2",
            mem_table(&[(0, 128 << 20, 0, 0)]),
            vec![&log],
        ),
        (
            "a call fd that is no eventfd",
            request(FrontendReq::SET_VRING_CALL, &0u64.to_ne_bytes()),
            vec![&not_eventfd],
        ),
        (
            "a call on queue 16",
            request(FrontendReq::SET_VRING_CALL, &16u64.to_ne_bytes()),
            vec![&not_eventfd],
        ),
        (
            "a reply from the frontend",
            encode_message(1, VhostUserHeaderFlag::REPLY.bits(), &[]),
            vec![],
        ),
    ];
    for (what, msg, fds) in cases {
        let mut fe = h.connect(0);
        send(&fe, &msg, &fds);
        assert_eq!(h.frame(), Frame::close(0), "{what}");
        assert!(closed(&mut fe), "{what}: the frontend sees its backend go");
        assert!(h.device.regions().is_empty(), "{what}");
        assert_eq!(h.relay.bar2_used(), 0, "{what}");
        // The other channel is untouched.
        let get = request(FrontendReq::GET_FEATURES, &[]);
        send(&other, &get, &[]);
        assert_eq!(h.frame(), Frame::vhost(1, vec![], get), "{what}");
    }
    // A whole channel's life on the same socket still works after all that.
    let fe = h.connect(0);
    let get = request(FrontendReq::GET_QUEUE_NUM, &[]);
    send(&fe, &get, &[]);
    assert_eq!(h.frame(), Frame::vhost(0, vec![], get));
    other.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(h.frame(), Frame::close(1));
    let _ = other.read(&mut [0u8; 1]);
}

#[test]
fn the_driver_vm_closes_a_channel_and_bad_replies_close_it_too() {
    let mut h = Harness::new(3);
    let mut fe = h.connect(2);
    let call = eventfd();
    send(
        &fe,
        &request(FrontendReq::SET_VRING_CALL, &0u64.to_ne_bytes()),
        &[&call],
    );
    assert_eq!(h.frame().refs, vec![Ref::doorbell(32)]);
    // CLOSE from the driver VM: the frontend's connection is shut, no CLOSE echoes back.
    h.relay.from_vm(Frame::close(2));
    assert!(closed(&mut fe));
    h.no_frame();
    for t in h.threads.drain(..) {
        t.join().unwrap();
    }
    assert!(h.kvm.state().doorbells.is_empty(), "its doorbell freed");

    // A reply with references, or not a vhost-user message: CLOSE to the driver VM.
    for bad in [
        Frame::vhost(
            2,
            vec![Ref::none()],
            request(FrontendReq::GET_FEATURES, &[]),
        ),
        Frame::vhost(2, vec![], vec![0xff; 12]),
    ] {
        let mut fe = h.connect(2);
        h.relay.from_vm(bad);
        assert_eq!(h.frame(), Frame::close(2));
        assert!(closed(&mut fe));
        h.no_frame();
    }
    // Frames for channels that do not exist or are not open are dropped.
    h.relay.from_vm(Frame::vhost(
        9,
        vec![],
        request(FrontendReq::GET_FEATURES, &[]),
    ));
    h.relay.from_vm(Frame::vhost(
        0,
        vec![],
        request(FrontendReq::GET_FEATURES, &[]),
    ));
    h.relay.from_vm(Frame::close(7));
    h.relay.from_vm(Frame::open(0));
    h.no_frame();
}

#[test]
fn frontends_are_accepted_only_after_hello() {
    let h = Harness::new(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blk0.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let relay = Arc::clone(&h.relay);
    let t = std::thread::spawn(move || relay.serve_channel(0, &listener));
    // The connection is queued but nothing is relayed yet.
    let mut fe = UnixStream::connect(&path).unwrap();
    fe.write_all(&request(FrontendReq::GET_FEATURES, &[]))
        .unwrap();
    h.no_frame();
    // A HELLO of another version is not the one.
    h.relay.from_vm(Frame {
        payload: 2u32.to_le_bytes().to_vec(),
        ..Frame::hello()
    });
    h.no_frame();
    h.relay.from_vm(Frame::hello());
    assert_eq!(h.frame(), Frame::open(0));
    assert_eq!(
        h.frame(),
        Frame::vhost(0, vec![], request(FrontendReq::GET_FEATURES, &[]))
    );
    // The server in the driver VM starts again: open channels close (their frontends see it)
    // and the next frontend is accepted.
    h.relay.from_vm(Frame::hello());
    assert!(closed(&mut fe));
    let _next = UnixStream::connect(&path).unwrap();
    assert_eq!(h.frame(), Frame::open(0));
    h.relay.stop();
    t.join().unwrap();
    let _ = OwnedFd::from(fe).as_fd();
}

/// The next message on the frontend's end, with the fds that came with it.
fn recv_with_fds(frontend: &UnixStream, len: usize) -> (Vec<u8>, Vec<OwnedFd>) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;
    frontend
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; len];
    let mut space = nix::cmsg_space!([i32; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        frontend.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .unwrap();
    assert_eq!(msg.bytes, len);
    let mut fds = Vec::new();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: installed in this process by the kernel for this message.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    (buf, fds)
}

#[test]
fn the_in_flight_log_is_made_in_dom0_mapped_into_bar2_and_mapped_again_when_handed_back() {
    use ipc::tunnel::vhost_msg::{inflight_body, MsgHeader};
    use ipc::tunnel::RefKind;
    use std::os::unix::fs::FileExt;
    let mut h = Harness::new(1);
    let fe = h.connect(0);
    // GET_INFLIGHT_FD goes to the driver VM as it is.
    let ask = request(
        FrontendReq::GET_INFLIGHT_FD,
        VhostUserInflight::new(0, 0, 1, 256).as_slice(),
    );
    send(&fe, &ask, &[]);
    assert_eq!(h.frame(), Frame::vhost(0, vec![], ask));
    // The backend's answer: its size, and a NONE for the log that stays in the driver VM.
    let reply = encode_message(
        FrontendReq::GET_INFLIGHT_FD.into(),
        VhostUserHeaderFlag::REPLY.bits(),
        VhostUserInflight::new(4160, 0, 1, 256).as_slice(),
    );
    h.relay
        .from_vm(Frame::vhost(0, vec![Ref::none()], reply.clone()));
    // dom0 made the log and tells the backend to adopt it where BAR2 holds it, unasked for
    // an acknowledgement (nobody waits for one).
    let set = h.frame();
    assert_eq!(set.refs.len(), 1);
    assert_eq!(set.refs[0].kind, RefKind::Memory);
    let offset = set.refs[0].value;
    let header = MsgHeader::parse(&set.payload).unwrap();
    assert_eq!(header.request, u32::from(FrontendReq::SET_INFLIGHT_FD));
    assert_eq!(header.flags & VhostUserHeaderFlag::NEED_REPLY.bits(), 0);
    let shape = inflight_body(FrontendReq::SET_INFLIGHT_FD, &set.payload[HEADER_LEN..]).unwrap();
    assert_eq!(
        (
            shape.mmap_size,
            shape.mmap_offset,
            shape.num_queues,
            shape.queue_size
        ),
        (0x2000, offset, 1, 256),
        "whole pages, at its BAR2 offset"
    );
    let gpas: Vec<u64> = h.kvm.state().slots.values().map(|s| s.0).collect();
    assert!(gpas.contains(&(BAR2 + offset)));
    // The frontend gets the same log: a memfd of those pages, sealed, at offset 0.
    let (got, mut fds) = recv_with_fds(&fe, reply.len());
    assert_eq!(fds.len(), 1, "the log's memfd");
    let mine = std::fs::File::from(fds.remove(0));
    let shape = inflight_body(FrontendReq::GET_INFLIGHT_FD, &got[HEADER_LEN..]).unwrap();
    assert_eq!((shape.mmap_size, shape.mmap_offset), (0x2000, 0));
    assert_eq!(mine.metadata().unwrap().len(), 0x2000);
    assert!(mine.set_len(0x1000).is_err(), "sealed against shrinking");
    assert!(mine.set_len(0x3000).is_err(), "and growing");
    // What the backend writes through BAR2 is in the frontend's memfd: one memory.
    mine.write_all_at(&[0x5a], 100).unwrap();
    let mut b = [0u8; 1];
    h.device.read_region(offset, 100, &mut b);
    assert_eq!(b, [0x5a]);
    // The frontend goes (its VMM restarts nothing; its backend did): its space is freed.
    drop(fe);
    assert_eq!(h.frame(), Frame::close(0));
    let mut i = 0;
    while h.relay.bar2_used() != 0 && i < 100 {
        std::thread::sleep(Duration::from_millis(20));
        i += 1;
    }
    assert_eq!(h.relay.bar2_used(), 0);
    assert!(h.kvm.state().slots.is_empty());
    // A frontend handing the log back (a restarted driver VM): mapped again, content and all.
    let fe = h.connect(0);
    let back = request(FrontendReq::SET_INFLIGHT_FD, shape.as_slice());
    send(&fe, &back, &[&mine]);
    let f = h.frame();
    assert_eq!(f.refs.len(), 1);
    assert_eq!(f.refs[0].kind, RefKind::Memory);
    let again = inflight_body(FrontendReq::SET_INFLIGHT_FD, &f.payload[HEADER_LEN..]).unwrap();
    assert_eq!(
        (again.mmap_size, again.mmap_offset),
        (0x2000, f.refs[0].value)
    );
    h.device.read_region(f.refs[0].value, 100, &mut b);
    assert_eq!(b, [0x5a]);
    // A reply to GET_INFLIGHT_FD without its NONE closes the channel.
    let ask = request(
        FrontendReq::GET_INFLIGHT_FD,
        VhostUserInflight::new(0, 0, 1, 256).as_slice(),
    );
    send(&fe, &ask, &[]);
    assert_eq!(h.frame().kind, FrameKind::Vhost);
    h.relay.from_vm(Frame::vhost(0, vec![], reply));
    assert_eq!(h.frame(), Frame::close(0));
    let mut fe = fe;
    assert!(closed(&mut fe));
}
