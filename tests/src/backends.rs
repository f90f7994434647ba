//! Block backends that frontend tests and benchmarks run against, each serving a fresh
//! zero-filled image over a vhost-user-blk socket: splitvmm's own driver domain
//! (`driver-domain serve --blk`) and qemu-storage-daemon, which nobody here wrote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_bin;

/// How long a backend may take to bind its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process killed (and reaped) on drop: only the child a test started.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running vhost-user-blk backend serving one raw image; stopped when dropped.
#[derive(Debug)]
pub struct BlkBackendProcess {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub process: Reaped,
}

impl BlkBackendProcess {
    /// `driver-domain serve --blk <dir>/disk.img --socket <dir>/blk.sock EXTRA...` on a
    /// zero-filled image of `image_bytes`.
    pub fn driver_domain(dir: &Path, image_bytes: u64, extra: &[&str]) -> Self {
        let (image, socket) = files(dir, image_bytes);
        let child = Command::new(workspace_bin("driver-domain"))
            .arg("serve")
            .arg("--blk")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning driver-domain");
        Self::started(socket, image, child)
    }

    /// `qsd` (qemu-storage-daemon) exporting a zero-filled image of `image_bytes` in `dir`,
    /// writable, with `queues` queues.
    pub fn qemu_storage_daemon(qsd: &str, dir: &Path, image_bytes: u64, queues: u16) -> Self {
        let (image, socket) = files(dir, image_bytes);
        let child = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export0,node-name=disk,addr.type=unix,\
                 addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning qemu-storage-daemon");
        Self::started(socket, image, child)
    }

    /// Process id of the backend (to stop and continue it).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.process.0.id()).expect("pid fits i32")
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(None))
    }

    /// Waits for the socket; a backend that never binds it fails the caller.
    fn started(socket: PathBuf, image: PathBuf, child: Child) -> Self {
        let backend = Self {
            socket,
            image,
            process: Reaped(child),
        };
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !backend.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "backend socket {} never appeared",
                backend.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        backend
    }
}

/// Creates `<dir>/disk.img` (zero-filled, `image_bytes`); the image and socket paths.
fn files(dir: &Path, image_bytes: u64) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(image_bytes))
        .expect("creating the disk image");
    (image, dir.join("blk.sock"))
}
