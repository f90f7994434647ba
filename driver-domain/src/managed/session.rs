//! One vhost-user-blk session of a managed device, on its own thread.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ipc::xenbus::DeviceId;
use vhost::vhost_user::Listener;
use vhost_user_backend::ShutdownHandle;

use crate::blk::{BlkConfig, BlkDisk};
use crate::vhost_user::blk::serve_blk_listener;

/// How long a stopping session waits for its connection to be accepted.
const START_WAIT: Duration = Duration::from_secs(2);

/// A device being served.
pub struct Session {
    id: DeviceId,
    shutdown: mpsc::Receiver<ShutdownHandle>,
    thread: Option<JoinHandle<()>>,
    capacity_sectors: u64,
}

impl Session {
    /// Starts serving `image` to the one frontend connection pending on `listener`.
    pub fn start(
        id: DeviceId,
        image: File,
        listener: UnixListener,
        readonly: bool,
    ) -> Result<Session, String> {
        let disk =
            Arc::new(BlkDisk::from_file(image, readonly).map_err(|e| format!("disk image: {e}"))?);
        let capacity_sectors = disk.capacity_sectors();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vbd-{}-{}", id.frontend, id.devid))
            .spawn(move || {
                let listener = Listener::from(listener);
                let started = move |handle| {
                    let _ = tx.send(handle);
                };
                match serve_blk_listener(listener, disk, BlkConfig::default(), started) {
                    Ok(()) => log::info!("{id}: session ended"),
                    Err(e) => log::warn!("{id}: session ended: {e}"),
                }
            })
            .map_err(|e| format!("starting the session thread: {e}"))?;
        Ok(Session {
            id,
            shutdown: rx,
            thread: Some(thread),
            capacity_sectors,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Ends the session (the frontend sees its connection close) and joins the thread.
    pub fn stop(mut self) {
        if let Ok(handle) = self.shutdown.recv_timeout(START_WAIT) {
            handle.shutdown();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: session thread panicked", self.id);
            }
        }
    }
}
