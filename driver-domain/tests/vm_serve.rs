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

/// Held while a pty's descriptors are not yet close-on-exec, and while a child is spawned: no
/// child inherits another test's master (which would keep its pty from hanging up).
static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The pty: master (dom0's end) and the slave's path.
fn pty() -> (File, PathBuf) {
    let _spawning = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let pty = nix::pty::openpty(None, None).unwrap();
    for fd in [pty.master.as_raw_fd(), pty.slave.as_raw_fd()] {
        nix::fcntl::fcntl(fd, nix::fcntl::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).unwrap();
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    // The slave stays open here too until the child has it (a pty whose slave closes hangs up).
    std::mem::forget(pty.slave);
    (File::from(pty.master), path)
}

fn vm_serve(sys: &Path, tunnel: &Path, img: &Path) -> Child {
    let _spawning = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
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

/// A managed driver VM's side (`vm-serve --managed`) with the real `driver-domain managed`
/// behind it: the test plays dom0's relay between the pty and a store connection of domain 1
/// (STORE frames), and the toolstack on CONTROL frames.
mod managed {
    use super::*;
    use ipc::control::messages::{BackendEvent, BackendRequest};
    use ipc::tunnel::TunnelControl;
    use ipc::xenstore::client::StoreClient;
    use ipc::xenstore::perms::{Access, Perm, Perms};
    use ipc::xenstore::server::StoreConfig;
    use ipc::xenstore::StoreThread;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    const DRIVER: u32 = 1;

    struct Rig {
        _dir: tempfile::TempDir,
        log: PathBuf,
        store: Option<StoreThread>,
        master: Arc<Mutex<File>>,
        reader: File,
        decoder: FrameDecoder,
        to_store: UnixStream,
        child: Child,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Some(s) = self.store.take() {
                let _ = s.stop();
            }
        }
    }

    /// The store with domain 1 in it, `vm-serve --managed --domid 1` on the pty, HELLO read,
    /// and a thread relaying the store's bytes to the pty as STORE frames.
    fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let sys = sysfs(dir.path(), true);
        let store = StoreThread::start(StoreConfig::new(dir.path().join("xs.sock"))).unwrap();
        let mut dom0 = StoreClient::connect(dir.path().join("xs.sock")).unwrap();
        let own = Perms::new(vec![Perm::new(Access::None, DRIVER)]).unwrap();
        for node in ["", "/backend", "/hardware"] {
            let path = format!("/local/domain/{DRIVER}{node}");
            dom0.write(&path, b"").unwrap();
            dom0.set_perms(&path, &own).unwrap();
        }
        dom0.introduce(DRIVER, 0, 0).unwrap();
        let from_store = store.handle().connect_domain(DRIVER).unwrap();
        let to_store = from_store.try_clone().unwrap();
        let (master, slave) = pty();
        let log = dir.path().join("vm-serve.log");
        let spawning = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
        let child = Command::new(BIN)
            .args(["vm-serve", "--managed", "--domid", "1", "--tunnel"])
            .arg(&slave)
            .env("SPLITVMM_SYSFS_ROOT", &sys)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        drop(spawning);
        let reader = master.try_clone().unwrap();
        let master = Arc::new(Mutex::new(master));
        let out = master.clone();
        std::thread::spawn(move || {
            let mut from_store = from_store;
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = from_store.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let frame = Frame::store(buf[..n].to_vec()).encode().unwrap();
                if out.lock().unwrap().write_all(&frame).is_err() {
                    break;
                }
            }
        });
        let mut rig = Rig {
            _dir: dir,
            log,
            store: Some(store),
            master,
            reader,
            decoder: FrameDecoder::new(),
            to_store,
            child,
        };
        let hello = next_frame(&mut rig.reader, &mut rig.decoder);
        assert_eq!(hello.hello_version(), Some(1), "{hello:?}");
        rig
    }

    impl Rig {
        fn send(&self, frame: &Frame) {
            let bytes = frame.encode().unwrap();
            self.master.lock().unwrap().write_all(&bytes).unwrap();
        }

        /// The next CONTROL message, relaying STORE frames to the store meanwhile.
        fn control(&mut self) -> TunnelControl {
            loop {
                let f = next_frame(&mut self.reader, &mut self.decoder);
                match f.kind {
                    FrameKind::Store => self.to_store.write_all(&f.payload).unwrap(),
                    FrameKind::Control => return TunnelControl::decode(&f.payload).unwrap(),
                    _ => panic!("unexpected {f:?}"),
                }
            }
        }

        fn request(&self, request: BackendRequest) {
            let msg = TunnelControl::Request {
                request,
                channel: None,
            };
            self.send(&msg.to_frame().unwrap());
        }

        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap()
        }
    }

    /// Waits (10 s at most) for vm-serve to exit, relaying STORE frames meanwhile (the driver
    /// domain may be in the middle of a store request).
    fn wait_exit(rig: &mut Rig) -> std::process::ExitStatus {
        let end = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(status) = rig.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "vm-serve still runs after 10 s: {}",
                rig.log()
            );
            while let Some(f) = rig.decoder.next_frame().unwrap() {
                if f.kind == FrameKind::Store {
                    let _ = rig.to_store.write_all(&f.payload);
                }
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&rig.reader),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u16)).unwrap_or(0) > 0 {
                match rig.reader.read(&mut buf) {
                    Ok(n) if n > 0 => rig.decoder.push(&buf[..n]),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// The pid of the driver domain vm-serve started.
    fn driver_pid(vm_serve: u32) -> u32 {
        let children =
            std::fs::read_to_string(format!("/proc/{vm_serve}/task/{vm_serve}/children")).unwrap();
        let pids: Vec<u32> = children
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 1, "one child: {pids:?}");
        pids[0]
    }

    #[test]
    fn the_driver_domain_behind_the_tunnel_says_ready_answers_and_its_exit_ends_vm_serve() {
        let mut rig = start();
        assert_eq!(
            rig.control(),
            TunnelControl::Event(BackendEvent::Ready),
            "{}",
            rig.log()
        );
        // Its descriptors: stdin, stdout, stderr, the store connection and the control
        // channel (both sockets), and only what it opened itself since.
        let pid = driver_pid(rig.child.id());
        for fd in [3, 4] {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert!(
                target.to_string_lossy().starts_with("socket:"),
                "fd {fd}: {target:?}"
            );
        }
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<&str> = cmdline.split('\0').collect();
        assert_eq!(
            args[1..5],
            ["managed", "--domid", "1", "--memory-from-sysfs"],
            "{args:?}"
        );
        rig.request(BackendRequest::Stats);
        assert_eq!(
            rig.control(),
            TunnelControl::Event(BackendEvent::Stats(Vec::new()))
        );
        rig.request(BackendRequest::Shutdown);
        let status = wait_exit(&mut rig);
        let log = rig.log();
        assert!(status.success(), "{status:?}: {log}");
        assert!(log.contains("the driver domain exited"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    #[test]
    fn the_tunnels_end_stops_the_driver_domain() {
        let mut rig = start();
        assert_eq!(rig.control(), TunnelControl::Event(BackendEvent::Ready));
        let pid = driver_pid(rig.child.id());
        // The pty hangs up: vm-serve stops (with the read error) and takes its child along.
        let (master, _) = pty();
        *rig.master.lock().unwrap() = master;
        rig.reader = tempfile::tempfile().unwrap();
        wait_exit(&mut rig);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the driver domain is gone: {}",
            rig.log()
        );
        assert!(
            rig.log().contains("stopping the driver domain"),
            "{}",
            rig.log()
        );
    }
}
