//! The managed relay (`--driver-vm-domid`): the toolstack's store connection and control
//! channel carried as STORE and CONTROL frames, with a fake COM2 (frames to the driver VM
//! decoded here, frames "from" it handed to the relay) and real sockets on the toolstack's side.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use ipc::control::messages::{BackendEvent, BackendRequest, MemoryGrant};
use ipc::control::ControlChannel;
use ipc::tunnel::vhost_msg::encode_message;
use ipc::tunnel::{Frame, FrameDecoder, FrameKind, TunnelControl};
use vhost::vhost_user::message::FrontendReq;

use super::managed::{spawn, Managed, ManagedEnds};
use super::relay::Relay;
use crate::vmm::arch::{PCI_MMIO64_GPA, PCI_MMIO_GPA};
use crate::vmm::devices::cross_vm::kvm::fake::FakeKvm;
use crate::vmm::devices::cross_vm::CrossVmDevice;

/// The toolstack's ends of a managed driver VM's relay, and what it sent to the VM.
struct Rig {
    relay: Arc<Relay>,
    com2: mpsc::Receiver<Vec<u8>>,
    store: UnixStream,
    control: ControlChannel,
    threads: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

impl Rig {
    /// A relay whose driver VM said HELLO.
    fn new() -> Rig {
        let kvm = Arc::new(FakeKvm::default());
        let device = CrossVmDevice::new(kvm as _, PCI_MMIO_GPA, PCI_MMIO64_GPA, 64 << 20).state();
        let (tx, com2) = mpsc::channel();
        let (store_ours, store) = UnixStream::pair().unwrap();
        let (control_ours, control) = ControlChannel::pair().unwrap();
        let ends = ManagedEnds {
            domid: 1,
            store: store_ours,
            control: control_ours,
        };
        let managed = Arc::new(Managed::new(ends, 16));
        let stop = Arc::new(AtomicBool::new(false));
        let relay = Arc::new(Relay::new(device, 16, tx, stop, Some(Arc::clone(&managed))).unwrap());
        let threads = spawn(&relay, &managed).unwrap();
        relay.from_vm(Frame::hello());
        let dir = tempfile::tempdir().unwrap();
        Rig {
            relay,
            com2,
            store,
            control,
            threads,
            dir: dir.path().to_owned(),
            _dir: dir,
        }
    }

    /// The next frame sent to the driver VM.
    fn frame(&self) -> Frame {
        let bytes = self
            .com2
            .recv_timeout(Duration::from_secs(10))
            .expect("a frame for the driver VM");
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        d.next_frame().unwrap().unwrap()
    }

    fn no_frame(&self) {
        assert!(self.com2.recv_timeout(Duration::from_millis(300)).is_err());
    }

