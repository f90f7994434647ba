//! The frontend walk's side of a backend restart, with the toolstack and the backend played
//! through the store (as in walk_release.rs), so the order of events is the test's to choose.
//!
//! A guest can notice that its backend died (the connection ends under a check) before the
//! toolstack has marked the backend Closed: the store still says Connected on both sides. That
//! is not "back": the check must wait for the restart and the reconnection, not run again on
//! the dead session (which failed restart.rs's
//! `a_killed_driver_domain_is_restarted_and_the_guests_lose_nothing` under load with "synchronous
//! call with 1 batched requests in flight"). Likewise a check asked while its device walks back
//! to a restarted backend waits for it instead of failing with "not Connected" (restart.rs's
//! ping after the restart, under load).

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Why the fake disk's check failed.
#[derive(Debug)]
enum CheckFailure {
    /// The backend's connection ended (what a dead driver domain looks like).
    BackendGone,
    /// The check ran again on the session whose backend is dead.
    DeadSession,
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::BackendGone => f.write_str("the backend is gone"),
            CheckFailure::DeadSession => f.write_str("ran on the dead session"),
        }
    }
}

impl std::error::Error for CheckFailure {}

/// A disk whose backend dies (under the first check, with `dies_under_a_check`); checks pass
/// only once the session has been set up again on the restarted backend.
#[derive(Default)]
struct DyingBackend {
    dies_under_a_check: bool,
    checks: Arc<AtomicUsize>,
    reconnected: Arc<AtomicBool>,
}

impl FrontendLifecycle for DyingBackend {
    type BlockSession = UnixStream;
    type NetSession = ();
    type ConnectError = CheckFailure;

    fn connect_block(&mut self, _: u32, c: UnixStream) -> Result<(UnixStream, u64), CheckFailure> {
        Ok((c, 2048))
    }

    fn disconnect_block(&mut self, _: u32, _: UnixStream) {}

    fn reconnect_block(
        &mut self,
        _: u32,
        session: &mut UnixStream,
        connection: UnixStream,
    ) -> Option<Result<(), CheckFailure>> {
        *session = connection;
        self.reconnected.store(true, Ordering::SeqCst);
        Some(Ok(()))
    }

    fn connect_net(
        &mut self,
        _: u32,
        _: UnixStream,
        _: [u8; 4],
    ) -> Result<((), [u8; 6]), CheckFailure> {
        Err(CheckFailure::DeadSession)
    }

    fn disconnect_net(&mut self, _: u32, _: ()) {}
}

impl FrontendDiagnostics for DyingBackend {
    type CheckError = CheckFailure;

    fn disk_check(
        &mut self,
        _: u32,
        _: &mut UnixStream,
        _: DiskCheck,
    ) -> Result<String, CheckFailure> {
        match self.checks.fetch_add(1, Ordering::SeqCst) {
            0 if self.dies_under_a_check => Err(CheckFailure::BackendGone),
            _ if self.reconnected.load(Ordering::SeqCst) => Ok("pattern verified".into()),
            _ => Err(CheckFailure::DeadSession),
        }
    }

    fn net_ping(&mut self, _: u32, _: &mut (), _: [u8; 4], _: u32) -> Result<String, CheckFailure> {
        Err(CheckFailure::DeadSession)
    }

    fn answer_peers(&mut self, _: u32, _: &mut ()) -> Result<(), CheckFailure> {
        Ok(())
    }

    fn stats<'a>(&self, _: impl Iterator<Item = &'a UnixStream>) -> GuestStats {
        GuestStats::default()
    }

    fn backend_gone(error: &CheckFailure) -> bool {
        matches!(error, CheckFailure::BackendGone)
    }
}

fn event(ctl: &ControlChannel, timeout: Duration) -> Option<GuestEvent> {
    ctl.recv_timeout::<GuestEvent>(timeout)
        .unwrap()
        .map(|(e, _)| e)
}

/// A guest walking one disk, Connected, with the toolstack and the backend played here.
struct Rig {
    dom0: StoreClient,
    toolstack: ControlChannel,
    be: String,
    fe: String,
    checks: Arc<AtomicUsize>,
    reconnected: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    walker: std::thread::JoinHandle<Result<(), frontend_core::xenbus::WalkError>>,
    _dir: tempfile::TempDir,
}

const DEVID: u32 = 51712;

