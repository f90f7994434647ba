//! Helpers shared by the driver-domain integration tests: running `driver-domain serve` as a
//! child process that is always killed, and waiting for its socket.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod blk_rig;

/// A `driver-domain serve` child process, killed on drop.
pub struct BackendProcess {
    pub child: Child,
    pub socket: PathBuf,
}

impl BackendProcess {
    /// Start `driver-domain serve --socket <dir>/blk.sock <args>` and wait for the socket.
    pub fn start(dir: &Path, args: &[&str]) -> BackendProcess {
        Self::start_logging(dir, args, Stdio::inherit())
    }

    /// As [`BackendProcess::start`], its log (stderr) going to `log`.
    pub fn start_logging(dir: &Path, args: &[&str], log: impl Into<Stdio>) -> BackendProcess {
        let socket = dir.join("blk.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_driver-domain"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut process = BackendProcess { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process.socket.exists() {
            let ended = process.child.try_wait().unwrap();
            if ended.is_some() || Instant::now() >= deadline {
                panic!(
                    "backend socket never appeared (backend {}){}",
                    ended.map_or("still running".to_owned(), |s| s.to_string()),
                    logs_in(dir)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    /// The backend process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

/// The `*.log` files in `dir`, for a failure message.
pub fn logs_in(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!("\n--- {}\n{text}", path.display()));
        }
    }
    out
}
