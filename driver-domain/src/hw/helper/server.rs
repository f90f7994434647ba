//! The helper's side: one request at a time from the driver domain's channel, checked against
//! [`Ownership`], carried out with [`DirectHardware`], answered with one reply. A request that
//! is malformed, not allowed or fails is answered [`HardwareReply::Refused`]; the helper
//! carries on. It ends when the driver domain closes the channel (the driver domain exited).

use std::os::fd::{AsFd, OwnedFd};

use ipc::control::hardware::{HardwareReply, HardwareRequest, VfEnabling};
use ipc::control::{ChannelError, ControlChannel};

use super::super::ops::{DirectHardware, HardwareOps, HwOpsError};
use super::super::pci::Bdf;
use super::policy::{Ownership, PolicyError};

/// Errors of the helper: a broken channel ends it; the others refuse one request.
#[derive(Debug, thiserror::Error)]
pub enum HelperServerError {
    #[error("the driver domain's channel")]
    Channel(#[source] ChannelError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Hardware(#[from] HwOpsError),
}

/// The hardware helper.
#[derive(Debug)]
pub struct HardwareHelper {
    hw: DirectHardware,
    ownership: Ownership,
}

fn addresses(list: &[Bdf]) -> Vec<String> {
    list.iter().map(Bdf::to_string).collect()
}

impl HardwareHelper {
    /// A helper acting on `owns` (the driver domain's PFs) and their VFs through `hw`.
    pub fn new(hw: DirectHardware, owns: Vec<Bdf>) -> Self {
        HardwareHelper {
            hw,
            ownership: Ownership::new(owns),
        }
    }

    /// Carries out one request; the reply, and the descriptor that goes with it.
    pub fn handle(&mut self, request: &HardwareRequest) -> (HardwareReply, Option<OwnedFd>) {
        match self.carry_out(request) {
            Ok(answer) => {
                log::info!("{request:?}: done");
                answer
            }
            Err(reason) => {
                log::warn!("{request:?}: refused: {reason}");
                (
                    HardwareReply::Refused {
                        reason: reason.to_string(),
                    },
                    None,
                )
            }
        }
    }

    fn carry_out(
        &mut self,
        request: &HardwareRequest,
    ) -> Result<(HardwareReply, Option<OwnedFd>), HelperServerError> {
        Ok(match request {
            HardwareRequest::DescribePf { pf } => {
                let pf = self.ownership.owned_pf(pf)?;
                let state = self.hw.describe_pf(pf)?;
                let reply = HardwareReply::Pf {
                    driver: state.driver,
                    total_vfs: state.total_vfs,
                    num_vfs: state.num_vfs,
                    vfs: addresses(&state.vfs),
                };
                (reply, None)
            }
            HardwareRequest::EnableVfs { pf, count, how } => {
                let pf = self.ownership.owned_pf(pf)?;
                if *count == 0 {
                    return Err(PolicyError::Zero { what: "count" }.into());
                }
                if let VfEnabling::Nvme(r) = how {
                    if r.queues == 0 || r.interrupts == 0 {
                        return Err(PolicyError::Zero {
                            what: "each VF's queues and interrupts",
                        }
                        .into());
                    }
                }
                let state = self.hw.describe_pf(pf)?;
                let vfs = if state.num_vfs == *count {
                    state.vfs
                } else if state.num_vfs != 0 {
                    return Err(PolicyError::AlreadyEnabled {
                        pf,
                        enabled: state.num_vfs,
                        requested: *count,
                    }
                    .into());
                } else {
                    self.hw.enable_vfs(pf, *count, *how)?
                };
                (
                    HardwareReply::VfsEnabled {
                        vfs: addresses(&vfs),
                    },
                    None,
                )
            }
            HardwareRequest::BindVfio { vf } => {
                let vf = self.ownership.owned_vf(self.hw.sysfs(), vf)?;
                self.ownership.check_group(self.hw.sysfs(), vf)?;
                let group = self.hw.bind_vfio(vf)?;
                let reply = HardwareReply::VfioGroup {
                    vf: vf.to_string(),
                    group: group.number,
                };
                (reply, Some(group.fd))
            }
            HardwareRequest::ResetVf { vf } => {
                let vf = self.ownership.owned_vf(self.hw.sysfs(), vf)?;
                self.hw.reset_vf(vf)?;
                (HardwareReply::Reset { vf: vf.to_string() }, None)
            }
        })
    }

    /// Serves `channel` until its peer closes it (Ok) or it breaks.
    pub fn serve(&mut self, channel: &ControlChannel) -> Result<(), HelperServerError> {
        loop {
            let (reply, fd) = match channel.recv::<HardwareRequest>() {
                Ok((request, fds)) if fds.is_empty() => self.handle(&request),
                Ok((request, fds)) => {
                    // Closed on drop: a request carries no descriptors.
                    log::warn!(
                        "{request:?}: refused: it came with {} descriptors",
                        fds.len()
                    );
                    let reason = format!(
                        "a request carries no descriptors, this one had {}",
                        fds.len()
                    );
                    (HardwareReply::Refused { reason }, None)
                }
                Err(ChannelError::Closed) => return Ok(()),
                Err(
                    e @ (ChannelError::Decode(_)
                    | ChannelError::Version(_)
                    | ChannelError::Truncated
                    | ChannelError::TooLarge(_)
                    | ChannelError::TooManyFds(_)),
                ) => {
                    log::warn!("malformed request refused: {e}");
                    let reason = format!("malformed request: {e}");
                    (HardwareReply::Refused { reason }, None)
                }
                Err(e) => return Err(HelperServerError::Channel(e)),
            };
            let fds: Vec<_> = fd.iter().map(AsFd::as_fd).collect();
            match channel.send(&reply, &fds) {
                Ok(()) => {}
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(HelperServerError::Channel(e)),
            }
            // `fd` closes here: the driver domain's copy is the only one left.
        }
    }
}
