//! A managed process domain: a guest that is a host process, started by `splitvmm up`.
//!
//! The xenbus walk, the control channel and the store are `frontend_core::xenbus`'s; this is
//! what a process domain does at the walk's moments: at backend InitWait it connects a
//! [`BlockFrontend`] or [`NetFrontend`] (rings and buffers in its I/O window, the only memory
//! it shares with the driver domain) on the handed vhost-user connection; on close it stops
//! the vrings. Disk checks and pings run on request.

mod disk_check;
pub mod frames;
mod net_check;

use std::os::unix::net::UnixStream;

use frontend_core::xenbus::{DiskCheck, FrontendDiagnostics, FrontendLifecycle, ManagedFrontend};
use ipc::control::messages::GuestStats;
use thiserror::Error;

use crate::process::{
    BlockFrontend, BlockFrontendConfig, FrontendStats, NetFrontend, NetFrontendConfig,
    ProcessFrontendError,
};

pub use disk_check::{pattern_byte, DiskCheckError};
pub use net_check::{NetNic, PingError};

/// Why a process domain's device could not be set up or checked.
#[derive(Debug, Error)]
pub enum ProcessDeviceError {
    #[error("frontend")]
    Frontend(#[from] ProcessFrontendError),
    #[error("the backend offered no MAC address (VIRTIO_NET_F_MAC)")]
    NoMac,
    #[error("disk check")]
    DiskCheck(#[from] DiskCheckError),
    #[error("ping")]
    Ping(#[from] PingError),
}

/// A process domain's frontends.
#[derive(Debug, Default)]
pub struct ProcessFrontends {
    /// Counters of sessions that already ended.
    finished: FrontendStats,
}

impl FrontendLifecycle for ProcessFrontends {
    type BlockSession = BlockFrontend;
    type NetSession = NetNic;
    type ConnectError = ProcessDeviceError;

    fn connect_block(
        &mut self,
        _devid: u32,
        connection: UnixStream,
    ) -> Result<(BlockFrontend, u64), ProcessDeviceError> {
        let frontend = BlockFrontend::connect(connection, BlockFrontendConfig::default())?;
        let capacity = frontend.capacity();
        Ok((frontend, capacity))
    }

    fn disconnect_block(&mut self, devid: u32, session: BlockFrontend) {
        if let Ok(stats) = session.stats() {
            self.finished.add(&stats);
        }
        if let Err(e) = session.shutdown() {
            log::warn!("vbd {devid}: ending the vhost-user session: {e}");
        }
    }

    fn reconnect_block(
        &mut self,
        devid: u32,
        session: &mut BlockFrontend,
        connection: UnixStream,
    ) -> Option<Result<(), ProcessDeviceError>> {
        Some(match session.reconnect(connection) {
            Ok(resubmitted) => {
                log::warn!(
                    "vbd {devid}: reconnected; {resubmitted} request(s) in flight resubmitted"
                );
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
    }

    fn connect_net(
        &mut self,
        _devid: u32,
        connection: UnixStream,
        ip: [u8; 4],
    ) -> Result<(NetNic, [u8; 6]), ProcessDeviceError> {
        let frontend = NetFrontend::connect(connection, NetFrontendConfig::default())?;
        let mac = frontend.mac().ok_or(ProcessDeviceError::NoMac)?;
        Ok((
            NetNic {
                frontend,
                mac,
                ip,
                frames: 0,
            },
            mac,
        ))
    }

    fn disconnect_net(&mut self, devid: u32, nic: NetNic) {
        if let Err(e) = nic.frontend.shutdown() {
            log::warn!("vif {devid}: ending the vhost-user session: {e}");
        }
    }
}

impl FrontendDiagnostics for ProcessFrontends {
    type CheckError = ProcessDeviceError;

    fn disk_check(
        &mut self,
        _devid: u32,
        session: &mut BlockFrontend,
        check: DiskCheck,
    ) -> Result<String, ProcessDeviceError> {
        Ok(disk_check::run(
            session,
            check.seed,
            check.bytes,
            check.verify_only,
        )?)
    }

    fn net_ping(
        &mut self,
        _devid: u32,
        nic: &mut NetNic,
        peer: [u8; 4],
        rounds: u32,
    ) -> Result<String, ProcessDeviceError> {
        Ok(nic.ping(peer, rounds)?)
    }

    fn answer_peers(&mut self, _devid: u32, nic: &mut NetNic) -> Result<(), ProcessDeviceError> {
        Ok(nic.answer_pending()?)
    }

    fn backend_gone(error: &ProcessDeviceError) -> bool {
        let frontend = match error {
            ProcessDeviceError::Frontend(e) => e,
            ProcessDeviceError::DiskCheck(
                DiskCheckError::Write { source, .. }
                | DiskCheckError::Read { source, .. }
                | DiskCheckError::Flush(source),
            )
            | ProcessDeviceError::Ping(PingError::Receive(source)) => source,
            _ => return false,
        };
        matches!(frontend, ProcessFrontendError::BackendGone { .. })
    }

    fn stats<'a>(&self, live: impl Iterator<Item = &'a BlockFrontend>) -> GuestStats {
        let mut t = self.finished;
        for frontend in live {
            if let Ok(s) = frontend.stats() {
                t.add(&s);
            }
        }
        GuestStats {
            requests: t.requests,
            bytes: t.bytes_read + t.bytes_written,
            kicks_sent: t.kicks_sent,
            kicks_suppressed: t.kicks_suppressed,
            interrupts: t.interrupts,
            vmm_exits: 0,
        }
    }
}

/// The process guest: the shared frontend runtime with process-domain frontends.
pub type ManagedGuest = ManagedFrontend<ProcessFrontends>;
