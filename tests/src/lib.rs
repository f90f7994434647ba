//! Helpers for end-to-end tests and benchmarks.

pub mod backends;
pub mod bench_stats;
pub mod running;
pub mod toolstack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The workspace's root folder (the repository checkout).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace root")
        .to_path_buf()
}

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

/// Judges a process guest's disk check from the host: the first `bytes` of `image` hold the
/// pattern it writes for `seed` (`guest_frontend::managed::pattern_byte`), and the rest of
/// the image, which starts zeroed in these tests, is still zero.
pub fn assert_process_guest_pattern(image: &Path, seed: u64, bytes: u64) {
    let data = std::fs::read(image)
        .unwrap_or_else(|e| panic!("reading {} from the host: {e}", image.display()));
    let bytes = usize::try_from(bytes).expect("check size");
    assert!(data.len() >= bytes, "{} is too short", image.display());
    if let Some(at) =
        (0..bytes).find(|&i| data[i] != guest_frontend::managed::pattern_byte(seed, i as u64))
    {
        panic!(
            "{}: byte {at} is not the pattern for seed {seed:#x}",
            image.display()
        );
    }
    if let Some(at) = data[bytes..].iter().position(|&b| b != 0) {
        panic!(
            "{}: byte {} beyond the checked {bytes} was written",
            image.display(),
            bytes + at
        );
    }
}

/// A `splitvmm up --stay` that is stopped (SIGTERM, then SIGKILL after 20 s) if the test
/// fails half-way, so no host outlives it.
pub struct UpStay(pub Child);

impl Drop for UpStay {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            wait_for(&mut self.0, Duration::from_secs(20));
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits up to `timeout` for `child` to exit; true if it did.
pub fn wait_for(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A xorshift64 generator: reproducible pseudo-random offsets and sizes for tests and
/// benchmarks (not for anything that needs real randomness). The seed must not be 0.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
