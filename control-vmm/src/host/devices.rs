//! Devices of one guest: attach and detach with the xenbus walk, disk checks and pings. Each
//! public operation holds that guest's lock only.

use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use ipc::control::messages::{
    BackendRequest, GuestEvent, GuestRequest, MemoryGrant, PROCESS_WINDOW_GPA,
    PROCESS_WINDOW_MAX_BYTES,
};
use ipc::xenbus::{keys, DeviceId, DeviceKind};

use super::{lock, Guest, GuestSlot, Host, CHECK_TIMEOUT, WALK_TIMEOUT};
use crate::config::{DiskConfig, GuestConfig, GuestKind, NicConfig};
use crate::domains;
use crate::vdev::Vdev;
use ipc::connection;

/// The vif's backend-directory key recording whether offloads are offered ("1"/"0"), so a
/// restarted driver domain gets the same setting.
pub(super) const OFFLOADS_KEY: &str = "splitvmm-offloads";

impl Host {
    fn device_id(&self, kind: DeviceKind, guest: &Guest, devid: u32) -> DeviceId {
        DeviceId {
            kind,
            backend: self.driver_config.domid,
            frontend: guest.domain.domid,
            devid,
        }
    }

    /// Attaches disk `disk` to guest `name`: hands the image and one end of a fresh
    /// vhost-user connection to the driver domain, the other end to the guest, writes both
    /// device directories, and waits for the guest to report Connected. Returns the disk's
    /// size in sectors.
    pub fn attach_disk(&self, name: &str, disk: &DiskConfig) -> Result<u64> {
        self.with_guest(name, |name, slot, guest| {
            self.attach_disk_locked(name, slot, guest, disk)
        })
    }

    pub(super) fn attach_disk_locked(
        &self,
        name: &str,
        slot: &GuestSlot,
        guest: &mut Guest,
        disk: &DiskConfig,
    ) -> Result<u64> {
        let dev = self.device_id(DeviceKind::Vbd, guest, disk.devid);
        if guest.disks.contains_key(&disk.devid) {
            bail!("{name} already has a vbd {}", Vdev(disk.devid));
        }
        let max = crate::config::MAX_DISK_QUEUES;
        if !(1..=max).contains(&disk.queues) {
            bail!("a disk has 1 to {max} queues, not {}", disk.queues);
        }
        if disk.queues > 1 && slot.config.kind != crate::config::GuestKind::Linux {
            bail!("{name} is not a Linux guest: its disks have one queue");
        }
        lock(&self.images).hold(name, disk)?;
        let result = self.connect_disk(name, slot, guest, disk, dev);
        if result.is_err() {
            // Leave nothing half-attached: no directories (if they were written), no lock.
            let torn_down = self.client().and_then(|mut client| {
                let written = client
                    .read(&format!("{}/{}", dev.backend_path(), keys::FRONTEND))
                    .is_ok();
                if written {
                    domains::tear_down(&mut client, &dev, WALK_TIMEOUT)?;
                }
                Ok(())
            });
            if let Err(e) = torn_down {
                log::warn!("{name}: removing the failed vbd {}: {e:#}", dev.devid);
            }
            lock(&self.images).release(name, disk.devid);
        }
        result
    }

    fn connect_disk(
        &self,
        name: &str,
        slot: &GuestSlot,
        guest: &mut Guest,
        disk: &DiskConfig,
        dev: DeviceId,
    ) -> Result<u64> {
        let vdev = Vdev(disk.devid);
        // A device inside a driver VM has no image here: the VM opens it.
        let image = match disk.device {
            None => Some(lock(&self.images).file(name, disk.devid)?),
            Some(_) => None,
        };
        let serial = self
            .attach_serial
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sock_name = format!("{}-{}-{serial}.sock", dev.frontend, dev.devid);
        let (backend_end, frontend_end) =
            connection::private_connection(&self.private_dir, &sock_name)
                .context("creating the vhost-user connection")?;
        lock(&self.driver).channel.send(
            &BackendRequest::ServeBlock {
                frontend: dev.frontend,
                devid: dev.devid,
                readonly: disk.readonly,
                grant: memory_grant(&slot.config),
                queues: disk.queues,
                device: disk.device.clone(),
            },
            &image
                .iter()
                .map(|i| i.as_fd())
                .chain([backend_end.as_fd()])
                .collect::<Vec<_>>(),
        )?;
        guest.domain.channel.send(
            &GuestRequest::AttachBlock { devid: dev.devid },
            &[frontend_end.as_fd()],
        )?;
        drop((image, backend_end, frontend_end));
        let mode = if disk.readonly { "r" } else { "w" };
        domains::add_device(
            &mut self.client()?,
            &dev,
            &[
                (keys::MODE, mode.to_owned()),
                (keys::TYPE, disk_type(disk).to_owned()),
                (keys::PARAMS, disk_params(disk)),
                (keys::TRANSPORT, "vhost-user".to_owned()),
                (keys::VHOST_USER, "fd".to_owned()),
                (keys::MULTI_QUEUE_MAX_QUEUES, disk.queues.to_string()),
                ("dev", vdev.to_string()),
            ],
            &[(keys::VIRTUAL_DEVICE, dev.devid.to_string())],
        )?;
        match self.guest_event(name, slot, guest, WALK_TIMEOUT)? {
            GuestEvent::Connected { devid, sectors } if devid == dev.devid => {
                guest.disks.insert(devid, disk.clone());
                self.progress(&format!(
                    "{name}: vbd {} Connected ({} MiB)",
                    devid,
                    sectors / 2048
                ));
                Ok(sectors)
            }
            other => bail!("{name}: attaching vbd {vdev}: {other:?}"),
        }
    }

