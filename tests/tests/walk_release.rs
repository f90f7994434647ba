//! The frontend walk's detach waits for the guest to let go of the device: a kind whose
//! `release_block` says "not yet" keeps the frontend Closing (no `Closed` to the toolstack, the
//! session alive) until it says yes; then the session ends and the frontend goes Closed. This
//! is what a Linux guest's VMM does while the guest ejects a hot-plugged disk. The toolstack
//! and the backend are played here through the store.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_vmm::domains;
use frontend_core::xenbus::{DiskCheck, FrontendDiagnostics, FrontendLifecycle, ManagedFrontend};
use ipc::control::messages::{GuestEvent, GuestRequest, GuestStats};
use ipc::control::ControlChannel;
use ipc::xenbus::{DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn, StoreConfig};

const DRIVER: u32 = 1;
const GUEST: u32 = 2;
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Unused;

impl std::fmt::Display for Unused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not in this test")
    }
}

impl std::error::Error for Unused {}

/// A kind whose guest lets go of a disk only once `release` is set.
struct SlowGuest {
    release: Arc<AtomicBool>,
    asked: Arc<AtomicUsize>,
    disconnected: Arc<AtomicBool>,
}

impl FrontendLifecycle for SlowGuest {
    type BlockSession = UnixStream;
    type NetSession = ();
    type ConnectError = Unused;

    fn connect_block(&mut self, _: u32, c: UnixStream) -> Result<(UnixStream, u64), Unused> {
        Ok((c, 2048))
    }

    fn disconnect_block(&mut self, _: u32, _: UnixStream) {
        assert!(
            self.release.load(Ordering::SeqCst),
            "the session ended before the guest let go"
        );
        self.disconnected.store(true, Ordering::SeqCst);
    }

    fn release_block(&mut self, _: u32, _: &mut UnixStream) -> bool {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.release.load(Ordering::SeqCst)
    }

    fn connect_net(&mut self, _: u32, _: UnixStream, _: [u8; 4]) -> Result<((), [u8; 6]), Unused> {
        Err(Unused)
    }

    fn disconnect_net(&mut self, _: u32, _: ()) {}
}

impl FrontendDiagnostics for SlowGuest {
    type CheckError = Unused;

    fn disk_check(&mut self, _: u32, _: &mut UnixStream, _: DiskCheck) -> Result<String, Unused> {
        Err(Unused)
    }

    fn net_ping(&mut self, _: u32, _: &mut (), _: [u8; 4], _: u32) -> Result<String, Unused> {
        Err(Unused)
    }

    fn answer_peers(&mut self, _: u32, _: &mut ()) -> Result<(), Unused> {
        Ok(())
    }

    fn stats<'a>(&self, _: impl Iterator<Item = &'a UnixStream>) -> GuestStats {
        GuestStats::default()
    }
}

fn event(ctl: &ControlChannel, timeout: Duration) -> Option<GuestEvent> {
    ctl.recv_timeout::<GuestEvent>(timeout)
        .unwrap()
        .map(|(e, _)| e)
}

#[test]
fn a_detach_stays_closing_until_the_guest_lets_go_of_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("xs.sock");
    let (store, _thread) = spawn(StoreConfig::new(&socket)).unwrap();
    let mut dom0 = StoreClient::connect(&socket).unwrap();
    domains::create_domain(&mut dom0, DRIVER, "driver").unwrap();
    domains::create_domain(&mut dom0, GUEST, "guest").unwrap();
    let (toolstack, guest_end) = ControlChannel::pair().unwrap();
    let (release, asked, disconnected) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let kind = SlowGuest {
        release: Arc::clone(&release),
        asked: Arc::clone(&asked),
        disconnected: Arc::clone(&disconnected),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let walk = ManagedFrontend::new(
        GUEST,
        StoreClient::from_stream(store.connect_domain(GUEST).unwrap()),
        guest_end,
        kind,
    )
    .with_stop_flag(Arc::clone(&stop));
    let walker = std::thread::spawn(move || walk.run());

    let dev = DeviceId {
        kind: DeviceKind::Vbd,
        backend: DRIVER,
        frontend: GUEST,
        devid: 51712,
    };
    let (be, fe) = (dev.backend_path(), dev.frontend_path());
    let (_backend_end, frontend_end) = UnixStream::pair().unwrap();
    toolstack
        .send(
            &GuestRequest::AttachBlock { devid: dev.devid },
            &[frontend_end.as_fd()],
        )
        .unwrap();
    domains::add_device(&mut dom0, &dev, &[], &[]).unwrap();
    // The backend's part: InitWait, then Connected once the frontend is Initialised.
    dom0.write(&format!("{be}/state"), b"2").unwrap();
    domains::wait_for_state(&mut dom0, &fe, XenbusState::Initialised, WAIT).unwrap();
    dom0.write(&format!("{be}/state"), b"4").unwrap();
    assert!(matches!(
        event(&toolstack, WAIT),
        Some(GuestEvent::Connected {
            devid: 51712,
            sectors: 2048
        })
    ));

    // Detach: the frontend goes Closing and asks the kind on every tick; after it asked
    // three times (it has looked), still no Closed and the session is alive.
    domains::request_close(&mut dom0, &dev).unwrap();
    domains::wait_for_state(&mut dom0, &fe, XenbusState::Closing, WAIT).unwrap();
    let deadline = Instant::now() + WAIT;
    while asked.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "the walk stopped asking the kind"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(event(&toolstack, Duration::from_millis(1)), None);
    assert!(!disconnected.load(Ordering::SeqCst));
    assert_eq!(
        domains::read_state(&mut dom0, &fe).unwrap(),
        XenbusState::Closing
    );

    // The guest lets go: the session ends, Closed, and the toolstack hears it.
    release.store(true, Ordering::SeqCst);
    assert!(matches!(
        event(&toolstack, WAIT),
        Some(GuestEvent::Closed { devid: 51712 })
    ));
    assert!(disconnected.load(Ordering::SeqCst));
    domains::wait_for_state(&mut dom0, &fe, XenbusState::Closed, WAIT).unwrap();

    stop.store(true, Ordering::SeqCst);
    walker.join().unwrap().unwrap();
    assert!(matches!(
        event(&toolstack, WAIT),
        Some(GuestEvent::Stats(_))
    ));
}
