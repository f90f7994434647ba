//! The privileged hardware helper and its client (docs/security.md, "The hardware helper").
//!
//! A confined driver domain cannot write sysfs, open `/dev/nvmeN` or `/dev/vfio/N`: it holds
//! no capabilities and its root has none of them. What it needs of them to hand VFs to guests
//! (enable a PF's VFs, bind a VF to vfio-pci and open its VFIO group, reset a VF) it asks of
//! `splitvmm-hw-helper`, a small process the toolstack starts as root beside it, over a
//! channel of their own ([`ipc::control::hardware`]). The helper knows which PFs the host
//! file gives the driver domain and refuses everything else; which guest holds which VF stays
//! the driver domain's business.
//!
//! - [`policy`]: what the helper may touch, checked on every request;
//! - [`server`]: the helper's request loop;
//! - [`client`]: [`super::ops::HardwareOps`] as requests to the helper.

pub mod client;
pub mod policy;
pub mod server;

pub use client::HelperClient;
pub use server::HardwareHelper;

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;

    use ipc::control::hardware::{HardwareReply, HardwareRequest, NvmeVfResources, VfEnabling};
    use ipc::control::ControlChannel;

    use super::super::ops::{DirectHardware, HardwareOps};
    use super::super::pci::fake::FakeSysfs;
    use super::*;

    const PF: &str = "0000:00:02.0";
    const VF1: &str = "0000:00:02.1";
    const VF2: &str = "0000:00:02.2";
    /// An SR-IOV PF the driver domain does not own, with a VF.
    const FOREIGN_PF: &str = "0000:00:03.0";
    const FOREIGN_VF: &str = "0000:00:03.1";

    /// The owned PF (VF 1 on vfio-pci, group 4; VF 2 unbound, group 5) and a foreign PF with
    /// one VF (on vfio-pci, group 6).
    fn fake() -> FakeSysfs {
        FakeSysfs::owned_and_foreign_pfs()
    }

    fn helper(fake: &FakeSysfs) -> HardwareHelper {
        let hw = DirectHardware::new(fake.sysfs(), fake.dir.path().join("vfio"));
        HardwareHelper::new(hw, vec![PF.parse().unwrap()])
    }

    fn refusal(helper: &mut HardwareHelper, request: HardwareRequest) -> String {
        match helper.handle(&request) {
            (HardwareReply::Refused { reason }, None) => reason,
            other => panic!("{request:?} was not refused: {other:?}"),
        }
    }

    /// Nothing was written to the fake kernel: no probe, no override, no reset, no VF count.
    fn assert_untouched(fake: &FakeSysfs) {
        assert_eq!(fake.read("bus/pci/drivers_probe"), "");
        for f in [VF1, VF2, FOREIGN_VF] {
            let dir = format!("bus/pci/devices/{f}");
            assert_eq!(fake.read(&format!("{dir}/reset")), "", "{f} was reset");
            assert_eq!(fake.read(&format!("{dir}/driver_override")), "(null)\n");
        }
        assert_eq!(
            fake.read(&format!("bus/pci/devices/{PF}/sriov_numvfs")),
            "2\n"
        );
    }

    #[test]
    fn functions_the_host_file_does_not_give_are_refused() {
        let fake = fake();
        let mut helper = helper(&fake);
        let e = refusal(
            &mut helper,
            HardwareRequest::DescribePf {
                pf: FOREIGN_PF.into(),
            },
        );
        assert!(
            e.contains("0000:00:03.0 is not a PF the host file gives"),
            "{e}"
        );
        let e = refusal(
            &mut helper,
            HardwareRequest::EnableVfs {
                pf: FOREIGN_PF.into(),
                count: 1,
                how: VfEnabling::Plain,
            },
        );
        assert!(e.contains("is not a PF the host file gives"), "{e}");
        // A VF of a PF the driver domain does not own, even one already on vfio-pci.
        for request in [
            HardwareRequest::BindVfio {
                vf: FOREIGN_VF.into(),
            },
            HardwareRequest::ResetVf {
                vf: FOREIGN_VF.into(),
            },
        ] {
            let e = refusal(&mut helper, request);
            assert!(
                e.contains("is a VF of 0000:00:03.0, which the host file does not"),
                "{e}"
            );
        }
        // The owned PF itself is no VF: it cannot be bound to vfio-pci or reset this way.
        for request in [
            HardwareRequest::BindVfio { vf: PF.into() },
            HardwareRequest::ResetVf { vf: PF.into() },
        ] {
            let e = refusal(&mut helper, request);
            assert!(e.contains("0000:00:02.0 is not a virtual function"), "{e}");
        }
        // A function that does not exist.
        let e = refusal(
            &mut helper,
            HardwareRequest::ResetVf {
                vf: "0000:00:07.0".into(),
            },
        );
        assert!(e.contains("no PCI function 0000:00:07.0"), "{e}");
        assert_untouched(&fake);
    }

    #[test]
    fn path_tricks_in_addresses_are_refused_before_any_path_is_made() {
        let fake = fake();
        let mut helper = helper(&fake);
        let tricks = [
            "../../../../etc/passwd",
            "0000:00:02.1/../../0000:00:03.1",
            "0000:00:02.1/reset",
            "0000:00:02.1\0",
            "/sys/bus/pci/devices/0000:00:02.1",
            " 0000:00:02.1",
            "0000:00:02.1\n",
            "",
            &"0".repeat(5000),
        ];
        for trick in tricks {
            for request in [
                HardwareRequest::DescribePf { pf: trick.into() },
                HardwareRequest::EnableVfs {
                    pf: trick.into(),
                    count: 1,
                    how: VfEnabling::Plain,
                },
                HardwareRequest::BindVfio { vf: trick.into() },
                HardwareRequest::ResetVf { vf: trick.into() },
            ] {
                let e = refusal(&mut helper, request);
                assert!(e.starts_with("malformed PCI address"), "{trick:?}: {e}");
                assert!(e.len() < 200, "the refusal echoes the whole input: {e}");
            }
        }
        assert_untouched(&fake);
    }

    #[test]
    fn a_vf_of_an_owned_pf_is_bound_and_its_group_handed_over_then_reset() {
        let fake = fake();
        let mut helper = helper(&fake);
        match helper.handle(&HardwareRequest::BindVfio { vf: VF1.into() }) {
            (HardwareReply::VfioGroup { vf, group: 4 }, Some(fd)) if vf == VF1 => {
                let mut text = String::new();
                std::fs::File::from(fd).read_to_string(&mut text).unwrap();
                assert_eq!(text, "group 4", "the descriptor is not /dev/vfio/4");
            }
            other => panic!("{other:?}"),
        }
        match helper.handle(&HardwareRequest::ResetVf { vf: VF1.into() }) {
            (HardwareReply::Reset { vf }, None) => assert_eq!(vf, VF1),
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.read(&format!("bus/pci/devices/{VF1}/reset")), "1");
        assert_eq!(fake.read(&format!("bus/pci/devices/{VF2}/reset")), "");
        // VF 2 has no driver and the fake kernel binds nothing: the bind is refused, after
        // the override and probe were written, and no group is handed over.
        let e = refusal(&mut helper, HardwareRequest::BindVfio { vf: VF2.into() });
        assert!(e.contains("vfio-pci refused to bind"), "{e}");
        assert_eq!(fake.read("bus/pci/drivers_probe"), VF2);
    }

    #[test]
    fn a_vf_whose_iommu_group_holds_a_foreign_function_is_refused() {
        let fake = fake();
        // Another device of the host, on vfio-pci, in VF 1's group: VF 1's group descriptor
        // would reach it too.
        fake.add_function("0000:00:05.0", 0x8086, 0x1234, 0x020000, 4);
        fake.bind("0000:00:05.0", "vfio-pci");
        let mut helper = helper(&fake);
        let e = refusal(&mut helper, HardwareRequest::BindVfio { vf: VF1.into() });
        assert!(
            e.contains("IOMMU group 4 of 0000:00:02.1 also holds 0000:00:05.0"),
            "{e}"
        );
    }

    #[test]
    fn vfs_are_enabled_only_from_none_and_in_a_nonzero_count() {
        let fake = fake();
        let mut helper = helper(&fake);
        let enable = |count, how| HardwareRequest::EnableVfs {
            pf: PF.into(),
            count,
            how,
        };
        // Already 2: asking for 2 changes nothing and names them; asking for 1 would take
        // VFs from guests.
        match helper.handle(&enable(2, VfEnabling::Plain)) {
            (HardwareReply::VfsEnabled { vfs }, None) => assert_eq!(vfs, [VF1, VF2]),
            other => panic!("{other:?}"),
        }
        let e = refusal(&mut helper, enable(1, VfEnabling::Plain));
        assert!(e.contains("has 2 VFs enabled; changing that to 1"), "{e}");
        let e = refusal(&mut helper, enable(0, VfEnabling::Plain));
        assert!(e.contains("count must be at least 1"), "{e}");
        let none = NvmeVfResources {
            queues: 0,
            interrupts: 1,
        };
        let e = refusal(&mut helper, enable(2, VfEnabling::Nvme(none)));
        assert!(e.contains("must be at least 1"), "{e}");
        assert_untouched(&fake);
        // From none: the plain way writes autoprobe off and the count.
        fake.write(&format!("bus/pci/devices/{PF}/sriov_numvfs"), "0\n");
        match helper.handle(&enable(2, VfEnabling::Plain)) {
            (HardwareReply::VfsEnabled { vfs }, None) => assert_eq!(vfs, [VF1, VF2]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fake.read(&format!("bus/pci/devices/{PF}/sriov_numvfs")),
            "2\n"
        );
        assert_eq!(
            fake.read(&format!("bus/pci/devices/{PF}/sriov_drivers_autoprobe")),
            "0"
        );
    }

    #[test]
    fn malformed_requests_are_refused_and_the_helper_serves_on() {
        let fake = fake();
        let (ours, theirs) = ControlChannel::pair().unwrap();
        let mut helper = helper(&fake);
        let server = std::thread::spawn(move || helper.serve(&theirs));
        let ask = |body: &dyn Fn(&ControlChannel)| {
            body(&ours);
            ours.recv::<HardwareReply>().unwrap()
        };
        // Another protocol's message, a cut-short one, one with a descriptor attached.
        let (reply, _) = ask(&|c| c.send(&(200u32, "x"), &[]).unwrap());
        assert!(
            matches!(&reply, HardwareReply::Refused { reason } if reason.starts_with("malformed request")),
            "{reply:?}"
        );
        let (reply, _) = ask(&|c| c.send(&(3u32, 250u8), &[]).unwrap());
        assert!(matches!(reply, HardwareReply::Refused { .. }), "{reply:?}");
        let file = tempfile::tempfile().unwrap();
        let (reply, _) = ask(&|c| {
            c.send(
                &HardwareRequest::ResetVf { vf: VF1.into() },
                &[file.as_fd()],
            )
            .unwrap()
        });
        assert!(
            matches!(&reply, HardwareReply::Refused { reason } if reason.contains("carries no descriptors")),
            "{reply:?}"
        );
        assert_eq!(fake.read(&format!("bus/pci/devices/{VF1}/reset")), "");
        // Still serving: the client side of the protocol gets a real answer.
        let mut client = HelperClient::new(ours);
        let state = client.describe_pf(PF.parse().unwrap()).unwrap();
        assert_eq!((state.total_vfs, state.num_vfs), (2, 2));
        assert_eq!(state.driver.as_deref(), Some("nvme"));
        let group = client.bind_vfio(VF1.parse().unwrap()).unwrap();
        assert_eq!(group.number, 4);
        client.reset_vf(VF1.parse().unwrap()).unwrap();
        let e = client.reset_vf(FOREIGN_VF.parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("the hardware helper refused"), "{e}");
        // The driver domain going away ends the helper, cleanly.
        drop(client);
        server.join().unwrap().unwrap();
    }
}
