//! A Linux guest's interactive console: COM1 over a Unix socket, for `splitvmm console`.
//!
//! The VMM listens on the socket; one client at a time. What the client sends goes into the
//! UART's receive FIFO (as fast as the guest drains it); what the guest writes goes to the
//! console log as always and, while a client is attached, to the client too (without ever
//! blocking a vCPU: a client that does not keep up loses output, the log keeps it).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::bus::LinuxBus;

/// How often the console thread looks at the machine's stop flag while idle.
const POLL_MS: i32 = 200;
/// How long to wait for the guest to drain a full receive FIFO before trying again.
const FIFO_FULL_WAIT: Duration = Duration::from_millis(5);

/// The attached client, if any.
#[derive(Clone, Default)]
pub struct ConsoleClient(Arc<Mutex<Option<UnixStream>>>);

impl ConsoleClient {
    fn set(&self, client: Option<UnixStream>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = client;
    }
}

/// COM1's output: the console log, and the attached client.
pub struct ConsoleOutput {
    log: Box<dyn Write + Send>,
    client: ConsoleClient,
}

impl ConsoleOutput {
    pub fn new(log: Box<dyn Write + Send>, client: ConsoleClient) -> Self {
        Self { log, client }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.client.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = client.as_mut() {
            // Non-blocking: a client that stops reading is dropped, never waited for.
            match stream.write(buf) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *client = None,
            }
        }
        drop(client);
        self.log.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.log.flush()
    }
}

/// Waits up to [`POLL_MS`] for `fd` to be readable.
fn readable(fd: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    n > 0
}

/// Feeds `bytes` to the guest's UART, waiting while its FIFO is full; false if the machine
/// stopped meanwhile.
fn feed(bus: &LinuxBus, mut bytes: &[u8], halt: &AtomicBool) -> bool {
    while !bytes.is_empty() {
        if halt.load(Ordering::SeqCst) {
            return false;
        }
        match bus.console_input(bytes) {
            0 => std::thread::sleep(FIFO_FULL_WAIT),
            n => bytes = &bytes[n..],
        }
    }
    true
}

/// Serves one client until it leaves or the machine stops.
fn serve_client(stream: UnixStream, bus: &LinuxBus, client: &ConsoleClient, halt: &AtomicBool) {
    let output = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("console client: {e}");
            return;
        }
    };
    if let Err(e) = stream.set_nonblocking(true) {
        log::warn!("console client: {e}");
        return;
    }
    client.set(Some(output));
    log::info!("console client attached");
    let mut reader = &stream;
    let mut buf = [0u8; 256];
    while !halt.load(Ordering::SeqCst) {
        if !readable(&stream) {
            continue;
        }
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !feed(bus, &buf[..n], halt) {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    client.set(None);
    log::info!("console client detached");
}

/// Serves console clients on `listener` until `halt` is set.
pub fn spawn(
    listener: UnixListener,
    bus: Arc<LinuxBus>,
    client: ConsoleClient,
    halt: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                if !readable(&listener) {
                    continue;
                }
                match listener.accept() {
                    Ok((stream, _)) => serve_client(stream, &bus, &client, &halt),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => log::warn!("console socket: {e}"),
                }
            }
        })
}
