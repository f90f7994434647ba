//! A managed driver VM (`splitvmm-vmm --linux ... --driver-vm-domid N`, started by
//! `splitvmm up` for `[driver_domain] kind = "vm"`): the driver domain's store connection
//! (fd 3) and control channel (fd 4) are carried through the tunnel, as STORE and CONTROL
//! frames, to the driver domain that runs unchanged inside the VM (docs/driver-vm.md,
//! "Managed driver VM"). Descriptors never cross: a request's vhost-user listener stays here
//! and becomes a tunnel channel, named in the CONTROL frame that carries the request, whose
//! OPEN follows once the frontend is accepted; the device a disk is served from is named by
//! its path inside the VM (`ServeBlock::device`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ipc::control::messages::{fds, BackendEvent, BackendRequest};
use ipc::control::{ChannelError, ControlChannel};
use ipc::tunnel::{Frame, TunnelControl, PAYLOAD_MAX};

use super::relay::Relay;

/// The toolstack's ends, as a process driver domain gets them.
#[derive(Debug)]
pub struct ManagedEnds {
    pub domid: u32,
    /// The store connection, bound to `domid`.
    pub store: UnixStream,
    /// The control channel.
    pub control: ControlChannel,
}

impl ManagedEnds {
    /// Adopts the inherited store connection (fd 3) and control channel (fd 4).
    ///
    /// # Safety
    /// The caller checked that fds 3 and 4 are the sockets `splitvmm up` hands over
    /// (`ipc::startup::check_inherited_fds`) and that nothing else in the process owns them.
    pub unsafe fn from_inherited_fds(domid: u32) -> Self {
        // SAFETY: per this function's contract, both descriptors are open sockets owned by
        // nobody else.
        let (store, control) = unsafe {
            (
                UnixStream::from_raw_fd(fds::STORE),
                ControlChannel::from_fd(OwnedFd::from_raw_fd(fds::CONTROL)),
            )
        };
        ManagedEnds {
            domid,
            store,
            control,
        }
    }
}

/// What the relay needs to carry a managed driver domain: the two ends and the channels
/// given to devices.
#[derive(Debug)]
pub struct Managed {
    domid: u32,
    store: Mutex<UnixStream>,
    control: ControlChannel,
    /// Channels a Serve* request holds, until its connection ends.
    busy: Mutex<Vec<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Managed {
    /// `channels` channels to hand out.
    pub fn new(ends: ManagedEnds, channels: usize) -> Self {
        Managed {
            domid: ends.domid,
            store: Mutex::new(ends.store),
            control: ends.control,
            busy: Mutex::new(vec![false; channels]),
        }
    }

    /// STORE bytes from the driver VM: to the store.
    pub fn store_from_vm(&self, bytes: &[u8]) {
        if let Err(e) = lock(&self.store).write_all(bytes) {
            log::error!("driver VM {}: writing to the store: {e}", self.domid);
        }
    }

    /// A CONTROL message from the driver VM: its event to the toolstack.
    pub fn control_from_vm(&self, payload: &[u8]) {
        match TunnelControl::decode(payload) {
            Ok(TunnelControl::Event(event)) => {
                log::info!("driver VM {}: event {}", self.domid, event_name(&event));
                if let Err(e) = self.control.send(&event, &[]) {
                    log::error!("driver VM {}: to the toolstack: {e}", self.domid);
                }
            }
            Ok(other) => log::warn!("driver VM {}: {other:?} from the VM; dropped", self.domid),
            Err(e) => log::warn!("driver VM {}: CONTROL frame: {e}; dropped", self.domid),
        }
    }

    fn take_channel(&self) -> Option<u16> {
        let mut busy = lock(&self.busy);
        let free = busy.iter().position(|b| !b)?;
        busy[free] = true;
        u16::try_from(free).ok()
    }

    fn free_channel(&self, channel: u16) {
        if let Some(b) = lock(&self.busy).get_mut(usize::from(channel)) {
            *b = false;
        }
    }

    fn fail_device(&self, frontend: u32, devid: u32, reason: String) {
        log::warn!(
            "driver VM {}: device {frontend}/{devid}: {reason}",
            self.domid
        );
        let event = BackendEvent::DeviceFailed {
            frontend,
            devid,
            reason,
        };
        if let Err(e) = self.control.send(&event, &[]) {
            log::error!("driver VM {}: to the toolstack: {e}", self.domid);
        }
    }
}

fn event_name(event: &BackendEvent) -> &'static str {
    match event {
        BackendEvent::Ready => "Ready",
        BackendEvent::Stats(_) => "Stats",
        BackendEvent::DeviceFailed { .. } => "DeviceFailed",
        BackendEvent::VfAssigned { .. } => "VfAssigned",
        BackendEvent::VfRefused { .. } => "VfRefused",
        BackendEvent::VfReleased { .. } => "VfReleased",
    }
}

