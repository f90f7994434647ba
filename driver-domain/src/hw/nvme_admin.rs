//! NVMe admin commands through the kernel driver's passthrough ioctl (`NVME_IOCTL_ADMIN_CMD`
//! on `/dev/nvmeN`), for a PF that stays bound to the kernel `nvme` driver: Identify of the
//! primary controller capabilities and the secondary controller list, and Virtualization
//! Management (NVMe 1.4, admin opcode 0x1c).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

/// Errors of NVMe admin passthrough.
#[derive(Debug, thiserror::Error)]
pub enum NvmeAdminError {
    #[error("opening {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
    #[error("{what} on {dev}: ioctl failed: {source}")]
    Ioctl {
        what: String,
        dev: PathBuf,
        source: io::Error,
    },
    #[error("{what} on {dev}: the controller answered status 0x{status:x} ({})", status_name(*.status))]
    Status {
        what: String,
        dev: PathBuf,
        status: u32,
    },
}

/// `struct nvme_passthru_cmd` of `<linux/nvme_ioctl.h>`.
#[repr(C)]
#[derive(Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

ioctl_iowr_nr!(NVME_IOCTL_ADMIN_CMD, b'N' as u32, 0x41, PassthruCmd);

const OPC_IDENTIFY: u8 = 0x06;
const OPC_VIRT_MGMT: u8 = 0x1c;
const CNS_PRIMARY_CTRL_CAPS: u32 = 0x14;
const CNS_SECONDARY_CTRL_LIST: u32 = 0x15;

/// Resource type of Virtualization Management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceType {
    /// Virtual queue resources (submission/completion queue pairs).
    Vq = 0,
    /// Virtual interrupt resources (MSI-X vectors).
    Vi = 1,
}

/// Action of Virtualization Management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtAction {
    PrimaryFlexibleAllocation = 1,
    SecondaryOffline = 7,
    SecondaryAssign = 8,
    SecondaryOnline = 9,
}

/// Identify CNS 0x14: the primary controller's flexible resource capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryCaps {
    pub cntlid: u16,
    /// VQ flexible resources total, assigned to the primary, and the max per secondary.
    pub vq_flexible_total: u32,
    pub vq_flexible_primary: u16,
    pub vq_max_per_secondary: u16,
    /// VI flexible resources total, assigned to the primary, and the max per secondary.
    pub vi_flexible_total: u32,
    pub vi_flexible_primary: u16,
    pub vi_max_per_secondary: u16,
}

/// One entry of the secondary controller list (Identify CNS 0x15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecondaryController {
    pub cntlid: u16,
    pub primary_cntlid: u16,
    pub online: bool,
    /// Virtual function number, 1-based (0: not a VF).
    pub vf_number: u16,
    pub vq: u16,
    pub vi: u16,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Parses the 4 KiB Identify CNS 0x14 data structure.
pub fn parse_primary_caps(b: &[u8; 4096]) -> PrimaryCaps {
    PrimaryCaps {
        cntlid: le16(b, 0),
        vq_flexible_total: le32(b, 32),
        vq_flexible_primary: le16(b, 40),
        vq_max_per_secondary: le16(b, 44),
        vi_flexible_total: le32(b, 64),
        vi_flexible_primary: le16(b, 72),
        vi_max_per_secondary: le16(b, 76),
    }
}

/// Parses the 4 KiB Identify CNS 0x15 data structure (at most 127 entries).
pub fn parse_secondary_list(b: &[u8; 4096]) -> Vec<SecondaryController> {
    let n = usize::from(b[0]).min(127);
    (0..n)
        .map(|i| {
            let e = &b[32 + 32 * i..64 + 32 * i];
            SecondaryController {
                cntlid: le16(e, 0),
                primary_cntlid: le16(e, 2),
                online: e[4] & 1 != 0,
                vf_number: le16(e, 8),
                vq: le16(e, 10),
                vi: le16(e, 12),
            }
        })
        .collect()
}

/// Short name of an NVMe status (SCT/SC without the phase and DNR bits).
pub fn status_name(status: u32) -> &'static str {
    match status & 0x7ff {
        0x002 => "invalid field in command",
        0x001 => "invalid command opcode",
        0x10b => "invalid controller identifier",
        0x115 => "invalid resource identifier",
        0x116 => "controller offline",
        0x120 => "invalid secondary controller state",
        0x121 => "invalid number of controller resources",
        0x122 => "invalid resource identifier",
        _ => "see the NVMe specification",
    }
}

/// The admin queue of a controller bound to the kernel nvme driver.
pub struct NvmeAdmin {
    dev: PathBuf,
    file: File,
}

