//! Supervision: the toolstack watches every domain process through its pidfd, on one thread.
//!
//! - A guest whose process ends by itself (a Linux guest powering off, or any guest killed or
//!   crashed) has its devices torn down and its domain released in the store, as `destroy`
//!   would; nobody needs to run anything.
//! - A driver domain that dies is noticed at once, logged, and restarted (the "backend
//!   restart" walk of docs/protocol.md): its backend directories are marked Closed, a new
//!   process starts with the same domain id, and each device is handed over again: the image
//!   descriptor the toolstack kept (same open file description, so the same lock; nothing is
//!   reopened by path) and a fresh private vhost-user connection, whose other end goes to the
//!   guest (`ReconnectBlock`/`ReconnectNet`). The new backend finds the directories, goes to
//!   InitWait, and each frontend reconnects on its own.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipc::control::messages::{BackendRequest, GuestEvent, GuestRequest};
use ipc::control::ControlChannel;
use ipc::xenbus::{backend_kind_dir, keys, DeviceId, DeviceKind, XenbusState};
use ipc::xenstore::client::StoreClient;

use super::devices::memory_grant;
use super::{lock, start_driver_domain, Domain, GuestSlot, Host};
use crate::config::GuestKind;
use crate::supervisor::describe;
use ipc::connection;

/// How long one look at the pidfds waits when nothing dies.
const POLL: Duration = Duration::from_millis(100);
/// A driver domain restarted this often within [`RESTART_WINDOW`] is given up on.
const RESTART_LIMIT: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The supervision thread and its stop flag.
pub(super) struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// What the supervisor reaches a guest's current process by, without the guest's lock (a
/// request may hold it for a long time): its pidfd, and a duplicate of its control channel
/// (messages are whole datagrams, so sending on a duplicate never interleaves).
#[derive(Default)]
pub(super) struct Watched {
    pidfd: Option<Arc<OwnedFd>>,
    notify: Option<ControlChannel>,
}

impl Watched {
    /// The handles of `domain`'s process.
    pub(super) fn of(domain: &Domain) -> Watched {
        let notify = match domain.channel.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(ControlChannel::from_fd(fd)),
            Err(e) => {
                log::warn!("{}: duplicating its control channel: {e}", domain.name);
                None
            }
        };
        Watched {
            pidfd: domain.process.pidfd(),
            notify,
        }
    }
}

/// Restarts of the driver domain, to stop a crash loop.
#[derive(Default)]
pub(super) struct RestartHistory {
    recent: Vec<Instant>,
    given_up: bool,
}

