//! The frontend side's protocols, shared by every guest-domain process: process guests
//! (`guest-frontend`) and the VMM of a KVM guest (`control-vmm`).
//!
//! * [`vhost_user`]: one vhost-user frontend session per device (connect with retry, feature
//!   and protocol-feature negotiation, config space, memory table, vrings), keeping what a
//!   new connection would need re-sent.
//! * [`xenbus`]: the frontend half of the xenbus walk ([`xenbus::ManagedFrontend`]), driven
//!   by what a kind of guest does at its moments ([`xenbus::FrontendLifecycle`]) and what it
//!   checks on request ([`xenbus::FrontendDiagnostics`]).
//!
//! Dependency rule: this crate depends on `ipc` (the vocabulary and channels domains meet
//! through) and external crates only; the guest-domain crates depend on it; the driver domain
//! never does.

mod reply_watchdog;
pub mod vhost_user;
pub mod xenbus;
