//! The frontend half of the xenbus walk for block devices (vbd) and network interfaces (vif),
//! shared by every kind of guest domain `splitvmm up` runs (a process guest, a KVM guest's
//! VMM), as Linux shares its xenbus frontend core between blkfront and netfront.
//!
//! [`ManagedFrontend`] runs the walk; a kind of guest plugs in what it does at the walk's
//! moments ([`FrontendLifecycle`]: set a device's data path up, tear it down) and what it
//! checks when the toolstack asks ([`FrontendDiagnostics`]: disk checks, pings, counters).
//! The xenbus vocabulary (states, keys, paths) stays in `ipc::xenbus`.

mod walk;

use std::os::unix::net::UnixStream;

use ipc::control::messages::GuestStats;

pub use walk::{ManagedFrontend, WalkError};

/// A kind of guest's device lifecycle: what it does when a backend is ready (InitWait) and
/// when a device closes.
pub trait FrontendLifecycle {
    /// The data-path session of one block device.
    type BlockSession;
    /// The data-path session of one network interface.
    type NetSession;
    /// Why a data path could not be set up.
    type ConnectError: std::error::Error + Send + Sync + 'static;

    /// At backend InitWait of a vbd: sets the data path up on the handed vhost-user
    /// connection. Returns the session and the disk's capacity in 512-byte sectors.
    fn connect_block(
        &mut self,
        devid: u32,
        connection: UnixStream,
    ) -> Result<(Self::BlockSession, u64), Self::ConnectError>;

    /// When a vbd closes: ends the session (stopping its vrings).
    fn disconnect_block(&mut self, devid: u32, session: Self::BlockSession);

    /// At backend InitWait of a vif: sets the data path up; returns the session and the MAC
    /// address the backend gave the interface. A kind without network interfaces refuses.
    fn connect_net(
        &mut self,
        devid: u32,
        connection: UnixStream,
        ip: [u8; 4],
    ) -> Result<(Self::NetSession, [u8; 6]), Self::ConnectError>;

    /// When a vif closes.
    fn disconnect_net(&mut self, devid: u32, session: Self::NetSession);

    /// The toolstack detaches a vbd (backend Closing; the frontend is Closing): take it away
    /// from the guest. Called on every tick until it returns true, the guest having let go of
    /// the device (or the kind having stopped waiting for it); only then does the session end
    /// and the frontend go Closed. The default lets go at once.
    fn release_block(&mut self, _devid: u32, _session: &mut Self::BlockSession) -> bool {
        true
    }

    /// The same for a vif.
    fn release_net(&mut self, _devid: u32, _session: &mut Self::NetSession) -> bool {
        true
    }

    /// After a backend restart, at the new backend's InitWait: sets the vbd's data path up
    /// again on the new `connection`, keeping its queues, and resubmits what was in flight.
    /// `None` (the default): this kind keeps nothing across a restart, and the device fails.
    fn reconnect_block(
        &mut self,
        _devid: u32,
        _session: &mut Self::BlockSession,
        _connection: UnixStream,
    ) -> Option<Result<(), Self::ConnectError>> {
        None
    }

    /// The same for a vif. The default sets a new session up on `connection` (frames in
    /// flight are lost, as on a wire whose switch restarted); returns it and its MAC address.
    fn reconnect_net(
        &mut self,
        devid: u32,
        session: Self::NetSession,
        connection: UnixStream,
        ip: [u8; 4],
    ) -> Result<(Self::NetSession, [u8; 6]), Self::ConnectError> {
        drop(session);
        self.connect_net(devid, connection, ip)
    }

    /// How many block devices this kind can hold at once.
    fn max_block_devices(&self) -> usize {
        usize::MAX
    }

    /// When a vbd has gone Connected (the toolstack has been told): a kind whose guest boots
    /// with its disks cold-plugged starts it here. An error fails the device.
    fn block_connected(
        &mut self,
        _devid: u32,
        _session: &mut Self::BlockSession,
    ) -> Result<(), Self::ConnectError> {
        Ok(())
    }

