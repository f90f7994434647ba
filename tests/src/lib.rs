//! Helpers for end-to-end tests and benchmarks.

pub mod running_host;

use std::path::PathBuf;
use std::process::Command;

/// The path of a workspace binary, building it first if it is missing (integration tests of
/// one package cannot ask cargo for another package's binaries).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory layout");
    let path = profile_dir.join(name);
    if !path.exists() {
        eprintln!("{} missing: building it", path.display());
        let status = Command::new(env!("CARGO"))
            .args(["build", "--workspace", "--bins"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}
