//! The backend core shared by every device: the transport-independent device contract and its
//! queue scheduler, checks on peer-supplied memory, lock helpers, and the driver side of a
//! split ring (for tests, fuzzing and benchmarks that play the guest).
//!
//! - [`device`]: [`BackendDevice`], [`TransportQueue`], [`serve_queues`], the per-queue
//!   failure latch.
//! - [`counters`]: what a device served, as its backend counts it.
//! - [`memory`]: sealing and size checks on peer memory; [`CheckedMemory`].
//! - [`sync`]: lock helpers that recover from poisoning.
//! - [`ring_driver`]: the driver side of a split ring.

pub mod counters;
pub mod device;
pub mod memory;
pub mod poll_window;
pub mod ring_driver;
pub mod sync;

pub use device::{
    serve_queues, BackendDevice, InflightSetupError, InflightTracking, QueueFailedEarlier,
    QueueFailure, QueueProgress, TransportQueue,
};
pub use memory::{CheckedMemory, GuestMem, MemoryGrant, PeerMemoryError, SealPolicy, SealState};
