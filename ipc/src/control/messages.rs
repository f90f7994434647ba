//! The management vocabulary between the toolstack (dom0) and the domains it starts.
//!
//! The store carries the xenbus negotiation; these messages carry what the store cannot:
//! descriptors (disk images, pre-connected vhost-user sockets) and results. Each message says
//! which descriptors travel with it, in order.

use serde::{Deserialize, Serialize};

/// Descriptor numbers a domain process finds at start-up.
pub mod fds {
    /// The domain's store connection, already bound to its domain id.
    pub const STORE: i32 = 3;
    /// The domain's control channel to the toolstack.
    pub const CONTROL: i32 = 4;
}

/// What of a guest's memory the backend of one device may map: the memory table the guest's
/// frontend sends (vhost-user SET_MEM_TABLE) must be exactly this, or the device is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryGrant {
    /// One region starting at `guest_address`, at most `max_bytes` long: the device's I/O
    /// window (rings and bounce buffers), the KVM-world analogue of Xen grants.
    Window { guest_address: u64, max_bytes: u64 },
    /// Any table: the guest shares all of its RAM (its host-file entry says
    /// `share = "all-ram"`; an unmodified Linux guest puts buffers anywhere).
    AllRam,
}

/// Where a process guest's I/O windows sit in the address space its backends see.
pub const PROCESS_WINDOW_GPA: u64 = 0x1_0000_0000;
/// The largest I/O window a process guest's device may have.
pub const PROCESS_WINDOW_MAX_BYTES: u64 = 64 << 20;

fn one_queue() -> u16 {
    1
}

/// Toolstack to driver domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendRequest {
    /// Serve a block device to `frontend`. Descriptors: `[image file, vhost-user listener]`;
    /// the listener's path is already unlinked and its one pending connection is the
    /// frontend's. The backend starts once the store directory for
    /// (`frontend`, `devid`) appears.
    ServeBlock {
        frontend: u32,
        devid: u32,
        readonly: bool,
        /// The guest memory this device's backend may map.
        grant: MemoryGrant,
        /// Virtqueues to offer (VIRTIO_BLK_F_MQ when more than one).
        #[serde(default = "one_queue")]
        queues: u16,
        /// A block device inside a driver VM (`[[guest.disk]] device`), served in place of
        /// an image: the toolstack then hands `[vhost-user listener]` only, and the driver
        /// VM's in-VM server opens the device (O_DIRECT) and hands it on as the image.
        #[serde(default)]
        device: Option<String>,
    },
    /// Serve a network interface of `frontend` as a port of the driver domain's switch.
    /// Descriptors: `[vhost-user listener]`, made as for [`BackendRequest::ServeBlock`].
    ServeNet {
        frontend: u32,
        devid: u32,
        mac: [u8; 6],
        /// The guest memory this device's backend may map.
        grant: MemoryGrant,
        /// Offer checksum offload and TCP segmentation (the vif's `offloads`).
        offloads: bool,
    },
    /// Report per-device counters.
    Stats,
    /// Prepare a VF of the owned PF `pf` for guest `frontend` (direct assignment): VF number
    /// `vf` (1-based), or any free one; SR-IOV enabled if it is not (the NVMe secondary
    /// controllers online), the VF bound to vfio-pci. Answered by
    /// [`BackendEvent::VfAssigned`] with the VF's VFIO group, of which the driver domain keeps
    /// no copy, or [`BackendEvent::VfRefused`].
    AssignVf {
        frontend: u32,
        pf: String,
        vf: Option<u16>,
    },
    /// Guest `frontend` no longer holds VF `address` (its VMM has exited or let it go): reset
    /// it and take it back. Answered by [`BackendEvent::VfReleased`].
    ReleaseVf { frontend: u32, address: String },
    /// Stop serving everything and exit.
    Shutdown,
}

/// Driver domain to toolstack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendEvent {
    /// The driver domain is up and watching its backend directories.
    Ready,
    /// Answer to [`BackendRequest::Stats`].
    Stats(Vec<BackendDeviceStats>),
    /// A device failed; the others keep running.
    DeviceFailed {
        frontend: u32,
        devid: u32,
        reason: String,
    },
    /// VF `vf` (address `address`) of `pf` is ready for `frontend`. Descriptors: `[VFIO
    /// group]` (the driver domain closed its own).
    VfAssigned {
        frontend: u32,
        pf: String,
        vf: u16,
        address: String,
    },
    /// No VF for `frontend`, and why.
    VfRefused { frontend: u32, reason: String },
    /// VF `address` is back: `reset` says whether its function reset succeeded (`detail`
    /// says why not).
    VfReleased {
        frontend: u32,
        address: String,
        reset: bool,
        detail: String,
    },
}

/// Counters of one backend device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendDeviceStats {
    pub frontend: u32,
    pub devid: u32,
    /// Sessions served (attach and re-attach each start one).
    pub sessions: u64,
}

