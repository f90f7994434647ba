//! The toolstack's part, for tests that play it instead of running `splitvmm up`: a store with
//! domains created as the toolstack creates them (libxl's layout and permissions), domain
//! processes started on it with their two descriptors, and disk images.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use control_vmm::domains;
use control_vmm::supervisor::{DomainProcess, Launch};
use ipc::control::messages::BackendEvent;
use ipc::control::ControlChannel;
use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{StoreConfig, StoreHandle};
use ipc::xenstore::StoreThread;

/// A store on `<dir>/xs.sock` with a dom0 (privileged) client.
pub struct ToolstackStore {
    pub store: StoreThread,
    pub dom0: StoreClient,
    pub socket: PathBuf,
}

impl ToolstackStore {
    /// Starts the store in `dir` and creates `domains` (domid, name) in it.
    pub fn start(dir: &Path, domains: &[(u32, &str)]) -> Self {
        let socket = dir.join("xs.sock");
        let store = StoreThread::start(StoreConfig::new(&socket)).expect("starting the store");
        let mut dom0 = StoreClient::connect(&socket).expect("connecting as dom0");
        for &(domid, name) in domains {
            domains::create_domain(&mut dom0, domid, name)
                .unwrap_or_else(|e| panic!("creating domain {domid} ({name}): {e}"));
        }
        ToolstackStore {
            store,
            dom0,
            socket,
        }
    }

    /// A store client speaking for `domid`, as the toolstack hands one to a domain.
    pub fn client_of(&self, domid: u32) -> StoreClient {
        StoreClient::from_stream(
            self.store
                .handle()
                .connect_domain(domid)
                .expect("a domain's store connection"),
        )
    }

    /// Starts `cmd` as domain `domid`'s process, as the toolstack does: fd 3 its store
    /// connection, fd 4 its end of a control channel; returns the process and our end.
    pub fn start_domain(
        &self,
        domid: u32,
        name: &str,
        cmd: Command,
    ) -> (DomainProcess, ControlChannel) {
        self.start_domain_with_fds(domid, name, cmd, Vec::new())
    }

    /// [`ToolstackStore::start_domain`], with `handed` as its fds 5, 6, ...
    pub fn start_domain_with_fds(
        &self,
        domid: u32,
        name: &str,
        cmd: Command,
        handed: Vec<OwnedFd>,
    ) -> (DomainProcess, ControlChannel) {
        spawn_domain_on(self.store.handle(), domid, name, cmd, handed)
    }

    /// Stops the store; fails the test if it did not end cleanly.
    pub fn stop(self) {
        self.store.stop().expect("the store ended cleanly");
    }
}

/// A zero-filled, writable disk image of `bytes` at `path` (replacing any file there).
pub fn create_image(path: &Path, bytes: u64) -> File {
    let image = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    image
        .set_len(bytes)
        .unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
    image
}

/// Starts domain process `name` (domain `domid`) on `store` as `splitvmm up` does: its store
/// connection on fd 3, a control channel on fd 4, `handed` as fds 5, 6, ..., confined when this
/// runs as root. Returns the process and the toolstack's end of the channel.
pub fn spawn_domain_on(
    store: &StoreHandle,
    domid: u32,
    name: &str,
    cmd: Command,
    handed: Vec<OwnedFd>,
) -> (DomainProcess, ControlChannel) {
    let store_conn: OwnedFd = store
        .connect_domain(domid)
        .expect("a domain's store connection")
        .into();
    let (ours, theirs) = ControlChannel::pair().expect("a control channel");
    let launch = Launch {
        command: cmd,
        output: None,
        cgroup: None,
        // Confined as `splitvmm up` confines it, where this runs as root.
        confine: nix::unistd::geteuid().is_root().then(|| {
            confine::Plan::for_domain(control_vmm::confinement::DEFAULT_UID_BASE, domid, vec![])
        }),
    };
    let mut fds = vec![store_conn, theirs.into_fd()];
    fds.extend(handed);
    let process =
        DomainProcess::spawn(name, launch, fds).unwrap_or_else(|e| panic!("starting {name}: {e}"));
    (process, ours)
}

/// Starts `driver-domain managed --domid <driver>` on `store` and waits (at most `wait`) for
/// its Ready.
pub fn start_managed_driver_domain(
    store: &StoreHandle,
    driver: u32,
    wait: Duration,
) -> (DomainProcess, ControlChannel) {
    let mut command = Command::new(crate::workspace_bin("driver-domain"));
    command.args(["managed", "--domid", &driver.to_string()]);
    let (process, ours) = spawn_domain_on(store, driver, "driver", command, Vec::new());
    match ours.recv_timeout::<BackendEvent>(wait) {
        Ok(Some((BackendEvent::Ready, _))) => {}
        other => panic!("driver domain not ready: {other:?}"),
    }
    (process, ours)
}
