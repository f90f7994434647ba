//! The tunnel's serial port (`/dev/ttyS1` in the driver VM: COM2 of its VMM), opened as a raw
//! byte stream: no echo, no line discipline, no flow control, no character translation, so
//! every byte dom0 sends arrives as sent and vice versa.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::termios::{self, BaudRate, ControlFlags, FlushArg, SetArg, SpecialCharacterIndices};
use thiserror::Error;

/// Why the tunnel's tty could not be set up.
#[derive(Debug, Error)]
pub enum TtyError {
    /// Opening the device failed.
    #[error("cannot open {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
    /// The device refused the raw settings (not a terminal?).
    #[error("{0}: cannot make it raw: {1}")]
    Termios(PathBuf, #[source] nix::Error),
}

/// Opens `path` read-write as a raw 8-bit byte stream (115200 baud; the emulated port
/// ignores the rate), without making it this process's controlling terminal, and drops
/// whatever arrived before.
pub fn open_raw(path: &Path) -> Result<File, TtyError> {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(|e| TtyError::Open(path.to_owned(), e))?;
    let raw = |e| TtyError::Termios(path.to_owned(), e);
    let mut t = termios::tcgetattr(&tty).map_err(raw)?;
    termios::cfmakeraw(&mut t);
    // Ignore modem lines, receive, no hardware flow control; block for at least one byte.
    t.control_flags |= ControlFlags::CLOCAL | ControlFlags::CREAD;
    t.control_flags &= !ControlFlags::CRTSCTS;
    t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    termios::cfsetspeed(&mut t, BaudRate::B115200).map_err(raw)?;
    termios::tcsetattr(&tty, SetArg::TCSANOW, &t).map_err(raw)?;
    termios::tcflush(&tty, FlushArg::TCIFLUSH).map_err(raw)?;
    Ok(tty)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    /// The pty's slave side, by path, and its master.
    fn pty() -> (File, PathBuf) {
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
        (File::from(pty.master), path)
    }

    #[test]
    fn every_byte_value_passes_unchanged_both_ways() {
        let (mut master, path) = pty();
        let mut tty = open_raw(&path).unwrap();
        // CR, LF, ^C, ^D, ^S, ^Q, DEL and high bytes: a cooked tty would translate, signal,
        // end input or stop output on these.
        let bytes: Vec<u8> = (0..=255u8).collect();
        master.write_all(&bytes).unwrap();
        let mut got = vec![0u8; bytes.len()];
        tty.read_exact(&mut got).unwrap();
        assert_eq!(got, bytes);
        // Reversed: with echo on, the master would read the bytes it sent first.
        let reply: Vec<u8> = bytes.iter().rev().copied().collect();
        tty.write_all(&reply).unwrap();
        let mut back = vec![0u8; reply.len()];
        master.read_exact(&mut back).unwrap();
        assert_eq!(back, reply, "no echo, no output processing");
    }

    #[test]
    fn a_file_that_is_not_a_terminal_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(open_raw(f.path()), Err(TtyError::Termios(..))));
        assert!(matches!(
            open_raw(Path::new("/nonexistent/ttyS1")),
            Err(TtyError::Open(..))
        ));
    }
}