/// Starts the threads that carry the store connection and the control channel to the
/// driver VM once it said HELLO.
pub fn spawn(relay: &Arc<Relay>, managed: &Arc<Managed>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let store = lock(&managed.store).try_clone()?;
    let (r, m) = (Arc::clone(relay), Arc::clone(managed));
    let store_thread = std::thread::Builder::new()
        .name("dvm-store".into())
        .spawn(move || carry_store(&r, &m, store))?;
    let (r, m) = (Arc::clone(relay), Arc::clone(managed));
    let control_thread = std::thread::Builder::new()
        .name("dvm-control".into())
        .spawn(move || carry_control(&r, &m))?;
    Ok(vec![store_thread, control_thread])
}

/// The store's bytes to the driver VM, as STORE frames.
fn carry_store(relay: &Relay, managed: &Managed, mut store: UnixStream) {
    if !relay.wait_ready() {
        return;
    }
    let mut buf = vec![0u8; PAYLOAD_MAX];
    loop {
        match relay.stop_handle().wait_readable(store.as_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::error!("driver VM {}: waiting for the store: {e}", managed.domid);
                return;
            }
        }
        match store.read(&mut buf) {
            Ok(0) => {
                log::warn!(
                    "driver VM {}: the store closed the connection",
                    managed.domid
                );
                return;
            }
            Ok(n) => relay.send(&Frame::store(buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error!("driver VM {}: reading the store: {e}", managed.domid);
                return;
            }
        }
    }
}

/// The toolstack's requests to the driver VM, as CONTROL frames; a Serve* request's
/// listener becomes a channel. Stops the machine when the toolstack goes away.
fn carry_control(relay: &Arc<Relay>, managed: &Arc<Managed>) {
    if !relay.wait_ready() {
        return;
    }
    loop {
        match relay.stop_handle().wait_readable(managed.control.as_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::error!(
                    "driver VM {}: waiting for the toolstack: {e}",
                    managed.domid
                );
                return;
            }
        }
        match managed.control.try_recv::<BackendRequest>() {
            Ok(Some((request, fds))) => forward(relay, managed, request, fds),
            Ok(None) => {}
            Err(ChannelError::Closed) => {
                log::warn!(
                    "driver VM {}: the toolstack closed the control channel; stopping",
                    managed.domid
                );
                relay.stop_handle().stop();
                return;
            }
            Err(e) => log::warn!(
                "driver VM {}: a malformed request: {e}; dropped",
                managed.domid
            ),
        }
    }
}

/// One request: sent on as CONTROL; a Serve* request's listener kept here as a channel.
fn forward(
    relay: &Arc<Relay>,
    managed: &Arc<Managed>,
    request: BackendRequest,
    mut fds: Vec<OwnedFd>,
) {
    let served = match &request {
        BackendRequest::ServeBlock {
            frontend,
            devid,
            device,
            ..
        } => Some((*frontend, *devid, device.is_some())),
        BackendRequest::ServeNet {
            frontend, devid, ..
        } => Some((*frontend, *devid, true)),
        _ => None,
    };
    let Some((frontend, devid, named)) = served else {
        if !fds.is_empty() {
            log::warn!(
                "driver VM {}: {} descriptors with a request that takes none; closed",
                managed.domid,
                fds.len()
            );
        }
        send_control(
            relay,
            managed,
            TunnelControl::Request {
                request,
                channel: None,
            },
        );
        return;
    };
    if !named {
        let reason =
            "a driver VM serves block devices inside it: the disk needs a `device`".to_owned();
        return managed.fail_device(frontend, devid, reason);
    }
    let (Some(listener), true) = (fds.pop(), fds.is_empty()) else {
        return managed.fail_device(
            frontend,
            devid,
            "expected one descriptor, the vhost-user listener".into(),
        );
    };
    let listener = UnixListener::from(listener);
    let Some(channel) = managed.take_channel() else {
        return managed.fail_device(
            frontend,
            devid,
            "every channel of the tunnel is in use".into(),
        );
    };
    // Before the thread starts: the CONTROL frame goes ahead of the channel's OPEN.
    send_control(
        relay,
        managed,
        TunnelControl::Request {
            request,
            channel: Some(channel),
        },
    );
    let (r, m) = (Arc::clone(relay), Arc::clone(managed));
    let spawned = std::thread::Builder::new()
        .name(format!("relay{channel}"))
        .spawn(move || {
            while !r.stop_handle().stopped() {
                if let Some(conn) = r.accept(&listener) {
                    log::info!(
                        "driver VM {}: device {frontend}/{devid} on channel {channel}",
                        m.domid
                    );
                    r.serve_connection(channel, conn);
                    break;
                }
            }
            m.free_channel(channel);
        });
    if let Err(e) = spawned {
        managed.free_channel(channel);
        relay.send(&Frame::close(channel));
        managed.fail_device(frontend, devid, format!("starting its relay thread: {e}"));
    }
}

fn send_control(relay: &Relay, managed: &Managed, message: TunnelControl) {
    match message.to_frame() {
        Ok(frame) => relay.send(&frame),
        Err(e) => log::error!("driver VM {}: {e}", managed.domid),
    }
}
