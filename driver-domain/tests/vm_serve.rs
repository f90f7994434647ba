//! `driver-domain vm-serve` as the driver VM's /init runs it, on the host: a pty stands in for
//! the tunnel's serial port (the test plays dom0 on its master side), a hand-made sysfs tree
//! for the cross-VM device (`SPLITVMM_SYSFS_ROOT`), a temporary image for the disk. Judged
//! from outside: the frames on the pty, the exit status and message, `/proc/<pid>/fd`.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc::tunnel::vhost_msg::encode_message;
use ipc::tunnel::{Frame, FrameDecoder, FrameKind};
use vhost::vhost_user::message::FrontendReq;

const BIN: &str = env!("CARGO_BIN_EXE_driver-domain");

/// A sysfs tree with the cross-VM device at 0000:00:04.0 (or, without `device`, none).
fn sysfs(dir: &Path, device: bool) -> PathBuf {
    let root = dir.join("sys");
    let devices = root.join("bus/pci/devices");
    std::fs::create_dir_all(&devices).unwrap();
    if device {
        let d = devices.join("0000:00:04.0");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vendor"), "0x1af4\n").unwrap();
        std::fs::write(d.join("device"), "0x1130\n").unwrap();
        std::fs::write(d.join("class"), "0x050000\n").unwrap();
        std::fs::write(d.join("enable"), "0\n").unwrap();
        let mut bar0 = vec![0u8; 4096];
        bar0[..4].copy_from_slice(&0x5356_4d58u32.to_le_bytes());
        bar0[4..8].copy_from_slice(&256u32.to_le_bytes());
        std::fs::write(d.join("resource0"), bar0).unwrap();
        File::create(d.join("resource2"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    root
}

fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    img
}

/// The pty: master (dom0's end) and the slave's path.
fn pty() -> (File, PathBuf) {
    let pty = nix::pty::openpty(None, None).unwrap();
    let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    // The slave stays open here too until the child has it (a pty whose slave closes hangs up).
    std::mem::forget(pty.slave);
    (File::from(pty.master), path)
}

fn vm_serve(sys: &Path, tunnel: &Path, img: &Path) -> Child {
    Command::new(BIN)
        .args(["vm-serve", "--tunnel"])
        .arg(tunnel)
        .arg("--blk")
        .arg(img)
        .env("SPLITVMM_SYSFS_ROOT", sys)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The next frame from the pty (10 s at most).
fn next_frame(master: &mut File, decoder: &mut FrameDecoder) -> Frame {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(f) = decoder.next_frame().unwrap() {
            return f;
        }
        assert!(Instant::now() < end, "no frame from vm-serve within 10 s");
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(master),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap() == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        let n = master.read(&mut buf).unwrap();
        decoder.push(&buf[..n]);
    }
}

#[test]
fn vm_serve_says_hello_and_serves_a_channel_over_the_tty() {
    let dir = tempfile::tempdir().unwrap();
    let sys = sysfs(dir.path(), true);
    let (mut master, slave) = pty();
    let mut child = vm_serve(&sys, &slave, &image(dir.path()));
    let mut decoder = FrameDecoder::new();
    let hello = next_frame(&mut master, &mut decoder);
    assert_eq!(hello.hello_version(), Some(1), "{hello:?}");
    assert_eq!(
        std::fs::read_to_string(sys.join("bus/pci/devices/0000:00:04.0/enable")).unwrap(),
        "1",
        "the device was enabled"
    );
    master.write_all(&Frame::open(0).encode().unwrap()).unwrap();
    let get = encode_message(FrontendReq::GET_FEATURES.into(), 0, &[]);
    master
        .write_all(&Frame::vhost(0, Vec::new(), get).encode().unwrap())
        .unwrap();
    let reply = next_frame(&mut master, &mut decoder);
    assert_eq!(
        (reply.channel, reply.kind),
        (0, FrameKind::Vhost),
        "{reply:?}"
    );
    let features = u64::from_le_bytes(reply.payload[12..20].try_into().unwrap());
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    // A channel without a disk is refused; the server goes on.
    master.write_all(&Frame::open(1).encode().unwrap()).unwrap();
    let refused = next_frame(&mut master, &mut decoder);
    assert_eq!((refused.channel, refused.kind), (1, FrameKind::Close));
    master
        .write_all(&Frame::close(0).encode().unwrap())
        .unwrap();
    let get = encode_message(FrontendReq::GET_FEATURES.into(), 0, &[]);
    master.write_all(&Frame::open(0).encode().unwrap()).unwrap();
    master
        .write_all(&Frame::vhost(0, Vec::new(), get).encode().unwrap())
        .unwrap();
    let again = next_frame(&mut master, &mut decoder);
    assert_eq!(
        (again.channel, again.kind),
        (0, FrameKind::Vhost),
        "{again:?}"
    );
    assert!(child.try_wait().unwrap().is_none(), "vm-serve still runs");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn vm_serve_without_the_cross_vm_device_or_a_tty_exits_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let (_master, slave) = pty();
    let out = vm_serve(&sysfs(dir.path(), false), &slave, &img)
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no cross-VM device (1af4:1130)"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let other = tempfile::tempdir().unwrap();
    let not_a_tty = other.path().join("not-a-tty");
    std::fs::write(&not_a_tty, "").unwrap();
    let out = vm_serve(&sysfs(other.path(), true), &not_a_tty, &image(other.path()))
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot make it raw"), "{err}");
}
