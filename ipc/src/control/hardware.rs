//! The hardware helper's request protocol: a confined driver domain asks the privileged
//! hardware helper (`splitvmm-hw-helper`, started by the toolstack in dom0) for the few
//! operations on PCI functions that need root, and the helper answers each request with one
//! reply. Messages travel on a [`super::ControlChannel`] (one datagram each, versioned,
//! bounded), so a malformed request fails that request only.
//!
//! Addresses are PCI function addresses as text (`DDDD:BB:DD.F`); the helper parses them
//! strictly and acts only on the physical functions the host file gives the driver domain and
//! on their virtual functions: anything else is answered [`HardwareReply::Refused`].

use serde::{Deserialize, Serialize};

/// NVMe resources each secondary controller (VF) gets when its PF's VFs are enabled through
/// NVMe Virtualization Management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeVfResources {
    /// Virtual queue resources (admin + I/O queue pairs).
    pub queues: u16,
    /// Virtual interrupt resources (MSI-X vectors).
    pub interrupts: u16,
}

impl NvmeVfResources {
    /// What each secondary controller gets by default: an admin and one I/O queue pair, one
    /// interrupt (the lab's QEMU NVMe PF has enough for every VF this way).
    pub const DEFAULT: NvmeVfResources = NvmeVfResources {
        queues: 2,
        interrupts: 1,
    };
}

/// How a PF's VFs are enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfEnabling {
    /// `sriov_numvfs` only (the PF's driver does the rest).
    Plain,
    /// An NVMe PF kept on the kernel nvme driver: release the primary's flexible resources,
    /// reset, `sriov_numvfs`, then give each secondary controller these resources and bring
    /// it online (admin passthrough on the PF's `/dev/nvmeN`).
    Nvme(NvmeVfResources),
}

impl VfEnabling {
    /// How to enable the VFs of a PF bound to kernel driver `driver`: the NVMe sequence (with
    /// [`NvmeVfResources::DEFAULT`]) on an nvme-bound PF, `sriov_numvfs` alone otherwise.
    pub fn for_pf_driver(driver: Option<&str>) -> VfEnabling {
        if driver == Some("nvme") {
            VfEnabling::Nvme(NvmeVfResources::DEFAULT)
        } else {
            VfEnabling::Plain
        }
    }
}

/// Driver domain to hardware helper. Each request carries no descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HardwareRequest {
    /// The SR-IOV state of owned PF `pf`. Answered by [`HardwareReply::Pf`].
    DescribePf { pf: String },
    /// Enable `count` VFs of owned PF `pf`, which has none enabled (or exactly `count`, then
    /// nothing changes). Answered by [`HardwareReply::VfsEnabled`].
    EnableVfs {
        pf: String,
        count: u16,
        how: VfEnabling,
    },
    /// Bind VF `vf` of an owned PF to vfio-pci and open its VFIO group. Answered by
    /// [`HardwareReply::VfioGroup`] with the group's descriptor; the helper keeps no copy.
    BindVfio { vf: String },
    /// Function-level reset of VF `vf` of an owned PF (sysfs `reset`). Answered by
    /// [`HardwareReply::Reset`].
    ResetVf { vf: String },
}

