//! `splitvmm-vmm --managed-domid`: the VMM as a guest domain process of `splitvmm up`.
//!
//! The xenbus walk, the control channel and the store are `frontend_core::xenbus`'s, shared
//! with process-domain guests; this is what a KVM guest does at the walk's moments. At backend
//! InitWait it sets up the vhost-user session on the handed connection (the memory table is
//! sent per machine: each has its own I/O window). Each disk check boots the tiny kernel in a
//! fresh KVM machine on that same session; the guest writes and verifies the pattern through
//! the driver domain and powers off with its verdict. The exit table of every machine goes to
//! stderr.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use frontend_core::vhost_user::FrontendSessionError;
use frontend_core::xenbus::{DiskCheck, FrontendDiagnostics, FrontendLifecycle, ManagedFrontend};
use ipc::control::messages::GuestStats;
use thiserror::Error;

use super::layout::{GuestMode, GUEST_REPORT_SLOTS};
use super::machine::{run_keeping_backend, BlkAttachment, Outcome, RingMode, VmConfig, VmError};
use super::vhost_device::{VhostDevice, VirtioDeviceType};

/// Why a KVM guest's device could not be set up or checked.
#[derive(Debug, Error)]
pub enum KvmDeviceError {
    #[error("vhost-user set-up")]
    Session(#[from] FrontendSessionError),
    #[error("a KVM guest has no network interface yet")]
    NoNet,
    #[error("check of {0} bytes exceeds the tiny guest's limit of {MAX_CHECK_BYTES}")]
    CheckTooLarge(u64),
    #[error("check of {bytes} bytes does not fit the {sectors}-sector disk in whole sectors")]
    CheckDoesNotFit { bytes: u64, sectors: u64 },
    #[error("the vhost-user session was lost by an earlier machine")]
    SessionLost,
    #[error("machine")]
    Machine(#[from] VmError),
    #[error("guest ended with {0:?}")]
    GuestFailed(Outcome),
}

/// The network half of [`FrontendLifecycle`] for a guest without network interfaces (the
/// tiny KVM guest; a Linux guest has virtio-net): no session can exist (`Infallible`), and every attach is refused with `$refusal`.
macro_rules! refuse_network_interfaces {
    ($refusal:expr) => {
        type NetSession = std::convert::Infallible;

        fn connect_net(
            &mut self,
            _devid: u32,
            _connection: std::os::unix::net::UnixStream,
            _ip: [u8; 4],
        ) -> Result<(Self::NetSession, [u8; 6]), Self::ConnectError> {
            Err($refusal)
        }

        fn disconnect_net(&mut self, _devid: u32, session: Self::NetSession) {
            match session {}
        }
    };
}

/// The network half of [`FrontendDiagnostics`] for the same kind: with no session there is
/// nothing to check.
macro_rules! no_network_checks {
    () => {
        fn net_ping(
            &mut self,
            _devid: u32,
            session: &mut Self::NetSession,
            _peer: [u8; 4],
            _rounds: u32,
        ) -> Result<String, Self::CheckError> {
            match *session {}
        }

        fn answer_peers(
            &mut self,
            _devid: u32,
            session: &mut Self::NetSession,
        ) -> Result<(), Self::CheckError> {
            match *session {}
        }
    };
}

/// How each machine is built.
#[derive(Debug, Clone)]
pub struct MachineSettings {
    pub kernel: PathBuf,
    pub ram_bytes: u64,
    pub window_bytes: u64,
    pub ring: RingMode,
    pub batch: u32,
    /// Sectors per request (1..=8).
    pub sectors_per_request: u32,
    pub idle_baseline: bool,
}

/// Largest disk check one machine runs: the tiny guest is meant to stay small (1 MiB is about
/// 3.4 M guest instructions, ~3 s on a software-emulated /dev/kvm).
pub const MAX_CHECK_BYTES: u64 = 4 << 20;

/// A KVM guest's block device: the vhost-user session (lent to each machine in turn) and the
/// disk's capacity.
pub struct MachineDisk {
    /// None only while a machine has it, or after a machine lost it.
    session: Option<VhostDevice>,
    capacity: u64,
}

/// KVM guests booted per disk check.
pub struct KvmMachines {
    settings: MachineSettings,
    stop: Arc<AtomicBool>,
    totals: GuestStats,
}

impl KvmMachines {
    /// Machines built with `settings`; `stop` (a signal flag) stops a running one.
    pub fn new(settings: MachineSettings, stop: Arc<AtomicBool>) -> Self {
        KvmMachines {
            settings,
            stop,
            totals: GuestStats::default(),
        }
    }
}

/// The managed VMM process: the shared frontend runtime with KVM machines.
pub type ManagedVm = ManagedFrontend<KvmMachines>;

impl FrontendLifecycle for KvmMachines {
    type BlockSession = MachineDisk;
    type ConnectError = KvmDeviceError;

    fn connect_block(
        &mut self,
        _devid: u32,
        connection: UnixStream,
    ) -> Result<(MachineDisk, u64), KvmDeviceError> {
        // The memory table is sent per machine (each has its own window).
        let session = VhostDevice::from_stream(VirtioDeviceType::Blk, connection, Vec::new())?;
        let capacity = session.capacity_sectors();
        Ok((
            MachineDisk {
                session: Some(session),
                capacity,
            },
            capacity,
        ))
    }

    fn disconnect_block(&mut self, _devid: u32, _disk: MachineDisk) {
        // Machines stop their queue (GET_VRING_BASE) when they end; dropping the session
        // closes the connection.
    }

    /// Between checks no machine runs and no vring is set up: the disk simply gets a new
    /// session on the restarted backend (the next check's machine uses it). A restart during
    /// a check is not resumed: the machine runs on the walk's thread, which therefore cannot
    /// take the reconnection until the check has ended (a Linux guest's machine runs
    /// on a thread of its own and resumes, see `linux::managed`).
    fn reconnect_block(
        &mut self,
        devid: u32,
        disk: &mut MachineDisk,
        connection: UnixStream,
    ) -> Option<Result<(), KvmDeviceError>> {
        Some(
            VhostDevice::from_stream(VirtioDeviceType::Blk, connection, Vec::new())
                .map_err(KvmDeviceError::from)
                .map(|session| {
                    if session.capacity_sectors() != disk.capacity {
                        log::warn!(
                            "vbd {devid}: the restarted backend reports {} sectors, not {}",
                            session.capacity_sectors(),
                            disk.capacity
                        );
                    }
                    disk.session = Some(session);
                }),
        )
    }

    // The tiny kernel has no virtio-net driver yet: a KVM guest refuses network interfaces.
    refuse_network_interfaces!(KvmDeviceError::NoNet);

    /// One virtio-mmio slot: one disk per machine.
    fn max_block_devices(&self) -> usize {
        1
    }
}

impl FrontendDiagnostics for KvmMachines {
    type CheckError = KvmDeviceError;

    fn stats<'a>(&self, _live: impl Iterator<Item = &'a MachineDisk>) -> GuestStats {
        self.totals
    }

    no_network_checks!();

    /// Boots the tiny kernel in a fresh machine on the disk's session; the guest writes and
    /// verifies the pattern and powers off with its verdict.
    fn disk_check(
        &mut self,
        _devid: u32,
        dev: &mut MachineDisk,
        check: DiskCheck,
    ) -> Result<String, KvmDeviceError> {
        let DiskCheck {
            seed,
            bytes,
            verify_only,
        } = check;
        if bytes > MAX_CHECK_BYTES {
            return Err(KvmDeviceError::CheckTooLarge(bytes));
        }
        let sectors = bytes / 512;
        if bytes == 0
            || !bytes.is_multiple_of(512)
            || sectors > dev.capacity
            || sectors > u64::from(u32::MAX)
        {
            return Err(KvmDeviceError::CheckDoesNotFit {
                bytes,
                sectors: dev.capacity,
            });
        }
        let session = dev.session.take().ok_or(KvmDeviceError::SessionLost)?;
        let s = &self.settings;
        let cfg = VmConfig {
            kernel: s.kernel.clone(),
            ram_bytes: s.ram_bytes,
            vcpus: 1,
            mode: GuestMode::Disk,
            blk: BlkAttachment::Connected(Box::new(session)),
            share_all_ram: false,
            window_bytes: s.window_bytes,
            ring: s.ring,
            requests: 0,
            batch: s.batch,
            seed,
            verify_only,
            sectors_per_request: s.sectors_per_request,
            check_sectors: sectors as u32,
            markers: Default::default(),
            idle_baseline: s.idle_baseline,
            connect_timeout: Duration::from_secs(5),
            console: Box::new(std::io::stderr()),
            stop: Arc::clone(&self.stop),
        };
        let (report, session) = run_keeping_backend(cfg)?;
        dev.session = session;
        eprint!("{}", report.table());
        let g: [u64; GUEST_REPORT_SLOTS] = report.guest;
        self.totals.requests += g[4];
        self.totals.bytes += bytes * if verify_only { 1 } else { 2 };
        self.totals.kicks_sent += g[0];
        self.totals.kicks_suppressed += g[1];
        self.totals.interrupts += g[2];
        let per = report.per_request().unwrap_or_default();
        self.totals.vmm_exits += (per.vmm_exits * per.requests as f64).round() as u64;
        let detail = format!(
            "{} {} KiB in a KVM guest: {} requests, {:.2} kicks, {:.2} interrupts, {:.2} VMM exits per request",
            if verify_only { "verified" } else { "wrote and verified" },
            bytes / 1024,
            per.requests,
            per.kicks,
            per.interrupts,
            per.vmm_exits
        );
        match report.outcome {
            Outcome::Poweroff(0) => Ok(detail),
            other => Err(KvmDeviceError::GuestFailed(other)),
        }
    }
}
