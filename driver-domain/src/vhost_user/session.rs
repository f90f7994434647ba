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
//! - [`serve_stream`]: serve the frontend at the other end of a connected socket (the driver
//!   VM's tunnel, [`crate::vm_tunnel`]).
//!
//! Each session is one [`VhostUserReqHandler`] (this project's request handler, see
//! [`super::handler`]) behind the `vhost` crate's `BackendReqHandler`, which reads the
//! frontend's messages on this thread; the queues are served by the handler's workers.
//!
//! Errors of a session (a hostile or buggy frontend) are logged and end only that session.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::{BackendListener, BackendReqHandler, Error as VuError, Listener};

use super::device::VhostUserDevice;
use super::handler::{HandlerError, VhostUserReqHandler};
use crate::virtio_core::{sync, BackendDevice};

/// Errors of a vhost-user session.
#[derive(Debug, Error)]
pub enum VhostUserSessionError {
    /// The device could not be created.
    #[error("device: {0}")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The request handler or its workers could not be created.
    #[error("request handler: {0}")]
    Handler(#[source] HandlerError),
    /// Binding the socket failed.
    #[error("cannot listen on the vhost-user socket: {0}")]
    Listen(#[source] io::Error),
    /// Accepting the frontend's connection failed.
    #[error("cannot accept the frontend: {0}")]
    Accept(#[source] VuError),
    /// The session ended with an error (not a disconnect).
    #[error("session: {0}")]
    Failed(String),
}

/// Ends a session from another thread: the connection is shut down, which ends the request
/// loop (the frontend sees the backend go).
#[derive(Debug)]
pub struct SessionShutdown {
    conn: UnixStream,
    requested: Arc<AtomicBool>,
}

impl SessionShutdown {
    /// Ends the session.
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::Release);
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}

type Handler<D> = Mutex<VhostUserReqHandler<D>>;

/// One accepted session: the device, its handler, and the vhost crate's message loop on it.
struct Session<D: BackendDevice> {
    device: Arc<VhostUserDevice<D>>,
    handler: Arc<Handler<D>>,
    req: BackendReqHandler<Handler<D>>,
}

/// A session's device and its request handler.
type DeviceAndHandler<D> = (Arc<VhostUserDevice<D>>, Arc<Handler<D>>);

/// The device of a session and its request handler (its workers started).
fn device_and_handler<D: BackendDevice>(
    device: D,
) -> Result<DeviceAndHandler<D>, VhostUserSessionError> {
    let device = Arc::new(
        VhostUserDevice::new(device).map_err(|e| VhostUserSessionError::Device(Box::new(e)))?,
    );
    let handler =
        VhostUserReqHandler::new(device.clone()).map_err(VhostUserSessionError::Handler)?;
    Ok((device, Arc::new(Mutex::new(handler))))
}

/// Accepts one frontend on `listener` for `device`.
fn accept<D: BackendDevice>(
    listener: &mut Listener,
    device: D,
) -> Result<Session<D>, VhostUserSessionError> {
    let (device, handler) = device_and_handler(device)?;
    let mut backend =
        BackendListener::new(listener, handler.clone()).map_err(VhostUserSessionError::Accept)?;
    loop {
        match backend.accept() {
            Ok(Some(req)) => {
                return Ok(Session {
                    device,
                    handler,
                    req,
                })
            }
            Ok(None) => continue,
            Err(e) => return Err(VhostUserSessionError::Accept(e)),
        }
    }
}

/// How long a frontend of [`serve_forever`] may stay silent after connecting (5 s).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the connected frontend's requests until it leaves or the session is shut down;
/// then stops the workers. With `greeting`, a frontend that has not sent a request by then
/// is disconnected. An error other than the frontend going away is returned (and logged).
fn run_session<D: BackendDevice>(
    session: Session<D>,
    greeting: Option<Duration>,
    started: impl FnOnce(SessionShutdown),
) -> Result<(), String> {
    let Session {
        device,
        handler,
        mut req,
    } = session;
    let device = &*device;
    let name = device.device().name();
    info!("{name}: frontend connected");
    let requested = Arc::new(AtomicBool::new(false));
    let handle = |conn| SessionShutdown {
        conn,
        requested: requested.clone(),
    };
    let (mine, theirs) = match (req.try_clone_connection(), req.try_clone_connection()) {
        (Ok(a), Ok(b)) => (handle(a), handle(b)),
        (Err(e), _) | (_, Err(e)) => return Err(format!("cloning the connection: {e}")),
    };
    started(theirs);
    let result = std::thread::scope(|s| {
        if let Some(timeout) = greeting {
            let watchdog = &mine;
            s.spawn(move || {
                if !device.wait_greeted(timeout) {
                    warn!("{name}: frontend silent for {timeout:?}, disconnecting it");
                    watchdog.shutdown();
                }
            });
        }
        let result = loop {
            if let Err(e) = req.handle_request() {
                break e;
            }
        };
        // Releases the watchdog.
        device.mark_greeted();
        result
    });
    let _ = mine.conn.shutdown(Shutdown::Both);
    drop(req);
    sync::lock(&handler).stop_workers();
    device.device().disconnected();
    match result {
        VuError::Disconnected | VuError::PartialMessage => {
            info!("{name}: frontend disconnected");
            Ok(())
        }
        _ if requested.load(Ordering::Acquire) => {
            info!("{name}: session shut down");
            Ok(())
        }
        e => {
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
    let session = accept(listener, device)?;
    // Logged; the next frontend gets a fresh device either way.
    let _ = run_session(session, Some(greeting), |_| {});
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
    started: impl FnOnce(SessionShutdown),
) -> Result<(), VhostUserSessionError> {
    let mut listener = listener.into();
    let session = accept(&mut listener, device)?;
    // Nobody else may connect: the listener goes as soon as its one connection is accepted.
    drop(listener);
    // The one connection is private to its frontend, which may speak only once its guest
    // has booted: no greeting deadline.
    run_session(session, None, started).map_err(VhostUserSessionError::Failed)
}

/// Serve `device` to the frontend at the other end of `stream`, a connected socket (the
/// driver VM's tunnel hands each channel's messages to the session through a socketpair, see
/// [`crate::vm_tunnel`]). No greeting deadline: the peer speaks when its guest boots.
/// `started` receives a handle that ends the session from another thread. Returns when the
/// peer disconnects or the session is shut down.
pub fn serve_stream<D: BackendDevice>(
    stream: UnixStream,
    device: D,
    started: impl FnOnce(SessionShutdown),
) -> Result<(), VhostUserSessionError> {
    let (device, handler) = device_and_handler(device)?;
    let req = BackendReqHandler::from_stream(stream, handler.clone());
    let session = Session {
        device,
        handler,
        req,
    };
    run_session(session, None, started).map_err(VhostUserSessionError::Failed)
}
