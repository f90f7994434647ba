//! The toolstack's writes to the store: domain directories and split-device directories, with
//! the owners and permissions Xen's libxl gives them (see docs/protocol.md).

use std::time::{Duration, Instant};

use ipc::xenbus::{domain_path, keys, DeviceId, XenbusState};
use ipc::xenstore::client::{ClientError, StoreClient};
use ipc::xenstore::perms::{Access, Perm, Perms};
use ipc::xenstore::wire::XsError;

/// Errors of the toolstack's store operations.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("store operation on {path}")]
    Store {
        path: String,
        #[source]
        source: ClientError,
    },
    #[error("transaction kept conflicting after {0} attempts")]
    Contended(u32),
    #[error("{path} did not reach state {want} within {waited:?} (last seen: {seen})")]
    StateTimeout {
        path: String,
        want: XenbusState,
        seen: String,
        waited: Duration,
    },
}

const TRANSACTION_ATTEMPTS: u32 = 16;

fn store_err(path: &str) -> impl FnOnce(ClientError) -> DomainError + '_ {
    move |source| DomainError::Store {
        path: path.to_owned(),
        source,
    }
}

/// `[n<owner>, r<reader>...]`: owned by `owner`, no access for others, read for `readers`.
fn perms(owner: u32, readers: &[u32]) -> Perms {
    let mut entries = vec![Perm::new(Access::None, owner)];
    entries.extend(readers.iter().map(|&d| Perm::new(Access::Read, d)));
    Perms::new(entries).unwrap_or_else(|_| Perms::owned_by(owner))
}

/// Runs `body` in a store transaction, retrying on EAGAIN as every xenstore client must.
fn in_transaction<F>(client: &mut StoreClient, mut body: F) -> Result<(), DomainError>
where
    F: FnMut(&mut StoreClient, u32) -> Result<(), DomainError>,
{
    for _ in 0..TRANSACTION_ATTEMPTS {
        let tx = client
            .transaction_start()
            .map_err(store_err("transaction"))?;
        if let Err(e) = body(client, tx) {
            let _ = client.transaction_end(tx, false);
            return Err(e);
        }
        match client.transaction_end(tx, true) {
            Ok(()) => return Ok(()),
            Err(e) if e.xs_error() == Some(XsError::EAGAIN) => continue,
            Err(e) => return Err(store_err("transaction")(e)),
        }
    }
    Err(DomainError::Contended(TRANSACTION_ATTEMPTS))
}

fn write_with_perms(
    client: &mut StoreClient,
    tx: u32,
    path: &str,
    value: &str,
    perms: &Perms,
) -> Result<(), DomainError> {
    client
        .tx_write(tx, path, value.as_bytes())
        .map_err(store_err(path))?;
    client
        .tx_set_perms(tx, path, perms)
        .map_err(store_err(path))
}

/// Creates `/local/domain/<domid>` as libxl does and introduces the domain to the store.
pub fn create_domain(client: &mut StoreClient, domid: u32, name: &str) -> Result<(), DomainError> {
    let dom = domain_path(domid);
    in_transaction(client, |c, tx| {
        let read_only = perms(0, &[domid]);
        let own = perms(domid, &[]);
        write_with_perms(c, tx, &dom, "", &read_only)?;
        write_with_perms(c, tx, &format!("{dom}/name"), name, &read_only)?;
        write_with_perms(
            c,
            tx,
            &format!("{dom}/domid"),
            &domid.to_string(),
            &read_only,
        )?;
        write_with_perms(c, tx, &format!("{dom}/device"), "", &perms(domid, &[0]))?;
        write_with_perms(c, tx, &format!("{dom}/data"), "", &own)?;
        write_with_perms(c, tx, &format!("{dom}/backend"), "", &perms(domid, &[0]))?;
        // What a driver domain reports of the hardware it owns (docs/lab.md).
        write_with_perms(c, tx, &format!("{dom}/hardware"), "", &perms(domid, &[0]))?;
        Ok(())
    })?;
    // Over sockets the ring page and event channel mean nothing (docs/store.md).
    client.introduce(domid, 0, 0).map_err(store_err(&dom))
}

/// Removes a domain's directory and releases it, so a reused id inherits nothing.
pub fn destroy_domain(client: &mut StoreClient, domid: u32) -> Result<(), DomainError> {
    let dom = domain_path(domid);
    match client.rm(&dom) {
        Ok(()) => {}
        Err(e) if e.xs_error() == Some(XsError::ENOENT) => {}
        Err(e) => return Err(store_err(&dom)(e)),
    }
    match client.release(domid) {
        Ok(()) => Ok(()),
        // Never introduced (its nodes were written by hand): nothing to release.
        Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(()),
        Err(e) => Err(store_err(&dom)(e)),
    }
}

