//! What splitvmm's VMM and its guest kernel agree on, from one source: the boot-info page
//! ([`boot`]) and the virtio-mmio register file ([`virtio_mmio`]).
//!
//! `no_std` and without dependencies, so the freestanding tiny kernel
//! (guest-frontend/tiny-kernel) builds it with its own flags. The VMM takes the virtio-mmio
//! registers from `virtio-bindings` (which needs std, so the kernel cannot); this crate's tests
//! check that both agree.
#![no_std]

pub mod boot;
pub mod virtio_mmio;
