//! Shared by the `vmm_*` tests: KVM detection, building the tiny kernel, and running
//! `splitvmm-vmm` with a deadline (their driver domain is `splitvmm_tests::backends`').

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use splitvmm_tests::workspace_root;
use std::time::{Duration, Instant};

/// True if /dev/kvm can be opened; otherwise records the skip of `test`.
pub fn kvm_or_skip(test: &str) -> bool {
    test_support::require(test, test_support::peers::kvm())
}

fn target_root() -> PathBuf {
    // target/<profile>/deps/<test>
    std::env::current_exe()
        .expect("test executable")
        .ancestors()
        .nth(3)
        .expect("target directory")
        .to_path_buf()
}

/// The kernel is built for the host target, named explicitly so that the flags below apply
/// to the kernel only and not to its build script.
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Flags for the freestanding kernel (same as guest-frontend/tiny-kernel/build.sh).
const KERNEL_RUSTFLAGS: &[&str] = &[
    "-C",
    "no-redzone=yes",
    "-C",
    "relocation-model=static",
    "-C",
    "code-model=small",
    "-C",
    "target-cpu=x86-64",
    "-C",
    "target-feature=-sse,-sse2,-avx,-avx2",
];

/// Builds the tiny kernel (once per test binary) into target/tiny-kernel and returns its path.
pub fn tiny_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let dir = workspace_root().join("guest-frontend/tiny-kernel");
            let target = target_root().join("tiny-kernel");
            let out = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--release",
                    "--offline",
                    "--quiet",
                    "--target",
                    HOST_TARGET,
                ])
                .current_dir(&dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_BUILD_RUSTFLAGS")
                .env("CARGO_ENCODED_RUSTFLAGS", KERNEL_RUSTFLAGS.join("\u{1f}"))
                .env("CARGO_TARGET_DIR", &target)
                .output()
                .expect("running cargo for the tiny kernel");
            assert!(
                out.status.success(),
                "building the tiny kernel failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = target.join(HOST_TARGET).join("release/tiny-kernel");
            assert!(path.exists(), "{} missing after build", path.display());
            path
        })
        .clone()
}

/// What a VMM run printed and how it ended.
#[derive(Debug)]
pub struct VmmRun {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub console: String,
    pub log: String,
}

impl VmmRun {
    /// A `key=value` from the report line starting with `prefix`.
    pub fn field(&self, prefix: &str, key: &str) -> Option<f64> {
        let line = self.log.lines().find(|l| l.starts_with(prefix))?;
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    }

    /// The I/O-phase column of the exit table for `counter`.
    pub fn io_count(&self, counter: &str) -> u64 {
        self.log
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(counter))
                    .then(|| w.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
            .unwrap_or(0)
    }
}

pub fn spawn_vmm(args: &[&str]) -> Child {
    Command::new(splitvmm_tests::workspace_bin("splitvmm-vmm"))
        .arg("--kernel")
        .arg(tiny_kernel())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning splitvmm-vmm")
}

/// Waits for `child` up to `limit` (killing it after), collecting its output.
pub fn finish(child: Child, limit: Duration) -> VmmRun {
    finish_signalled(child, limit, None)
}

/// As [`finish`], but sends SIGTERM to the VMM once its console shows `text` (the guest is
/// provably running then); fails if it never does.
pub fn terminate_when_console_shows(child: Child, text: &str, limit: Duration) -> VmmRun {
    finish_signalled(child, limit, Some(text))
}

fn finish_signalled(mut child: Child, limit: Duration, mut sigterm_on: Option<&str>) -> VmmRun {
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let out = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut console = Vec::new();
    let deadline = Instant::now() + limit;
    let status = loop {
        console.extend(rx.try_iter().flatten());
        if let Some(text) = sigterm_on {
            if String::from_utf8_lossy(&console).contains(text) {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                sigterm_on = None;
            }
        }
        if let Some(st) = child.try_wait().expect("waiting for splitvmm-vmm") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "splitvmm-vmm did not finish within {limit:?}{}",
                sigterm_on.map_or(String::new(), |t| format!(" (console never showed {t:?})"))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = out.join();
    console.extend(rx.try_iter().flatten());
    assert!(
        sigterm_on.is_none(),
        "the VMM exited before its console showed {sigterm_on:?}"
    );
    let run = VmmRun {
        code: status.code(),
        signal: status.signal(),
        console: String::from_utf8_lossy(&console).into_owned(),
        log: err.join().unwrap_or_default(),
    };
    eprintln!(
        "--- guest console ---\n{}--- vmm ---\n{}",
        run.console, run.log
    );
    run
}

/// Runs the VMM to completion (20 s limit).
pub fn run_vmm(args: &[&str]) -> VmmRun {
    finish(spawn_vmm(args), Duration::from_secs(20))
}

/// Word `i` of sector `s` of the tiny kernel's disk pattern for `seed` (standalone runs use
/// seed 0).
pub fn pattern(seed: u64, sector: u64, i: u64) -> u64 {
    sector.wrapping_mul(0x1_0000_0001) ^ i.wrapping_mul(0x9e37_79b9) ^ 0x5356_4d4d ^ seed
}

/// Checks that sectors `0..sectors` of `image` hold the pattern for `seed`.
pub fn assert_pattern(image: &[u8], seed: u64, sectors: u64) {
    for s in 0..sectors {
        for i in 0..64u64 {
            let off = (s * 512 + i * 8) as usize;
            let word = u64::from_le_bytes(image[off..off + 8].try_into().expect("8 bytes"));
            assert_eq!(word, pattern(seed, s, i), "sector {s} word {i}");
        }
    }
}
