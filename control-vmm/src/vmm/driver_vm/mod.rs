//! A driver domain as a VM (issue 21, phase 1): dom0's side in the driver VM's VMM
//! (`splitvmm-vmm --driver-vm-socket PATH ...`). The machine gets COM2 ([`com2`]), which
//! carries the tunnel to the in-VM server (`driver-domain vm-serve`), and the cross-VM device
//! (`devices::cross_vm`), which carries the guests' memory and doorbells; the relay
//! ([`relay`]) turns each guest's vhost-user connection into a channel of the tunnel. The wire
//! format is `ipc::tunnel` (docs/protocol.md, "The driver-VM tunnel").

pub mod bar2_space;
pub mod com2;
pub mod managed;
pub mod relay;
pub mod session;
pub mod wire;

#[cfg(test)]
mod managed_tests;
#[cfg(test)]
mod tests;

use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use ipc::tunnel::Frame;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::devices::cross_vm::{CrossVmState, CHANNELS};
use com2::TunnelUart;
use managed::Managed;
pub use managed::ManagedEnds;
use relay::Relay;

/// Default size of BAR2, the shared memory (`--driver-vm-shm-mib`).
pub const SHM_DEFAULT_MIB: u64 = 1024;

/// What makes a Linux machine a driver VM.
#[derive(Debug)]
pub struct DriverVmConfig {
    /// One listening socket per channel, in order (none for a managed driver VM).
    pub sockets: Vec<UnixListener>,
    /// A managed driver VM's store connection and control channel (`--driver-vm-domid`):
    /// its channels are handed out per Serve* request.
    pub managed: Option<ManagedEnds>,
    /// BAR2's size in bytes (a power of two).
    pub shm_bytes: u64,
}

/// Errors setting a driver VM up.
#[derive(Debug, thiserror::Error)]
pub enum DriverVmError {
    #[error("{0} sockets: a driver VM serves 1 to {CHANNELS} channels (none when managed)")]
    Channels(usize),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
}

/// COM2 before the machine's bus exists: the UART, and the queues its threads will use.
#[derive(Debug)]
pub struct Tunnel {
    pub uart: Arc<Mutex<TunnelUart>>,
    drained: Arc<EventFd>,
    from_vm: mpsc::Receiver<Option<Frame>>,
    /// To stop the tunnel's reader (a `None`).
    stop_reader: mpsc::Sender<Option<Frame>>,
}

impl Tunnel {
    /// COM2, interrupting through `irq`.
    pub fn new(irq: EventFd) -> Result<Self, DriverVmError> {
        let (frames, from_vm) = mpsc::channel();
        let stop_reader = frames.clone();
        let (uart, drained) = TunnelUart::new(irq, frames).map_err(|source| DriverVmError::Io {
            op: "COM2 eventfd",
            source,
        })?;
        Ok(Self {
            uart: Arc::new(Mutex::new(uart)),
            drained,
            from_vm,
            stop_reader,
        })
    }
}

/// The running relay: its threads end when `halt` is set.
#[derive(Debug)]
pub struct DriverVm {
    relay: Arc<Relay>,
    stop_reader: mpsc::Sender<Option<Frame>>,
    threads: Vec<JoinHandle<()>>,
}

impl DriverVm {
    /// Starts the tunnel's threads and a relay thread per socket.
    pub fn start(
        cfg: DriverVmConfig,
        tunnel: Tunnel,
        device: Arc<CrossVmState>,
        halt: Arc<AtomicBool>,
    ) -> Result<Self, DriverVmError> {
        let sockets = cfg.sockets.len();
        let n = match (&cfg.managed, sockets) {
            (None, 1..) if sockets <= usize::from(CHANNELS) => sockets,
            (Some(_), 0) => usize::from(CHANNELS),
            _ => return Err(DriverVmError::Channels(sockets)),
        };
        let io = |op| move |source| DriverVmError::Io { op, source };
        let (to_vm, for_vm) = mpsc::channel();
        let managed = cfg.managed.map(|ends| Arc::new(Managed::new(ends, n)));
        let relay = Arc::new(
            Relay::new(device, n, to_vm, Arc::clone(&halt), managed.clone())
                .map_err(io("the relay's eventfd"))?,
        );
        let mut threads = vec![com2::spawn_feeder(
            Arc::clone(&tunnel.uart),
            tunnel.drained,
            for_vm,
            Arc::clone(&halt),
        )
        .map_err(io("starting the tunnel's feeder"))?];
        let deliver = Arc::clone(&relay);
        threads.push(
            com2::spawn_reader(tunnel.from_vm, move |f| deliver.from_vm(f))
                .map_err(io("starting the tunnel's reader"))?,
        );
        for (channel, listener) in cfg.sockets.into_iter().enumerate() {
            let relay = Arc::clone(&relay);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("relay{channel}"))
                    .spawn(move || relay.serve_channel(channel as u16, &listener))
                    .map_err(io("starting a relay thread"))?,
            );
        }
        if let Some(managed) = &managed {
            threads.extend(
                managed::spawn(&relay, managed)
                    .map_err(io("starting the managed relay threads"))?,
            );
        }
        log::info!("driver VM: {n} channel(s), waiting for the driver VM's HELLO on COM2 (ttyS1)");
        Ok(Self {
            relay,
            stop_reader: tunnel.stop_reader,
            threads,
        })
    }

    /// Stops the threads and waits for them (their channels close, BAR2 is unmapped). None
    /// of them wakes up before: they wait on their sockets, COM2's queues and the stop.
    pub fn join(self) {
        self.relay.stop();
        let _ = self.stop_reader.send(None);
        for t in self.threads {
            if t.join().is_err() {
                log::error!("a driver-VM relay thread panicked");
            }
        }
        log::info!(
            "driver VM: relay stopped, {} bytes of BAR2 still mapped",
            self.relay.bar2_used()
        );
    }
}
