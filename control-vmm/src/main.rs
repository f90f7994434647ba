//! `splitvmm`: the toolstack, in the style of Xen's `xl`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use control_vmm::{store_cmd, up, xs};

#[derive(Parser)]
#[command(
    name = "splitvmm",
    version,
    about = "Toolstack of a Xen-style driver-domain split I/O stack on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the xenstore-compatible store standalone; PATH is the privileged (dom0) socket.
    Store {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Bring up a host described in a TOML file: the store, the driver domain, the guests.
    Up { config: PathBuf },
    /// List the domains the store knows.
    List {
        #[command(flatten)]
        store: xs::StoreArg,
    },
    /// Destroy a domain: release it in the store and remove its directory.
    Destroy {
        #[command(flatten)]
        store: xs::StoreArg,
        /// Domain name or id.
        domain: String,
    },
    /// Read and change the store, like xenstore-read/-write/-ls/-rm/-watch.
    Xs {
        #[command(flatten)]
        store: xs::StoreArg,
        #[command(subcommand)]
        op: xs::XsOp,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Store { socket } => store_cmd::run(&socket),
        Command::Up { config } => up::run(&config),
        Command::List { store } => xs::list_domains(&store.path()),
        Command::Destroy { store, domain } => xs::destroy_domain(&store.path(), &domain),
        Command::Xs { store, op } => xs::run(&store.path(), op),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("splitvmm: {err:#}");
            ExitCode::FAILURE
        }
    }
}
