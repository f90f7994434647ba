//! `splitvmm-vmm --linux --managed-domid`: a Linux guest as a guest domain of `splitvmm up`.
//!
//! The xenbus walk, the control channel and the store are `frontend_core::xenbus`'s, as for
//! the tiny KVM guests ([`crate::vmm::managed`]). At backend InitWait a device's vhost-user
//! session (a disk, or a network interface on the driver domain's switch) is set up on the
//! handed connection; once the devices the guest was started with are Connected (cold-plugged:
//! disks, then interfaces, each by device number), the machine boots on its own thread with
//! all of its RAM shared with the driver domain, once the PCI functions assigned to it
//! (`[[guest.pci]]`, their VFIO groups handed over by the toolstack) are here too. The interfaces' addresses go on the kernel
//! command line (`splitvmm.vif<devid>=<mac>,<ip>`) for the guest to configure. A device
//! attached while the guest runs is hot-plugged (ACPI, see [`super::hotplug`]); a detach
//! waits for the guest to eject the device, up to a deadline after which it is removed by
//! force. A driver domain that dies and is restarted by the toolstack does not cost the guest
//! its devices: each resumes on the new backend with the guest's rings as they are
//! ([`LinuxMachine::reconnect_block`], [`Hotplug::resume`]; a disk's in-flight requests are
//! resubmitted from the log its session kept). It runs until the guest powers off (the machine's thread then sets
//! the stop flag, which ends the walk: devices close, counters go to the toolstack, the
//! process exits), until the toolstack asks for a shutdown (the ACPI power button is pressed;
//! the guest powers off in its own time), or until the process is stopped.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use frontend_core::vhost_user::FrontendSessionError;
use frontend_core::xenbus::{DiskCheck, FrontendDiagnostics, FrontendLifecycle, ManagedFrontend};
use ipc::control::messages::GuestStats;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::hotplug::{DeviceKey, Hotplug, HotplugError, HotplugSlot};
use super::{run, LinuxReport, LinuxVmConfig};
use crate::vmm::arch::bzimage::LinuxBoot;
use crate::vmm::machine::VmError;
use crate::vmm::vfio::{AssignedFunctions, Assignment, GroupSource};
use crate::vmm::vhost_device::{VhostDevice, VirtioDeviceType, VringSetup};

/// How the managed Linux machine is built.
#[derive(Debug)]
pub struct LinuxSettings {
    pub boot: LinuxBoot,
    pub ram_bytes: u64,
    pub vcpus: u8,
    /// Disks and network interfaces the guest boots with: it starts once this many are
    /// Connected.
    pub devices: usize,
    /// PCI functions assigned to the guest: it starts once this many have been handed over
    /// too (their VFIO groups, from the driver domain through the toolstack).
    pub pci: usize,
    /// The interactive console's socket (see [`super::console`]).
    pub console_socket: Option<std::os::unix::net::UnixListener>,
    /// The guest's owner agreed to share all of its RAM with the driver domain: needed for any
    /// device, cold- or hot-plugged.
    pub share_all_ram: bool,
    /// How long a detach waits for the guest to eject the device before removing it by force.
    pub eject_timeout: Duration,
    /// Emulated NVMe namespaces, on files the toolstack opened and handed over.
    pub nvme: Vec<crate::vmm::devices::nvme::Namespace>,
}

/// Where the machine stands.
#[derive(Default)]
enum Machine {
    #[default]
    NotBooted,
    Running(JoinHandle<Result<LinuxReport, VmError>>),
    Ended(Result<LinuxReport, VmError>),
}

/// The machine, shared by the walk (which boots it) and `main` (which reports how it ended).
#[derive(Clone, Default)]
pub struct MachineSlot(Arc<Mutex<Machine>>);

