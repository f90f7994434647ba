//! `splitvmm`: the toolstack, in the style of Xen's `xl`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};

use control_vmm::cli::{Cli, Command};
use control_vmm::{console, listing, store_cmd, toolstack, up, xs};
use ipc::control::messages::ToolstackRequest;

fn main() -> ExitCode {
    ipc::startup::restore_sigpipe();
    ipc::startup::init_logging("splitvmm", "warn");
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("splitvmm: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let host = cli.host;
    let ask = |request| toolstack::request(&host.toolstack(), request);
    match cli.command {
        Command::Store { socket } => store_cmd::run(&socket),
        Command::Up {
            config,
            stay,
            check,
        } => up::run(&config, stay, check, host.explicit_run_dir()),
        Command::Create { file } => {
            let file = std::path::absolute(&file)
                .with_context(|| format!("locating {}", file.display()))?;
            ask(ToolstackRequest::Create {
                file: file.display().to_string(),
            })
        }
        Command::Shutdown { domain } => ask(ToolstackRequest::Shutdown { guest: domain }),
        Command::Reboot { domain } => ask(ToolstackRequest::Reboot { guest: domain }),
        // With a toolstack running, it stops the domain's process too; with a bare store,
        // only the store's view of the domain goes.
        Command::Destroy { domain } if toolstack::is_running(&host.toolstack()) => {
            ask(ToolstackRequest::Destroy { guest: domain })
        }
        Command::Destroy { domain } => xs::destroy_domain(&host.store(), &domain),
        Command::BlockAttach {
            guest,
            image,
            devid,
            readonly,
            size_mib,
            scratch,
            queues,
        } => {
            let image = std::path::absolute(&image).unwrap_or(image);
            ask(ToolstackRequest::BlockAttach {
                guest,
                image: image.display().to_string(),
                devid: devid.0,
                readonly,
                size_mib,
                scratch,
                queues,
            })
        }
        Command::BlockDetach { guest, devid } => ask(ToolstackRequest::BlockDetach {
            guest,
            devid: devid.0,
        }),
        Command::NetworkAttach {
            guest,
            devid,
            mac,
            ip,
        } => ask(ToolstackRequest::NetworkAttach {
            guest,
            devid,
            mac,
            ip,
        }),
        Command::NetworkDetach { guest, devid } => {
            ask(ToolstackRequest::NetworkDetach { guest, devid })
        }
        Command::NetPing {
            guest,
            devid,
            peer,
            rounds,
        } => ask(ToolstackRequest::NetPing {
            guest,
            devid,
            peer: peer.octets(),
            rounds,
        }),
        Command::DiskCheck {
            guest,
            devid,
            seed,
            verify_only,
        } => ask(ToolstackRequest::DiskCheck {
            guest,
            devid: devid.0,
            seed,
            verify_only,
        }),
        Command::List { json } => listing::list(&host.store(), json.json),
        Command::Top {
            interval,
            rounds,
            json,
        } => listing::top(
            &host.store(),
            std::time::Duration::from_secs(interval),
            rounds,
            json.json,
        ),
        Command::BlockList { domain, json } => {
            listing::list_devices_of(&host.store(), &domain, "vbd", json.json)
        }
        Command::NetworkList { domain, json } => {
            listing::list_devices_of(&host.store(), &domain, "vif", json.json)
        }
        Command::Console { domain, no_follow } => {
            console::show(&host.run_dir(), &domain, !no_follow)
        }
        Command::Devices => xs::list_devices(&host.store()),
        Command::PciList => xs::list_pci(&host.store()),
        Command::PciDetach { guest, index } => ask(ToolstackRequest::PciDetach { guest, index }),
        Command::Xs { op } => xs::run(&host.store(), op),
        Command::BenchApproaches(args) => Ok(bench_approaches(args)),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "splitvmm", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let cmd = Cli::command();
            match dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, &dir)
                        .with_context(|| format!("writing man pages into {}", dir.display()))?;
                }
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `splitvmm bench-approaches`: the table on stdout; 3 when the host lacks what it needs.
fn bench_approaches(a: control_vmm::cli::BenchArgs) -> ExitCode {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default();
    let l2_bench = a.l2_bench.unwrap_or_else(|| {
        let sibling = bin_dir.join("l2-bench");
        if sibling.is_file() {
            sibling
        } else {
            "/bin/l2-bench".into()
        }
    });
    let settings = control_vmm::bench::Settings {
        kernel: a.kernel,
        initrd: a.initrd,
        store: a.store,
        vf: a.vf,
        rows: a.rows,
        seconds: a.seconds,
        mem_mib: a.mem_mib,
        l2_bench,
        work_dir: a
            .work_dir
            .unwrap_or_else(|| std::env::temp_dir().join("splitvmm-bench")),
        row_timeout: std::time::Duration::from_secs(a.row_timeout_s),
        guest_args: a.guest_args,
        bin_dir,
        exit_reason_hist: a.exit_reason_hist,
    };
    match control_vmm::bench::run(&settings) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("splitvmm: bench-approaches: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
