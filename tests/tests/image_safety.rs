//! A user's images are safe with `splitvmm up`: checks write only to scratch images, images
//! are locked as QEMU locks them (qemu-storage-daemon and splitvmm refuse each other's), and a
//! bad image fails at load or at `block-attach` at once, leaving nothing half-attached.
//! Every verdict is read from outside: the image bytes from the host, the store through the CLI.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure is the assertion

mod vmm_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use splitvmm_tests::running::{children_of, run, splitvmm, RunningHost};

const MIB: usize = 1 << 20;

/// A user's image: distinctive bytes throughout, with a marker at its start and its end.
fn user_image(path: &Path, size: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    bytes[..16].copy_from_slice(b"USER-MARK-START!");
    bytes[size - 16..].copy_from_slice(b"USER-MARK-END!!!");
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `out` is a failure saying `text` on stderr.
fn assert_refused(out: &std::process::Output, text: &str) {
    let err = stderr_of(out);
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(err.contains(text), "{err}");
}

/// A qemu-storage-daemon exporting `image` writable over vhost-user-blk, so it holds the
/// image's locks; killed when dropped.
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-storage-daemon exporting `image` writable on `socket`; None (the skip of `test`
/// recorded) if this machine has none.
fn qsd_command(test: &str, image: &Path, socket: &Path) -> Option<Command> {
    let qsd = test_support::require_value(test, test_support::peers::qemu_storage_daemon())?;
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={},locking=on",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Some(cmd)
}

/// Starts qemu-storage-daemon on `image` and waits until its export listens (its locks are
/// taken by then).
fn qsd_holding(test: &str, image: &Path, socket: &Path) -> Option<Qsd> {
    let qsd = Qsd(qsd_command(test, image, socket)?.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(qsd)
}

fn host_file(dir: &Path, checks: &str, disks: &str) -> PathBuf {
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"run\"\n{checks}\n\
             [driver_domain]\nname = \"driver\"\ndomid = 1\n\
             [[guest]]\nname = \"guest-a\"\ndomid = 2\n{disks}\n\
             [[guest]]\nname = \"guest-b\"\ndomid = 3\n\
             [[guest.disk]]\nimage = \"b.img\"\nsize_mib = 4\n"
        ),
    )
    .unwrap();
    config
}

#[test]
fn user_images_survive_checks_attach_detach_and_shutdown_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user.img");
    let extra = dir.path().join("extra.img");
    let (user_bytes, extra_bytes) = (user_image(&user, 4 * MIB), user_image(&extra, 2 * MIB));
    // Every check asked for; guest-a's disk is the user's, guest-b's is created as scratch.
    let config = host_file(
        dir.path(),
        "[checks]\ndisk = true\nping = true\nreplug = true",
        "[[guest.disk]]\nimage = \"user.img\"",
    );
    let mut host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    assert!(
        host.startup.contains("guest-a: vbd 51712 check skipped: ")
            && host.startup.contains("guest-b: vbd 51712 check passed"),
        "{}",
        host.startup
    );

    // Asked by hand, a writing check is refused; a read-only one is allowed to run.
    let out = host.cli(&["disk-check", "guest-a", "51712"]);
    assert_refused(&out, "not a scratch image");
    host.cli(&["disk-check", "guest-a", "51712", "--verify-only"]);

    // Another user image attached, refused a writing check, detached.
    let extra_arg = extra.to_str().unwrap();
    host.cli_ok(&["block-attach", "guest-a", extra_arg, "--devid", "51728"]);
    assert_refused(
        &host.cli(&["disk-check", "guest-a", "51728"]),
        "not a scratch image",
    );
    // The same image for another guest: refused, naming who holds it.
    let out = host.cli(&["block-attach", "guest-b", extra_arg, "--devid", "51728"]);
    assert_refused(&out, "guest-a's vbd 51728");
    host.cli_ok(&["block-detach", "guest-a", "51728"]);

    assert!(
        host.shut_down(Duration::from_secs(20)),
        "up ignored SIGTERM"
    );
    assert!(
        std::fs::read(&user).unwrap() == user_bytes,
        "user.img changed"
    );
    assert!(
        std::fs::read(&extra).unwrap() == extra_bytes,
        "extra.img changed"
    );
}

