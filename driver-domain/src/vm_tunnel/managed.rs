//! A managed driver VM (`vm-serve --managed`, docs/driver-vm.md): the unchanged
//! `driver-domain managed` runs behind the tunnel, on a store connection and a control channel
//! whose other ends are this server's. STORE frames are the store connection's bytes, both
//! ways; CONTROL frames carry the toolstack's requests in and the driver domain's events out.
//! A Serve* request names the tunnel channel of its frontend's connection: the descriptors the
//! toolstack would hand over are made here (the device the request names, opened in the VM; a
//! listener whose one pending connection is the channel's end, kept until its OPEN).
//!
//! Two threads: one sends what the driver domain writes to its store connection out as STORE
//! frames, one sends its events out as CONTROL frames. When either finds the driver domain
//! gone, it signals the server's wake-up, which ends the server.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ipc::control::messages::{BackendEvent, BackendRequest};
use ipc::control::{ChannelError as ControlError, ControlChannel};
use ipc::tunnel::{Frame, TunnelControl, PAYLOAD_MAX};
use log::{info, warn};
use nix::sys::eventfd::EventFd;
use thiserror::Error;

use super::writer::TunnelWriter;
use crate::blk::CacheMode;

/// Why the managed side could not start.
#[derive(Debug, Error)]
pub enum ManagedError {
    /// A socket pair could not be made.
    #[error("cannot make the driver domain's sockets: {0}")]
    Pair(#[source] io::Error),
    /// The control channel's pair could not be made.
    #[error("cannot make the driver domain's control channel: {0}")]
    ControlPair(#[source] ControlError),
    /// The private directory for listeners could not be made.
    #[error("cannot make a private directory in {0}: {1}")]
    Dir(PathBuf, #[source] io::Error),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
    /// The driver domain could not be started.
    #[error("cannot start the driver domain: {0}")]
    Spawn(#[source] confine::spawn::SpawnError),
}

/// The server's ends of the driver domain's store connection and control channel.
pub struct ManagedLink {
    pub store: UnixStream,
    pub control: ControlChannel,
}

/// The driver domain's ends, handed to it as fds 3 (store) and 4 (control).
pub struct DriverEnds {
    pub store: OwnedFd,
    pub control: OwnedFd,
}

impl ManagedLink {
    /// A store pair (a stream socketpair) and a control pair: the server's ends and the
    /// driver domain's.
    pub fn pairs() -> Result<(ManagedLink, DriverEnds), ManagedError> {
        let (store, theirs) = UnixStream::pair().map_err(ManagedError::Pair)?;
        let (control, their_control) = ControlChannel::pair().map_err(ManagedError::ControlPair)?;
        Ok((
            ManagedLink { store, control },
            DriverEnds {
                store: theirs.into(),
                control: their_control.into_fd(),
            },
        ))
    }
}

/// Starts `program managed --domid DOMID --memory-from-sysfs` with `ends` as its fds 3 and 4 and
/// nothing else above 2 (standard output and error and the environment, `RUST_LOG` with it,
/// inherited); it gets SIGKILL should this thread end first. No confinement: in a driver VM
/// the VM is the boundary. Returns its pid; `ends` are closed here.
pub fn spawn_driver_domain(
    program: &Path,
    domid: u32,
    ends: DriverEnds,
) -> Result<libc::pid_t, ManagedError> {
    let fds = [ends.store, ends.control];
    // SAFETY: sigemptyset initialises the set it is given; a zeroed sigset_t is valid memory.
    let unblock = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        set
    };
    let spec = confine::SpawnSpec {
        program,
        args: vec![
            "managed".into(),
            "--domid".into(),
            domid.to_string().into(),
            "--memory-from-sysfs".into(),
        ],
        env: std::env::vars_os().collect(),
        output: None,
        fds: &fds,
        namespaces: 0,
        unblock,
        parent_death_signal: libc::SIGKILL,
        cgroup_procs: None,
    };
    confine::spawn(&spec).map_err(ManagedError::Spawn)
}

/// The managed driver domain as the server sees it.
pub struct ManagedBackend {
    store: UnixStream,
    control: ControlChannel,
    tunnel: Arc<TunnelWriter>,
    /// Connections of channels a Serve* request prepared, waiting for their OPEN.
    prepared: HashMap<u16, UnixStream>,
    /// Channels whose Serve* request was refused: their OPEN gets CLOSE.
    refused: HashSet<u16>,
    dir: PrivateDir,
    threads: Vec<JoinHandle<()>>,
}

impl ManagedBackend {
    /// Starts the two threads out of `link`; `wake` is signalled when the driver domain is
    /// gone.
    pub fn start(
        link: ManagedLink,
        tunnel: Arc<TunnelWriter>,
        wake: Arc<EventFd>,
    ) -> Result<Self, ManagedError> {
        let dir = PrivateDir::create()?;
        let store_in = link.store.try_clone().map_err(ManagedError::Pair)?;
        let control_in = link
            .control
            .as_fd()
            .try_clone_to_owned()
            .map(ControlChannel::from_fd)
            .map_err(ManagedError::Pair)?;
        let mut threads = Vec::new();
        let (t, w) = (tunnel.clone(), wake.clone());
        threads.push(
            std::thread::Builder::new()
                .name("store-out".into())
                .spawn(move || {
                    store_out(store_in, &t);
                    signal(&w);
                })
                .map_err(ManagedError::Thread)?,
        );
        let t = tunnel.clone();
        let spawned = std::thread::Builder::new()
            .name("control-out".into())
            .spawn(move || {
                events_out(&control_in, &t);
                signal(&wake);
            });
        let mut backend = ManagedBackend {
            store: link.store,
            control: link.control,
            tunnel,
            prepared: HashMap::new(),
            refused: HashSet::new(),
            dir,
            threads,
        };
        // On failure, dropping `backend` ends the first thread.
        backend.threads.push(spawned.map_err(ManagedError::Thread)?);
        Ok(backend)
    }

    /// A STORE frame's bytes, to the driver domain's store connection.
    pub fn store(&mut self, bytes: &[u8]) {
        if let Err(e) = self.store.write_all(bytes) {
            // The driver domain is gone: the store thread sees it too and ends the server.
            warn!("store: writing to the driver domain: {e}");
        }
    }

    /// A CONTROL frame's payload: a request goes on to the driver domain; a malformed one is
    /// dropped.
    pub fn control(&mut self, payload: &[u8]) {
        match TunnelControl::decode(payload) {
            Ok(TunnelControl::Request { request, channel }) => self.request(request, channel),
            Ok(TunnelControl::Event(e)) => warn!("control: an event from dom0 dropped: {e:?}"),
            Err(e) => warn!("control: {e}: dropped"),
        }
    }

    /// The prepared connection of channel `id`, taken for its OPEN, or why there is none.
    pub fn take_prepared(&mut self, id: u16) -> Result<UnixStream, &'static str> {
        if let Some(conn) = self.prepared.remove(&id) {
            return Ok(conn);
        }
        if self.refused.remove(&id) {
            Err("its request was refused")
        } else {
            Err("no request prepared it")
        }
    }

    fn request(&mut self, request: BackendRequest, channel: Option<u16>) {
        let made = match (&request, channel) {
            (
                BackendRequest::ServeBlock {
                    device: Some(path),
                    readonly,
                    ..
                },
                Some(c),
            ) => open_device(path, *readonly).and_then(|dev| {
                let listener = self.prepare(c)?;
                Ok(vec![OwnedFd::from(dev), OwnedFd::from(listener)])
            }),
            (BackendRequest::ServeBlock { device: None, .. }, _) => {
                Err("ServeBlock names no device in the driver VM".to_owned())
            }
            (BackendRequest::ServeNet { .. }, Some(c)) => {
                self.prepare(c).map(|l| vec![OwnedFd::from(l)])
            }
            (BackendRequest::ServeBlock { .. } | BackendRequest::ServeNet { .. }, None) => {
                Err("no tunnel channel for its connection".to_owned())
            }
            (_, Some(c)) => {
                warn!("control: {request:?} names channel {c}, which it has no use for");
                self.refuse_channel(c);
                Ok(Vec::new())
            }
            (_, None) => Ok(Vec::new()),
        };
        let fds = match made {
            Ok(fds) => fds,
            Err(reason) => return self.refuse(&request, channel, reason),
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = self.control.send(&request, &borrowed) {
            warn!("control: handing {request:?} to the driver domain: {e}");
            if !fds.is_empty() {
                self.refuse(&request, channel, format!("the driver domain: {e}"));
            }
        }
        // Our copies close here: the driver domain holds its own.
    }

    /// A listener whose one pending connection is channel `c`'s, which is kept until OPEN.
    fn prepare(&mut self, c: u16) -> Result<UnixListener, String> {
        let (listener, conn) = self
            .dir
            .connection()
            .map_err(|e| format!("a listener for channel {c}: {e}"))?;
        if self.prepared.insert(c, conn).is_some() {
            warn!("channel {c}: prepared again; the earlier connection dropped");
        }
        self.refused.remove(&c);
        Ok(listener)
    }

    /// Tells dom0 the request failed: DeviceFailed for a device; its channel's OPEN will get
    /// CLOSE.
    fn refuse(&mut self, request: &BackendRequest, channel: Option<u16>, reason: String) {
        warn!("control: {request:?} refused: {reason}");
        let device = match request {
            BackendRequest::ServeBlock {
                frontend, devid, ..
            }
            | BackendRequest::ServeNet {
                frontend, devid, ..
            } => Some((*frontend, *devid)),
            _ => None,
        };
        if let Some((frontend, devid)) = device {
            let event = TunnelControl::Event(BackendEvent::DeviceFailed {
                frontend,
                devid,
                reason,
            });
            self.send_control(&event);
        }
        if let Some(c) = channel {
            self.refuse_channel(c);
        }
    }

    /// Channel `c` will not be served: its OPEN gets CLOSE (then, not now: dom0 sends OPEN
    /// when the frontend connects, and frees the channel only once it is closed after that,
    /// so one CLOSE, after OPEN, can never reach a later user of the channel).
    fn refuse_channel(&mut self, c: u16) {
        self.prepared.remove(&c);
        self.refused.insert(c);
    }

    fn send_control(&self, msg: &TunnelControl) {
        match msg.to_frame() {
            Ok(frame) => {
                if let Err(e) = self.tunnel.send(&frame) {
                    warn!("control: {e}");
                }
            }
            Err(e) => warn!("control: {e}"),
        }
    }

    /// Ends the link: both sockets shut down (the driver domain sees its store and control
    /// channel end), the threads joined.
    fn shut(&mut self) {
        let _ = self.store.shutdown(Shutdown::Both);
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.control.as_fd()),
            nix::sys::socket::Shutdown::Both,
        );
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ManagedBackend {
    fn drop(&mut self) {
        self.shut();
    }
}

fn signal(wake: &EventFd) {
    if let Err(e) = wake.write(1) {
        warn!("vm-serve: cannot wake the server: {e}");
    }
}

/// The store thread: the driver domain's bytes out as STORE frames, until it closes.
fn store_out(mut from: UnixStream, tunnel: &TunnelWriter) {
    let mut buf = vec![0u8; PAYLOAD_MAX];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("store: reading the driver domain's connection: {e}");
                break;
            }
        };
        if let Err(e) = tunnel.send(&Frame::store(buf[..n].to_vec())) {
            warn!("store: {e}");
            break;
        }
    }
    info!("store: the driver domain's connection ended");
}

