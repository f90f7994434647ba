//! The process block frontend's reconnect to a restarted backend, with the timing pinned down
//! (the race behind restart.rs's flaky `a_killed_driver_domain_is_restarted_and_the_guests_lose_nothing`).
//!
//! A backend that dies with a request in flight leaves its kick unread on the kick eventfd, which
//! the frontend keeps and hands to the restarted backend: that backend reads the ring as soon as
//! SET_VRING_ENABLE starts it. The frontend must have started its rings over (in-flight requests
//! re-posted from avail index 0) before then; if it rewrites them afterwards, what the new
//! backend completed meanwhile is wiped and the request never completes.
//!
//! Both backends here are the driver domain's own request handler ([`VhostUserReqHandler`])
//! serving a real image in this process, behind a handler that pins the timing: the dead one
//! never enables a ring (a stopped backend: the write stays in flight, its kick unread); the
//! restarted one acknowledges SET_VRING_ENABLE (the frontend waits for it: REPLY_ACK) only once
//! it has served what the ring held, the fastest backend the frontend could meet. Without the
//! ordering in `BlockFrontend::reconnect` the write then never completes (the reconnect times
//! out, as the guest's did). The result is read from the host: the image.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

use std::fs::File;
use std::net::Shutdown;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use driver_domain::blk::{BlkBackendConfig, BlkBackendDevice, BlkDisk};
use driver_domain::vhost_user::{VhostUserDevice, VhostUserReqHandler};
use guest_frontend::process::{BlockFrontend, BlockFrontendConfig, BlockOp, ProcessFrontendError};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::QueueT;

const IMAGE_BYTES: u64 = 1 << 20;
/// How long the restarted backend may take to serve what its ring held.
const SERVE_WAIT: Duration = Duration::from_secs(2);

/// How a backend departs from the driver domain's handler.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Timing {
    /// It refuses every memory table.
    RefusesMemoryTables,
    /// A stopped backend: rings are never enabled, so nothing posted is served and every
    /// kick stays unread.
    NeverServes,
    /// The answer to SET_VRING_ENABLE waits until the ring has been served (its used index
    /// moved), or [`SERVE_WAIT`].
    ServesBeforeAnswering,
}

/// The driver domain's request handler with the timing of SET_VRING_ENABLE pinned (or its
/// memory tables refused).
struct Pinned {
    inner: VhostUserReqHandler<BlkBackendDevice>,
    timing: Timing,
}

/// Methods passed to the driver domain's handler unchanged.
macro_rules! pass {
    ($(fn $name:ident(&mut self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&mut self $(, $arg: $ty)*) -> $ret { self.inner.$name($($arg),*) })*
    };
}