/// Hardware helper to driver domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HardwareReply {
    /// Answer to [`HardwareRequest::DescribePf`].
    Pf {
        /// The PF's kernel driver (`nvme`, ...), if one is bound.
        driver: Option<String>,
        total_vfs: u16,
        num_vfs: u16,
        /// The enabled VFs' addresses, in VF order.
        vfs: Vec<String>,
    },
    /// Answer to [`HardwareRequest::EnableVfs`]: the VFs' addresses, in VF order.
    VfsEnabled { vfs: Vec<String> },
    /// Answer to [`HardwareRequest::BindVfio`]: `vf` is bound to vfio-pci and sits in IOMMU
    /// group `group`. Descriptors: `[/dev/vfio/<group>]`.
    VfioGroup { vf: String, group: u32 },
    /// Answer to [`HardwareRequest::ResetVf`].
    Reset { vf: String },
    /// The request was not carried out (malformed, not allowed by the host file, or it
    /// failed), and why.
    Refused { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ChannelError, ControlChannel, MAX_MESSAGE};
    use std::os::fd::AsFd;

    #[test]
    fn every_request_and_reply_round_trips() {
        let (a, b) = ControlChannel::pair().unwrap();
        let requests = [
            HardwareRequest::DescribePf {
                pf: "0000:00:02.0".into(),
            },
            HardwareRequest::EnableVfs {
                pf: "0000:00:02.0".into(),
                count: 2,
                how: VfEnabling::Nvme(NvmeVfResources {
                    queues: 2,
                    interrupts: 1,
                }),
            },
            HardwareRequest::EnableVfs {
                pf: "0000:00:02.0".into(),
                count: 7,
                how: VfEnabling::Plain,
            },
            HardwareRequest::BindVfio {
                vf: "0000:00:02.1".into(),
            },
            HardwareRequest::ResetVf {
                vf: "0000:00:02.1".into(),
            },
        ];
        for request in &requests {
            a.send(request, &[]).unwrap();
            let (got, fds): (HardwareRequest, _) = b.recv().unwrap();
            assert_eq!(&got, request);
            assert!(fds.is_empty());
        }
        let file = tempfile::tempfile().unwrap();
        let replies = [
            HardwareReply::Pf {
                driver: Some("nvme".into()),
                total_vfs: 2,
                num_vfs: 0,
                vfs: vec![],
            },
            HardwareReply::VfsEnabled {
                vfs: vec!["0000:00:02.1".into(), "0000:00:02.2".into()],
            },
            HardwareReply::VfioGroup {
                vf: "0000:00:02.1".into(),
                group: 4,
            },
            HardwareReply::Reset {
                vf: "0000:00:02.1".into(),
            },
            HardwareReply::Refused {
                reason: "no".into(),
            },
        ];
        for reply in &replies {
            let fds = match reply {
                HardwareReply::VfioGroup { .. } => vec![file.as_fd()],
                _ => vec![],
            };
            b.send(reply, &fds).unwrap();
            let (got, received): (HardwareReply, _) = a.recv().unwrap();
            assert_eq!(&got, reply);
            assert_eq!(received.len(), fds.len());
        }
    }

    #[test]
    fn hostile_requests_fail_to_decode_without_harming_the_channel() {
        let (a, b) = ControlChannel::pair().unwrap();
        // A message of another protocol: a variant index past the request enum's end.
        a.send(&(200u32, "0000:00:02.0"), &[]).unwrap();
        assert!(matches!(
            b.recv::<HardwareRequest>(),
            Err(ChannelError::Decode(_))
        ));
        // A request cut short (a string length beyond the datagram).
        a.send(&(3u32, 250u8), &[]).unwrap();
        assert!(matches!(
            b.recv::<HardwareRequest>(),
            Err(ChannelError::Decode(_))
        ));
        // A request with trailing bytes.
        a.send(
            &(
                HardwareRequest::ResetVf {
                    vf: "0000:00:02.1".into(),
                },
                1u8,
            ),
            &[],
        )
        .unwrap();
        assert!(matches!(
            b.recv::<HardwareRequest>(),
            Err(ChannelError::Decode(_))
        ));
        // An address too long for one datagram is refused on the sending side.
        let huge = HardwareRequest::BindVfio {
            vf: "0".repeat(MAX_MESSAGE),
        };
        assert!(matches!(a.send(&huge, &[]), Err(ChannelError::TooLarge(_))));
        // The channel still carries the next good request.
        let good = HardwareRequest::DescribePf {
            pf: "0000:00:02.0".into(),
        };
        a.send(&good, &[]).unwrap();
        assert_eq!(b.recv::<HardwareRequest>().unwrap().0, good);
    }
}