    /// When a vif has gone Connected, as [`FrontendLifecycle::block_connected`] for vbds.
    fn net_connected(
        &mut self,
        _devid: u32,
        _session: &mut Self::NetSession,
    ) -> Result<(), Self::ConnectError> {
        Ok(())
    }

    /// On the toolstack's shutdown request: `true` (the default) closes every device and
    /// ends now; `false` when the kind has asked its guest to power off (a Linux guest's
    /// ACPI power button) and sets the stop flag once it has.
    fn shutdown_requested(&mut self) -> bool {
        true
    }

    /// A PCI function handed over for direct assignment as the guest's `index`-th:
    /// `fds` is `[VFIO group]` of function `address`. Only a kind whose VMM assigns devices
    /// takes it; the others refuse (and drop the descriptor, keeping no copy).
    fn assign_pci(
        &mut self,
        _index: u32,
        _address: &str,
        _fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        Err("this kind of guest cannot take PCI devices".into())
    }

    /// Lets PCI function `index` go (reset, descriptors closed). Kinds without PCI devices
    /// have none to let go.
    fn detach_pci(&mut self, index: u32) -> Result<(), String> {
        Err(format!("no PCI function {index}"))
    }
}

/// A disk check the toolstack asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCheck {
    /// Pattern seed.
    pub seed: u64,
    /// Bytes from the start of the disk.
    pub bytes: u64,
    /// Only read and verify (the pattern is already there).
    pub verify_only: bool,
}

/// What a kind of guest checks and counts on Connected devices when the toolstack asks.
pub trait FrontendDiagnostics: FrontendLifecycle {
    /// Why a check failed.
    type CheckError: std::error::Error + Send + Sync + 'static;

    /// Writes (unless `verify_only`) and verifies a pattern over the first bytes of a
    /// Connected disk; a short description on success.
    fn disk_check(
        &mut self,
        devid: u32,
        session: &mut Self::BlockSession,
        check: DiskCheck,
    ) -> Result<String, Self::CheckError>;

    /// Resolves `peer` and exchanges `rounds` UDP echoes with it.
    fn net_ping(
        &mut self,
        devid: u32,
        session: &mut Self::NetSession,
        peer: [u8; 4],
        rounds: u32,
    ) -> Result<String, Self::CheckError>;

    /// Whether this kind answers peers from the walk ([`FrontendDiagnostics::answer_peers`]):
    /// the walk then wakes every millisecond while an interface is Connected. A guest with its
    /// own network stack (Linux) says false and the walk keeps its slow tick.
    const ANSWERS_PEERS: bool = true;

    /// Answers what the interface received meanwhile (ARP, UDP echo); called every tick
    /// while the interface is Connected, so a guest answers its peers' checks while idle.
    fn answer_peers(
        &mut self,
        devid: u32,
        session: &mut Self::NetSession,
    ) -> Result<(), Self::CheckError>;

    /// Whether `error` means only that the device's backend went away (it is being
    /// restarted): the walk then waits for the device to reconnect and runs the check again,
    /// so the toolstack sees a delay, not a failure.
    fn backend_gone(_error: &Self::CheckError) -> bool {
        false
    }

    /// Counters over every session so far, the live block sessions included.
    fn stats<'a>(&self, live: impl Iterator<Item = &'a Self::BlockSession>) -> GuestStats
    where
        Self::BlockSession: 'a;
}

/// The error chain of `e`, one line (`outer: inner: ...`), for a device's failure report.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("vhost-user set-up")]
        SetUp(#[source] std::io::Error),
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer::SetUp(std::io::Error::other("backend lacks CONFIG"));
        assert_eq!(error_chain(&e), "vhost-user set-up: backend lacks CONFIG");
    }
}