impl NvmeAdmin {
    /// Opens `/dev/nvmeN`.
    pub fn open(dev: &Path) -> Result<Self, NvmeAdminError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|e| NvmeAdminError::Open(dev.to_path_buf(), e))?;
        Ok(NvmeAdmin {
            dev: dev.to_path_buf(),
            file,
        })
    }

    /// Runs one admin command; returns the completion's dword 0.
    fn run(
        &self,
        what: &str,
        mut cmd: PassthruCmd,
        data: Option<&mut [u8; 4096]>,
    ) -> Result<u32, NvmeAdminError> {
        if let Some(buf) = data {
            cmd.addr = buf.as_mut_ptr() as u64;
            cmd.data_len = buf.len() as u32;
        }
        // SAFETY: `cmd` is a correctly laid out `nvme_passthru_cmd`; the kernel reads it and
        // writes `result` back; `addr`/`data_len` describe a live 4 KiB buffer (or nothing) that
        // outlives the call, and the kernel writes at most `data_len` bytes to it.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, NVME_IOCTL_ADMIN_CMD(), &mut cmd) };
        match ret {
            0 => Ok(cmd.result),
            r if r < 0 => Err(NvmeAdminError::Ioctl {
                what: what.to_string(),
                dev: self.dev.clone(),
                source: io::Error::last_os_error(),
            }),
            status => Err(NvmeAdminError::Status {
                what: what.to_string(),
                dev: self.dev.clone(),
                status: status as u32,
            }),
        }
    }

    fn identify(&self, what: &str, cdw10: u32) -> Result<Box<[u8; 4096]>, NvmeAdminError> {
        let mut buf = Box::new([0u8; 4096]);
        let cmd = PassthruCmd {
            opcode: OPC_IDENTIFY,
            cdw10,
            ..Default::default()
        };
        self.run(what, cmd, Some(&mut buf))?;
        Ok(buf)
    }

    /// Identify CNS 0x14.
    pub fn primary_caps(&self) -> Result<PrimaryCaps, NvmeAdminError> {
        let b = self.identify(
            "Identify primary controller capabilities",
            CNS_PRIMARY_CTRL_CAPS,
        )?;
        Ok(parse_primary_caps(&b))
    }

    /// Identify CNS 0x15, starting at controller id 0.
    pub fn secondary_controllers(&self) -> Result<Vec<SecondaryController>, NvmeAdminError> {
        let b = self.identify(
            "Identify secondary controller list",
            CNS_SECONDARY_CTRL_LIST,
        )?;
        Ok(parse_secondary_list(&b))
    }

    /// Virtualization Management; returns the number of resources modified.
    pub fn virt_mgmt(
        &self,
        cntlid: u16,
        rt: ResourceType,
        act: VirtAction,
        nr: u16,
    ) -> Result<u16, NvmeAdminError> {
        let cmd = PassthruCmd {
            opcode: OPC_VIRT_MGMT,
            cdw10: act as u32 | (rt as u32) << 8 | u32::from(cntlid) << 16,
            cdw11: u32::from(nr),
            ..Default::default()
        };
        let what = format!("Virtualization Management (cntlid {cntlid}, {rt:?}, {act:?}, nr {nr})");
        Ok(self.run(&what, cmd, None)? as u16)
    }
}

impl AsRawFd for NvmeAdmin {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthru_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<PassthruCmd>(), 72);
        // _IOWR('N', 0x41, 72 bytes)
        assert_eq!(NVME_IOCTL_ADMIN_CMD(), 0xc048_4e41);
    }

    #[test]
    fn parses_primary_caps() {
        let mut b = [0u8; 4096];
        b[0..2].copy_from_slice(&0x41u16.to_le_bytes());
        b[32..36].copy_from_slice(&4u32.to_le_bytes());
        b[40..42].copy_from_slice(&1u16.to_le_bytes());
        b[44..46].copy_from_slice(&3u16.to_le_bytes());
        b[64..68].copy_from_slice(&2u32.to_le_bytes());
        b[76..78].copy_from_slice(&1u16.to_le_bytes());
        let c = parse_primary_caps(&b);
        assert_eq!(c.cntlid, 0x41);
        assert_eq!(
            (
                c.vq_flexible_total,
                c.vq_flexible_primary,
                c.vq_max_per_secondary
            ),
            (4, 1, 3)
        );
        assert_eq!(
            (
                c.vi_flexible_total,
                c.vi_flexible_primary,
                c.vi_max_per_secondary
            ),
            (2, 0, 1)
        );
    }

    #[test]
    fn parses_secondary_list_and_caps_the_count() {
        let mut b = [0u8; 4096];
        b[0] = 2;
        for (i, (id, online)) in [(1u16, true), (2u16, false)].iter().enumerate() {
            let e = &mut b[32 + 32 * i..64 + 32 * i];
            e[0..2].copy_from_slice(&id.to_le_bytes());
            e[4] = u8::from(*online);
            e[8..10].copy_from_slice(&id.to_le_bytes());
            e[10..12].copy_from_slice(&2u16.to_le_bytes());
            e[12..14].copy_from_slice(&1u16.to_le_bytes());
        }
        let l = parse_secondary_list(&b);
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0],
            SecondaryController {
                cntlid: 1,
                primary_cntlid: 0,
                online: true,
                vf_number: 1,
                vq: 2,
                vi: 1
            }
        );
        assert!(!l[1].online);
        // A hostile count cannot index past the 4 KiB page.
        b[0] = 255;
        assert_eq!(parse_secondary_list(&b).len(), 127);
    }
}
