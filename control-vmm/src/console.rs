//! `splitvmm console DOMAIN`: a domain's output as `splitvmm up` logs it
//! (`<run_dir>/logs/<name>.log`): a KVM guest's serial console and its VMM's log lines, a
//! process domain's log lines; printed and followed like `tail -f`. A Linux guest's console is
//! interactive, as `xl console`: after what the log holds, the terminal is attached to its
//! COM1 through the VMM's console socket (keys go to the guest, raw), until Ctrl-] or the end
//! of the input detaches, or the guest goes away. The tiny guest takes no console input.

use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::is_valid_name;
use crate::host::{console_socket, log_path};

/// The detach key, as in `xl console`: Ctrl-].
const DETACH: u8 = 0x1d;

/// Prints the console log of `domain`; with `follow`, keeps printing what is appended until
/// interrupted, or attaches to the guest's interactive console if it has one.
pub fn show(run_dir: &Path, domain: &str, follow: bool) -> Result<ExitCode> {
    if !is_valid_name(domain) {
        bail!("{domain:?} is not a domain name");
    }
    let path = log_path(run_dir, domain);
    let mut file = std::fs::File::open(&path).with_context(|| {
        format!(
            "no log for {domain} at {} (is it a domain of the host in {}? Pass --run-dir)",
            path.display(),
            run_dir.display()
        )
    })?;
    let interactive = if follow {
        UnixStream::connect(console_socket(run_dir, domain)).ok()
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if let Some(stream) = interactive {
            drop(out);
            return attach(stream);
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        // A log truncated under us (a new run) starts over.
        let len = file.metadata()?.len();
        if file.stream_position()? > len {
            file.seek(SeekFrom::Start(0))?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The terminal in raw mode while it lives (if standard input is one), restored on drop.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> Self {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return RawTerminal(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal descriptor.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return RawTerminal(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw and tcsetattr on a valid termios and terminal descriptor.
        unsafe {
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return RawTerminal(None);
            }
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read from the same descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Copies standard input to the guest's console and its output to standard output until
/// Ctrl-] (or the end of the input) detaches, or the guest's console closes.
fn attach(mut stream: UnixStream) -> Result<ExitCode> {
    eprint!("[attached to the console; Ctrl-] detaches]\r\n");
    let raw = RawTerminal::enter();
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    let mut fds = [
        libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let why = loop {
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            break format!("poll: {e}");
        }
        if fds[1].revents != 0 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break "the guest's console closed".to_owned(),
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
            }
        }
        if fds[0].revents != 0 {
            let n = stdin.read(&mut buf)?;
            let input = &buf[..n];
            let detach = input.iter().position(|b| *b == DETACH);
            let send = &input[..detach.unwrap_or(n)];
            if !send.is_empty() && stream.write_all(send).is_err() {
                break "the guest's console closed".to_owned();
            }
            if detach.is_some() || n == 0 {
                break "detached".to_owned();
            }
        }
    };
    drop(raw);
    eprintln!("\r\n[{why}]");
    Ok(ExitCode::SUCCESS)
}
