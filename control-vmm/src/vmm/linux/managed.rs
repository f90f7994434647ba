//! `splitvmm-vmm --linux --managed-domid`: a Linux guest as a guest domain of `splitvmm up`.
//!
//! The xenbus walk, the control channel and the store are `frontend_core::xenbus`'s, as for
//! the tiny KVM guests ([`crate::vmm::managed`]). At backend InitWait the disk's vhost-user
//! session is set up on the handed connection; once the disks the guest was started with are
//! Connected (cold-plugged), the machine boots on its own thread with all of its RAM shared
//! with the driver domain. It runs until the guest powers off (the machine's thread then sets
//! the stop flag, which ends the walk: devices close, counters go to the toolstack, the
//! process exits), until the toolstack asks for a shutdown (the ACPI power button is pressed;
//! the guest powers off in its own time), or until the process is stopped.

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

use super::{run, LinuxReport, LinuxVmConfig};
use crate::vmm::arch::bzimage::LinuxBoot;
use crate::vmm::machine::{BlkAttachment, VmError};
use crate::vmm::managed::{no_network_checks, refuse_network_interfaces};
use crate::vmm::vfio::{AssignedFunctions, Assignment, GroupSource};
use crate::vmm::vhost_blk::VhostBlk;

/// How the managed Linux machine is built.
#[derive(Debug)]
pub struct LinuxSettings {
    pub boot: LinuxBoot,
    pub ram_bytes: u64,
    pub vcpus: u8,
    /// Disks the guest boots with: it starts once this many are Connected.
    pub disks: usize,
    /// PCI functions assigned to the guest: it starts once this many have been handed over
    /// (their VFIO groups, from the driver domain through the toolstack).
    pub pci: usize,
    /// The interactive console's socket (see [`super::console`]).
    pub console_socket: Option<std::os::unix::net::UnixListener>,
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

/// A Linux guest's disk: its vhost-user session until the machine takes it at boot.
pub struct LinuxDisk {
    session: Option<VhostBlk>,
}

/// The Linux machine of a managed VMM.
pub struct LinuxMachine {
    settings: LinuxSettings,
    stop: Arc<AtomicBool>,
    button: Arc<EventFd>,
    machine: MachineSlot,
    /// Sessions of the Connected disks, until boot.
    ready: Vec<VhostBlk>,
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
            ready: Vec::new(),
            assigned: Vec::new(),
            pci_addresses: Vec::new(),
            functions: AssignedFunctions::default(),
        };
        m.boot_when_ready()?;
        Ok(m)
    }

    /// Boots once every disk is Connected and every PCI function handed over.
    fn boot_when_ready(&mut self) -> Result<(), LinuxDeviceError> {
        if self.ready.len() >= self.settings.disks && self.assigned.len() >= self.settings.pci {
            self.boot()?;
        }
        Ok(())
    }

    /// Starts the machine on its own thread with the Connected disks.
    fn boot(&mut self) -> Result<(), LinuxDeviceError> {
        let blk = match self.ready.pop() {
            Some(session) => BlkAttachment::Connected(Box::new(session)),
            None => BlkAttachment::None,
        };
        let share_all_ram = !matches!(blk, BlkAttachment::None);
        let cfg = LinuxVmConfig {
            boot: self.settings.boot.clone(),
            ram_bytes: self.settings.ram_bytes,
            vcpus: self.settings.vcpus,
            console: Box::new(std::io::stdout()),
            console_socket: self.settings.console_socket.take(),
            stop: Arc::clone(&self.stop),
            power_button: Some(Arc::clone(&self.button)),
            blk,
            share_all_ram,
            connect_timeout: Duration::from_secs(5),
            assigned: std::mem::take(&mut self.assigned),
            functions: self.functions.clone(),
            nvme: std::mem::take(&mut self.settings.nvme),
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
}

/// Why a Linux guest's device could not be set up or checked.
#[derive(Debug, Error)]
pub enum LinuxDeviceError {
    #[error("vhost-user set-up")]
    Session(#[from] FrontendSessionError),
    #[error("vbd {0}: a Linux guest's disks are attached before it boots (no hotplug yet)")]
    AfterBoot(u32),
    #[error("the disk's session is gone")]
    SessionGone,
    #[error("starting the machine's thread")]
    Thread(#[source] std::io::Error),
    #[error("disk checks run in the tiny KVM guest, not in a Linux guest")]
    NoChecks,
    // Network interfaces of Linux guests come with the next part of issue 12.
    #[error("a Linux guest has no network interface yet")]
    NoNet,
}

impl FrontendLifecycle for LinuxMachine {
    type BlockSession = LinuxDisk;
    type ConnectError = LinuxDeviceError;

    fn connect_block(
        &mut self,
        devid: u32,
        connection: UnixStream,
    ) -> Result<(LinuxDisk, u64), LinuxDeviceError> {
        if !matches!(*self.machine.lock(), Machine::NotBooted) {
            return Err(LinuxDeviceError::AfterBoot(devid));
        }
        // The memory table (all of the guest's RAM) is sent when the machine boots.
        let session = VhostBlk::from_stream(connection, Vec::new())?;
        let capacity = session.capacity_sectors();
        Ok((
            LinuxDisk {
                session: Some(session),
            },
            capacity,
        ))
    }

    fn block_connected(
        &mut self,
        _devid: u32,
        disk: &mut LinuxDisk,
    ) -> Result<(), LinuxDeviceError> {
        let session = disk.session.take().ok_or(LinuxDeviceError::SessionGone)?;
        self.ready.push(session);
        self.boot_when_ready()
    }

    fn disconnect_block(&mut self, devid: u32, _disk: LinuxDisk) {
        // The machine holds the session: stop it before the backend lets go of its memory.
        if self.machine.is_running() {
            log::warn!("vbd {devid} closed under the running guest: stopping it");
            self.machine.finish(&self.stop);
        }
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

    fn assign_pci(
        &mut self,
        index: u32,
        address: &str,
        mut fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        if !matches!(*self.machine.lock(), Machine::NotBooted) {
            return Err("the guest has booted (no PCI hotplug yet)".into());
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

    /// One virtio-pci disk for now.
    fn max_block_devices(&self) -> usize {
        1
    }

    refuse_network_interfaces!(LinuxDeviceError::NoNet);
}

impl FrontendDiagnostics for LinuxMachine {
    type CheckError = LinuxDeviceError;

    fn disk_check(
        &mut self,
        _devid: u32,
        _disk: &mut LinuxDisk,
        _check: DiskCheck,
    ) -> Result<String, LinuxDeviceError> {
        Err(LinuxDeviceError::NoChecks)
    }

    no_network_checks!();

    fn stats<'a>(&self, _live: impl Iterator<Item = &'a LinuxDisk>) -> GuestStats {
        GuestStats::default()
    }
}
