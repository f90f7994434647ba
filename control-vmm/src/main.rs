//! `splitvmm`: the toolstack, in the style of Xen's `xl`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use control_vmm::{console, store_cmd, toolstack, up, xs};
use ipc::control::messages::ToolstackRequest;

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
    /// Bring up a host described in a TOML file: the store, the driver domain, the guests;
    /// attach their devices and run the checks the file's [checks] asks for.
    Up {
        config: PathBuf,
        /// Keep the host up after the checks, for `block-attach`/`block-detach`, until
        /// SIGINT or SIGTERM.
        #[arg(long)]
        stay: bool,
        /// Run every check (disk, ping, replug) whatever [checks] says. Disk checks write
        /// only to scratch images.
        #[arg(long)]
        check: bool,
    },
    /// Attach a disk image to a guest of a running `splitvmm up --stay`.
    BlockAttach {
        #[command(flatten)]
        store: xs::StoreArg,
        guest: String,
        image: PathBuf,
        /// Xen virtual device number (51712 is xvda, 51728 xvdb).
        #[arg(long, default_value_t = 51728)]
        devid: u32,
        #[arg(long)]
        readonly: bool,
        /// Create (or grow) the image to this many MiB. An image created so is scratch.
        #[arg(long)]
        size_mib: Option<u64>,
        /// The image holds nothing anyone needs: `disk-check` may write to it.
        #[arg(long)]
        scratch: bool,
    },
    /// Detach a disk from a guest of a running `splitvmm up --stay`.
    BlockDetach {
        #[command(flatten)]
        store: xs::StoreArg,
        guest: String,
        devid: u32,
    },
    /// Attach a network interface (a port of the driver domain's switch) to a guest of a
    /// running `splitvmm up --stay`.
    NetworkAttach {
        #[command(flatten)]
        store: xs::StoreArg,
        guest: String,
        #[arg(long, default_value_t = 0)]
        devid: u32,
        /// MAC address [default: 02:00:00:<domid>:<devid>].
        #[arg(long)]
        mac: Option<String>,
        /// IPv4 address on the host's internal switch [default: 10.0.0.<domid>].
        #[arg(long)]
        ip: Option<String>,
    },
    /// Detach a network interface from a guest of a running `splitvmm up --stay`.
    NetworkDetach {
        #[command(flatten)]
        store: xs::StoreArg,
        guest: String,
        devid: u32,
    },
    /// Have a guest resolve PEER (ARP) and exchange UDP echoes with it.
    NetPing {
        #[command(flatten)]
        store: xs::StoreArg,
        guest: String,
        devid: u32,
        peer: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 20)]
        rounds: u32,
    },
    /// Have a guest write and verify (or only verify) a pattern on one of its disks. Writing
    /// is refused unless the image is scratch.
    DiskCheck {
        #[command(flatten)]
        store: xs::StoreArg,
        guest: String,
        devid: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        verify_only: bool,
    },
    /// List the domains the store knows.
    List {
        #[command(flatten)]
        store: xs::StoreArg,
    },
    /// `list`, refreshed every second, until Ctrl-C.
    Top {
        #[command(flatten)]
        store: xs::StoreArg,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1)]
        interval: u64,
        /// Stop after this many refreshes.
        #[arg(short = 'n', long)]
        rounds: Option<u64>,
    },
    /// Show a domain's console log (a KVM guest's serial console), following it.
    Console {
        #[command(flatten)]
        store: xs::StoreArg,
        /// Domain name.
        domain: String,
        /// Print what is there and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// List the PCI functions driver domains own, as they reported them.
    Devices {
        #[command(flatten)]
        store: xs::StoreArg,
    },
    /// Destroy a domain: with `splitvmm up --stay` running, stop its process and tear its
    /// devices down; always remove its store directories and release it.
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Store { socket } => store_cmd::run(&socket),
        Command::Up {
            config,
            stay,
            check,
        } => up::run(&config, stay, check),
        Command::BlockAttach {
            store,
            guest,
            image,
            devid,
            readonly,
            size_mib,
            scratch,
        } => {
            let image = std::path::absolute(&image).unwrap_or(image);
            toolstack::request(
                &store.path(),
                ToolstackRequest::BlockAttach {
                    guest,
                    image: image.display().to_string(),
                    devid,
                    readonly,
                    size_mib,
                    scratch,
                },
            )
        }
        Command::BlockDetach {
            store,
            guest,
            devid,
        } => toolstack::request(
            &store.path(),
            ToolstackRequest::BlockDetach { guest, devid },
        ),
        Command::NetworkAttach {
            store,
            guest,
            devid,
            mac,
            ip,
        } => toolstack::request(
            &store.path(),
            ToolstackRequest::NetworkAttach {
                guest,
                devid,
                mac,
                ip,
            },
        ),
        Command::NetworkDetach {
            store,
            guest,
            devid,
        } => toolstack::request(
            &store.path(),
            ToolstackRequest::NetworkDetach { guest, devid },
        ),
        Command::NetPing {
            store,
            guest,
            devid,
            peer,
            rounds,
        } => toolstack::request(
            &store.path(),
            ToolstackRequest::NetPing {
                guest,
                devid,
                peer: peer.octets(),
                rounds,
            },
        ),
        Command::DiskCheck {
            store,
            guest,
            devid,
            seed,
            verify_only,
        } => toolstack::request(
            &store.path(),
            ToolstackRequest::DiskCheck {
                guest,
                devid,
                seed,
                verify_only,
            },
        ),
        Command::List { store } => xs::list_domains(&store.path()),
        Command::Devices { store } => xs::list_devices(&store.path()),
        Command::Top {
            store,
            interval,
            rounds,
        } => xs::top(
            &store.path(),
            std::time::Duration::from_secs(interval),
            rounds,
        ),
        Command::Console {
            store,
            domain,
            no_follow,
        } => console::show(&store.path(), &domain, !no_follow),
        // With a toolstack running, it stops the domain's process too; with a bare store,
        // only the store's view of the domain goes.
        Command::Destroy { store, domain } if toolstack::is_running(&store.path()) => {
            toolstack::request(&store.path(), ToolstackRequest::Destroy { guest: domain })
        }
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