impl VhostUserBackendReqHandlerMut for Pinned {
    pass! {
        fn set_owner(&mut self) -> VuResult<()>;
        fn reset_owner(&mut self) -> VuResult<()>;
        fn reset_device(&mut self) -> VuResult<()>;
        fn get_features(&mut self) -> VuResult<u64>;
        fn set_features(&mut self, features: u64) -> VuResult<()>;
        fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()>;
        fn set_vring_addr(
            &mut self,
            index: u32,
            flags: VhostUserVringAddrFlags,
            descriptor: u64,
            used: u64,
            available: u64,
            log: u64
        ) -> VuResult<()>;
        fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()>;
        fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState>;
        fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()>;
        fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()>;
        fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()>;
        fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures>;
        fn set_protocol_features(&mut self, features: u64) -> VuResult<()>;
        fn get_queue_num(&mut self) -> VuResult<u64>;
        fn get_config(
            &mut self,
            offset: u32,
            size: u32,
            flags: VhostUserConfigFlags
        ) -> VuResult<Vec<u8>>;
        fn set_config(&mut self, offset: u32, buf: &[u8], flags: VhostUserConfigFlags)
            -> VuResult<()>;
        fn set_gpu_socket(&mut self, gpu: GpuBackend) -> VuResult<()>;
        fn get_shared_object(&mut self, uuid: VhostUserSharedMsg) -> VuResult<File>;
        fn get_inflight_fd(
            &mut self,
            inflight: &VhostUserInflight
        ) -> VuResult<(VhostUserInflight, File)>;
        fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()>;
        fn get_max_mem_slots(&mut self) -> VuResult<u64>;
        fn add_mem_region(
            &mut self,
            region: &VhostUserSingleMemoryRegion,
            fd: File,
            postcopy: Option<bool>
        ) -> VuResult<Option<VhostUserMemoryRegionBase>>;
        fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()>;
        fn set_device_state_fd(
            &mut self,
            direction: VhostTransferStateDirection,
            phase: VhostTransferStatePhase,
            fd: File
        ) -> VuResult<Option<File>>;
        fn check_device_state(&mut self) -> VuResult<()>;
        fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig>;
        fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()>;
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if self.timing == Timing::RefusesMemoryTables {
            return Err(vhost::vhost_user::Error::InvalidParam);
        }
        self.inner.set_mem_table(ctx, files, postcopy)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.timing == Timing::NeverServes {
            return Ok(());
        }
        self.inner.set_vring_enable(index, enable)?;
        let Some(vring) = self.inner.vrings().get(index as usize) else {
            return Ok(());
        };
        let deadline = Instant::now() + SERVE_WAIT;
        while enable && vring.lock().queue().next_used() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// One backend session on its own thread.
struct Backend {
    /// A duplicate of its end of the connection: shutting it down is the backend dying.
    connection: UnixStream,
    thread: JoinHandle<()>,
}

impl Backend {
    /// Serves `image` on `connection` with `timing`.
    fn serve(connection: UnixStream, image: &File, timing: Timing) -> Backend {
        let disk = Arc::new(BlkDisk::from_file(image.try_clone().unwrap(), false).unwrap());
        let device = BlkBackendDevice::new(disk, BlkBackendConfig::default()).unwrap();
        let device = Arc::new(VhostUserDevice::new(device).unwrap());
        let inner = VhostUserReqHandler::new(device).unwrap();
        let handler = Arc::new(Mutex::new(Pinned { inner, timing }));
        let dup = connection.try_clone().unwrap();
        let mut requests = BackendReqHandler::from_stream(connection, Arc::clone(&handler));
        let thread = std::thread::spawn(move || {
            while requests.handle_request().is_ok() {}
            handler.lock().unwrap().inner.stop_workers();
        });
        Backend {
            connection: dup,
            thread,
        }
    }

    /// The backend dies: its connection ends and its workers stop.
    fn kill(self) {
        self.connection.shutdown(Shutdown::Both).unwrap();
        self.thread.join().unwrap();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn a_write_in_flight_completes_on_a_restarted_backend_that_serves_its_ring_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let image = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    image.set_len(IMAGE_BYTES).unwrap();
    let cfg = BlockFrontendConfig {
        timeout: Duration::from_secs(1),
        ..BlockFrontendConfig::default()
    };

    // The first backend takes the write and never serves it; then it dies.
    let (frontend_end, backend_end) = UnixStream::pair().unwrap();
    let dead = Backend::serve(backend_end, &image, Timing::NeverServes);
    let mut frontend = BlockFrontend::connect(frontend_end, cfg).unwrap();
    let data = pattern(4096);
    frontend
        .queue(0)
        .unwrap()
        .submit(BlockOp::Write {
            sector: 8,
            data: &data,
        })
        .unwrap();
    frontend.queue(0).unwrap().publish().unwrap();
    dead.kill();
    let gone = frontend
        .queue(0)
        .unwrap()
        .complete(|_| panic!("a backend that never served completed a request"));
    assert!(
        matches!(
            gone,
            Err(ProcessFrontendError::BackendGone { in_flight: 1, .. })
        ),
        "{gone:?}"
    );
    assert_eq!(
        image_bytes(&image, 8 * 512, data.len()),
        vec![0; data.len()]
    );

    // The restarted backend serves the ring the moment it is enabled; the write is
    // resubmitted and completes, and is on the image.
    let (frontend_end, backend_end) = UnixStream::pair().unwrap();
    let restarted = Backend::serve(backend_end, &image, Timing::ServesBeforeAnswering);
    let resubmitted = frontend.reconnect(frontend_end);
    assert!(
        matches!(resubmitted, Ok(1)),
        "reconnect: {resubmitted:?} (the resubmitted write never completed)"
    );
    assert_eq!(image_bytes(&image, 8 * 512, data.len()), data);

    // And the queue goes on: a read on the new session sees the write.
    let mut back = vec![0u8; data.len()];
    frontend.read(8, &mut back).unwrap();
    assert_eq!(back, data);
    frontend.shutdown().unwrap();
    restarted.kill();
}

/// `len` bytes of the image at `offset`, read from the host.
fn image_bytes(image: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// With REPLY_ACK the frontend waits for each set-up message's acknowledgement: a memory table
/// the backend refuses fails the call that sent it (not a later message, nor a silently dead
/// queue), and the restarted-backend ordering above relies on the same wait.
#[test]
fn a_refused_memory_table_fails_the_connect_at_set_mem_table() {
    let dir = tempfile::tempdir().unwrap();
    let image = File::create(dir.path().join("disk.img")).unwrap();
    image.set_len(IMAGE_BYTES).unwrap();
    let (frontend_end, backend_end) = UnixStream::pair().unwrap();
    let backend = Backend::serve(backend_end, &image, Timing::RefusesMemoryTables);
    let err = BlockFrontend::connect(frontend_end, BlockFrontendConfig::default())
        .expect_err("a refused memory table must fail the connect");
    let chain = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(chain.contains("SET_MEM_TABLE"), "{chain}");
    backend.kill();
}
