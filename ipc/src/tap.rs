//! A host tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`), opened by name in the caller's
//! network namespace. The toolstack opens the driver domain's uplink this way, in the host's
//! namespace, and hands the descriptor over: the confined driver domain has no `/dev/net/tun`,
//! no capability to create interfaces and a network namespace of its own.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Errors of opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapDeviceError {
    /// The interface name is empty or too long.
    #[error("invalid tap interface name {0:?} (1..=15 bytes, no NUL)")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// `TUNSETIFF` failed.
    #[error("cannot create tap {0}")]
    SetIff(String, #[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates (or attaches to) tap `name`; the descriptor is non-blocking and close-on-exec.
pub fn open(name: &str) -> Result<File, TapDeviceError> {
    if name.is_empty() || name.len() > 15 || name.contains('\0') {
        return Err(TapDeviceError::Name(name.to_string()));
    }
    let tap = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapDeviceError::Open)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (name,
    // flags, padding to 40 bytes); `req` lives across the call and `tap` is an open fd.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(TapDeviceError::SetIff(
            name.to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(tap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_anything_is_opened() {
        for bad in ["", "a-name-longer-than-15", "nul\0"] {
            assert!(matches!(open(bad), Err(TapDeviceError::Name(_))), "{bad:?}");
        }
    }
}
