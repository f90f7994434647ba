//! The tunnel's sending half: whole frames written to the serial port under one lock, so the
//! channels' threads never interleave their frames.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ipc::tunnel::{Frame, TunnelError};
use thiserror::Error;

use crate::virtio_core::sync;

/// Why a frame was not sent.
#[derive(Debug, Error)]
pub enum WriterError {
    /// The frame breaks the tunnel's limits.
    #[error(transparent)]
    Frame(#[from] TunnelError),
    /// Writing to the serial port failed.
    #[error("writing to the tunnel: {0}")]
    Io(#[source] io::Error),
}

/// Frames out, to the tunnel's byte stream.
pub struct TunnelWriter {
    out: Mutex<Box<dyn Write + Send>>,
    frames: AtomicU64,
}

impl TunnelWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        TunnelWriter {
            out: Mutex::new(out),
            frames: AtomicU64::new(0),
        }
    }

    /// Sends one frame whole.
    pub fn send(&self, frame: &Frame) -> Result<(), WriterError> {
        let bytes = frame.encode()?;
        let mut out = sync::lock(&self.out);
        out.write_all(&bytes).map_err(WriterError::Io)?;
        out.flush().map_err(WriterError::Io)?;
        self.frames.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Frames sent so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}