impl Rig {
    fn connected(dies_under_a_check: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("xs.sock");
        let (store, _thread) = spawn(StoreConfig::new(&socket)).unwrap();
        let mut dom0 = StoreClient::connect(&socket).unwrap();
        domains::create_domain(&mut dom0, DRIVER, "driver").unwrap();
        domains::create_domain(&mut dom0, GUEST, "guest").unwrap();
        let (toolstack, guest_end) = ControlChannel::pair().unwrap();
        let kind = DyingBackend {
            dies_under_a_check,
            ..DyingBackend::default()
        };
        let (checks, reconnected) = (Arc::clone(&kind.checks), Arc::clone(&kind.reconnected));
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
            devid: DEVID,
        };
        let (be, fe) = (dev.backend_path(), dev.frontend_path());
        let (_backend_end, frontend_end) = UnixStream::pair().unwrap();
        toolstack
            .send(
                &GuestRequest::AttachBlock { devid: DEVID },
                &[frontend_end.as_fd()],
            )
            .unwrap();
        domains::add_device(&mut dom0, &dev, &[], &[]).unwrap();
        dom0.write(&format!("{be}/state"), b"2").unwrap();
        domains::wait_for_state(&mut dom0, &fe, XenbusState::Initialised, WAIT).unwrap();
        dom0.write(&format!("{be}/state"), b"4").unwrap();
        assert!(matches!(
            event(&toolstack, WAIT),
            Some(GuestEvent::Connected { devid: DEVID, .. })
        ));
        Rig {
            dom0,
            toolstack,
            be,
            fe,
            checks,
            reconnected,
            stop,
            walker,
            _dir: dir,
        }
    }

    fn ask_check(&self) {
        let check = GuestRequest::DiskCheck {
            devid: DEVID,
            seed: 1,
            bytes: 4096,
            verify_only: false,
        };
        self.toolstack.send(&check, &[]).unwrap();
    }

    fn set_backend(&mut self, state: XenbusState) {
        let path = format!("{}/state", self.be);
        self.dom0
            .write(&path, state.to_string().as_bytes())
            .unwrap();
    }

    /// The toolstack's restart (Closed, a fresh connection) and the new backend's walk, up
    /// to the frontend's Initialised; then Connected.
    fn restart_backend(&mut self) {
        self.set_backend(XenbusState::Closed);
        let (_new_backend_end, new_frontend_end) = UnixStream::pair().unwrap();
        self.toolstack
            .send(
                &GuestRequest::ReconnectBlock { devid: DEVID },
                &[new_frontend_end.as_fd()],
            )
            .unwrap();
        self.set_backend(XenbusState::InitWait);
        domains::wait_for_state(&mut self.dom0, &self.fe, XenbusState::Initialised, WAIT).unwrap();
        assert!(self.reconnected.load(Ordering::SeqCst));
        self.set_backend(XenbusState::Connected);
    }

    /// The check's verdict passed, after `checks` runs of it; the disk Connected again.
    fn check_passed(mut self, checks: usize) {
        match event(&self.toolstack, WAIT) {
            Some(GuestEvent::DiskCheck {
                devid: DEVID,
                passed: true,
                ..
            }) => {}
            other => panic!("the check after the reconnection: {other:?}"),
        }
        assert_eq!(self.checks.load(Ordering::SeqCst), checks);
        domains::wait_for_state(&mut self.dom0, &self.fe, XenbusState::Connected, WAIT).unwrap();
        self.stop.store(true, Ordering::SeqCst);
        self.walker.join().unwrap().unwrap();
    }
}

#[test]
fn a_check_that_sees_its_backend_die_before_the_store_says_so_waits_for_the_reconnection() {
    let mut rig = Rig::connected(true);
    // The check finds the backend gone; the store still says Connected on both sides (the
    // toolstack has not noticed yet). The check must not run again, nor end, meanwhile.
    rig.ask_check();
    let early = event(&rig.toolstack, Duration::from_millis(300));
    assert!(
        early.is_none(),
        "the check ended before the backend was back: {early:?}"
    );
    assert_eq!(
        rig.checks.load(Ordering::SeqCst),
        1,
        "the check ran again on the dead session"
    );
    rig.restart_backend();
    rig.check_passed(2);
}

#[test]
fn a_check_asked_while_the_disk_reconnects_waits_for_it() {
    let mut rig = Rig::connected(false);
    // The toolstack marked the dead backend Closed: the frontend keeps its session and goes
    // back to Initialising, waiting for the new backend.
    rig.set_backend(XenbusState::Closed);
    domains::wait_for_state(&mut rig.dom0, &rig.fe, XenbusState::Initialising, WAIT).unwrap();
    rig.ask_check();
    let early = event(&rig.toolstack, Duration::from_millis(300));
    assert!(
        early.is_none(),
        "the check ended before the disk was back: {early:?}"
    );
    assert_eq!(rig.checks.load(Ordering::SeqCst), 0);
    rig.restart_backend();
    rig.check_passed(1);
}