/// The control thread: the driver domain's events out as CONTROL frames, until it closes.
fn events_out(control: &ControlChannel, tunnel: &TunnelWriter) {
    loop {
        match control.recv::<BackendEvent>() {
            Ok((event, fds)) => {
                if !fds.is_empty() {
                    warn!(
                        "control: {} descriptor(s) with {event:?} dropped: the tunnel cannot carry them",
                        fds.len()
                    );
                }
                match TunnelControl::Event(event).to_frame() {
                    Ok(frame) => {
                        if let Err(e) = tunnel.send(&frame) {
                            warn!("control: {e}");
                            break;
                        }
                    }
                    Err(e) => warn!("control: {e}: dropped"),
                }
            }
            Err(ControlError::Closed) => break,
            Err(e @ ControlError::Io(_)) => {
                warn!("control: {e}");
                break;
            }
            Err(e) => warn!("control: a message from the driver domain dropped: {e}"),
        }
    }
    info!("control: the driver domain's channel ended");
}

/// Opens block device `path` for a ServeBlock: O_DIRECT (the guest's memory is BAR2, which
/// direct I/O cannot pin: the disk then goes through bounce buffers), read-only if asked.
fn open_device(path: &str, readonly: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(CacheMode::None.open_flags())
        .open(path)
        .map_err(|e| format!("opening {path}: {e}"))
}

