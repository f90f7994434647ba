//! The xenbus vocabulary: device states and the store layout frontends and backends meet in.
//!
//! Layout (as Xen's libxl writes it, see docs/protocol.md):
//! - backend:  `/local/domain/<backend-id>/backend/<kind>/<frontend-id>/<devid>/...`
//! - frontend: `/local/domain/<frontend-id>/device/<kind>/<devid>/...`
//!
//! The frontend half of the walk is `frontend-core`'s (`frontend_core::xenbus`); the backend
//! half is the driver domain's.

use std::fmt;
use std::str::FromStr;

/// Errors of the xenbus vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XenbusError {
    #[error("invalid xenbus state {0:?}")]
    BadState(String),
    #[error("unknown device kind {0:?}")]
    BadKind(String),
}

/// `enum xenbus_state` from Xen's `io/xenbus.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    /// The backend is ready for the frontend to connect (it published its features).
    InitWait = 2,
    /// The frontend published its side of the connection.
    Initialised = 3,
    Connected = 4,
    /// One side is tearing the device down.
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// The state as a number, as the store holds it.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for XenbusState {
    type Error = XenbusError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        use XenbusState::*;
        Ok(match value {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return Err(XenbusError::BadState(value.to_string())),
        })
    }
}

impl FromStr for XenbusState {
    type Err = XenbusError;

    /// Parses the store value: a decimal number, surrounding whitespace and a trailing NUL
    /// tolerated (C clients sometimes write one).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim_end_matches('\0').trim();
        let n: u8 = trimmed
            .parse()
            .map_err(|_| XenbusError::BadState(s.to_owned()))?;
        XenbusState::try_from(n)
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u8())
    }
}

/// Kinds of split devices this project serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    /// A virtual block device.
    Vbd,
    /// A virtual network interface.
    Vif,
}

impl DeviceKind {
    /// The store's name for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Vbd => "vbd",
            DeviceKind::Vif => "vif",
        }
    }
}

