//! `process-guest`: a guest domain that is a host process, as `splitvmm up` starts it.

use std::process::ExitCode;

use clap::Parser;
use guest_frontend::managed::{ManagedGuest, ProcessFrontends};

#[derive(Parser)]
#[command(
    about = "A process-domain guest (started by `splitvmm up`, with its store connection \
                   on fd 3 and its control channel on fd 4)"
)]
struct Args {
    #[arg(long)]
    domid: u32,
    #[arg(long)]
    name: String,
    /// Confine this process as a process guest is confined, then try these (tests judge the
    /// confinement with it): open:PATH, connect:PATH, mem:PID, process-vm-readv:PID,
    /// forbidden-syscall.
    #[arg(long, hide = true, num_args = 1..)]
    confinement_probe: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    ipc::startup::init_logging(&format!("{}[{}]", args.name, args.domid), "warn");
    if !args.confinement_probe.is_empty() {
        let code = confine::probe::main(confine::Profile::ProcessGuest, &args.confinement_probe);
        return ExitCode::from(u8::try_from(code).unwrap_or(2));
    }
    if let Err(e) = ipc::startup::check_inherited_fds() {
        eprintln!("{}", ipc::startup::not_managed_message("process-guest", &e));
        return ExitCode::from(ipc::startup::EXIT_NOT_MANAGED);
    }
    // It holds every descriptor it needs (fds 3 and 4): confine it before it touches any
    // guest data (the toolstack's plan is in the environment).
    if let Err(e) = confine::enter_if_planned(confine::Profile::ProcessGuest, &[]) {
        eprintln!("process-guest: cannot be confined: {e}");
        return ExitCode::FAILURE;
    }
    // SAFETY: fds 3 and 4 were just checked to be the sockets `splitvmm up` hands this
    // program, and nothing else in this process uses them.
    let guest =
        unsafe { ManagedGuest::from_inherited_fds(args.domid, ProcessFrontends::default()) };
    match guest.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("process-guest {}: {e}", args.domid);
            ExitCode::FAILURE
        }
    }
}