impl MachineSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_running(&self) -> bool {
        matches!(*self.lock(), Machine::Running(_))
    }

    /// Stops the machine (sets `stop`) if it runs and waits for it; returns how it ended, or
    /// None if it never booted.
    pub fn finish(&self, stop: &AtomicBool) -> Option<Result<LinuxReport, VmError>> {
        let mut machine = self.lock();
        if let Machine::Running(_) = &*machine {
            stop.store(true, Ordering::SeqCst);
            if let Machine::Running(thread) = std::mem::take(&mut *machine) {
                let ended = thread.join().unwrap_or_else(|_| {
                    Err(VmError::Config("the machine's thread panicked".into()))
                });
                *machine = Machine::Ended(ended);
            }
        }
        match &*machine {
            Machine::Ended(Ok(report)) => Some(Ok(report.clone())),
            Machine::Ended(Err(e)) => Some(Err(VmError::Config(e.to_string()))),
            _ => None,
        }
    }
}

/// A Linux guest's disk or network interface: its vhost-user session until the machine
/// takes it at boot.
pub struct LinuxDevice {
    session: Option<VhostDevice>,
    /// Network interfaces: the MAC address and the IPv4 address the toolstack gave.
    mac: [u8; 6],
    ip: [u8; 4],
}

/// The Linux machine of a managed VMM.
pub struct LinuxMachine {
    settings: LinuxSettings,
    stop: Arc<AtomicBool>,
    button: Arc<EventFd>,
    machine: MachineSlot,
    /// Sessions of the Connected devices, until boot, in plugging order.
    ready: BTreeMap<DeviceKey, VhostDevice>,
    /// The interfaces' addresses for the kernel command line.
    addresses: Vec<String>,
    /// The running machine's PCI hotplug.
    hotplug: Arc<HotplugSlot>,
    /// Functions handed over, until boot.
    assigned: Vec<Assignment>,
    /// Host address of each function handed over, by index.
    pci_addresses: Vec<(u32, String)>,
    /// The functions of the running machine.
    functions: AssignedFunctions,
}

/// The managed VMM process of a Linux guest.
pub type ManagedLinuxVm = ManagedFrontend<LinuxMachine>;

impl LinuxMachine {
    /// A machine built with `settings`; `stop` ends it from outside (and is set when it ends),
    /// `button` is its ACPI power button. A guest without disks boots at once.
    pub fn new(
        settings: LinuxSettings,
        stop: Arc<AtomicBool>,
        button: Arc<EventFd>,
        machine: MachineSlot,
    ) -> Result<Self, LinuxDeviceError> {
        let mut m = LinuxMachine {
            settings,
            stop,
            button,
            machine,
            ready: BTreeMap::new(),
            addresses: Vec::new(),
            hotplug: Arc::default(),
            assigned: Vec::new(),
            pci_addresses: Vec::new(),
            functions: AssignedFunctions::default(),
        };
        m.boot_when_ready()?;
        Ok(m)
    }

    /// Boots once every device is Connected and every PCI function handed over.
    fn boot_when_ready(&mut self) -> Result<(), LinuxDeviceError> {
        if self.ready.len() >= self.settings.devices && self.assigned.len() >= self.settings.pci {
            self.boot()?;
        }
        Ok(())
    }

    /// Starts the machine on its own thread with the Connected devices and the functions
    /// handed over.
    fn boot(&mut self) -> Result<(), LinuxDeviceError> {
        let devices: Vec<(DeviceKey, VhostDevice)> =
            std::mem::take(&mut self.ready).into_iter().collect();
        let cfg = LinuxVmConfig {
            boot: self.settings.boot.clone(),
            ram_bytes: self.settings.ram_bytes,
            vcpus: self.settings.vcpus,
            console: Box::new(std::io::stdout()),
            console_socket: self.settings.console_socket.take(),
            stop: Arc::clone(&self.stop),
            power_button: Some(Arc::clone(&self.button)),
            devices,
            share_all_ram: self.settings.share_all_ram,
            cmdline_extra: self.addresses.join(" "),
            hotplug: Some(Arc::clone(&self.hotplug)),
            exit_reason_hist: None,
            assigned: std::mem::take(&mut self.assigned),
            functions: self.functions.clone(),
            nvme: std::mem::take(&mut self.settings.nvme),
            watch_threads: Default::default(),
            driver_vm: None,
            reconnect: Vec::new(),
        };
        let stop = Arc::clone(&self.stop);
        let thread = std::thread::Builder::new()
            .name("machine".into())
            .spawn(move || {
                let ended = run(cfg);
                // However it ended, the walk ends with it.
                stop.store(true, Ordering::SeqCst);
                ended
            })
            .map_err(LinuxDeviceError::Thread)?;
        *self.machine.lock() = Machine::Running(thread);
        log::info!("booting the Linux guest");
        Ok(())
    }

