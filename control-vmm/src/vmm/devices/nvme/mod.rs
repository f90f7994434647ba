//! An emulated NVMe controller (NVMe 1.2 subset) for Linux guests: full emulation, where every
//! register and doorbell access traps to the VMM, which walks the queues in guest memory, does
//! the I/O on a backing file and raises MSI-X. The same stock `nvme` driver drives it as an
//! assigned NVMe VF, so the two differ only in the approach (docs/approaches.md).
//!
//! - [`regs`]: CAP, VS, CC, CSTS, AQA/ASQ/ACQ and the CC state changes;
//! - [`queues`]: submission and completion queues in guest memory, the phase tag;
//! - [`prp`]: a command's data buffers from its PRP entries, checked against guest RAM;
//! - [`commands`]: admin commands and the status of every failure;
//! - [`io`]: the namespace (backing file) and Read/Write/Flush;
//! - [`controller`]: doorbells, the command loop, asynchronous events, interrupts;
//! - [`pci`]: the PCI function (BAR0, MSI-X glue) and plugging it into a machine.
//!
//! See docs/vmm.md ("Emulated NVMe").

pub mod commands;
pub mod controller;
pub mod io;
pub mod pci;
pub mod prp;
pub mod queues;
pub mod regs;

#[cfg(test)]
mod tests;

pub use controller::{NvmeController, NvmeStats};
pub use io::Namespace;
pub use pci::{plug, NvmePci, NvmePciError};