/// Toolstack to a process-domain guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestRequest {
    /// A block device is being attached. Descriptors: `[frontend end of the vhost-user
    /// connection]`. The guest connects when its backend reaches InitWait.
    AttachBlock { devid: u32 },
    /// A network interface is being attached, with this IPv4 address on the host's internal
    /// switch. Descriptors: `[frontend end of the vhost-user connection]`.
    AttachNet { devid: u32, ip: [u8; 4] },
    /// The driver domain was restarted: a fresh vhost-user connection for block device
    /// `devid`, already attached. Descriptors: `[frontend end of the new connection]`. The
    /// guest keeps its queues and reconnects when its backend is back at InitWait
    /// (docs/protocol.md, "Backend restart").
    ReconnectBlock { devid: u32 },
    /// The same for network interface `devid`.
    ReconnectNet { devid: u32 },
    /// Resolve `peer` with ARP on interface `devid`, then exchange `rounds` UDP echoes with it.
    NetPing {
        devid: u32,
        peer: [u8; 4],
        rounds: u32,
    },
    /// Write a pattern derived from `seed` over the first `bytes` of the disk (unless
    /// `verify_only`) and read it back.
    DiskCheck {
        devid: u32,
        seed: u64,
        bytes: u64,
        verify_only: bool,
    },
    /// A PCI function to assign to the guest (a KVM Linux guest, before it boots), as its
    /// `index`-th. Descriptors: `[VFIO group]` holding the function `address`.
    AssignPci { index: u32, address: String },
    /// Let the PCI function of [`GuestRequest::AssignPci`] `index` go (`pci-detach`): reset
    /// it and close its descriptors, the guest running or not (no hotplug: a running guest
    /// sees it vanish). Answered by [`GuestEvent::PciDetached`] or [`GuestEvent::PciFailed`].
    DetachPci { index: u32 },
    /// Report counters and exit.
    Shutdown,
}

/// A process-domain guest to the toolstack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestEvent {
    /// The device walked to Connected.
    Connected { devid: u32, sectors: u64 },
    /// A network interface walked to Connected.
    NetConnected { devid: u32, mac: [u8; 6] },
    /// The device walked to Closed (after the backend asked, or on shutdown).
    Closed { devid: u32 },
    /// Result of a [`GuestRequest::NetPing`].
    NetPing {
        devid: u32,
        passed: bool,
        detail: String,
    },
    /// Result of a [`GuestRequest::DiskCheck`].
    DiskCheck {
        devid: u32,
        passed: bool,
        detail: String,
    },
    /// Something went wrong with a device; the guest keeps its other devices.
    DeviceFailed { devid: u32, reason: String },
    /// The guest took the PCI function of [`GuestRequest::AssignPci`] `index`.
    PciAssigned { index: u32 },
    /// The guest let PCI function `index` go; it holds nothing of it any more.
    PciDetached { index: u32 },
    /// The guest could not take it, and why (it holds no copy of the group).
    PciFailed { index: u32, reason: String },
    /// Final counters, sent before exiting.
    Stats(GuestStats),
}

/// Counters of a process-domain guest, summed over its devices and sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub requests: u64,
    pub bytes: u64,
    pub kicks_sent: u64,
    pub kicks_suppressed: u64,
    pub interrupts: u64,
    /// Exits to the VMM process during I/O (KVM guests; 0 for process guests, which have no
    /// VMM).
    pub vmm_exits: u64,
}

/// A management client (`splitvmm block-attach`, ...) to a running `splitvmm up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToolstackRequest {
    /// Attach the image at `image` to guest `guest` as vbd `devid`.
    BlockAttach {
        guest: String,
        image: String,
        devid: u32,
        readonly: bool,
        size_mib: Option<u64>,
        /// Disk checks may write to the image (one the toolstack creates is scratch anyway).
        scratch: bool,
        /// Virtqueues (Linux guests: more than one).
        #[serde(default = "one_queue")]
        queues: u16,
    },
    /// Detach vbd `devid` from guest `guest`.
    BlockDetach { guest: String, devid: u32 },
    /// Attach a network interface to guest `guest`.
    NetworkAttach {
        guest: String,
        devid: u32,
        mac: Option<String>,
        ip: Option<String>,
    },
    /// Detach network interface `devid` from guest `guest`.
    NetworkDetach { guest: String, devid: u32 },
    /// Take PCI function `index` (its `[[pci]]` entry) away from guest `guest` and give the
    /// VF back to the driver domain.
    PciDetach { guest: String, index: u32 },
    /// Have guest `guest` resolve `peer` on interface `devid` and exchange UDP echoes with it.
    NetPing {
        guest: String,
        devid: u32,
        peer: [u8; 4],
        rounds: u32,
    },
    /// Destroy guest `guest` (its process, its devices, its store entries).
    Destroy { guest: String },
    /// Create the guest described in the file at `file` (an absolute path; the keys of a
    /// `[[guest]]` entry) and attach its devices.
    Create { file: String },
    /// Shut guest `guest` down in order (its devices closed through the xenbus walk, then its
    /// process ends) and release it.
    Shutdown { guest: String },
    /// Shut guest `guest` down in order and start it again with the devices it had.
    Reboot { guest: String },
    /// Write and verify a pattern on a guest's disk (or only verify it).
    DiskCheck {
        guest: String,
        devid: u32,
        seed: u64,
        verify_only: bool,
    },
}

/// The answer of a running `splitvmm up` to a [`ToolstackRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToolstackReply {
    Done(String),
    Failed(String),
}
