//! The tunnel between dom0 and a driver VM: vhost-user channels multiplexed over one byte
//! stream (the driver VM's second serial port), fds replaced by references to what dom0 set
//! up for them in the cross-VM device. One implementation of the framing, used by both sides:
//! dom0's relay (`splitvmm-vmm --driver-vm-socket`) and the in-VM server
//! (`driver-domain vm-serve`). The wire format is in docs/protocol.md, "The driver-VM tunnel".

pub mod control;
mod decoder;
mod frame;
pub mod vhost_msg;

pub use control::{ControlFrameError, TunnelControl};
pub use decoder::FrameDecoder;
pub use frame::{
    Frame, FrameKind, Ref, RefKind, TunnelError, FRAME_MAX, HEADER_LEN, MAGIC, PAYLOAD_MAX,
    REFS_MAX, REF_LEN, VERSION,
};

#[cfg(test)]
mod tests;
