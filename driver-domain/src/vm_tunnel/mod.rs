//! The driver domain inside a VM (`driver-domain vm-serve`, docs/driver-vm.md): the in-VM
//! side of the tunnel dom0's VMM relays vhost-user over (the wire format is `ipc::tunnel`'s).
//! Each channel runs the unchanged vhost-user backend session on a socketpair; the tunnel's
//! end turns references back into descriptors: memory into BAR2 of the cross-VM device,
//! calls into doorbell writes, kicks into a ring poller's signals.
//!
//! - [`tty`]: the serial port as a raw byte stream.
//! - [`mapping`]: bounds-checked volatile access to a mapped part of a BAR file.
//! - [`xvm_device`]: the cross-VM device in sysfs: doorbells (BAR0), shared memory (BAR2).
//! - [`doorbell`]: the relay thread from call eventfds to doorbell writes.
//! - [`poller`]: the ring poller (avail index moves to kick eventfds), with back-off.
//! - [`rings`]: the memory table and ring addresses learnt from passing messages.
//! - [`refs`]: references to descriptors, and what each channel bound.
//! - [`vhost_stream`]: whole vhost-user messages with descriptors on a socket.
//! - [`writer`]: frames out to the tunnel, whole.
//! - [`channel`]: one channel: the backend session and the thread relaying its messages out.
//! - [`managed`]: a managed driver VM: the in-VM driver domain's store connection and control
//!   channel behind STORE and CONTROL frames, and the connections its requests prepare.
//! - [`server`]: the main loop: HELLO, then OPEN, VHOST and CLOSE frames (and STORE, CONTROL).
//! - [`probe`]: the isolation probe (`vm-probe`): what of a guest the VM can reach.

pub mod channel;
pub mod doorbell;
pub mod managed;
pub mod mapping;
pub mod poller;
pub mod probe;
pub mod refs;
pub mod rings;
pub mod server;
pub mod tty;
pub mod vhost_stream;
pub mod writer;
pub mod xvm_device;

#[cfg(test)]
mod managed_tests;
#[cfg(test)]
mod tests;

pub use managed::{DriverEnds, ManagedLink};
pub use server::{Ended, ServerError, VmServer};
pub use writer::TunnelWriter;
pub use xvm_device::CrossVmDevice;