    /// Attaches interface `nic` to guest `name`: a new port of the driver domain's switch,
    /// reached over a private vhost-user connection as for disks; waits for Connected.
    /// Returns the interface's IPv4 address.
    pub fn attach_nic(&self, name: &str, nic: &NicConfig) -> Result<[u8; 4]> {
        self.with_guest(name, |name, slot, guest| {
            self.attach_nic_locked(name, slot, guest, nic)
        })
    }

    pub(super) fn attach_nic_locked(
        &self,
        name: &str,
        slot: &GuestSlot,
        guest: &mut Guest,
        nic: &NicConfig,
    ) -> Result<[u8; 4]> {
        let dev = self.device_id(DeviceKind::Vif, guest, nic.devid);
        let domid = dev.frontend;
        if guest.nics.contains_key(&nic.devid) {
            bail!("{name} already has a vif {}", nic.devid);
        }
        let mac = nic.mac_of(domid).context("MAC address")?;
        let ip = nic.ip_of(domid).context("IPv4 address")?;
        let serial = self
            .attach_serial
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sock_name = format!("vif-{domid}-{}-{serial}.sock", nic.devid);
        let (backend_end, frontend_end) =
            connection::private_connection(&self.private_dir, &sock_name)
                .context("creating the vhost-user connection")?;
        lock(&self.driver).channel.send(
            &BackendRequest::ServeNet {
                frontend: domid,
                devid: nic.devid,
                mac,
                grant: memory_grant(&slot.config),
                offloads: nic.offloads,
            },
            &[backend_end.as_fd()],
        )?;
        guest.domain.channel.send(
            &GuestRequest::AttachNet {
                devid: nic.devid,
                ip,
            },
            &[frontend_end.as_fd()],
        )?;
        drop((backend_end, frontend_end));
        let mac_text = mac.map(|b| format!("{b:02x}")).join(":");
        let ip_text = std::net::Ipv4Addr::from(ip).to_string();
        domains::add_device(
            &mut self.client()?,
            &dev,
            &[
                ("mac", mac_text.clone()),
                ("handle", nic.devid.to_string()),
                ("ip", ip_text.clone()),
                (OFFLOADS_KEY, u8::from(nic.offloads).to_string()),
            ],
            &[("mac", mac_text), ("handle", nic.devid.to_string())],
        )?;
        match self.guest_event(name, slot, guest, WALK_TIMEOUT)? {
            GuestEvent::NetConnected { devid, mac: got } if devid == nic.devid && got == mac => {
                guest.nics.insert(devid, nic.clone());
                self.progress(&format!(
                    "{name}: vif {devid} Connected ({}, {ip_text})",
                    got.map(|b| format!("{b:02x}")).join(":"),
                ));
                Ok(ip)
            }
            other => bail!("{name}: attaching vif {}: {other:?}", nic.devid),
        }
    }

    /// Has guest `name` resolve `peer` on interface `devid` and exchange UDP echoes with it
    /// through the driver domain's switch.
    pub fn net_ping(&self, name: &str, devid: u32, peer: [u8; 4], rounds: u32) -> Result<bool> {
        self.with_guest(name, |name, slot, guest| {
            guest.domain.channel.send(
                &GuestRequest::NetPing {
                    devid,
                    peer,
                    rounds,
                },
                &[],
            )?;
            match self.guest_event(name, slot, guest, CHECK_TIMEOUT)? {
                GuestEvent::NetPing {
                    devid: d,
                    passed,
                    detail,
                } if d == devid => {
                    let verdict = if passed { "passed" } else { "FAILED" };
                    self.progress(&format!("{name}: vif {devid} ping {verdict}: {detail}"));
                    Ok(passed)
                }
                other => bail!("{name}: ping on vif {devid}: {other:?}"),
            }
        })
    }

