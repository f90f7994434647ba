//! Domain 0: the splitvmm toolstack.
//!
//! It reads a host description, runs the store, starts the driver domain and the guests as
//! separate processes, creates their store directories as Xen's libxl does, and stays off the
//! data path.

pub mod bench;
pub mod cli;
pub mod config;
pub mod confinement;
pub mod console;
pub mod domains;
pub mod host;
pub mod image;
pub mod listing;
pub mod location;
pub mod signals;
pub mod store_cmd;
pub mod supervisor;
pub mod toolstack;
pub mod up;
pub mod vdev;
pub mod vmm;
pub mod xs;