impl Host {
    /// Starts watching every domain process (until [`Host::stop_supervision`]).
    pub fn start_supervision(self: &Arc<Self>) -> Result<()> {
        let host = Arc::downgrade(self);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    let Some(host) = host.upgrade() else { break };
                    host.supervise_once(POLL);
                }
            })
            .context("starting the supervision thread")?;
        *lock(&self.supervision) = Some(Supervisor { stop, thread });
        Ok(())
    }

    /// Stops watching (before an orderly shutdown, whose exits are no deaths).
    pub fn stop_supervision(&self) {
        let supervisor = lock(&self.supervision).take();
        if let Some(s) = supervisor {
            s.stop.store(true, Ordering::SeqCst);
            if s.thread.join().is_err() {
                log::error!("the supervision thread panicked");
            }
        }
    }

    /// Waits up to `timeout` for a domain process to end, and deals with those that did.
    fn supervise_once(&self, timeout: Duration) {
        // `None`: the driver domain; `Some(name)`: a guest.
        let mut watched: Vec<(Option<String>, Arc<OwnedFd>)> = Vec::new();
        if !lock(&self.restarts).given_up {
            if let Some(fd) = lock(&self.driver).process.pidfd() {
                watched.push((None, fd));
            }
        }
        for (name, slot) in lock(&self.guests).iter() {
            if let Some(fd) = lock(&slot.watch).pidfd.clone() {
                watched.push((Some(name.clone()), fd));
            }
        }
        if watched.is_empty() {
            std::thread::sleep(timeout);
            return;
        }
        let mut pfds: Vec<libc::pollfd> = watched
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let n = libc::nfds_t::try_from(pfds.len()).unwrap_or(0);
        // SAFETY: `pfds` is a valid array of `n` pollfds, alive for the call; the descriptors
        // are kept open by `watched`.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), n, ms) };
        if ready <= 0 {
            return;
        }
        let mut busy = false;
        for (pfd, (who, _)) in pfds.iter().zip(&watched) {
            if pfd.revents == 0 {
                continue;
            }
            match who {
                None => self.driver_exited(),
                Some(name) => busy |= !self.guest_exited(name),
            }
        }
        if busy {
            // A request holds a dead guest's lock; it notices the death itself and lets go.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Guest `name`'s process has ended: tears it down. False if its lock is busy (try again).
    fn guest_exited(&self, name: &str) -> bool {
        let Some(slot) = lock(&self.guests).get(name).cloned() else {
            return true;
        };
        let mut guest = match slot.state.try_lock() {
            Ok(guest) => guest,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        if slot.gone.load(Ordering::SeqCst) {
            return true;
        }
        let status = match guest.domain.process.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => match guest.domain.process.exit_status() {
                Some(status) => status,
                // Running: a newer process (a reboot) than the pidfd looked at.
                None => return true,
            },
            Err(e) => {
                log::error!("{name}: {e}");
                return true;
            }
        };
        while let Ok(Some((event, _))) = guest.domain.channel.try_recv::<GuestEvent>() {
            if let GuestEvent::Stats(s) = event {
                guest.stats = Some(s);
            }
        }
        let how = describe(&status);
        let powered_off = slot.config.kind == GuestKind::Linux && status.success();
        if !powered_off {
            log::error!("{name} died ({how}); tearing its devices down");
        }
        match self.forget(name, &slot, &mut guest) {
            Ok(()) if powered_off => self.progress(&format!("{name}: powered off ({how})")),
            Ok(()) => self.progress(&format!("{name}: died ({how}); devices torn down")),
            Err(e) => log::error!("{name}: tearing down after it ended: {e:#}"),
        }
        true
    }

    /// The driver domain's process has ended: restarts it with its devices.
    fn driver_exited(&self) {
        let mut driver = lock(&self.driver);
        let status = match driver.process.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => match driver.process.exit_status() {
                Some(status) => status,
                None => return,
            },
            Err(e) => {
                log::error!("{}: {e}", driver.name);
                return;
            }
        };
        let how = describe(&status);
        {
            let mut restarts = lock(&self.restarts);
            restarts.recent.retain(|t| t.elapsed() < RESTART_WINDOW);
            if restarts.recent.len() >= RESTART_LIMIT {
                restarts.given_up = true;
                log::error!(
                    "{} died ({how}) after {RESTART_LIMIT} restarts within {RESTART_WINDOW:?}; \
                     not restarting it again",
                    driver.name
                );
                self.progress(&format!("{}: died ({how}); given up", driver.name));
                return;
            }
            restarts.recent.push(Instant::now());
        }
        log::error!(
            "{} (domain {}) died ({how}); restarting it with its devices",
            driver.name,
            driver.domid
        );
        self.progress(&format!("{}: died ({how}); restarting", driver.name));
        let devices = match self.client().and_then(|mut c| {
            let devices = backend_devices(&mut c, driver.domid)?;
            mark_closed(&mut c, &devices);
            Ok(devices)
        }) {
            Ok(devices) => devices,
            Err(e) => {
                log::error!("{}: reading its devices: {e:#}", driver.name);
                Vec::new()
            }
        };
        match start_driver_domain(
            &self.store,
            &self.run_dir,
            (&self.driver_config, self.uplink.as_ref()),
            self.confinement.as_ref(),
            true,
        ) {
            Ok(new) => *driver = new,
            Err(e) => {
                log::error!("restarting {}: {e:#}", driver.name);
                self.progress(&format!("{}: restart failed: {e:#}", driver.name));
                return;
            }
        }
        let mut handed = 0;
        for (dev, online) in devices {
            if !online {
                continue;
            }
            match self.hand_over_again(&driver, &dev) {
                Ok(()) => handed += 1,
                Err(e) => {
                    log::error!("{dev}: handing it to the restarted backend: {e:#}");
                    let _ = self.client().and_then(|mut c| {
                        let path = format!("{}/{}", dev.backend_path(), keys::ERROR);
                        Ok(c.write(&path, format!("restart: {e:#}").as_bytes())?)
                    });
                }
            }
        }
        self.progress(&format!(
            "{}: restarted (pid {}), {handed} device(s) handed over again",
            driver.name,
            driver.process.pid().unwrap_or(0)
        ));
    }

    /// Hands device `dev` to the restarted driver domain: its image (the descriptor the
    /// toolstack kept, so the same lock) or switch port, and a fresh private connection whose
    /// other end goes to the guest.
    fn hand_over_again(&self, driver: &Domain, dev: &DeviceId) -> Result<()> {
        let (name, slot) = self.slot_by_domid(dev.frontend)?;
        let serial = self.attach_serial.fetch_add(1, Ordering::SeqCst);
        let sock_name = format!(
            "re-{}-{}-{}-{serial}.sock",
            dev.kind, dev.frontend, dev.devid
        );
        let (backend_end, frontend_end) =
            connection::private_connection(&self.private_dir, &sock_name)
                .context("creating the vhost-user connection")?;
        let mut client = self.client()?;
        let backend_key = |client: &mut StoreClient, key: &str| {
            client
                .read(&format!("{}/{key}", dev.backend_path()))
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .with_context(|| format!("reading {key} of {dev}"))
        };
        let reconnect = match dev.kind {
            DeviceKind::Vbd => {
                // A device inside a driver VM (`type` phy) is opened there again.
                let device = (backend_key(&mut client, keys::TYPE)? == "phy")
                    .then(|| backend_key(&mut client, keys::PARAMS))
                    .transpose()?;
                let image = match device {
                    None => Some(lock(&self.images).file(&name, dev.devid)?),
                    Some(_) => None,
                };
                let readonly = backend_key(&mut client, keys::MODE)? == "r";
                // The same queues as before the restart (one where the key is missing).
                let queues = backend_key(&mut client, keys::MULTI_QUEUE_MAX_QUEUES)
                    .ok()
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(1);
                driver.channel.send(
                    &BackendRequest::ServeBlock {
                        frontend: dev.frontend,
                        devid: dev.devid,
                        readonly,
                        grant: memory_grant(&slot.config),
                        queues,
                        device,
                    },
                    &image
                        .iter()
                        .map(|i| i.as_fd())
                        .chain([backend_end.as_fd()])
                        .collect::<Vec<_>>(),
                )?;
                GuestRequest::ReconnectBlock { devid: dev.devid }
            }
            DeviceKind::Vif => {
                let text = backend_key(&mut client, "mac")?;
                let Some(mac) = parse_mac(&text) else {
                    bail!("{dev}: mac {text:?} in the store is not a MAC address");
                };
                // Written by the toolstack when it attached the vif (absent: offloads on).
                let offloads = backend_key(&mut client, super::devices::OFFLOADS_KEY)
                    .map_or(true, |v| v.trim() != "0");
                driver.channel.send(
                    &BackendRequest::ServeNet {
                        frontend: dev.frontend,
                        devid: dev.devid,
                        mac,
                        grant: memory_grant(&slot.config),
                        offloads,
                    },
                    &[backend_end.as_fd()],
                )?;
                GuestRequest::ReconnectNet { devid: dev.devid }
            }
        };
        let watch = lock(&slot.watch);
        let Some(notify) = watch.notify.as_ref() else {
            bail!("{name} has no control channel");
        };
        notify.send(&reconnect, &[frontend_end.as_fd()])?;
        Ok(())
    }

    /// The guest with domain id `domid`.
    fn slot_by_domid(&self, domid: u32) -> Result<(String, Arc<GuestSlot>)> {
        lock(&self.guests)
            .iter()
            .find(|(_, s)| s.config.domid == domid)
            .map(|(n, s)| (n.clone(), Arc::clone(s)))
            .with_context(|| format!("no guest has domain id {domid}"))
    }
}

