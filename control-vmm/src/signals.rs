//! Termination signals as events: SIGINT, SIGTERM and SIGHUP are blocked in every thread and
//! collected by one thread with `sigwait`, so shutdown runs as ordinary code (reaping children,
//! removing sockets) instead of inside a signal handler.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Errors of signal setup.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("blocking termination signals")]
    Mask(#[source] nix::Error),
    #[error("starting the signal thread")]
    Thread(#[source] std::io::Error),
}

/// The termination signals the toolstack blocks and a child gets unblocked.
pub fn termination_sigset() -> SigSet {
    termination_signals()
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks the termination signals in the calling thread (and so in every thread it starts
/// afterwards) and runs `on_signal` on a dedicated thread for each one that arrives.
///
/// Call it before starting other threads. Child processes inherit the blocked mask, so
/// [`unblock_in_child`] must run between fork and exec.
pub fn handle_termination<F>(on_signal: F) -> Result<(), SignalError>
where
    F: FnMut(Signal) + Send + 'static,
{
    wait_on(termination_signals(), "signals", on_signal)
}

/// Blocks SIGUSR1 as [`handle_termination`] does its signals and runs `on_press` on a
/// dedicated thread each time it arrives: `splitvmm-vmm --linux` presses the guest's ACPI power
/// button.
pub fn handle_power_button<F>(mut on_press: F) -> Result<(), SignalError>
where
    F: FnMut() + Send + 'static,
{
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    wait_on(set, "power-button", move |_| on_press())
}

fn wait_on<F>(set: SigSet, name: &str, mut on_signal: F) -> Result<(), SignalError>
where
    F: FnMut(Signal) + Send + 'static,
{
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(SignalError::Mask)?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            match set.wait() {
                Ok(signal) => on_signal(signal),
                Err(e) => {
                    log::error!("sigwait failed: {e}");
                    return;
                }
            }
        })
        .map_err(SignalError::Thread)?;
    Ok(())
}

/// Restores the default mask; for use in `Command::pre_exec`, where only async-signal-safe
/// calls are allowed (sigprocmask is).
pub fn unblock_in_child() -> std::io::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&termination_signals()), None)
        .map_err(std::io::Error::from)
}

/// The exit status of a program that shut down in order after termination signal `signal`
/// (0 if none came), or `None` to report how the work went: SIGINT (Ctrl-C) and SIGHUP give
/// 128 + their number (130, 129), as a shell reports a program they ended; SIGTERM is how a
/// service manager or a script stops a daemon, and an orderly stop on request is a success.
pub fn exit_code(signal: i32) -> Option<std::process::ExitCode> {
    match signal {
        libc::SIGINT | libc::SIGHUP => Some(std::process::ExitCode::from(
            u8::try_from(128 + signal).unwrap_or(1),
        )),
        _ => None,
    }
}