    /// A listener whose one pending connection is the returned frontend (its path gone), as
    /// the toolstack makes them.
    fn connection(&self, name: &str) -> (UnixListener, UnixStream) {
        let path = self.dir.join(name);
        let listener = UnixListener::bind(&path).unwrap();
        let frontend = UnixStream::connect(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (listener, frontend)
    }

    /// The next event the toolstack gets.
    fn event(&self) -> BackendEvent {
        let (event, fds) = self
            .control
            .recv_timeout::<BackendEvent>(Duration::from_secs(10))
            .unwrap()
            .expect("an event for the toolstack");
        assert!(fds.is_empty());
        event
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.relay.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_block(device: Option<&str>) -> BackendRequest {
    BackendRequest::ServeBlock {
        frontend: 2,
        devid: 51712,
        readonly: false,
        grant: MemoryGrant::AllRam,
        queues: 1,
        device: device.map(str::to_owned),
    }
}

#[test]
fn store_bytes_cross_both_ways_in_order() {
    let mut rig = Rig::new();
    rig.store.write_all(b"a store request").unwrap();
    let f = rig.frame();
    assert_eq!(
        (f.kind, f.payload.as_slice()),
        (FrameKind::Store, &b"a store request"[..])
    );
    rig.relay.from_vm(Frame::store(b"its reply".to_vec()));
    rig.relay
        .from_vm(Frame::store(b" and a watch event".to_vec()));
    rig.store
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; b"its reply and a watch event".len()];
    rig.store.read_exact(&mut got).unwrap();
    assert_eq!(got, b"its reply and a watch event");
}

#[test]
fn a_served_disk_is_a_channel_whose_open_follows_its_request() {
    let rig = Rig::new();
    let (listener, frontend) = rig.connection("a.sock");
    let request = serve_block(Some("/dev/nvme0n1"));
    rig.control.send(&request, &[listener.as_fd()]).unwrap();
    drop(listener);
    let f = rig.frame();
    assert_eq!(f.kind, FrameKind::Control);
    assert_eq!(
        TunnelControl::decode(&f.payload).unwrap(),
        TunnelControl::Request {
            request,
            channel: Some(0)
        }
    );
    assert_eq!(rig.frame(), Frame::open(0));
    // The frontend's messages travel on that channel.
    let msg = encode_message(FrontendReq::GET_FEATURES.into(), 0, &[]);
    (&frontend).write_all(&msg).unwrap();
    let f = rig.frame();
    assert_eq!((f.kind, f.channel, f.payload), (FrameKind::Vhost, 0, msg));
    // A second disk gets the next channel while the first is open.
    let (listener, _frontend2) = rig.connection("b.sock");
    rig.control
        .send(&serve_block(Some("/dev/nvme0n2")), &[listener.as_fd()])
        .unwrap();
    let f = rig.frame();
    let Ok(TunnelControl::Request { channel, .. }) = TunnelControl::decode(&f.payload) else {
        panic!("not a request: {f:?}");
    };
    assert_eq!(channel, Some(1));
    assert_eq!(rig.frame(), Frame::open(1));
    // The first frontend goes away: its channel closes, and is free again.
    drop(frontend);
    assert_eq!(rig.frame(), Frame::close(0));
}

#[test]
fn requests_the_vm_cannot_serve_fail_that_device_alone() {
    let rig = Rig::new();
    // A host image cannot reach a driver VM.
    let (listener, _frontend) = rig.connection("a.sock");
    let image = tempfile::tempfile().unwrap();
    rig.control
        .send(&serve_block(None), &[image.as_fd(), listener.as_fd()])
        .unwrap();
    match rig.event() {
        BackendEvent::DeviceFailed {
            frontend: 2,
            devid: 51712,
            reason,
        } => assert!(reason.contains("device"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A device without its listener.
    rig.control
        .send(&serve_block(Some("/dev/nvme0n1")), &[])
        .unwrap();
    assert!(matches!(rig.event(), BackendEvent::DeviceFailed { .. }));
    rig.no_frame();
    // The relay goes on: other requests pass, without a channel.
    rig.control.send(&BackendRequest::Stats, &[]).unwrap();
    let f = rig.frame();
    assert_eq!(
        TunnelControl::decode(&f.payload).unwrap(),
        TunnelControl::Request {
            request: BackendRequest::Stats,
            channel: None
        }
    );
}

#[test]
fn events_from_the_vm_reach_the_toolstack_and_garbage_is_dropped() {
    let rig = Rig::new();
    rig.relay.from_vm(Frame::control(vec![0xff, 0xfe, 0xfd]));
    let request_from_vm = TunnelControl::Request {
        request: BackendRequest::Shutdown,
        channel: None,
    };
    rig.relay.from_vm(request_from_vm.to_frame().unwrap());
    rig.relay.from_vm(
        TunnelControl::Event(BackendEvent::Ready)
            .to_frame()
            .unwrap(),
    );
    // Only the event arrives: garbage and a request from the VM are dropped.
    assert_eq!(rig.event(), BackendEvent::Ready);
    assert!(rig
        .control
        .recv_timeout::<BackendEvent>(Duration::from_millis(300))
        .unwrap()
        .is_none());
}

#[test]
fn the_toolstack_going_away_stops_the_relay() {
    let mut rig = Rig::new();
    assert!(!rig.relay.stop_handle().stopped());
    // The toolstack's end closes (a fresh, unrelated channel takes its place in the rig).
    rig.control = ControlChannel::pair().unwrap().0;
    let t0 = std::time::Instant::now();
    while !rig.relay.stop_handle().stopped() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the relay did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
