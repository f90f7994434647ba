//! `splitvmm store`: the store as a standalone daemon.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use ipc::xenstore::server::{Store, StoreConfig};

use crate::signals;

/// Serves the store on `socket` (the privileged, dom0 socket) until SIGINT or SIGTERM.
pub fn run(socket: &Path) -> Result<ExitCode> {
    let store = Store::bind(StoreConfig {
        socket: socket.to_owned(),
        ..StoreConfig::default()
    })
    .with_context(|| format!("starting the store on {}", socket.display()))?;
    let handle = store.handle();
    signals::handle_termination(move |signal| {
        log::info!("{signal}: shutting the store down");
        handle.shutdown();
    })?;
    println!("store listening on {}", socket.display());
    store.run().context("store failed")?;
    Ok(ExitCode::SUCCESS)
}
