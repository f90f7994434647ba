//! `splitvmm store`: the store as a standalone daemon, until SIGINT (exit status 130) or
//! SIGTERM (0).

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

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
    let caught = Arc::new(AtomicI32::new(0));
    let caught_by_handler = caught.clone();
    signals::handle_termination(move |signal| {
        log::info!("{signal}: shutting the store down");
        caught_by_handler.store(signal as i32, Ordering::SeqCst);
        handle.shutdown();
    })?;
    println!("store listening on {}", socket.display());
    store.run().context("store failed")?;
    // After Ctrl-C: 130, as a shell reports it; after SIGTERM, a clean stop: 0.
    Ok(signals::exit_code(caught.load(Ordering::SeqCst)).unwrap_or(ExitCode::SUCCESS))
}
