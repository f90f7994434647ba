//! `[driver_domain] kind = "vm"`: the driver domain as a VM (docs/driver-vm.md, "Managed
//! driver VM"). dom0 keeps the PF: the hardware helper (as for a confined process driver
//! domain) enables its VFs if none are, binds the VF the host file names to vfio-pci and
//! opens its group, which the toolstack hands to the driver VM's VMM (`--vfio-fd`); that VMM
//! runs confined as the driver domain's id, with the driver domain's store connection and
//! control channel, which it carries into the VM (`--driver-vm-domid`), where `driver-domain
//! vm-serve --managed` runs the same managed driver domain as a process would.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipc::control::hardware::{HardwareReply, HardwareRequest, VfEnabling};
use ipc::control::messages::BackendEvent;
use ipc::control::ControlChannel;

use super::{domain_confinement, sibling_binary, start_domain, start_hw_helper, Domain};
use crate::config::{DriverDomainConfig, DriverVmSettings};
use crate::confinement::Confinement;
use crate::supervisor::FIRST_HANDED_FD;
use ipc::xenstore::server::StoreHandle;

/// How long the driver VM has to boot and say Ready (its kernel, the VF's nvme probe, the
/// in-VM driver domain; 10-15 s under the lab's nested KVM).
const DRIVER_VM_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the hardware helper has for one request (enabling VFs resets an NVMe PF).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// Boots the driver VM of `dd` (its domain already in the store) and waits until the driver
/// domain inside it says it is ready. `append` continues its log (a restart).
pub(super) fn start_driver_vm(
    store: &StoreHandle,
    run_dir: &Path,
    (dd, vm): (&DriverDomainConfig, &DriverVmSettings),
    confinement: Option<&Confinement>,
    append: bool,
) -> Result<Domain> {
    let pf = dd
        .owns
        .first()
        .context("a driver VM needs the PF it takes a VF of (`owns`)")?;
    let (mut helper, channel) = start_hw_helper(run_dir, dd, append)?;
    let prepared = prepare_vf(&channel, pf, vm.vf)
        .with_context(|| format!("preparing VF {} of {pf} for the driver VM", vm.vf));
    // The helper ends when its channel closes (or is stopped when dropped).
    drop(channel);
    match helper.wait_timeout(HELPER_TIMEOUT) {
        Ok(Some(status)) if status.success() => {}
        other => log::warn!("the hardware helper did not end cleanly: {other:?}"),
    }
    drop(helper);
    let (vf, group) = prepared?;
    let mut command = Command::new(sibling_binary("splitvmm-vmm")?);
    let cmdline = format!(
        "console=ttyS0 dvm.managed={}{}",
        dd.domid,
        vm.extra
            .as_deref()
            .map(|e| format!(" {e}"))
            .unwrap_or_default()
    );
    command
        .arg("--linux")
        .arg("--kernel")
        .arg(&vm.kernel)
        .arg("--initrd")
        .arg(&vm.ramdisk)
        .arg("--mem-mib")
        .arg(vm.memory.to_string())
        .arg("--vcpus")
        .arg(vm.vcpus.to_string())
        .arg("--driver-vm-domid")
        .arg(dd.domid.to_string())
        .arg("--driver-vm-shm-mib")
        .arg(vm.shm_mib.to_string())
        .arg("--vfio-fd")
        .arg(format!("{}:{vf}", FIRST_HANDED_FD + 2))
        .arg("--cmdline")
        .arg(cmdline);
    // VFIO pins all of the driver VM's RAM, counted in RLIMIT_MEMLOCK, which a confined VMM
    // cannot raise itself.
    let pinned = (vm.memory << 20) + crate::vmm::vfio::MEMLOCK_SLACK;
    let confined = domain_confinement(confinement, dd.domid, &dd.name, vm.memory)?
        .map(|(plan, cgroup)| (plan.with_memlock(pinned), cgroup));
    let driver = start_domain(
        store,
        run_dir,
        (dd.domid, &dd.name),
        (command, vec![group]),
        confined,
        append,
    )?;
    match driver
        .channel
        .recv_timeout::<BackendEvent>(DRIVER_VM_READY_TIMEOUT)?
    {
        Some((BackendEvent::Ready, _)) => Ok(driver),
        other => bail!(
            "the driver VM did not report ready within {} s: {other:?} (its console is in {})",
            DRIVER_VM_READY_TIMEOUT.as_secs(),
            super::log_path(run_dir, &dd.name).display()
        ),
    }
}

/// Asks the hardware helper for VF `vf` (1-based) of `pf`: its VFs enabled if none are (an
/// NVMe PF through NVMe Virtualization Management), the VF bound to vfio-pci. Returns its
/// address and its VFIO group.
fn prepare_vf(helper: &ControlChannel, pf: &str, vf: u16) -> Result<(String, OwnedFd)> {
    let ask = |request: HardwareRequest| -> Result<(HardwareReply, Vec<OwnedFd>)> {
        helper.send(&request, &[])?;
        match helper.recv_timeout::<HardwareReply>(HELPER_TIMEOUT)? {
            Some((HardwareReply::Refused { reason }, _)) => {
                bail!("the hardware helper refused {request:?}: {reason}")
            }
            Some(answer) => Ok(answer),
            None => {
                bail!("the hardware helper did not answer {request:?} within {HELPER_TIMEOUT:?}")
            }
        }
    };
    let (driver, total, vfs) = match ask(HardwareRequest::DescribePf { pf: pf.into() })? {
        (
            HardwareReply::Pf {
                driver,
                total_vfs,
                vfs,
                ..
            },
            _,
        ) => (driver, total_vfs, vfs),
        (other, _) => bail!("unexpected answer {other:?}"),
    };
    let vfs = if vfs.is_empty() {
        let how = VfEnabling::for_pf_driver(driver.as_deref());
        match ask(HardwareRequest::EnableVfs {
            pf: pf.into(),
            count: total,
            how,
        })? {
            (HardwareReply::VfsEnabled { vfs }, _) => vfs,
            (other, _) => bail!("unexpected answer {other:?}"),
        }
    } else {
        vfs
    };
    let Some(address) = usize::from(vf).checked_sub(1).and_then(|i| vfs.get(i)) else {
        bail!("{pf} has no VF {vf} ({} enabled)", vfs.len());
    };
    match ask(HardwareRequest::BindVfio {
        vf: address.clone(),
    })? {
        (HardwareReply::VfioGroup { vf, group }, mut fds) if fds.len() == 1 => {
            log::info!("VF {vf} (group {group}) goes to the driver VM");
            fds.pop()
                .map(|fd| (vf, fd))
                .context("the group descriptor went missing")
        }
        (other, fds) => bail!("unexpected answer {other:?} with {} descriptors", fds.len()),
    }
}
