//! One vhost-user-blk session of a managed device, on its own thread.

use std::fs::File;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use ipc::xenbus::DeviceId;

use crate::blk::{BlkConfig, BlkDisk};
use crate::vhost_user::serve_blk_connection;

/// A device being served.
pub struct Session {
    id: DeviceId,
    /// A second handle on the connection, to end the session from outside.
    connection: UnixStream,
    thread: Option<JoinHandle<()>>,
    capacity_sectors: u64,
}

impl Session {
    /// Starts serving `image` on `connection`.
    pub fn start(
        id: DeviceId,
        image: File,
        connection: UnixStream,
        readonly: bool,
    ) -> Result<Session, String> {
        let disk = BlkDisk::from_file(image, readonly).map_err(|e| format!("disk image: {e}"))?;
        let capacity_sectors = disk.capacity_sectors();
        let handle = connection
            .try_clone()
            .map_err(|e| format!("duplicating the connection: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("vbd-{}-{}", id.frontend, id.devid))
            .spawn(move || {
                match serve_blk_connection(connection, disk, BlkConfig::default()) {
                    Ok(()) => log::info!("{id}: session ended"),
                    Err(e) => log::warn!("{id}: session ended: {e}"),
                }
            })
            .map_err(|e| format!("starting the session thread: {e}"))?;
        Ok(Session {
            id,
            connection: handle,
            thread: Some(thread),
            capacity_sectors,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Ends the session: the connection is shut down, so the frontend sees it end too, and
    /// the thread is joined.
    pub fn stop(mut self) {
        let _ = self.connection.shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: session thread panicked", self.id);
            }
        }
    }
}
