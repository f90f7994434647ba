//! The driver domain's side: [`HardwareOps`] as requests to the hardware helper.

use std::os::fd::OwnedFd;
use std::time::Duration;

use ipc::control::hardware::{HardwareReply, HardwareRequest, VfEnabling};
use ipc::control::ControlChannel;

use super::super::ops::{HardwareOps, HwOpsError, PfState, VfioGroup};
use super::super::pci::Bdf;

/// How long the helper may take to answer: enabling an NVMe PF's VFs resets the PF (up to
/// 10 s) and waits for the VFs (up to 5 s); the toolstack waits a minute for a VF.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// A channel to the hardware helper.
#[derive(Debug)]
pub struct HelperClient {
    channel: ControlChannel,
}

fn parse_all(list: &[String]) -> Result<Vec<Bdf>, HwOpsError> {
    list.iter()
        .map(|a| {
            a.parse()
                .map_err(|_| HwOpsError::HelperAnswer(format!("bad address {a:?}")))
        })
        .collect()
}

impl HelperClient {
    /// The driver domain's end of the channel the toolstack made to the helper.
    pub fn new(channel: ControlChannel) -> Self {
        HelperClient { channel }
    }

    /// Sends `request` and waits for its reply.
    fn ask(&self, request: &HardwareRequest) -> Result<(HardwareReply, Vec<OwnedFd>), HwOpsError> {
        // An answer left over from a request that timed out belongs to nobody now.
        while let Some((stale, _)) = self.channel.try_recv::<HardwareReply>()? {
            log::warn!("dropping a late answer of the hardware helper: {stale:?}");
        }
        self.channel.send(request, &[])?;
        match self.channel.recv_timeout(ANSWER_TIMEOUT)? {
            Some((HardwareReply::Refused { reason }, _)) => Err(HwOpsError::Refused(reason)),
            Some(answer) => Ok(answer),
            None => Err(HwOpsError::HelperTimeout(ANSWER_TIMEOUT)),
        }
    }
}

fn unexpected(reply: &HardwareReply) -> HwOpsError {
    HwOpsError::HelperAnswer(format!("{reply:?}"))
}

impl HardwareOps for HelperClient {
    fn describe_pf(&mut self, pf: Bdf) -> Result<PfState, HwOpsError> {
        let request = HardwareRequest::DescribePf { pf: pf.to_string() };
        match self.ask(&request)? {
            (
                HardwareReply::Pf {
                    driver,
                    total_vfs,
                    num_vfs,
                    vfs,
                },
                _,
            ) => Ok(PfState {
                driver,
                total_vfs,
                num_vfs,
                vfs: parse_all(&vfs)?,
            }),
            (other, _) => Err(unexpected(&other)),
        }
    }

    fn enable_vfs(&mut self, pf: Bdf, count: u16, how: VfEnabling) -> Result<Vec<Bdf>, HwOpsError> {
        let request = HardwareRequest::EnableVfs {
            pf: pf.to_string(),
            count,
            how,
        };
        match self.ask(&request)? {
            (HardwareReply::VfsEnabled { vfs }, _) => parse_all(&vfs),
            (other, _) => Err(unexpected(&other)),
        }
    }

    fn bind_vfio(&mut self, vf: Bdf) -> Result<VfioGroup, HwOpsError> {
        let request = HardwareRequest::BindVfio { vf: vf.to_string() };
        match self.ask(&request)? {
            (HardwareReply::VfioGroup { vf: bound, group }, mut fds)
                if bound == vf.to_string() && fds.len() == 1 =>
            {
                match fds.pop() {
                    Some(fd) => Ok(VfioGroup { number: group, fd }),
                    None => Err(HwOpsError::HelperAnswer("no VFIO group descriptor".into())),
                }
            }
            (other, _) => Err(unexpected(&other)),
        }
    }

    fn reset_vf(&mut self, vf: Bdf) -> Result<(), HwOpsError> {
        let request = HardwareRequest::ResetVf { vf: vf.to_string() };
        match self.ask(&request)? {
            (HardwareReply::Reset { vf: reset }, _) if reset == vf.to_string() => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }
}
