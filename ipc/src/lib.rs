//! Cross-domain primitives shared by every domain of splitvmm.
//!
//! Nothing here knows what a domain is for: these are the channels domains meet through,
//! as they would across a real isolation boundary, and the disk images they share (sized and
//! locked the same way by whichever domain opens one).

pub mod connection;
pub mod control;
pub mod hex;
pub mod image;
pub mod startup;
pub mod tap;
pub mod tunnel;
pub mod xenbus;
pub mod xenstore;
