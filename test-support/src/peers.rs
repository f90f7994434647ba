//! One function per peer a test may need, deciding whether this machine has it. Each returns
//! what the test needs to use it, or the reason it is missing (with the Debian package that
//! provides it). Programs are looked up on `PATH`, so hiding a directory from `PATH` hides
//! the peer (see [`path_without`]).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The first `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `PATH` without the directories that hold `name`: the machine as it would be without that
/// program's package (the fresh-machine case of a test that needs it).
pub fn path_without(name: &str) -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|dir| !dir.join(name).is_file())
        .collect();
    std::env::join_paths(kept).unwrap_or_default()
}

fn program(name: &str, package: &str) -> Result<PathBuf, String> {
    on_path(name).ok_or_else(|| format!("{name} not found on PATH (Debian package {package})"))
}

/// True if `program --version` runs and succeeds.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Xen's store clients (`xenstore-read`, `-write`, `-ls`, ...), from xenstore-utils.
pub fn xenstore_utils() -> Result<(), String> {
    program("xenstore-read", "xenstore-utils").map(drop)
}

/// A usable /dev/kvm (opened read-write).
pub fn kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not usable ({e})"))
}

/// DPDK's `dpdk-testpmd` (Debian package dpdk-dev).
pub fn dpdk_testpmd() -> Result<(), String> {
    program("dpdk-testpmd", "dpdk-dev").map(drop)
}

/// The qemu-storage-daemon to run: `$SPLITVMM_QSD` (a path or a name on `PATH`; a name that
/// does not exist checks the skip path) or `qemu-storage-daemon`.
pub fn qemu_storage_daemon() -> Result<String, String> {
    qemu_storage_daemon_named(
        &std::env::var("SPLITVMM_QSD").unwrap_or_else(|_| "qemu-storage-daemon".into()),
    )
}

/// The qemu-storage-daemon `qsd` (a path or a name on `PATH`), if it runs.
pub fn qemu_storage_daemon_named(qsd: &str) -> Result<String, String> {
    if runs(qsd) {
        Ok(qsd.to_owned())
    } else {
        Err(format!(
            "{qsd} does not run (Debian package qemu-system-common provides \
             /usr/bin/qemu-storage-daemon)"
        ))
    }
}

/// `qemu-system-x86_64` (Debian package qemu-system-x86).
pub fn qemu_system_x86() -> Result<PathBuf, String> {
    program("qemu-system-x86_64", "qemu-system-x86")
}

/// A busybox to put in an initramfs (Debian package busybox-static).
pub fn busybox() -> Result<PathBuf, String> {
    program("busybox", "busybox-static")
}

/// What creating a tap in a network namespace needs: root, /dev/net/tun and `ip`.
pub fn netns_tap() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces and taps need it)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    program("ip", "iproute2").map(drop)
}
