//! The disk check a managed guest runs on request: write a pattern, read it back, compare.

use thiserror::Error;

use crate::process::{BlockFrontend, ProcessFrontendError};

/// Why a disk check failed.
#[derive(Debug, Error)]
pub enum DiskCheckError {
    #[error("check of {bytes} bytes does not fit the {capacity}-byte disk in whole sectors")]
    DoesNotFit { bytes: u64, capacity: u64 },
    #[error("write at byte {offset}")]
    Write {
        offset: u64,
        #[source]
        source: ProcessFrontendError,
    },
    #[error("flush")]
    Flush(#[source] ProcessFrontendError),
    #[error("read at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: ProcessFrontendError,
    },
    #[error("mismatch at byte {0}")]
    Mismatch(u64),
}

const SECTOR: u64 = 512;
/// Bytes per request: several requests per check, each within one bounce buffer.
const CHUNK: usize = 64 * 1024;

/// The pattern byte at `offset` for `seed`: position-dependent, so a misplaced or stale
/// block is caught, not only a missing one. Public so the host can judge a check from
/// outside by reading the disk image.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = (offset / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
    let x = x ^ (x >> 29);
    (x >> ((offset % 8) * 8)) as u8
}

/// Writes (unless `verify_only`) and verifies the first `bytes` of the disk; returns a short
/// description on success and the first mismatch or error on failure.
pub fn run(
    frontend: &BlockFrontend,
    seed: u64,
    bytes: u64,
    verify_only: bool,
) -> Result<String, DiskCheckError> {
    let capacity = frontend.capacity() * SECTOR;
    if bytes > capacity || !bytes.is_multiple_of(SECTOR) || bytes == 0 {
        return Err(DiskCheckError::DoesNotFit { bytes, capacity });
    }
    let mut offset = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    if !verify_only {
        while offset < bytes {
            let len = CHUNK.min((bytes - offset) as usize);
            for (i, b) in chunk[..len].iter_mut().enumerate() {
                *b = pattern_byte(seed, offset + i as u64);
            }
            frontend
                .write(offset / SECTOR, &chunk[..len])
                .map_err(|source| DiskCheckError::Write { offset, source })?;
            offset += len as u64;
        }
        frontend.flush().map_err(DiskCheckError::Flush)?;
    }
    offset = 0;
    while offset < bytes {
        let len = CHUNK.min((bytes - offset) as usize);
        frontend
            .read(offset / SECTOR, &mut chunk[..len])
            .map_err(|source| DiskCheckError::Read { offset, source })?;
        if let Some(i) = (0..len).find(|&i| chunk[i] != pattern_byte(seed, offset + i as u64)) {
            return Err(DiskCheckError::Mismatch(offset + i as u64));
        }
        offset += len as u64;
    }
    let what = if verify_only {
        "verified"
    } else {
        "wrote and verified"
    };
    Ok(format!("{what} {} KiB", bytes / 1024))
}