/// Every device in driver domain `backend`'s directories, and whether it is still wanted
/// (`online` is not "0").
fn backend_devices(client: &mut StoreClient, backend: u32) -> Result<Vec<(DeviceId, bool)>> {
    let mut out = Vec::new();
    for kind in [DeviceKind::Vbd, DeviceKind::Vif] {
        let dir = backend_kind_dir(backend, kind);
        for frontend in client.directory(&dir).unwrap_or_default() {
            let fe_dir = format!("{dir}/{frontend}");
            for devid in client.directory(&fe_dir).unwrap_or_default() {
                let (Ok(frontend), Ok(devid)) = (frontend.parse(), devid.parse()) else {
                    continue;
                };
                let dev = DeviceId {
                    kind,
                    backend,
                    frontend,
                    devid,
                };
                let online = client
                    .read(&format!("{}/{}", dev.backend_path(), keys::ONLINE))
                    .map(|v| v != b"0")
                    .unwrap_or(false);
                out.push((dev, online));
            }
        }
    }
    Ok(out)
}

/// Writes state Closed into each device's backend directory: its backend is gone (the
/// frontend sees its peer leave Connected; a detach waiting for Closed completes).
fn mark_closed(client: &mut StoreClient, devices: &[(DeviceId, bool)]) {
    for (dev, _) in devices {
        let path = format!("{}/{}", dev.backend_path(), keys::STATE);
        if let Err(e) = client.write(&path, XenbusState::Closed.to_string().as_bytes()) {
            log::warn!("{path}: {e}");
        }
    }
}

/// `02:00:00:00:02:00` as six bytes.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn macs_parse_as_the_store_holds_them_and_nothing_else_does() {
        assert_eq!(parse_mac("02:00:00:00:02:0a"), Some([2, 0, 0, 0, 2, 0x0a]));
        assert_eq!(parse_mac("02:00:00:00:02"), None);
        assert_eq!(parse_mac("02:00:00:00:02:00:01"), None);
        assert_eq!(parse_mac("zz:00:00:00:02:00"), None);
    }
}
