//! virtio-net device core and the L2 switch between the driver domain's ports.
//!
//! Like [`crate::blk`], the core works on "guest memory + split virtqueues + eventfds";
//! [`NetBackendDevice`] implements [`crate::virtio_core::BackendDevice`], so the same queues serve a
//! vhost-user peer ([`crate::vhost_user`]), a process domain, or later a peer VM.
//!
//! - [`header`]: the virtio-net header and the validation of transmitted frames.
//! - [`offload`]: checksum completion and TCP segmentation for ports that did not negotiate them.
//! - [`frame`]: pooled frame buffers (one copy in, one copy out, no per-frame allocation).
//! - [`switch`]: MAC learning with ageing, flooding, no hairpin, source-address checks.
//! - [`switch_port`]: one port: its inbox bounded per sender, its counters, its handle.
//! - [`device`]: the device: the queue pairs of one switch port.
//! - [`queue`]: the TX and RX data path of one queue pair.
//! - [`ring`]: batched used-ring publication and the call decision.
//! - [`config`]: device options, offered features, configuration space.
//! - [`ctrl`]: the control queue (receive filters, MAC table, queue pairs).
//! - [`tap`]: an optional uplink port to a host tap device.

pub mod config;
pub mod ctrl;
pub mod device;
pub mod frame;
pub mod header;
pub mod offload;
pub mod queue;
pub mod ring;
mod split_ring;
pub mod switch;
pub mod switch_port;
pub mod tap;
mod tx_gather;

pub use config::{Negotiated, NetBackendConfig, NetConfigSpace};
pub use device::{NetBackendDevice, NetBackendError};
pub use frame::{format_mac, parse_mac, FrameBox, FrameBuf, FramePool, Mac};
pub use header::{HeaderError, TxHeader, TxOffloads};
pub use offload::{Gso, IpVersion, Offload, OffloadError, Segments};
pub use queue::{Direction, FrameError, NetQueue, NetQueueError, Rx, RxQueue, Tx, TxQueue};
pub use switch::{
    CounterSnapshot, Forwarded, PortId, Switch, SwitchConfig, SwitchError, SwitchPort,
};
pub use tap::{TapError, TapUplink};
