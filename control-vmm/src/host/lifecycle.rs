//! Lifecycle of one guest on a running host, after `xl`: create from its own description,
//! orderly shutdown, reboot, destroy; and the shutdown of the whole host.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ipc::control::messages::{
    BackendDeviceStats, BackendEvent, BackendRequest, GuestEvent, GuestRequest, GuestStats,
};
use ipc::xenbus::{DeviceId, DeviceKind};

use super::supervision::Watched;
use super::{
    console_socket, lock, shutdown_timeout, start_domain, Guest, GuestSlot, Host, WALK_TIMEOUT,
};
use crate::config::{ChecksConfig, GuestConfig, HostConfig};
use crate::domains;
use crate::supervisor::describe;

/// What `Host::shut_down` found out.
pub struct ShutdownReport {
    /// Each guest's name, id and counters (None if it did not report).
    pub guests: Vec<(String, u32, Option<GuestStats>)>,
    /// The driver domain's name and id.
    pub driver: (String, u32),
    /// The driver domain's per-device counters.
    pub backend: Vec<BackendDeviceStats>,
    /// Whether every process exited cleanly.
    pub clean: bool,
}

impl Host {
    /// Creates guest `config` and starts its process; with `attach`, attaches its disks and
    /// interfaces as well (a failure there destroys the guest again, as `xl create` does).
    /// `file` names the guest's description in errors; `None` for guests of the host file,
    /// which was checked as a whole.
    pub fn create_guest(&self, config: GuestConfig, attach: Option<&Path>) -> Result<()> {
        let creating = lock(&self.creating);
        if let Some(file) = attach {
            let mut host = HostConfig {
                checks: ChecksConfig::default(),
                run_dir: self.run_dir.clone(),
                driver_domain: self.driver_config.clone(),
                guests: lock(&self.guests)
                    .values()
                    .map(|s| s.config.clone())
                    .collect(),
                confinement: Default::default(),
            };
            host.guests.push(config.clone());
            host.validate(file)?;
            host.check_files(file)?;
        }
        let name = config.name.clone();
        self.create_domain(&config)?;
        let (command, handed) = self.guest_launch(&config)?;
        let domain = start_domain(
            &self.store,
            &self.run_dir,
            (config.domid, &name),
            (command, handed),
            self.confinement_of(&config)?,
            false,
        )?;
        let slot = Arc::new(GuestSlot {
            config,
            gone: AtomicBool::new(false),
            watch: Mutex::new(Watched::of(&domain)),
            state: Mutex::new(Guest {
                domain,
                disks: BTreeMap::new(),
                nics: BTreeMap::new(),
                pci: Vec::new(),
                stats: None,
            }),
        });
        let mut guest = lock(&slot.state);
        lock(&self.guests).insert(name.clone(), slot.clone());
        drop(creating);
        self.progress(&format!("{name}: created (domain {})", slot.config.domid));
        // Its VFs before anything else: the guest boots once they (and its disks) are there.
        let assigned = self.assign_pci_locked(&name, &slot, &mut guest);
        if let Err(e) = assigned {
            drop(guest);
            if let Err(undo) = self.destroy_guest(&name) {
                log::error!("{name}: destroying after a failed PCI assignment: {undo:#}");
            }
            return Err(e);
        }
        if attach.is_none() {
            return Ok(());
        }
        let attached = self.attach_devices(&name, &slot, &mut guest);
        drop(guest);
        if let Err(e) = attached {
            if let Err(undo) = self.destroy_guest(&name) {
                log::error!("{name}: destroying after a failed create: {undo:#}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Attaches the disks and interfaces of the guest's description.
    fn attach_devices(&self, name: &str, slot: &GuestSlot, guest: &mut Guest) -> Result<()> {
        for disk in &slot.config.disks {
            self.attach_disk_locked(name, slot, guest, disk)?;
        }
        for nic in &slot.config.nics {
            self.attach_nic_locked(name, slot, guest, nic)?;
        }
        Ok(())
    }

    /// Shuts guest `domain` down in order: the guest closes its devices through the xenbus
    /// walk and reports its counters, its process exits, its devices' directories go and the
    /// domain is released in the store. Returns its counters.
    pub fn shutdown_guest(&self, domain: &str) -> Result<(String, Option<GuestStats>)> {
        self.with_guest(domain, |name, slot, guest| {
            let clean = self.stop_orderly(name, &slot.config, guest);
            self.forget(name, slot, guest)?;
            if !clean {
                bail!("{name} did not shut down cleanly and was stopped (see its log)");
            }
            self.progress(&format!("{name}: shut down"));
            Ok((name.to_owned(), guest.stats))
        })
    }

    /// Reboots guest `domain`: an orderly shutdown, then a fresh process of the same
    /// description, same domain id, with the disks and interfaces it had at that moment
    /// (attached at run time or not). A KVM guest's VMM restarts the same way: the VM boots
    /// again from its kernel.
    pub fn reboot_guest(&self, domain: &str) -> Result<String> {
        self.with_guest(domain, |name, slot, guest| {
            let disks: Vec<_> = guest.disks.values().cloned().collect();
            let nics: Vec<_> = guest.nics.values().cloned().collect();
            let clean = self.stop_orderly(name, &slot.config, guest);
            self.tear_down(name, guest)?;
            domains::destroy_domain(&mut self.client()?, guest.domain.domid)?;
            if !clean {
                log::warn!("{name} did not shut down cleanly before its reboot");
            }
            self.create_domain(&slot.config)?;
            let (command, handed) = self.guest_launch(&slot.config)?;
            guest.domain = start_domain(
                &self.store,
                &self.run_dir,
                (slot.config.domid, name),
                (command, handed),
                self.confinement_of(&slot.config)?,
                true,
            )?;
            *lock(&slot.watch) = Watched::of(&guest.domain);
            guest.stats = None;
            self.assign_pci_locked(name, slot, guest)?;
            for disk in &disks {
                self.attach_disk_locked(name, slot, guest, disk)?;
            }
            for nic in &nics {
                self.attach_nic_locked(name, slot, guest, nic)?;
            }
            self.progress(&format!("{name}: rebooted"));
            Ok(name.to_owned())
        })
    }

    /// Destroys guest `domain` (a name or an id), as `xl destroy` does: a request waiting on
    /// it gives up, its process is stopped at once, its devices are torn down on the backend
    /// side (close requested, then its frontend directories removed, so the driver domain
    /// reads them as Closed and need not wait for a dead guest), and the domain is released in
    /// the store, so a reused id inherits nothing.
    pub fn destroy_guest(&self, domain: &str) -> Result<String> {
        let (name, slot) = self.slot(domain)?;
        slot.gone.store(true, Ordering::SeqCst);
        lock(&self.guests).remove(&name);
        let mut guest = lock(&slot.state);
        let status = guest.domain.process.stop();
        let _ = std::fs::remove_file(console_socket(&self.run_dir, &name));
        let torn_down = self.tear_down(&name, &mut guest);
        lock(&self.images).release_guest(&name);
        torn_down?;
        domains::destroy_domain(&mut self.client()?, guest.domain.domid)?;
        let how = status.map_or_else(|| "ended".to_owned(), |s| describe(&s));
        self.progress(&format!("{name}: destroyed ({how})"));
        Ok(name)
    }

    /// Creates guest `config`'s domain in the store, with what `splitvmm list` shows of it
    /// (`share`: the memory its disks' backend maps, `all-ram` for a Linux guest's).
    fn create_domain(&self, config: &GuestConfig) -> Result<()> {
        let mut client = self.client()?;
        domains::create_domain(&mut client, config.domid, &config.name)?;
        if let Some(share) = &config.share {
            let path = format!("{}/share", ipc::xenbus::domain_path(config.domid));
            client.write(&path, share.as_bytes())?;
        }
        Ok(())
    }

    /// Forgets a guest whose process has ended: its devices are torn down, its images
    /// released and its domain released in the store.
    pub(super) fn forget(&self, name: &str, slot: &GuestSlot, guest: &mut Guest) -> Result<()> {
        slot.gone.store(true, Ordering::SeqCst);
        lock(&self.guests).remove(name);
        let _ = std::fs::remove_file(console_socket(&self.run_dir, name));
        let torn_down = self.tear_down(name, guest);
        lock(&self.images).release_guest(name);
        let released = domains::destroy_domain(&mut self.client()?, guest.domain.domid);
        torn_down?;
        released?;
        Ok(())
    }

    /// Asks the guest to shut down: it closes its devices and reports its counters; waits for
    /// its process to exit, stopping it if it does not. Returns whether it went cleanly.
    fn stop_orderly(&self, name: &str, config: &GuestConfig, guest: &mut Guest) -> bool {
        let _ = guest.domain.channel.send(&GuestRequest::Shutdown, &[]);
        let timeout = shutdown_timeout(config);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match guest
                .domain
                .channel
                .recv_timeout::<GuestEvent>(Duration::from_millis(200))
            {
                Ok(Some((GuestEvent::Stats(s), _))) => {
                    guest.stats = Some(s);
                    break;
                }
                Ok(Some(_)) | Ok(None) => {}
                // The channel closed: the process is exiting.
                Err(_) => break,
            }
        }
        let exited: Option<ExitStatus> = guest.domain.process.wait_timeout(timeout).ok().flatten();
        match exited {
            Some(status) if status.success() => true,
            Some(status) => {
                log::error!("{name} {}", describe(&status));
                false
            }
            None => {
                log::error!("{name} did not exit; stopping it");
                guest.domain.process.stop();
                false
            }
        }
    }

    /// Tears down every device of a guest whose process has ended ([`domains::tear_down`]).
    /// The images stay held (a reboot attaches them again).
    fn tear_down(&self, name: &str, guest: &mut Guest) -> Result<()> {
        let vfs_back = self.release_pci(name, guest);
        let devices: Vec<(DeviceKind, u32)> = guest
            .disks
            .keys()
            .map(|d| (DeviceKind::Vbd, *d))
            .chain(guest.nics.keys().map(|d| (DeviceKind::Vif, *d)))
            .collect();
        guest.disks.clear();
        guest.nics.clear();
        let mut client = self.client()?;
        for (kind, devid) in devices {
            let dev = DeviceId {
                kind,
                backend: self.driver_config.domid,
                frontend: guest.domain.domid,
                devid,
            };
            domains::tear_down(&mut client, &dev, WALK_TIMEOUT)?;
            log::info!("{name}: {kind} {devid} torn down");
        }
        vfs_back
    }

    /// Stops every guest in order (collecting its counters), then the driver domain, then
    /// the store. Call it once no request is being served.
    pub fn shut_down(self) -> ShutdownReport {
        // From here on, domains ending is the plan, not a death.
        self.stop_supervision();
        let mut clean = true;
        let mut stats = Vec::new();
        let guests = std::mem::take(&mut *lock(&self.guests));
        for (name, slot) in guests {
            // Each guest closes its devices through the walk; the store goes away with the
            // host, so no directory needs removing (and a dead driver domain costs no waits).
            let mut guest = lock(&slot.state);
            clean &= self.stop_orderly(&name, &slot.config, &mut guest);
            if let Err(e) = self.release_pci(&name, &mut guest) {
                log::error!("{e:#}");
                clean = false;
            }
            stats.push((name.clone(), guest.domain.domid, guest.stats));
        }
        let mut driver = lock(&self.driver);
        let mut backend = Vec::new();
        if driver.channel.send(&BackendRequest::Stats, &[]).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match driver.channel.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some((BackendEvent::Stats(s), _))) => {
                        backend = s;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        let _ = driver.channel.send(&BackendRequest::Shutdown, &[]);
        match driver.process.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(status)) if status.success() => {}
            other => {
                log::error!("{} did not exit cleanly: {other:?}", driver.name);
                driver.process.stop();
                clean = false;
            }
        }
        let driver_id = (driver.name.clone(), driver.domid);
        drop(driver);
        self.store.shutdown();
        if let Some(thread) = lock(&self.store_thread).take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    log::error!("store: {e}");
                    clean = false;
                }
                Err(_) => {
                    log::error!("store thread panicked");
                    clean = false;
                }
            }
        }
        ShutdownReport {
            guests: stats,
            driver: driver_id,
            backend,
            clean,
        }
    }
}
