//! Frontend drivers for splitvmm guests.
//!
//! * [`virtio`]: the `no_std` virtio core (DMA memory abstraction, split virtqueue driver,
//!   virtio-blk driver), usable in a freestanding guest kernel and in a host process.
//! * `process` (feature `std`): process domains -- a host process acting as a vhost-user
//!   frontend whose rings and buffers all live in one sealed memfd, the I/O window.
//! * `managed` (feature `std`): a process-domain guest as `splitvmm up` runs it, walking the
//!   xenbus states with its backend through the store (binary `process-guest`).
#![cfg_attr(not(feature = "std"), no_std)]

pub mod virtio;

#[cfg(feature = "std")]
pub mod process;

#[cfg(feature = "std")]
pub mod managed;
