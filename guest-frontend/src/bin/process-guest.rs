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
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .format(move |buf, record| {
            use std::io::Write;
            writeln!(buf, "{} {}: {}", record.level(), args.name, record.args())
        })
        .init();
    // SAFETY: `splitvmm up` starts this program with fds 3 and 4 set up and nothing else
    // in this process uses them.
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
