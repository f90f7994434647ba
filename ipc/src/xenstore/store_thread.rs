//! A store served on its own thread for as long as its owner holds it: stopped and joined when
//! dropped, so an embedding process or a test cannot leave the thread (and its socket) behind.

use std::thread::JoinHandle;

use super::server::{spawn, ServerError, StoreConfig, StoreHandle};

/// A running store and its thread.
#[derive(Debug)]
pub struct StoreThread {
    handle: StoreHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl StoreThread {
    /// Binds a store with `cfg` and serves it on a new thread.
    pub fn start(cfg: StoreConfig) -> Result<Self, ServerError> {
        let (handle, thread) = spawn(cfg)?;
        Ok(StoreThread {
            handle,
            thread: Some(thread),
        })
    }

    /// The handle: domain connections, shutdown, the socket path.
    pub fn handle(&self) -> &StoreHandle {
        &self.handle
    }

    /// Stops the store and waits for its thread; the store's own result. A panic on the store
    /// thread is resumed here.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        self.handle.shutdown();
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.shutdown();
            // Its result was not asked for; a panic there is not re-raised during a drop.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::client::StoreClient;

    #[test]
    fn stop_ends_the_store_and_removes_its_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("xs.sock");
        let store = StoreThread::start(StoreConfig::new(&path)).expect("start");
        let mut c = StoreClient::connect(&path).expect("connect");
        c.write("/a", b"1").expect("write");
        assert_eq!(store.handle().socket(), path.as_path());
        store.stop().expect("the store ends cleanly");
        assert!(!path.exists(), "socket removed");
    }

    #[test]
    fn dropping_it_stops_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("xs.sock");
        drop(StoreThread::start(StoreConfig::new(&path)).expect("start"));
        assert!(!path.exists(), "socket removed");
        assert!(StoreClient::connect(&path).is_err());
    }
}
