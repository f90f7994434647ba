//! Private vhost-user connections between one frontend and its backend.
//!
//! The toolstack binds a listener in a directory only it can enter (0700), connects the
//! frontend's end to it, and unlinks the path at once. The listener then holds exactly one
//! pending connection and has no name anyone could connect to: the driver domain is handed the
//! listener (its vhost-user daemon accepts from it), the guest the connected stream. Neither
//! side opens a path, and no other domain can reach the device. A managed driver VM's in-VM
//! server makes its listeners the same way (`driver-domain vm-serve --managed`).

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Creates `dir` (mode 0700) if needed.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// A listener with the frontend's connection pending on it, and that connection.
pub fn private_connection(dir: &Path, name: &str) -> io::Result<(UnixListener, UnixStream)> {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let connected = UnixStream::connect(&path);
    let unlinked = std::fs::remove_file(&path);
    let stream = connected?;
    unlinked?;
    Ok((listener, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn connection_is_pending_and_nameless() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, mut frontend) = private_connection(dir.path(), "dev.sock").unwrap();
        assert!(!dir.path().join("dev.sock").exists());
        assert!(UnixStream::connect(dir.path().join("dev.sock")).is_err());
        let (mut backend, _) = listener.accept().unwrap();
        frontend.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        backend.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Nothing else is queued.
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err());
    }
}