    /// The running machine's hotplug, if it runs.
    fn running_hotplug(&self) -> Option<Arc<Hotplug>> {
        self.hotplug
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A Connected device: queued for boot (which starts once all are there), or hot-plugged
    /// into the running guest.
    fn connected(&mut self, key: DeviceKey, dev: &mut LinuxDevice) -> Result<(), LinuxDeviceError> {
        let session = dev.session.take().ok_or(LinuxDeviceError::SessionGone)?;
        if matches!(*self.machine.lock(), Machine::NotBooted) {
            if key.0 == VirtioDeviceType::Net {
                let mac = dev.mac.map(|b| format!("{b:02x}")).join(":");
                let ip = std::net::Ipv4Addr::from(dev.ip);
                self.addresses
                    .push(format!("splitvmm.vif{}={mac},{ip}", key.1));
            }
            self.ready.insert(key, session);
            return self.boot_when_ready();
        }
        let hotplug = self
            .running_hotplug()
            .ok_or(LinuxDeviceError::NotRunning(key.1))?;
        hotplug.plug(key, session, true)?;
        Ok(())
    }

    /// Resumes device `key` on `connection` to a restarted driver domain, wherever its
    /// session is: still in the walk, waiting for boot (no ring runs: the set-up is simply
    /// sent again), or on the running guest's bus ([`Hotplug::resume`]).
    fn resume(
        &mut self,
        key: DeviceKey,
        dev: &mut LinuxDevice,
        connection: UnixStream,
    ) -> Result<(), LinuxDeviceError> {
        let mut no_ring = |q: usize, _: VringSetup| Err(format!("queue {q} runs before boot"));
        if let Some(session) = dev.session.as_mut().or_else(|| self.ready.get_mut(&key)) {
            session.resume(connection, &mut no_ring)?;
            return Ok(());
        }
        let hotplug = self
            .running_hotplug()
            .ok_or(LinuxDeviceError::NotRunning(key.1))?;
        match hotplug.resume(key, connection)? {
            Some(log) => {
                log::warn!(
                    "{} {}: resumed on the restarted backend ({})",
                    key.0.name(),
                    key.1,
                    if log {
                        "in-flight log handed back"
                    } else {
                        "no in-flight log: rings restarted at their used index"
                    }
                );
                Ok(())
            }
            None => Err(LinuxDeviceError::NotPlugged(key.1)),
        }
    }

    /// Devices are set up before boot and while the guest runs, not after it ended.
    fn may_connect(&self, devid: u32) -> Result<(), LinuxDeviceError> {
        match *self.machine.lock() {
            Machine::NotBooted => Ok(()),
            Machine::Running(_) if self.settings.share_all_ram => Ok(()),
            Machine::Running(_) => Err(LinuxDeviceError::Hotplug(HotplugError::NotShared)),
            Machine::Ended(_) => Err(LinuxDeviceError::NotRunning(devid)),
        }
    }

    /// Detach: a device still waiting for boot lets go at once; one on the running guest's
    /// bus once the guest ejected it (or the deadline passed).
    fn release(&mut self, key: DeviceKey) -> bool {
        self.ready.remove(&key);
        match self.running_hotplug() {
            Some(hotplug) => hotplug.release(key, self.settings.eject_timeout),
            None => true,
        }
    }

    /// The session ends. A device that is still on the running guest's bus (its walk failed)
    /// is removed at once: the backend must not lose the guest's memory under a live queue.
    fn device_closed(&mut self, key: DeviceKey) {
        self.ready.remove(&key);
        if let Some(hotplug) = self.running_hotplug() {
            if !hotplug.release(key, Duration::ZERO) && !hotplug.release(key, Duration::ZERO) {
                log::error!("{} {}: could not be removed", key.0.name(), key.1);
            }
        }
    }
}

/// Why a Linux guest's device could not be set up or checked.
#[derive(Debug, Error)]
pub enum LinuxDeviceError {
    #[error("vhost-user set-up")]
    Session(#[from] FrontendSessionError),
    #[error("device {0}: the guest is not running")]
    NotRunning(u32),
    #[error("hotplug")]
    Hotplug(#[from] HotplugError),
    #[error("the backend gave the interface no MAC address (VIRTIO_NET_F_MAC)")]
    NoMac,
    #[error("device {0} is not on the guest's bus")]
    NotPlugged(u32),
    #[error("the disk's session is gone")]
    SessionGone,
    #[error("starting the machine's thread")]
    Thread(#[source] std::io::Error),
    #[error("disk checks run in the tiny KVM guest, not in a Linux guest")]
    NoChecks,
    #[error("pings run in the Linux guest itself (busybox ping), not in its VMM")]
    NoPing,
}

impl FrontendLifecycle for LinuxMachine {
    type BlockSession = LinuxDevice;
    type NetSession = LinuxDevice;
    type ConnectError = LinuxDeviceError;

    fn connect_block(
        &mut self,
        devid: u32,
        connection: UnixStream,
    ) -> Result<(LinuxDevice, u64), LinuxDeviceError> {
        self.may_connect(devid)?;
        // The memory table (all of the guest's RAM) is sent when the guest's driver starts.
        let session = VhostDevice::from_stream(VirtioDeviceType::Blk, connection, Vec::new())?;
        let capacity = session.capacity_sectors();
        Ok((
            LinuxDevice {
                session: Some(session),
                mac: [0; 6],
                ip: [0; 4],
            },
            capacity,
        ))
    }

    fn block_connected(
        &mut self,
        devid: u32,
        disk: &mut LinuxDevice,
    ) -> Result<(), LinuxDeviceError> {
        self.connected((VirtioDeviceType::Blk, devid), disk)
    }

    fn release_block(&mut self, devid: u32, _disk: &mut LinuxDevice) -> bool {
        self.release((VirtioDeviceType::Blk, devid))
    }

    fn disconnect_block(&mut self, devid: u32, _disk: LinuxDevice) {
        self.device_closed((VirtioDeviceType::Blk, devid));
    }

    fn connect_net(
        &mut self,
        devid: u32,
        connection: UnixStream,
        ip: [u8; 4],
    ) -> Result<(LinuxDevice, [u8; 6]), LinuxDeviceError> {
        self.may_connect(devid)?;
        // The toolstack's driver domain serves the control queue itself.
        let session = VhostDevice::from_stream(VirtioDeviceType::Net, connection, Vec::new())?
            .with_backend_control_queue();
        let mac = session.mac().ok_or(LinuxDeviceError::NoMac)?;
        Ok((
            LinuxDevice {
                session: Some(session),
                mac,
                ip,
            },
            mac,
        ))
    }

    fn net_connected(&mut self, devid: u32, nic: &mut LinuxDevice) -> Result<(), LinuxDeviceError> {
        self.connected((VirtioDeviceType::Net, devid), nic)
    }

    fn release_net(&mut self, devid: u32, _nic: &mut LinuxDevice) -> bool {
        self.release((VirtioDeviceType::Net, devid))
    }

    fn disconnect_net(&mut self, devid: u32, _nic: LinuxDevice) {
        self.device_closed((VirtioDeviceType::Net, devid));
    }

    fn shutdown_requested(&mut self) -> bool {
        if !self.machine.is_running() {
            return true;
        }
        log::warn!("shutdown requested: pressing the guest's ACPI power button");
        match self.button.write(1) {
            Ok(()) => false,
            Err(e) => {
                log::error!("pressing the power button: {e}; stopping the guest");
                true
            }
        }
    }

    /// A restarted driver domain: the disk resumes on the new connection with the guest's
    /// rings as they are (the in-flight log handed back, each ring at its used index,
    /// kicked); the guest sees a delay.
    fn reconnect_block(
        &mut self,
        devid: u32,
        disk: &mut LinuxDevice,
        connection: UnixStream,
    ) -> Option<Result<(), LinuxDeviceError>> {
        Some(self.resume((VirtioDeviceType::Blk, devid), disk, connection))
    }

    /// The same for an interface, without an in-flight log: its rings restart at their used
    /// indexes (frames the old backend had taken but not completed are sent again or lost,
    /// as on a wire whose switch restarted). The MAC address stays the one the guest has.
    fn reconnect_net(
        &mut self,
        devid: u32,
        mut nic: LinuxDevice,
        connection: UnixStream,
        _ip: [u8; 4],
    ) -> Result<(LinuxDevice, [u8; 6]), LinuxDeviceError> {
        self.resume((VirtioDeviceType::Net, devid), &mut nic, connection)?;
        let mac = nic.mac;
        Ok((nic, mac))
    }

    /// One PCI slot each (bus 0 has 31 after the host bridge).
    fn max_block_devices(&self) -> usize {
        16
    }

    fn assign_pci(
        &mut self,
        index: u32,
        address: &str,
        mut fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        if !matches!(*self.machine.lock(), Machine::NotBooted) {
            return Err("the guest has booted (no hotplug of assigned functions yet)".into());
        }
        if !crate::vmm::vfio::valid_bdf(address) {
            return Err(format!("{address:?} is not a PCI address"));
        }
        let group = match (fds.pop(), fds.is_empty()) {
            (Some(group), true) => group,
            _ => return Err("expected exactly one descriptor (the VFIO group)".into()),
        };
        log::info!("PCI {index}: {address} handed over (its VFIO group)");
        self.pci_addresses.push((index, address.to_owned()));
        self.assigned.push(Assignment {
            bdf: address.to_owned(),
            group: GroupSource::Fd(group),
        });
        self.boot_when_ready().map_err(|e| e.to_string())
    }

    fn detach_pci(&mut self, index: u32) -> Result<(), String> {
        let i = self
            .pci_addresses
            .iter()
            .position(|(n, _)| *n == index)
            .ok_or_else(|| format!("no PCI function {index}"))?;
        let (_, address) = self.pci_addresses.remove(i);
        if matches!(*self.machine.lock(), Machine::NotBooted) {
            // Not plugged yet: drop its group; the guest no longer waits for it.
            self.assigned.retain(|a| a.bdf != address);
            self.settings.pci = self.settings.pci.saturating_sub(1);
            return self.boot_when_ready().map_err(|e| e.to_string());
        }
        // A running machine: a surprise removal for the guest. A machine that has ended
        // closed it already.
        if self.functions.release(&address) {
            log::warn!("PCI {index} ({address}) taken away from the running guest");
        }
        Ok(())
    }
}

impl FrontendDiagnostics for LinuxMachine {
    type CheckError = LinuxDeviceError;

    fn disk_check(
        &mut self,
        _devid: u32,
        _disk: &mut LinuxDevice,
        _check: DiskCheck,
    ) -> Result<String, LinuxDeviceError> {
        Err(LinuxDeviceError::NoChecks)
    }

    fn net_ping(
        &mut self,
        _devid: u32,
        _nic: &mut LinuxDevice,
        _peer: [u8; 4],
        _rounds: u32,
    ) -> Result<String, LinuxDeviceError> {
        Err(LinuxDeviceError::NoPing)
    }

    /// The guest's own network stack answers its peers.
    const ANSWERS_PEERS: bool = false;

    fn answer_peers(
        &mut self,
        _devid: u32,
        _nic: &mut LinuxDevice,
    ) -> Result<(), LinuxDeviceError> {
        Ok(())
    }

    fn stats<'a>(&self, _live: impl Iterator<Item = &'a LinuxDevice>) -> GuestStats {
        GuestStats::default()
    }
}