    /// Detaches disk `devid` from guest `name` with the xenbus walk: online=0 and backend
    /// Closing; both sides reach Closed; the directories are removed.
    pub fn detach_disk(&self, name: &str, devid: u32) -> Result<()> {
        self.detach(name, DeviceKind::Vbd, devid)
    }

    /// Detaches interface `devid` from guest `name`, as [`Host::detach_disk`] does disks.
    pub fn detach_nic(&self, name: &str, devid: u32) -> Result<()> {
        self.detach(name, DeviceKind::Vif, devid)
    }

    fn detach(&self, name: &str, kind: DeviceKind, devid: u32) -> Result<()> {
        self.with_guest(name, |name, slot, guest| {
            let dev = self.device_id(kind, guest, devid);
            let shown = match kind {
                DeviceKind::Vbd => Vdev(devid).to_string(),
                DeviceKind::Vif => devid.to_string(),
            };
            let attached = match kind {
                DeviceKind::Vbd => guest.disks.remove(&devid).is_some(),
                DeviceKind::Vif => guest.nics.remove(&devid).is_some(),
            };
            if !attached {
                bail!("{name} has no {kind} {shown} attached");
            }
            let mut client = self.client()?;
            domains::request_close(&mut client, &dev)?;
            match self.guest_event(name, slot, guest, WALK_TIMEOUT)? {
                GuestEvent::Closed { devid: d } if d == devid => {}
                other => bail!("{name}: detaching {kind} {shown}: {other:?}"),
            }
            domains::remove_once_closed(&mut client, &dev, WALK_TIMEOUT)?;
            if kind == DeviceKind::Vbd {
                lock(&self.images).release(name, devid);
            }
            self.progress(&format!("{name}: {kind} {devid} detached"));
            Ok(())
        })
    }

    /// Asks guest `name` to write (unless `verify_only`) and verify a pattern on a disk, over
    /// as many bytes as its kind checks.
    /// Writing is refused unless the image is scratch ([`Host::is_scratch`]).
    pub fn disk_check(&self, name: &str, devid: u32, seed: u64, verify_only: bool) -> Result<bool> {
        self.with_guest(name, |name, slot, guest| {
            if !verify_only && !self.is_scratch(name, devid) {
                let path = lock(&self.images)
                    .path(name, devid)
                    .map_or_else(|| "its image".to_owned(), |p| p.display().to_string());
                bail!(
                    "{name}: vbd {}: refusing to write a check pattern to {path}: it is not a \
                     scratch image (not created by this toolstack, not marked scratch = true / \
                     block-attach --scratch); --verify-only only reads",
                    Vdev(devid)
                );
            }
            guest.domain.channel.send(
                &GuestRequest::DiskCheck {
                    devid,
                    seed,
                    bytes: slot.config.kind.check_bytes(),
                    verify_only,
                },
                &[],
            )?;
            match self.guest_event(name, slot, guest, CHECK_TIMEOUT)? {
                GuestEvent::DiskCheck {
                    devid: d,
                    passed,
                    detail,
                } if d == devid => {
                    let verdict = if passed { "passed" } else { "FAILED" };
                    self.progress(&format!("{name}: vbd {devid} check {verdict}: {detail}"));
                    Ok(passed)
                }
                other => bail!("{name}: disk check on vbd {}: {other:?}", Vdev(devid)),
            }
        })
    }
}

/// What of guest `config`'s memory the backends of its devices may map: the I/O window its
/// kind of frontend puts each device's rings and buffers in, or all of its RAM where its
/// host-file entry says `share = "all-ram"`.
pub(super) fn memory_grant(config: &GuestConfig) -> MemoryGrant {
    if config.share.as_deref() == Some("all-ram") {
        return MemoryGrant::AllRam;
    }
    match config.kind {
        GuestKind::Process => MemoryGrant::Window {
            guest_address: PROCESS_WINDOW_GPA,
            max_bytes: PROCESS_WINDOW_MAX_BYTES,
        },
        GuestKind::Kvm => MemoryGrant::Window {
            guest_address: crate::vmm::layout::WINDOW_GPA,
            max_bytes: crate::vmm::layout::WINDOW_DEFAULT_BYTES,
        },
        // A Linux guest with a disk must say share = "all-ram" (the host file is checked);
        // without it there is nothing it could share.
        GuestKind::Linux => MemoryGrant::Window {
            guest_address: 0,
            max_bytes: 0,
        },
    }
}

/// The vbd's `type` as Xen writes it: `phy` for a block device (inside a driver VM),
/// `file` for an image.
fn disk_type(disk: &DiskConfig) -> &'static str {
    if disk.device.is_some() {
        "phy"
    } else {
        "file"
    }
}

/// The vbd's `params`: the image's path, or the device's inside the driver VM.
fn disk_params(disk: &DiskConfig) -> String {
    match &disk.device {
        Some(device) => device.clone(),
        None => disk.image.display().to_string(),
    }
}