impl FromStr for DeviceKind {
    type Err = XenbusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vbd" => Ok(DeviceKind::Vbd),
            "vif" => Ok(DeviceKind::Vif),
            _ => Err(XenbusError::BadKind(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one split device: who serves it, who uses it, and its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId {
    pub kind: DeviceKind,
    pub backend: u32,
    pub frontend: u32,
    pub devid: u32,
}

impl DeviceId {
    /// `/local/domain/<backend>/backend/<kind>/<frontend>/<devid>`
    pub fn backend_path(&self) -> String {
        format!(
            "{}/{}/{}",
            backend_kind_dir(self.backend, self.kind),
            self.frontend,
            self.devid
        )
    }

    /// `/local/domain/<frontend>/device/<kind>/<devid>`
    pub fn frontend_path(&self) -> String {
        format!(
            "{}/device/{}/{}",
            domain_path(self.frontend),
            self.kind,
            self.devid
        )
    }

    /// Recovers a device from a path below a backend's kind directory, as a watch on
    /// [`backend_kind_dir`] reports it: `<dir>/<frontend>/<devid>[/...]`.
    pub fn from_backend_path(backend: u32, kind: DeviceKind, path: &str) -> Option<DeviceId> {
        let dir = backend_kind_dir(backend, kind);
        let rest = path.strip_prefix(&dir)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let frontend = parse_id(parts.next()?)?;
        let devid = parse_id(parts.next()?)?;
        Some(DeviceId {
            kind,
            backend,
            frontend,
            devid,
        })
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{} (backend dom{})",
            self.kind, self.frontend, self.devid, self.backend
        )
    }
}

/// Strict decimal: no sign, no leading zeros (other than "0"), so one id has one spelling.
fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// `/local/domain/<domid>`
pub fn domain_path(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

/// `/local/domain/<backend>/backend/<kind>`: what a driver domain watches.
pub fn backend_kind_dir(backend: u32, kind: DeviceKind) -> String {
    format!("{}/backend/{}", domain_path(backend), kind)
}

/// Keys of the device directories.
pub mod keys {
    /// Both sides: the xenbus state.
    pub const STATE: &str = "state";
    /// Frontend side: path of the backend directory.
    pub const BACKEND: &str = "backend";
    /// Frontend side: the backend's domain id.
    pub const BACKEND_ID: &str = "backend-id";
    /// Backend side: path of the frontend directory.
    pub const FRONTEND: &str = "frontend";
    /// Backend side: the frontend's domain id.
    pub const FRONTEND_ID: &str = "frontend-id";
    /// Backend side: "1" while the toolstack wants the device; "0" asks for teardown.
    pub const ONLINE: &str = "online";
    /// Backend side (vbd): "r" or "w".
    pub const MODE: &str = "mode";
    /// Backend side (vbd): what backs the disk, as the toolstack describes it.
    pub const PARAMS: &str = "params";
    /// Backend side (vbd): "file".
    pub const TYPE: &str = "type";
    /// Backend side (vbd): capacity in 512-byte sectors, published when the backend is ready.
    pub const SECTORS: &str = "sectors";
    /// Backend side (vbd): logical sector size.
    pub const SECTOR_SIZE: &str = "sector-size";
    /// Backend side (vbd): the queues the disk is served with (Xen blkback's name; here set
    /// by the toolstack from the host file, absent for one).
    pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";
    /// Frontend side: the virtual device number, also the directory name.
    pub const VIRTUAL_DEVICE: &str = "virtual-device";
    /// Backend side, added by this project: the transport the backend serves the device on
    /// ("vhost-user").
    pub const TRANSPORT: &str = "transport";
    /// Backend side, added by this project: the vhost-user connection the frontend was
    /// handed, as "fd" (a pre-connected descriptor) or a socket path.
    pub const VHOST_USER: &str = "vhost-user";
    /// Backend side: why the device's session failed, as a Xen backend's `xenbus_dev_fatal`
    /// reports it (written with state Closed; removed when a new session starts).
    pub const ERROR: &str = "error";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_store_text() {
        for n in 0..=8u8 {
            let state = XenbusState::try_from(n).unwrap();
            assert_eq!(state.to_string().parse::<XenbusState>().unwrap(), state);
        }
        assert_eq!(
            "4\0".parse::<XenbusState>().unwrap(),
            XenbusState::Connected
        );
        assert!("9".parse::<XenbusState>().is_err());
        assert!("-1".parse::<XenbusState>().is_err());
        assert!("".parse::<XenbusState>().is_err());
        assert!("Connected".parse::<XenbusState>().is_err());
    }

    #[test]
    fn device_paths_follow_the_xen_layout() {
        let dev = DeviceId {
            kind: DeviceKind::Vbd,
            backend: 1,
            frontend: 5,
            devid: 51712,
        };
        assert_eq!(dev.backend_path(), "/local/domain/1/backend/vbd/5/51712");
        assert_eq!(dev.frontend_path(), "/local/domain/5/device/vbd/51712");
    }

    #[test]
    fn device_is_recovered_from_watch_paths() {
        let dev = DeviceId {
            kind: DeviceKind::Vbd,
            backend: 1,
            frontend: 5,
            devid: 51712,
        };
        for path in [
            "/local/domain/1/backend/vbd/5/51712",
            "/local/domain/1/backend/vbd/5/51712/state",
        ] {
            assert_eq!(
                DeviceId::from_backend_path(1, DeviceKind::Vbd, path),
                Some(dev)
            );
        }
        for path in [
            "/local/domain/1/backend/vbd",
            "/local/domain/1/backend/vbd/5",
            "/local/domain/1/backend/vbd/05/51712",
            "/local/domain/1/backend/vbd/x/51712",
            "/local/domain/1/backend/vbdx/5/51712",
            "/local/domain/2/backend/vbd/5/51712",
            "/local/domain/1/backend/vbd/5/99999999999",
        ] {
            assert_eq!(
                DeviceId::from_backend_path(1, DeviceKind::Vbd, path),
                None,
                "{path}"
            );
        }
    }
}