/// Creates both directories of a split device in one transaction, state Initialising on both
/// sides. `backend_keys` and `frontend_keys` are the kind-specific entries.
pub fn add_device(
    client: &mut StoreClient,
    dev: &DeviceId,
    backend_keys: &[(&str, String)],
    frontend_keys: &[(&str, String)],
) -> Result<(), DomainError> {
    let be = dev.backend_path();
    let fe = dev.frontend_path();
    let be_perms = perms(dev.backend, &[dev.frontend]);
    let fe_perms = perms(dev.frontend, &[dev.backend]);
    let initialising = XenbusState::Initialising.to_string();
    in_transaction(client, |c, tx| {
        write_with_perms(c, tx, &be, "", &be_perms)?;
        let common_be = [
            (keys::FRONTEND, fe.clone()),
            (keys::FRONTEND_ID, dev.frontend.to_string()),
            (keys::ONLINE, "1".to_owned()),
            (keys::STATE, initialising.clone()),
        ];
        for (key, value) in common_be.iter().chain(backend_keys) {
            write_with_perms(c, tx, &format!("{be}/{key}"), value, &be_perms)?;
        }
        write_with_perms(c, tx, &fe, "", &fe_perms)?;
        let common_fe = [
            (keys::BACKEND, be.clone()),
            (keys::BACKEND_ID, dev.backend.to_string()),
            (keys::STATE, initialising.clone()),
        ];
        for (key, value) in common_fe.iter().chain(frontend_keys) {
            write_with_perms(c, tx, &format!("{fe}/{key}"), value, &fe_perms)?;
        }
        Ok(())
    })
}

/// Asks the backend to tear a device down, as libxl does: `online=0`, backend state Closing.
pub fn request_close(client: &mut StoreClient, dev: &DeviceId) -> Result<(), DomainError> {
    let be = dev.backend_path();
    in_transaction(client, |c, tx| {
        let online = format!("{be}/{}", keys::ONLINE);
        c.tx_write(tx, &online, b"0").map_err(store_err(&online))?;
        let state = format!("{be}/{}", keys::STATE);
        c.tx_write(tx, &state, XenbusState::Closing.to_string().as_bytes())
            .map_err(store_err(&state))
    })
}

/// Removes a device's frontend directory (its guest is gone).
pub fn remove_frontend(client: &mut StoreClient, dev: &DeviceId) -> Result<(), DomainError> {
    let path = dev.frontend_path();
    match client.rm(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(()),
        Err(e) => Err(store_err(&path)(e)),
    }
}

/// Removes both directories of a device, and the counters its backend published for it
/// (`data/io/<kind>/<frontend>/<devid>` under the backend domain).
pub fn remove_device(client: &mut StoreClient, dev: &DeviceId) -> Result<(), DomainError> {
    let counters = format!(
        "{}/data/io/{}/{}/{}",
        domain_path(dev.backend),
        dev.kind,
        dev.frontend,
        dev.devid
    );
    for path in [dev.frontend_path(), dev.backend_path(), counters.clone()] {
        match client.rm(&path) {
            Ok(()) => {}
            Err(e) if e.xs_error() == Some(XsError::ENOENT) => {}
            Err(e) => return Err(store_err(&path)(e)),
        }
    }
    // The frontend's directories under the backend domain go with its last device.
    for path in [dev.backend_path(), counters] {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if client.directory(parent).is_ok_and(|c| c.is_empty()) {
                match client.rm(parent) {
                    Ok(()) => {}
                    Err(e) if e.xs_error() == Some(XsError::ENOENT) => {}
                    Err(e) => return Err(store_err(parent)(e)),
                }
            }
        }
    }
    Ok(())
}

/// Waits until the backend of `dev` is Closed, then removes the device's directories (also
/// when the wait fails: a backend that never closes is told so by its directory going).
pub fn remove_once_closed(
    client: &mut StoreClient,
    dev: &DeviceId,
    timeout: Duration,
) -> Result<(), DomainError> {
    let closed = wait_for_state(client, &dev.backend_path(), XenbusState::Closed, timeout);
    remove_device(client, dev)?;
    closed
}

/// Removes a device whose frontend is gone or never took it, from the backend's side: close
/// requested first, then the frontend's directory taken away (the backend then finds the
/// request already there when it sees its frontend gone, and its Closed comes last), then
/// both directories once the backend is Closed, so no late backend write brings one back.
pub fn tear_down(
    client: &mut StoreClient,
    dev: &DeviceId,
    timeout: Duration,
) -> Result<(), DomainError> {
    request_close(client, dev)?;
    remove_frontend(client, dev)?;
    remove_once_closed(client, dev, timeout)
}

/// Reads a xenbus state; a missing node reads as Closed (a vanished peer is gone).
pub fn read_state(client: &mut StoreClient, dir: &str) -> Result<XenbusState, DomainError> {
    let path = format!("{dir}/{}", keys::STATE);
    match client.read(&path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes)
            .parse()
            .unwrap_or(XenbusState::Unknown)),
        Err(e) if e.xs_error() == Some(XsError::ENOENT) => Ok(XenbusState::Closed),
        Err(e) => Err(store_err(&path)(e)),
    }
}

/// Waits, with a watch, until the state under `dir` is `want`.
pub fn wait_for_state(
    client: &mut StoreClient,
    dir: &str,
    want: XenbusState,
    timeout: Duration,
) -> Result<(), DomainError> {
    let path = format!("{dir}/{}", keys::STATE);
    let token = format!("wait-{want}");
    client.watch(&path, &token).map_err(store_err(&path))?;
    let deadline = Instant::now() + timeout;
    let result = loop {
        let seen = read_state(client, dir)?;
        if seen == want {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(DomainError::StateTimeout {
                path: path.clone(),
                want,
                seen: format!("{seen:?}"),
                waited: timeout,
            });
        }
        match client.read_watch_event(Some(left)) {
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(e) => return Err(store_err(&path)(e)),
        }
    };
    let _ = client.unwatch(&path, &token);
    result
}
