//! The frontend's side of a backend restart (docs/protocol.md, "Backend restart").
//!
//! The toolstack marks a dead driver domain's devices Closed (leaving `online` at 1 and no
//! `error`), starts a new one and hands each guest a fresh connection per device. Here the
//! device keeps its session (queues, I/O window, requests in flight), goes back to
//! Initialising, and when the new backend is at InitWait and the connection has arrived,
//! reconnects (the kind re-runs the vhost-user set-up and resubmits what was in flight) and
//! walks Initialised, Connected again. The toolstack is told nothing: to it, and to a check
//! that was running, the restart is a delay.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use ipc::control::messages::GuestRequest;
use ipc::xenbus::{keys, DeviceKind, XenbusState};
use ipc::xenstore::client::ClientError;
use ipc::xenstore::wire::XsError;

use super::{DevKey, DeviceError, ManagedFrontend, Session, TICK};
use crate::xenbus::{error_chain, FrontendDiagnostics};

impl<K: FrontendDiagnostics> ManagedFrontend<K> {
    /// Keeps the fresh connection the toolstack handed for a device whose backend restarts.
    pub(super) fn take_reconnection(&mut self, (kind, devid): DevKey, mut fds: Vec<OwnedFd>) {
        let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
            log::error!("{kind} {devid}: a reconnection came without exactly one connection");
            return;
        };
        match self.devices.get_mut(&(kind, devid)) {
            Some(dev) => {
                log::info!("{kind} {devid}: the connection to the restarted backend arrived");
                dev.connection = Some(UnixStream::from(fd));
            }
            None => log::warn!("{kind} {devid}: a reconnection for a device this guest lacks"),
        }
    }

    /// Whether the backend at `backend` is being restarted rather than closed: the toolstack
    /// still wants the device (`online` is not "0") and the backend reported no failure.
    fn backend_restarting(&mut self, backend: &str) -> Result<bool, DeviceError> {
        let online = self.read_optional(&format!("{backend}/{}", keys::ONLINE))?;
        let error = self.read_optional(&format!("{backend}/{}", keys::ERROR))?;
        Ok(online.as_deref() != Some("0") && error.is_none())
    }

    fn read_optional(&mut self, path: &str) -> Result<Option<String>, DeviceError> {
        match self.store.read(path) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(None),
            Err(source) => Err(DeviceError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The restart part of a device's step: `Some` when it applies (suspend, resume, or the
    /// end of a resume), `None` for the ordinary walk.
    pub(super) fn restart_step(
        &mut self,
        key: DevKey,
        backend: &str,
        state: XenbusState,
        backend_state: XenbusState,
        resuming: bool,
    ) -> Option<Result<(), DeviceError>> {
        use XenbusState::{Closed, Closing, Connected, InitWait, Initialised, Initialising};
        let has_session = self.devices.get(&key).is_some_and(|d| d.session.is_some());
        let left = match (state, backend_state) {
            // The backend left Connected under a device that was using it.
            (Connected, Closed | Initialising | InitWait) | (Initialised, Closed) => has_session,
            _ => false,
        };
        if left {
            return Some(match self.backend_restarting(backend) {
                Ok(true) => self.suspend(key),
                Ok(false) => return None,
                Err(e) => Err(e),
            });
        }
        if !resuming {
            return None;
        }
        match (state, backend_state) {
            (Initialising, InitWait) => Some(self.resume(key)),
            (Initialised, Connected) => {
                let result = self.set_state(key, Connected);
                if let Some(dev) = self.devices.get_mut(&key) {
                    dev.resuming = false;
                }
                log::warn!("{} {}: reconnected to the restarted backend", key.0, key.1);
                Some(result)
            }
            // Detached (or failed) while waiting for the backend: close as usual.
            (Initialising, Closing | Closed) => match self.backend_restarting(backend) {
                Ok(true) => Some(Ok(())),
                Ok(false) => Some(self.close(key)),
                Err(e) => Some(Err(e)),
            },
            _ => Some(Ok(())),
        }
    }

    /// The backend went away: keep the session, go back to Initialising, wait for it.
    fn suspend(&mut self, key: DevKey) -> Result<(), DeviceError> {
        log::warn!(
            "{} {}: backend gone; keeping the queues and waiting for it to come back",
            key.0,
            key.1
        );
        if let Some(dev) = self.devices.get_mut(&key) {
            dev.resuming = true;
        }
        self.set_state(key, XenbusState::Initialising)
    }

    /// The new backend is at InitWait: reconnect on the handed connection (once it is here),
    /// then Initialised.
    fn resume(&mut self, key: DevKey) -> Result<(), DeviceError> {
        let (kind, devid) = key;
        let Self {
            devices, kind: k, ..
        } = self;
        let dev = devices.get_mut(&key).ok_or(DeviceError::Vanished)?;
        let Some(connection) = dev.connection.take() else {
            // The toolstack's fresh connection has not arrived yet.
            return Ok(());
        };
        log::info!("{kind} {devid}: backend at InitWait; reconnecting on the handed connection");
        match (kind, dev.session.take()) {
            (DeviceKind::Vbd, Some(Session::Block(mut session))) => {
                let result = k.reconnect_block(devid, &mut session, connection);
                dev.session = Some(Session::Block(session));
                match result {
                    None => return Err(DeviceError::CannotReconnect),
                    Some(Err(e)) => return Err(DeviceError::Connect(Box::new(e))),
                    Some(Ok(())) => {}
                }
            }
            (DeviceKind::Vif, Some(Session::Net(session))) => {
                let (session, mac) = k
                    .reconnect_net(devid, session, connection, dev.ip)
                    .map_err(|e| DeviceError::Connect(Box::new(e)))?;
                dev.session = Some(Session::Net(session));
                dev.mac = mac;
            }
            (_, other) => {
                dev.session = other;
                return Err(DeviceError::NoConnection);
            }
        }
        dev.backend_lost = false;
        log::info!("{kind} {devid}: vhost-user set-up done on the restarted backend");
        self.set_state(key, XenbusState::Initialised)
    }

    /// A check saw the backend's connection end under device `key` (`cause`, its error).
    pub(super) fn lose_backend(&mut self, key: DevKey, cause: &str) {
        if let Some(dev) = self.devices.get_mut(&key) {
            log::warn!(
                "{} {}: backend gone ({cause}); waiting for it to come back",
                key.0,
                key.1
            );
            dev.backend_lost = true;
        }
    }

    /// Whether device `key` waits for a restarted backend: its session is dead (a check saw
    /// the connection end) or it is walking back to Connected on the new backend.
    pub(super) fn reconnecting(&self, key: DevKey) -> bool {
        self.devices
            .get(&key)
            .is_some_and(|d| d.backend_lost || d.resuming)
    }

    /// While a check waits: walks the device until it is Connected again on a restarted
    /// backend (taking the toolstack's reconnections, deferring its other requests), by
    /// `deadline`. The reason it did not, otherwise, after `cause`.
    ///
    /// A dead session is not back until it has been set up again: the store may still say
    /// Connected on both sides for a while (the guest can notice the death before the
    /// toolstack has marked the backend Closed).
    pub(super) fn await_reconnect(
        &mut self,
        key: DevKey,
        deadline: Instant,
        cause: &str,
    ) -> Result<(), String> {
        let (kind, devid) = key;
        let result = self
            .walk_until_back(key, deadline)
            .map_err(|why| format!("{cause}; {why}"));
        if let Err(reason) = &result {
            log::warn!("{kind} {devid}: not back: {reason}");
        }
        result
    }

    /// [`Self::await_reconnect`]'s walk: Ok once the device is Connected again, the reason
    /// otherwise.
    fn walk_until_back(&mut self, key: DevKey, deadline: Instant) -> Result<(), String> {
        let (kind, devid) = key;
        loop {
            if Instant::now() >= deadline {
                return Err("the backend did not come back in time".to_owned());
            }
            loop {
                match self.control.try_recv::<GuestRequest>() {
                    Ok(Some((GuestRequest::ReconnectBlock { devid }, fds))) => {
                        self.take_reconnection((DeviceKind::Vbd, devid), fds)
                    }
                    Ok(Some((GuestRequest::ReconnectNet { devid }, fds))) => {
                        self.take_reconnection((DeviceKind::Vif, devid), fds)
                    }
                    Ok(Some(other)) => self.deferred.push_back(other),
                    Ok(None) => break,
                    Err(e) => return Err(format!("control channel: {e}")),
                }
            }
            match self.store.read_watch_event(Some(TICK)) {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(e) => return Err(format!("store: {e}")),
            }
            self.step(key).map_err(|e| error_chain(&e))?;
            match self.devices.get(&key) {
                Some(dev)
                    if dev.state == XenbusState::Connected
                        && !dev.resuming
                        && !dev.backend_lost =>
                {
                    log::warn!("{kind} {devid}: back; running the check again");
                    return Ok(());
                }
                Some(_) => {}
                None => return Err("the device closed".to_owned()),
            }
        }
    }
}