#[test]
fn qemu_storage_daemon_and_splitvmm_refuse_each_others_images() {
    let test = "qemu_storage_daemon_and_splitvmm_refuse_each_others_images";
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("held.img");
    let bytes = user_image(&held, MIB);
    let Some(qsd) = qsd_holding(test, &held, &dir.path().join("qsd1.sock")) else {
        return;
    };
    let config = host_file(dir.path(), "", "[[guest.disk]]\nimage = \"held.img\"");
    let out = run(splitvmm().arg("up").arg(&config));
    assert_refused(&out, "held.img: in use by qemu-storage-daemon (pid");

    // The standalone backend locks the same way.
    let out = run(Command::new(splitvmm_tests::workspace_bin("driver-domain"))
        .args(["serve", "--blk"])
        .arg(&held)
        .arg("--socket")
        .arg(dir.path().join("dd.sock")));
    assert_refused(&out, "in use by qemu-storage-daemon");

    let config = host_file(dir.path(), "", "");
    let host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let out = host.cli(&["block-attach", "guest-a", held.to_str().unwrap()]);
    assert_refused(&out, "in use by qemu-storage-daemon");
    // Nothing was left behind in the store.
    assert!(!host
        .cli(&["xs", "read", "/local/domain/1/backend/vbd/2/51728/state"])
        .status
        .success());

    // The other way: an image we hold for writing, qemu-storage-daemon cannot take.
    drop(qsd);
    let mine = dir.path().join("mine.img");
    let mine_bytes = user_image(&mine, MIB);
    host.cli_ok(&["block-attach", "guest-a", mine.to_str().unwrap()]);
    let out = qsd_command(test, &mine, &dir.path().join("qsd2.sock"))
        .unwrap()
        .output()
        .unwrap();
    assert_refused(&out, "Failed to get \"write\" lock");
    // Released by block-detach: then it can.
    host.cli_ok(&["block-detach", "guest-a", "51728"]);
    let _qsd = qsd_holding(test, &mine, &dir.path().join("qsd3.sock")).unwrap();
    drop(host);
    assert!(std::fs::read(&held).unwrap() == bytes);
    assert!(std::fs::read(&mine).unwrap() == mine_bytes);
}

#[test]
fn bad_images_and_host_files_fail_at_once_and_leave_nothing_attached() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("odd.img"), vec![7u8; 1000]).unwrap();
    std::fs::write(dir.path().join("empty.img"), b"").unwrap();
    let deadline = Duration::from_secs(1);
    for (image, want) in [
        ("odd.img", "truncate -s 1024"),
        ("empty.img", "is empty"),
        ("missing.img", "no such file"),
    ] {
        let config = host_file(
            dir.path(),
            "",
            &format!("[[guest.disk]]\nimage = {image:?}"),
        );
        let started = Instant::now();
        let out = run(splitvmm().arg("up").arg(&config));
        let took = started.elapsed();
        assert_refused(&out, want);
        assert!(took < deadline, "{image}: refused after {took:?}");
    }
    let started = Instant::now();
    let out = run(splitvmm().args(["up", "/dev/zero"]));
    assert_refused(&out, "not a regular file");
    assert!(started.elapsed() < deadline);

    // At run time: block-attach of a bad image fails at once, and leaves the devid free.
    let config = host_file(dir.path(), "", "");
    let host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    let odd = dir.path().join("odd.img");
    let started = Instant::now();
    let out = host.cli(&["block-attach", "guest-a", odd.to_str().unwrap()]);
    let took = started.elapsed();
    assert_refused(&out, "truncate -s 1024");
    assert!(took < deadline, "block-attach refused after {took:?}");
    for gone in [
        "/local/domain/1/backend/vbd/2/51728/state",
        "/local/domain/2/device/vbd/51728/state",
    ] {
        assert!(!host.cli(&["xs", "read", gone]).status.success(), "{gone}");
    }
    // Fixed as the error says, the same image attaches at the same devid and detaches.
    std::fs::File::options()
        .write(true)
        .open(&odd)
        .unwrap()
        .set_len(1024)
        .unwrap();
    host.cli_ok(&["block-attach", "guest-a", odd.to_str().unwrap()]);
    host.cli_ok(&["block-detach", "guest-a", "51728"]);
}

