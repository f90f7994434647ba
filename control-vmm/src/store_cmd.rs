//! `splitvmm store`: the store as a standalone daemon, until SIGINT (exit status 130) or
//! SIGTERM (0).

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use ipc::xenstore::server::{Store, StoreConfig, StoreHandle};

use crate::signals;

/// Serves the store on `socket` (the privileged, dom0 socket) until SIGINT or SIGTERM.
pub fn run(socket: &Path) -> Result<ExitCode> {
    // Signals are taken before the socket exists: a client that sees the socket may signal
    // at once, and the default action would kill the store without its exit status.
    let caught = Arc::new(AtomicI32::new(0));
    let bound: Arc<Mutex<Option<StoreHandle>>> = Arc::default();
    let (caught_by_handler, bound_by_handler) = (caught.clone(), bound.clone());
    signals::handle_termination(move |signal| {
        log::info!("{signal}: shutting the store down");
        caught_by_handler.store(signal as i32, Ordering::SeqCst);
        if let Some(handle) = &*bound_by_handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            handle.shutdown();
        }
    })?;
    let store = Store::bind(StoreConfig {
        socket: socket.to_owned(),
        ..StoreConfig::default()
    })
    .with_context(|| format!("starting the store on {}", socket.display()))?;
    *bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(store.handle());
    if caught.load(Ordering::SeqCst) != 0 {
        // A signal came while the store was being bound: it ends as soon as it starts.
        store.handle().shutdown();
    }
    println!("store listening on {}", socket.display());
    store.run().context("store failed")?;
    // After Ctrl-C: 130, as a shell reports it; after SIGTERM, a clean stop: 0.
    Ok(signals::exit_code(caught.load(Ordering::SeqCst)).unwrap_or(ExitCode::SUCCESS))
}
