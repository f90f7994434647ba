//! Direct assignment on a running host, after `xl pci-attach`/`pci-detach`: for each
//! `[[guest.pci]]` of a Linux guest, the toolstack asks the driver domain (which owns the
//! PF) for a VF, and passes the VF's VFIO group, which the driver domain no longer holds, on
//! to the guest's VMM before it boots, closing its own copy: the VMM holds the only
//! descriptor. The store records which VF each guest holds
//! (`/local/domain/<guest>/pci/<index>/{address,pf,vf,backend}`; `splitvmm pci-list`). When
//! the guest's VMM has ended, the VF goes back: the driver domain resets it and can give it
//! to the next guest.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipc::control::messages::{BackendEvent, BackendRequest, GuestEvent, GuestRequest};

use super::{lock, Guest, GuestSlot, Host, WALK_TIMEOUT};

/// How long the driver domain may take to prepare a VF (enabling SR-IOV with the NVMe
/// sequence resets the PF) or to take one back.
const VF_TIMEOUT: Duration = Duration::from_secs(60);

/// A VF a guest holds.
#[derive(Debug, Clone)]
pub(super) struct HeldVf {
    pub index: u32,
    pub address: String,
}

fn pci_dir(domid: u32, index: u32) -> String {
    format!("{}/pci/{index}", ipc::xenbus::domain_path(domid))
}

impl Host {
    /// Waits for the driver domain's answer about `frontend`'s VF (other events are logged).
    fn vf_event(&self, frontend: u32) -> Result<(BackendEvent, Vec<std::os::fd::OwnedFd>)> {
        let deadline = Instant::now() + VF_TIMEOUT;
        let driver = lock(&self.driver);
        while Instant::now() < deadline {
            self.check_stop()?;
            match driver
                .channel
                .recv_timeout::<BackendEvent>(Duration::from_millis(200))?
            {
                Some((
                    event @ (BackendEvent::VfAssigned { frontend: f, .. }
                    | BackendEvent::VfRefused { frontend: f, .. }
                    | BackendEvent::VfReleased { frontend: f, .. }),
                    fds,
                )) if f == frontend => return Ok((event, fds)),
                Some((other, _)) => log::warn!("driver domain: {other:?}"),
                None => {}
            }
        }
        bail!("the driver domain did not answer about domain {frontend}'s VF within {VF_TIMEOUT:?}")
    }

    /// Assigns guest `name` the VFs its description names, before it boots.
    pub(super) fn assign_pci_locked(
        &self,
        name: &str,
        slot: &GuestSlot,
        guest: &mut Guest,
    ) -> Result<()> {
        let domid = guest.domain.domid;
        for (index, pci) in slot.config.pci.iter().enumerate() {
            let index = index as u32;
            lock(&self.driver).channel.send(
                &BackendRequest::AssignVf {
                    frontend: domid,
                    pf: pci.pf.clone(),
                    vf: pci.vf.number(),
                },
                &[],
            )?;
            let (address, vf, group) = match self.vf_event(domid)? {
                (BackendEvent::VfAssigned { address, vf, .. }, mut fds) if fds.len() == 1 => {
                    (address, vf, fds.remove(0))
                }
                (BackendEvent::VfRefused { reason, .. }, _) => {
                    bail!("{name}: no VF of {} ({reason})", pci.pf)
                }
                (other, fds) => bail!(
                    "{name}: unexpected answer with {} descriptors: {other:?}",
                    fds.len()
                ),
            };
            let sent = guest.domain.channel.send(
                &GuestRequest::AssignPci {
                    index,
                    address: address.clone(),
                },
                &[group.as_fd()],
            );
            // The toolstack keeps no copy: the VMM's is the only one now.
            drop(group);
            let held = HeldVf {
                index,
                address: address.clone(),
            };
            guest.pci.push(held);
            sent.with_context(|| format!("{name}: handing {address} over"))?;
            loop {
                match self.guest_event(name, slot, guest, WALK_TIMEOUT)? {
                    GuestEvent::PciAssigned { index: i } if i == index => break,
                    GuestEvent::PciFailed { index: i, reason } if i == index => {
                        bail!("{name}: its VMM did not take {address}: {reason}")
                    }
                    other => log::warn!("{name}: {other:?} while assigning PCI {index}"),
                }
            }
            let mut client = self.client()?;
            let dir = pci_dir(domid, index);
            for (key, value) in [
                ("address", address.clone()),
                ("pf", pci.pf.clone()),
                ("vf", vf.to_string()),
                ("backend", self.driver_config.domid.to_string()),
            ] {
                client.write(&format!("{dir}/{key}"), value.as_bytes())?;
            }
            self.progress(&format!(
                "{name}: VF {vf} of {} ({address}) assigned",
                pci.pf
            ));
        }
        Ok(())
    }

    /// `splitvmm pci-detach`: guest `domain`'s VMM lets PCI function `index` go (a running
    /// guest sees it vanish: no hotplug), then the VF goes back to the driver domain, reset.
    pub fn detach_pci(&self, domain: &str, index: u32) -> Result<String> {
        self.with_guest(domain, |name, slot, guest| {
            let i = guest
                .pci
                .iter()
                .position(|h| h.index == index)
                .with_context(|| format!("{name} holds no PCI function {index}"))?;
            guest
                .domain
                .channel
                .send(&GuestRequest::DetachPci { index }, &[])?;
            loop {
                match self.guest_event(name, slot, guest, WALK_TIMEOUT)? {
                    GuestEvent::PciDetached { index: n } if n == index => break,
                    GuestEvent::PciFailed { index: n, reason } if n == index => {
                        bail!("{name}: its VMM did not let PCI {index} go: {reason}")
                    }
                    other => log::warn!("{name}: {other:?} while detaching PCI {index}"),
                }
            }
            // Release this one only: the others stay held.
            let held = guest.pci.remove(i);
            let address = held.address.clone();
            let others = std::mem::replace(&mut guest.pci, vec![held]);
            let released = self.release_pci(name, guest);
            guest.pci = others;
            released?;
            Ok(format!(
                "{name}: PCI {index} ({address}) detached, reset and returned"
            ))
        })
    }

    /// Gives back the VFs of guest `name`, whose VMM has ended (it held the only group
    /// descriptors): the driver domain resets each. Their store entries go.
    pub(super) fn release_pci(&self, name: &str, guest: &mut Guest) -> Result<()> {
        let domid = guest.domain.domid;
        let mut failed = Vec::new();
        for held in std::mem::take(&mut guest.pci) {
            lock(&self.driver).channel.send(
                &BackendRequest::ReleaseVf {
                    frontend: domid,
                    address: held.address.clone(),
                },
                &[],
            )?;
            match self.vf_event(domid)? {
                (BackendEvent::VfReleased { reset: true, .. }, _) => self.progress(&format!(
                    "{name}: {} reset and returned to the driver domain",
                    held.address
                )),
                (BackendEvent::VfReleased { detail, .. }, _) => {
                    failed.push(format!("{}: {detail}", held.address))
                }
                (other, _) => failed.push(format!("{}: {other:?}", held.address)),
            }
            let _ = self.client()?.rm(&pci_dir(domid, held.index));
        }
        if !failed.is_empty() {
            bail!("{name}: VFs not reset: {}", failed.join("; "));
        }
        Ok(())
    }
}
