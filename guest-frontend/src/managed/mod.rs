//! A managed process domain: a guest that is a host process, started by `splitvmm up`.
//!
//! The xenbus walk, the control channel and the store are `ipc::xenbus::frontend`'s; this is
//! what a process domain does at the walk's moments: at backend InitWait it connects a
//! [`BlockFrontend`] (rings and bounce buffers in its I/O window, the only memory it shares
//! with the driver domain) on the handed vhost-user connection; on close it stops the vrings.

mod disk_check;
mod net_check;

use std::os::unix::net::UnixStream;

use ipc::control::messages::GuestStats;
use ipc::xenbus::frontend::{FrontendKind, ManagedFrontend};

use crate::process::{
    BlockFrontend, FrontendConfig, FrontendStats, NetFrontend, NetFrontendConfig,
};

pub use disk_check::pattern_byte;
pub use net_check::NetNic;

/// A process domain's block frontends.
#[derive(Debug, Default)]
pub struct ProcessFrontends {
    /// Counters of sessions that already ended.
    finished: FrontendStats,
}

impl FrontendKind for ProcessFrontends {
    type Session = BlockFrontend;

    fn connect(
        &mut self,
        _devid: u32,
        connection: UnixStream,
    ) -> Result<(BlockFrontend, u64), String> {
        let frontend = BlockFrontend::connect(connection, FrontendConfig::default())
            .map_err(|e| format!("vhost-user set-up: {e}"))?;
        let capacity = frontend.capacity();
        Ok((frontend, capacity))
    }

    fn disconnect(&mut self, devid: u32, session: BlockFrontend) {
        if let Ok(stats) = session.stats() {
            self.finished.add(&stats);
        }
        if let Err(e) = session.shutdown() {
            log::warn!("vbd {devid}: ending the vhost-user session: {e}");
        }
    }

    fn disk_check(
        &mut self,
        _devid: u32,
        session: &mut BlockFrontend,
        seed: u64,
        bytes: u64,
        verify_only: bool,
    ) -> Result<String, String> {
        disk_check::run(session, seed, bytes, verify_only)
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

    type NetSession = NetNic;

    fn connect_net(
        &mut self,
        _devid: u32,
        connection: UnixStream,
        ip: [u8; 4],
    ) -> Result<(NetNic, [u8; 6]), String> {
        let frontend = NetFrontend::connect(connection, NetFrontendConfig::default())
            .map_err(|e| format!("vhost-user set-up: {e}"))?;
        let mac = frontend
            .mac()
            .ok_or("the backend offered no MAC address (VIRTIO_NET_F_MAC)")?;
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

    fn net_ping(
        &mut self,
        _devid: u32,
        nic: &mut NetNic,
        peer: [u8; 4],
        rounds: u32,
    ) -> Result<String, String> {
        nic.ping(peer, rounds)
    }

    fn net_poll(&mut self, devid: u32, nic: &mut NetNic) {
        if let Err(e) = nic.answer_pending() {
            log::warn!("vif {devid}: {e}");
        }
    }
}

/// The process guest: the shared frontend runtime with process-domain frontends.
pub type ManagedGuest = ManagedFrontend<ProcessFrontends>;
