//! How a command finds the running host: one run directory holds the store's socket
//! (`xenstored.sock`), the toolstack's management socket (`toolstack.sock`) and the domains'
//! logs (`logs/<name>.log`).
//!
//! The run directory is `--run-dir DIR`, else `$SPLITVMM_RUN_DIR`, else `<tmp>/splitvmm`
//! (where `splitvmm up` puts it when the host file sets no `run_dir`). `--store PATH` names
//! the store's socket directly, for a store started alone with `splitvmm store` (or through
//! `$SPLITVMM_STORE` or Xen's `$XENSTORED_PATH`); given a directory it means `--run-dir`.
//! A command that cannot reach what it needs says what to pass.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

/// The store socket's name in a run directory.
pub const STORE_SOCKET: &str = "xenstored.sock";
/// The management socket's name in a run directory.
pub const TOOLSTACK_SOCKET: &str = "toolstack.sock";
/// The environment variable naming the run directory.
pub const RUN_DIR_ENV: &str = "SPLITVMM_RUN_DIR";

/// The run directory when nothing names one.
pub fn default_run_dir() -> PathBuf {
    std::env::temp_dir().join("splitvmm")
}

/// Where the running host is, for commands that talk to it.
#[derive(Args, Debug, Clone, Default)]
pub struct HostArg {
    /// The running host's run directory (its host file's `run_dir`)
    /// [default: $SPLITVMM_RUN_DIR, else <tmp>/splitvmm].
    #[arg(long, value_name = "DIR", global = true)]
    run_dir: Option<PathBuf>,
    /// The store's socket, for a store started with `splitvmm store`
    /// [default: <run-dir>/xenstored.sock; $SPLITVMM_STORE, $XENSTORED_PATH when no run
    /// directory is given].
    #[arg(long = "store", value_name = "PATH", global = true)]
    store: Option<PathBuf>,
}

impl HostArg {
    /// A location naming `run_dir`.
    pub fn in_run_dir(run_dir: PathBuf) -> HostArg {
        HostArg {
            run_dir: Some(run_dir),
            store: None,
        }
    }

    /// The run directory: given, or the store socket's directory, or the default.
    pub fn run_dir(&self) -> PathBuf {
        if let Some(dir) = self.given_run_dir() {
            return dir;
        }
        match self.store_override() {
            Some(store) => store
                .parent()
                .map_or_else(default_run_dir, Path::to_path_buf),
            None => default_run_dir(),
        }
    }

    /// The run directory given by `--run-dir` or `$SPLITVMM_RUN_DIR`, if any: `splitvmm up`
    /// puts its host there instead of the host file's `run_dir`.
    pub fn explicit_run_dir(&self) -> Option<PathBuf> {
        self.run_dir
            .clone()
            .or_else(|| std::env::var_os(RUN_DIR_ENV).map(PathBuf::from))
    }

    fn given_run_dir(&self) -> Option<PathBuf> {
        self.run_dir
            .clone()
            .or_else(|| self.store.clone().filter(|s| s.is_dir()))
            .or_else(|| std::env::var_os(RUN_DIR_ENV).map(PathBuf::from))
    }

    fn store_override(&self) -> Option<PathBuf> {
        self.store.clone().filter(|s| !s.is_dir()).or_else(|| {
            if self.run_dir.is_some() || std::env::var_os(RUN_DIR_ENV).is_some() {
                return None;
            }
            std::env::var_os("SPLITVMM_STORE")
                .or_else(|| std::env::var_os("XENSTORED_PATH"))
                .map(PathBuf::from)
        })
    }

    /// The store's privileged socket.
    pub fn store(&self) -> PathBuf {
        match (
            self.store.clone().filter(|s| !s.is_dir()),
            self.given_run_dir(),
        ) {
            (Some(store), _) => store,
            (None, Some(dir)) => dir.join(STORE_SOCKET),
            (None, None) => self
                .store_override()
                .unwrap_or_else(|| default_run_dir().join(STORE_SOCKET)),
        }
    }

    /// The toolstack's management socket: next to the store's.
    pub fn toolstack(&self) -> PathBuf {
        self.store().with_file_name(TOOLSTACK_SOCKET)
    }
}

/// What to pass to reach a host whose run directory is `dir`.
fn hint(dir: &Path) -> String {
    format!(
        "pass --run-dir {} (or set ${RUN_DIR_ENV}) for a host started with `splitvmm up`, or \
         --store {} for a store started with `splitvmm store`",
        dir.display(),
        dir.join(STORE_SOCKET).display()
    )
}

/// Checks that `socket` is a store's socket, with an error saying what to pass if not.
pub fn check_store(socket: &Path) -> Result<()> {
    match UnixStream::connect(socket) {
        Ok(_) => Ok(()),
        // A stream connect to a seqpacket listener: the management socket.
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {
            let dir = socket.parent().unwrap_or(Path::new("."));
            bail!(
                "{} is not a store socket (it is the toolstack's management socket, which \
                 `splitvmm up` prints); {}",
                socket.display(),
                hint(dir)
            )
        }
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            bail!(
                "no store at {}: is a host running? Start one with `splitvmm up HOST.toml \
                 --stay`; if its host file sets run_dir, {}",
                socket.display(),
                hint(Path::new("RUN_DIR"))
            )
        }
        Err(e) => bail!("cannot reach the store at {}: {e}", socket.display()),
    }
}

/// The error for a management request nobody answers at `socket`.
pub fn no_toolstack(socket: &Path) -> anyhow::Error {
    let store = socket.with_file_name(STORE_SOCKET);
    if UnixStream::connect(&store).is_ok() {
        anyhow::anyhow!(
            "the store at {} runs, but no toolstack manages it (a standalone `splitvmm store`, \
             or `splitvmm up` without --stay): this command needs `splitvmm up HOST.toml --stay`",
            store.display()
        )
    } else {
        anyhow::anyhow!(
            "no running toolstack at {} (start one with `splitvmm up HOST.toml --stay`; if \
             its host file sets run_dir, {})",
            socket.display(),
            hint(Path::new("RUN_DIR"))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_names_both_sockets() {
        let at = HostArg::in_run_dir(PathBuf::from("/r"));
        assert_eq!(at.store(), Path::new("/r/xenstored.sock"));
        assert_eq!(at.toolstack(), Path::new("/r/toolstack.sock"));
        let store = HostArg {
            run_dir: None,
            store: Some(PathBuf::from("/s/xs.sock")),
        };
        assert_eq!(store.store(), Path::new("/s/xs.sock"));
        assert_eq!(store.toolstack(), Path::new("/s/toolstack.sock"));
        assert_eq!(store.run_dir(), Path::new("/s"));
    }

    #[test]
    fn the_management_socket_is_not_taken_for_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(TOOLSTACK_SOCKET);
        let _listener = ipc::control::ControlListener::bind(&socket).unwrap();
        let err = check_store(&socket).unwrap_err().to_string();
        assert!(err.contains("management socket"), "{err}");
        assert!(
            err.contains(&format!("--run-dir {}", dir.path().display())),
            "{err}"
        );
        let missing = check_store(&dir.path().join("nothing.sock")).unwrap_err();
        assert!(missing.to_string().contains("no store at"), "{missing}");
    }
}