#[test]
fn the_lock_outlives_the_driver_domain_process() {
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user.img");
    let bytes = user_image(&user, MIB);
    let test = "the_lock_outlives_the_driver_domain_process";
    let Some(mut qsd) = qsd_command(test, &user, &dir.path().join("qsd.sock")) else {
        return;
    };
    let config = host_file(dir.path(), "", "[[guest.disk]]\nimage = \"user.img\"");
    let host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    // The driver domain's descriptor is a duplicate of the toolstack's: killing it must not
    // free the image.
    let (driver, _) = children_of(host.pid())
        .into_iter()
        .find(|(_, comm)| comm == "driver-domain")
        .expect("a driver domain process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(driver),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while children_of(host.pid())
        .iter()
        .any(|(pid, _)| *pid == driver)
    {
        assert!(Instant::now() < deadline, "the driver domain did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = qsd.output().unwrap();
    assert_refused(&out, "lock");
    drop(host);
    assert!(std::fs::read(&user).unwrap() == bytes);
}

#[test]
fn checks_run_only_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user.img");
    let bytes = user_image(&user, MIB);
    let config = host_file(dir.path(), "", "[[guest.disk]]\nimage = \"user.img\"");
    // Not asked for: every device attached, nothing written, not even to the scratch image.
    let out = run(splitvmm().arg("up").arg(&config));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("no checks asked for"), "{stdout}");
    assert!(!stdout.contains("check passed"), "{stdout}");
    let created = std::fs::read(dir.path().join("b.img")).unwrap();
    assert!(created.len() == 4 * MIB && created.iter().all(|&b| b == 0));
    // Asked for on the command line: a scratch image (created by this run) is checked, the
    // user's is skipped. The b.img of the first run is not this run's: it goes first.
    std::fs::remove_file(dir.path().join("b.img")).unwrap();
    let out = run(splitvmm().arg("up").arg(&config).arg("--check"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("guest-a: vbd 51712 check skipped")
            && stdout.contains("guest-b: vbd 51712 check passed")
            && stdout.contains("checks: 3 passed, 0 failed, 2 skipped"),
        "{stdout}"
    );
    let checked = std::fs::read(dir.path().join("b.img")).unwrap();
    assert!(checked.iter().any(|&b| b != 0), "the check wrote nothing");
    assert!(std::fs::read(&user).unwrap() == bytes);
    // Once there, an unmarked image is the user's: the next run skips it and leaves it as is.
    let out = run(splitvmm().arg("up").arg(&config).arg("--check"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("checks: 1 passed, 0 failed, 4 skipped"));
    assert!(std::fs::read(dir.path().join("b.img")).unwrap() == checked);
}

#[test]
fn an_attach_the_guest_refuses_leaves_nothing_behind() {
    let test = "an_attach_the_guest_refuses_leaves_nothing_behind";
    if !vmm_support::kvm_or_skip(test) {
        return;
    }
    let kernel = vmm_support::tiny_kernel();
    splitvmm_tests::workspace_bin("splitvmm-vmm");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "run_dir = \"run\"\n\
             [driver_domain]\nname = \"driver\"\ndomid = 1\n\
             [[guest]]\nname = \"tiny\"\ndomid = 2\nkind = \"kvm\"\nkernel = {:?}\n\
             [[guest.disk]]\nimage = \"t.img\"\nsize_mib = 2\n\
             [[guest]]\nname = \"proc\"\ndomid = 3\n",
            kernel.display().to_string()
        ),
    )
    .unwrap();
    let user = dir.path().join("user.img");
    let bytes = user_image(&user, MIB);
    let host = RunningHost::start(&config, &dir.path().join("run/xenstored.sock"), &[]);
    // A KVM guest has one virtio-mmio slot: it refuses a second disk once the walk started.
    let out = host.cli(&["block-attach", "tiny", user.to_str().unwrap()]);
    assert_refused(&out, "room for 1 block device");
    for gone in [
        "/local/domain/1/backend/vbd/2/51728",
        "/local/domain/2/device/vbd/51728",
    ] {
        assert!(!host.cli(&["xs", "ls", gone]).status.success(), "{gone}");
    }
    // Its lock went too: another guest can take the image.
    host.cli_ok(&["block-attach", "proc", user.to_str().unwrap()]);
    host.cli_ok(&["block-detach", "proc", "51728"]);
    drop(host);
    assert!(std::fs::read(&user).unwrap() == bytes);
}
