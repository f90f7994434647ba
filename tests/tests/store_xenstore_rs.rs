//! xenstore-rs 0.8's blocking client (`XsUnix`) against this project's store.
//! `XsUnix::new()` finds the socket through the `XENSTORED_PATH` environment
//! variable, which is process-wide, so this file holds a single test.
#![allow(clippy::unwrap_used)]

use ipc::xenstore::client::StoreClient;
use ipc::xenstore::server::{spawn, StoreConfig};
use xenstore_rs::unix::XsUnix;
use xenstore_rs::Xs;

#[test]
fn xenstore_rs_read_write_directory_rm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xs.sock");
    let (handle, thread) = spawn(StoreConfig::new(&path)).unwrap();
    // The only test in this binary, so nothing else reads the environment concurrently.
    std::env::set_var("XENSTORED_PATH", &path);
    let xs = XsUnix::new().unwrap();

    xs.write("/rs/a", "alpha").unwrap();
    xs.write("/rs/b", "").unwrap();
    assert_eq!(&*xs.read("/rs/a").unwrap(), "alpha");
    let mut names: Vec<String> = xs
        .directory("/rs")
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a", "b"]);
    xs.rm("/rs/a").unwrap();
    let err = xs.read("/rs/a").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        StoreClient::connect(&path)
            .unwrap()
            .directory("/rs")
            .unwrap(),
        vec!["b"]
    );

    handle.shutdown();
    thread.join().unwrap().unwrap();
}
