//! Helpers shared by the driver-domain integration tests: running `driver-domain serve` as a
//! child process that is always killed, and waiting for its socket.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "backend socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        BackendProcess { child, socket }
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
