//! One vhost-user session of a managed device (a disk, or a switch port), on its own thread.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ipc::xenbus::DeviceId;

use crate::blk::{BlkBackendConfig, BlkBackendDevice, BlkDisk};
use crate::net::switch::{Switch, SwitchPort};
use crate::net::{NetBackendConfig, NetBackendDevice};
use crate::vhost_user::{serve_listener, SessionShutdown};
use crate::virtio_core::counters::{CounterValues, DeviceCounters};
use crate::virtio_core::{MemoryGrant, SealPolicy};

/// How long a stopping session waits for its connection to be accepted.
const START_WAIT: Duration = Duration::from_secs(2);

/// A device being served.
pub struct Session {
    id: DeviceId,
    shutdown: mpsc::Receiver<SessionShutdown>,
    thread: Option<JoinHandle<()>>,
    capacity_sectors: u64,
    counters: Counters,
    /// Why the session ended, if it failed (not a frontend leaving).
    failure: Arc<Mutex<Option<String>>>,
}

/// Where a session's counters come from.
enum Counters {
    /// The block device core and its transport count everything.
    Block(Arc<DeviceCounters>),
    /// The transport counts kicks and interrupts; the switch port, frames and bytes.
    Net(Arc<DeviceCounters>, Arc<SwitchPort>),
}

impl Session {
    /// Starts serving `image` (read-only or not, with `queues` virtqueues) to the one
    /// frontend connection pending on `listener`, which may share `grant` of its guest's
    /// memory, protected as `seal_policy` requires.
    pub fn start_block(
        id: DeviceId,
        image: File,
        listener: UnixListener,
        (readonly, queues): (bool, u16),
        (grant, seal_policy): (MemoryGrant, SealPolicy),
    ) -> Result<Session, String> {
        let disk =
            Arc::new(BlkDisk::from_file(image, readonly).map_err(|e| format!("disk image: {e}"))?);
        let capacity_sectors = disk.capacity_sectors();
        let cfg = BlkBackendConfig {
            num_queues: queues,
            seal_policy,
            grant,
            ..BlkBackendConfig::default()
        };
        let counters = Counters::Block(cfg.counters.clone());
        Self::spawn(id, capacity_sectors, counters, move |started| {
            let device = BlkBackendDevice::new(disk, cfg).map_err(|e| e.to_string())?;
            serve_listener(listener, device, started).map_err(|e| e.to_string())
        })
    }

    /// Starts serving a new port of `switch`, with address `mac` and checksum/segmentation
    /// offloads offered or not, to the one frontend connection pending on `listener`, which
    /// may share `grant` of its guest's memory, protected as `seal_policy` requires.
    pub fn start_net(
        id: DeviceId,
        switch: &Arc<Switch>,
        listener: UnixListener,
        (mac, offloads): ([u8; 6], bool),
        (grant, seal_policy): (MemoryGrant, SealPolicy),
    ) -> Result<Session, String> {
        let port = Arc::new(
            switch
                .attach_guest(&format!("vif{}.{}", id.frontend, id.devid), mac)
                .map_err(|e| format!("switch port: {e}"))?,
        );
        let cfg = NetBackendConfig {
            mac,
            offloads,
            seal_policy,
            grant,
            ..NetBackendConfig::default()
        };
        let counters = Counters::Net(cfg.counters.clone(), port.clone());
        Self::spawn(id, 0, counters, move |started| {
            let device = NetBackendDevice::new(port, cfg).map_err(|e| e.to_string())?;
            serve_listener(listener, device, started).map_err(|e| e.to_string())
        })
    }

    fn spawn<F>(
        id: DeviceId,
        capacity_sectors: u64,
        counters: Counters,
        serve: F,
    ) -> Result<Session, String>
    where
        F: FnOnce(Box<dyn FnOnce(SessionShutdown) + Send>) -> Result<(), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let failure = Arc::new(Mutex::new(None));
        let failed = Arc::clone(&failure);
        let thread = std::thread::Builder::new()
            .name(format!("{}-{}-{}", id.kind, id.frontend, id.devid))
            .spawn(move || {
                let started: Box<dyn FnOnce(SessionShutdown) + Send> = Box::new(move |handle| {
                    log::info!("{id}: the frontend's connection is accepted; serving it");
                    let _ = tx.send(handle);
                });
                match serve(started) {
                    Ok(()) => log::info!("{id}: session ended"),
                    Err(e) => {
                        log::warn!("{id}: session ended: {e}");
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
            })
            .map_err(|e| format!("starting the session thread: {e}"))?;
        Ok(Session {
            id,
            shutdown: rx,
            thread: Some(thread),
            capacity_sectors,
            counters,
            failure,
        })
    }

    /// Why the session failed, once it has (a frontend that left is no failure).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The device's counters so far in this session. For a network interface, requests are
    /// frames (sent and received), and errors are frames refused (malformed or spoofed) or dropped.
    pub fn counters(&self) -> CounterValues {
        match &self.counters {
            Counters::Block(c) => c.snapshot(),
            Counters::Net(c, port) => {
                let p = port.counters();
                CounterValues {
                    requests: p.tx_frames + p.rx_frames,
                    bytes: p.tx_bytes + p.rx_bytes,
                    errors: p.tx_invalid + p.tx_spoofed + p.tx_dropped + p.rx_dropped,
                    ..c.snapshot()
                }
            }
        }
    }

    /// Capacity in 512-byte sectors (block devices).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Ends the session (the frontend sees its connection close), joins the thread, and
    /// returns its final counters.
    pub fn stop(mut self) -> CounterValues {
        if let Ok(handle) = self.shutdown.recv_timeout(START_WAIT) {
            handle.shutdown();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: session thread panicked", self.id);
            }
        }
        self.counters()
    }
}
