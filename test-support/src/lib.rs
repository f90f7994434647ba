//! For tests only: which peers this machine has ([`peers`], one function per peer), and
//! [`skip`], which records a test that could not run.
//!
//! A test that needs a peer asks for it once, at the top:
//!
//! ```no_run
//! # fn my_test() {
//! if !test_support::require("my_test", test_support::peers::xenstore_utils()) {
//!     return;
//! }
//! # }
//! ```
//!
//! A skipped test still passes in cargo's eyes; [`skip`] therefore prints a line cargo does
//! not capture and leaves a marker file in [`skip_dir`], which `./run-tests` counts and lists
//! ("N passed, M failed, K skipped") and CI (`.ci/run`) holds against its allowlist.
//!
//! This crate depends on no workspace crate, so any of them can take it as a dev-dependency
//! without a cycle.

pub mod peers;

use std::io::Write;
use std::path::PathBuf;

/// The environment variable naming the directory skip markers go to.
pub const SKIP_DIR_ENV: &str = "SPLITVMM_SKIP_DIR";

/// Where skip markers go: `$SPLITVMM_SKIP_DIR`, or `<target>/test-skips` next to the running
/// test binary (`<target>/<profile>/deps/<binary>`).
pub fn skip_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(SKIP_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|t| t.join("test-skips")))
        .unwrap_or_else(|| std::env::temp_dir().join("splitvmm-test-skips"))
}

/// The running test binary's name without cargo's hash suffix (`store_interop`).
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem,
    }
}

/// The name of the running test (`module::test`): libtest runs each test on a thread named
/// after it. For helpers shared by several tests, which would otherwise need the name passed.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed-test")
        .to_owned()
}

/// Records that `test` did not run because of `reason`: one line on stderr (written to the
/// handle, which libtest does not capture) and a marker file `<binary>.<test>` in
/// [`skip_dir`] holding `<binary>::<test>: <reason>`. A marker that cannot be written fails
/// the test: an unrecorded skip is what this crate exists to prevent.
pub fn skip(test: &str, reason: &str) {
    let name = format!("{}::{test}", binary_name());
    let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {reason}");
    let dir = skip_dir();
    let file: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '.'
            }
        })
        .collect();
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(file), format!("{name}: {reason}\n")));
    if let Err(e) = written {
        panic!("cannot record the skip of {name} in {}: {e}", dir.display());
    }
}

/// `Some(value)` if `peer` is there; otherwise records the skip of `test` and gives `None`.
pub fn require_value<T>(test: &str, peer: Result<T, String>) -> Option<T> {
    match peer {
        Ok(value) => Some(value),
        Err(reason) => {
            skip(test, &reason);
            None
        }
    }
}

/// True if `peer` is there; otherwise records the skip of `test` and gives false.
pub fn require<T>(test: &str, peer: Result<T, String>) -> bool {
    require_value(test, peer).is_some()
}
