//! Serving vhost-user sessions: one frontend connection per [`VhostUserDevice`], for every
//! device.
//!
//! - [`serve_forever`]: bind a socket path (atomically) and serve one frontend after another,
//!   a fresh device each time. A frontend that connects and does not speak within the
//!   greeting deadline is disconnected, so it cannot hold the socket from the next one.
//! - [`serve_listener`]: serve the one frontend pending on a handed-over listener (managed
//!   mode; see control-vmm's `connection` module for how the toolstack makes it), with a
//!   handle that ends the session from another thread.
//! - [`serve_one`]: serve one connection accepted from a listener.
//!
//! Errors of a session (a hostile or buggy frontend) are logged and end only that session.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::VhostUserDevice;
use crate::virtio_core::BackendDevice;

/// Errors of a vhost-user session.
#[derive(Debug, Error)]
pub enum VhostUserSessionError {
    /// The device could not be created.
    #[error("device: {0}")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Eventfd creation failed.
    #[error("cannot create an exit event: {0}")]
    Event(#[source] io::Error),
    /// Binding the socket failed.
    #[error("cannot listen on the vhost-user socket: {0}")]
    Listen(#[source] io::Error),
    /// The vhost-user daemon could not be created, started or wired.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The session ended with an error (not a disconnect).
    #[error("session: {0}")]
    Failed(String),
}

type Daemon<D> = VhostUserDaemon<Arc<VhostUserDevice<D>>>;

/// The daemon of one session, with the device's wake event on every worker's epoll.
fn new_daemon<D: BackendDevice>(
    device: D,
) -> Result<(Arc<VhostUserDevice<D>>, Daemon<D>), VhostUserSessionError> {
    let name = format!("vhost-user {}", device.name());
    let backend = Arc::new(VhostUserDevice::new(device).map_err(VhostUserSessionError::Event)?);
    let daemon = VhostUserDaemon::new(
        name,
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserSessionError::Daemon(e.to_string()))?;
    if let Some(wake) = backend.device().wake_event() {
        for h in daemon.get_epoll_handlers() {
            h.register_listener(wake.as_raw_fd(), EventSet::IN, backend.wake_token())
                .map_err(|e| {
                    VhostUserSessionError::Daemon(format!("registering the wake event: {e}"))
                })?;
        }
    }
    Ok((backend, daemon))
}

/// How long a frontend of [`serve_forever`] may stay silent after connecting (5 s).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits for the connected frontend to leave, then stops the workers. With `greeting`, a
/// frontend that has not sent a request by then is disconnected. An error other than the
/// frontend going away is returned (and logged).
fn run_session<D: BackendDevice>(
    backend: &VhostUserDevice<D>,
    daemon: &mut Daemon<D>,
    greeting: Option<Duration>,
) -> Result<(), String> {
    let name = backend.device().name();
    info!("{name}: frontend connected");
    let handle = greeting.zip(daemon.shutdown_handle());
    let result = std::thread::scope(|s| {
        if let Some((timeout, handle)) = handle {
            // vhost-user-backend 0.24 blocks in the frontend's first read with no timeout
            // and offers no hook before it: a watchdog ends a silent session instead.
            s.spawn(move || {
                if !backend.wait_greeted(timeout) {
                    warn!("{name}: frontend silent for {timeout:?}, disconnecting it");
                    handle.shutdown();
                }
            });
        }
        let result = wait_session(backend, daemon);
        // Releases the watchdog.
        backend.mark_greeted();
        result
    });
    backend.stop_workers();
    backend.device().disconnected();
    result
}

fn wait_session<D: BackendDevice>(
    backend: &VhostUserDevice<D>,
    daemon: &mut Daemon<D>,
) -> Result<(), String> {
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::Error as DaemonError;
    let name = backend.device().name();
    match daemon.wait() {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => {
            info!("{name}: frontend disconnected");
            Ok(())
        }
        Err(e) => {
            warn!("{name}: session ended with an error: {e}");
            Err(e.to_string())
        }
    }
}

/// Serve `device` to one frontend connection accepted from `listener`, until it disconnects
/// or stays silent for `greeting` after connecting.
pub fn serve_one<D: BackendDevice>(
    listener: &mut Listener,
    device: D,
    greeting: Duration,
) -> Result<(), VhostUserSessionError> {
    let (backend, mut daemon) = new_daemon(device)?;
    daemon
        .start(listener)
        .map_err(|e| VhostUserSessionError::Daemon(e.to_string()))?;
    // Logged; the next frontend gets a fresh device either way.
    let _ = run_session(&backend, &mut daemon, Some(greeting));
    Ok(())
}

/// Bind and listen under a temporary name, then rename onto `socket`: the path appears only
/// once it accepts connections (a plain bind creates the file before `listen`, and a client
/// that connects in between gets ECONNREFUSED). A stale socket file is replaced.
pub fn bind_atomically(socket: &Path) -> Result<Listener, VhostUserSessionError> {
    let listen = VhostUserSessionError::Listen;
    let name = socket
        .file_name()
        .ok_or_else(|| listen(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = socket.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(listen)?;
    if let Err(e) = std::fs::rename(&tmp, socket) {
        let _ = std::fs::remove_file(&tmp);
        return Err(listen(e));
    }
    Ok(Listener::from(listener))
}

/// Bind `socket` (replacing a stale socket file) and serve frontends one after another, each
/// with a device from `new_device`, until `stop` becomes true (checked between connections)
/// or accepting fails. A frontend silent for `greeting` after connecting is disconnected.
pub fn serve_forever<D, E>(
    socket: &Path,
    stop: &AtomicBool,
    greeting: Duration,
    new_device: impl FnMut() -> Result<D, E>,
) -> Result<(), VhostUserSessionError>
where
    D: BackendDevice,
    E: std::error::Error + Send + Sync + 'static,
{
    let listener = bind_atomically(socket)?;
    info!("vhost-user: listening on {}", socket.display());
    serve_forever_on(listener, stop, greeting, new_device)
}

/// As [`serve_forever`], on a listener bound already (a confined backend binds before it is
/// confined: afterwards it sees no file system).
pub fn serve_forever_on<D, E>(
    mut listener: Listener,
    stop: &AtomicBool,
    greeting: Duration,
    mut new_device: impl FnMut() -> Result<D, E>,
) -> Result<(), VhostUserSessionError>
where
    D: BackendDevice,
    E: std::error::Error + Send + Sync + 'static,
{
    while !stop.load(Ordering::Acquire) {
        let device = new_device().map_err(|e| VhostUserSessionError::Device(Box::new(e)))?;
        serve_one(&mut listener, device, greeting)?;
    }
    Ok(())
}

/// Serve `device` to the one frontend whose connection is pending on `listener` (managed
/// mode: the toolstack bound a listener in a private directory, connected the frontend to it,
/// unlinked the path and handed the listener over, so no other peer can ever reach it).
/// `started` receives a handle that ends the session from another thread. Returns when the
/// frontend disconnects or the session is shut down.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use driver_domain::net::{NetBackendDevice, NetBackendConfig, Switch, SwitchConfig};
/// # use driver_domain::vhost_user::serve_listener;
/// # fn handed_over() -> std::os::unix::net::UnixListener { unimplemented!() }
/// let switch = Switch::new(SwitchConfig::default()); // one per driver domain
/// let port = Arc::new(switch.attach("vif2.0")?);
/// let cfg = NetBackendConfig { mac: [0x02, 0, 0, 0, 2, 0], ..NetBackendConfig::default() };
/// serve_listener(handed_over(), NetBackendDevice::new(port.clone(), cfg)?, |_shutdown| {})?;
/// println!("{:?}", port.counters()); // per-port counters for the toolstack
/// drop(port); // detaches the port from the switch
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn serve_listener<D: BackendDevice>(
    listener: impl Into<Listener>,
    device: D,
    started: impl FnOnce(ShutdownHandle),
) -> Result<(), VhostUserSessionError> {
    let mut listener = listener.into();
    let (backend, mut daemon) = new_daemon(device)?;
    daemon
        .start(&mut listener)
        .map_err(|e| VhostUserSessionError::Daemon(e.to_string()))?;
    // Nobody else may connect: the listener goes as soon as its one connection is accepted.
    drop(listener);
    if let Some(handle) = daemon.shutdown_handle() {
        started(handle);
    }
    // The one connection is private to its frontend, which may speak only once its guest
    // has booted: no greeting deadline.
    run_session(&backend, &mut daemon, None).map_err(VhostUserSessionError::Failed)
}