/// A directory only this process can enter (0700), where each listener is bound, connected
/// to and unlinked at once; removed on drop.
struct PrivateDir {
    path: PathBuf,
    next: AtomicU64,
}

impl PrivateDir {
    /// In `$TMPDIR` if set, else in `/run` (made if missing: an initramfs may have none),
    /// else in `/tmp`.
    fn create() -> Result<Self, ManagedError> {
        let bases: Vec<PathBuf> = match std::env::var_os("TMPDIR") {
            Some(dir) if !dir.is_empty() => vec![PathBuf::from(dir)],
            _ => vec![PathBuf::from("/run"), PathBuf::from("/tmp")],
        };
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let mut last = (PathBuf::new(), io::Error::from(io::ErrorKind::NotFound));
        for base in bases {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&base);
            let path = base.join(format!(
                "vm-serve.{}.{}",
                std::process::id(),
                SERIAL.fetch_add(1, Ordering::Relaxed)
            ));
            // Mode 0700 as made (mkdir applies the umask, which only takes bits away).
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    return Ok(PrivateDir {
                        path,
                        next: AtomicU64::new(0),
                    })
                }
                Err(e) => last = (base, e),
            }
        }
        Err(ManagedError::Dir(last.0, last.1))
    }

    /// A listener and the connection pending on it; no name is left to connect to.
    fn connection(&self) -> io::Result<(UnixListener, UnixStream)> {
        let name = format!("c{}.sock", self.next.fetch_add(1, Ordering::Relaxed));
        ipc::connection::private_connection(&self.path, &name)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}
