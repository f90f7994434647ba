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
}

fn main() -> ExitCode {
    ipc::startup::restore_sigpipe();
    let args = Args::parse();
    ipc::startup::init_logging(&format!("{}[{}]", args.name, args.domid), "warn");
    if let Err(e) = ipc::startup::check_inherited_fds() {
        eprintln!("{}", ipc::startup::not_managed_message("process-guest", &e));
        return ExitCode::from(ipc::startup::EXIT_NOT_MANAGED);
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
