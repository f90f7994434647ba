//! Pieces shared by every device core: checks on peer-supplied memory and the driver side of a
//! split ring (for tests, fuzzing and benchmarks that play the guest).

pub mod counters;
pub mod memory;
pub mod ring_driver;
