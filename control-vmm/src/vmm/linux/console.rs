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
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bus::LinuxBus;

/// How often the console thread looks at the machine's stop flag while idle.
const POLL_MS: i32 = 100;
/// How long to wait for the guest to drain a full receive FIFO before trying again.
const FIFO_FULL_WAIT: Duration = Duration::from_millis(5);
/// How long the start of a line (a shell prompt) may wait for its end before the log gets it.
const PARTIAL_LINE_WAIT: Duration = Duration::from_millis(100);
/// The longest line the log holds back: more goes out as it is.
const PARTIAL_LINE_MAX: usize = 4096;

/// Where COM1's output goes: the console log and the attached client, if any. Shared by the
/// UART (on the vCPU threads) and the console thread.
///
/// With `whole_lines`, the log gets the guest's output a line at a time: the guest writes
/// through the UART a byte per exit, and the VMM's own log lines share the file (the domain's
/// log), so byte-at-a-time writes let a VMM line land inside a guest line and split it. A
/// line's start that waits longer than [`PARTIAL_LINE_WAIT`] for its end (a prompt) goes out
/// when the console thread sees it, the rest when the machine ends. The client always gets
/// every byte at once.
#[derive(Clone)]
pub struct ConsoleSink(Arc<Mutex<SinkState>>);

struct SinkState {
    log: Box<dyn Write + Send>,
    client: Option<UnixStream>,
    whole_lines: bool,
    partial: Vec<u8>,
    partial_since: Option<Instant>,
}

impl SinkState {
    fn log_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.log.write_all(bytes)?;
        self.log.flush()
    }

    fn log_partial(&mut self) -> std::io::Result<()> {
        let partial = std::mem::take(&mut self.partial);
        self.partial_since = None;
        self.log_all(&partial)
    }
}

impl Drop for SinkState {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            // Nowhere to report a failure: the machine has ended.
            let _ = self.log_partial();
        }
    }
}

impl ConsoleSink {
    /// A sink writing to `log`, whole lines at a time if `whole_lines`.
    pub fn new(log: Box<dyn Write + Send>, whole_lines: bool) -> Self {
        Self(Arc::new(Mutex::new(SinkState {
            log,
            client: None,
            whole_lines,
            partial: Vec::new(),
            partial_since: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_client(&self, client: Option<UnixStream>) {
        self.lock().client = client;
    }

    /// Writes out the start of a line that has waited longer than `age` for its end.
    pub fn flush_partial_older_than(&self, age: Duration) -> std::io::Result<()> {
        let mut state = self.lock();
        match state.partial_since {
            Some(since) if since.elapsed() >= age => state.log_partial(),
            _ => Ok(()),
        }
    }

    /// The UART's end of the sink.
    pub fn output(&self) -> ConsoleOutput {
        ConsoleOutput(self.clone())
    }
}

/// COM1's output, as the UART writes it (see [`ConsoleSink`]).
pub struct ConsoleOutput(ConsoleSink);

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.0.lock();
        if let Some(stream) = state.client.as_mut() {
            // Non-blocking: a client that stops reading is dropped, never waited for.
            match stream.write(buf) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => state.client = None,
            }
        }
        if !state.whole_lines {
            return state.log.write(buf);
        }
        if state.partial.is_empty() {
            state.partial_since = Some(Instant::now());
        }
        state.partial.extend_from_slice(buf);
        // Only the new bytes can hold a line's end (what was held back has none).
        let line_end = buf
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| state.partial.len() - buf.len() + i);
        if state.partial.len() >= PARTIAL_LINE_MAX {
            state.log_partial()?;
        } else if let Some(end) = line_end {
            let rest = state.partial.split_off(end + 1);
            let lines = std::mem::replace(&mut state.partial, rest);
            state.partial_since = (!state.partial.is_empty()).then(Instant::now);
            state.log_all(&lines)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut state = self.0.lock();
        if state.whole_lines {
            // What is held back is a line's start, written when its end comes.
            return Ok(());
        }
        state.log.flush()
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

/// Gives the log a line's start that has waited too long for its end (a prompt).
fn flush_waiting_line(sink: &ConsoleSink) {
    if let Err(e) = sink.flush_partial_older_than(PARTIAL_LINE_WAIT) {
        log::debug!("console log: {e}");
    }
}

/// Serves one client until it leaves or the machine stops.
fn serve_client(stream: UnixStream, bus: &LinuxBus, sink: &ConsoleSink, halt: &AtomicBool) {
    let client = match stream.try_clone() {
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
    sink.set_client(Some(client));
    log::info!("console client attached");
    let mut reader = &stream;
    let mut buf = [0u8; 256];
    while !halt.load(Ordering::SeqCst) {
        flush_waiting_line(sink);
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
    sink.set_client(None);
    log::info!("console client detached");
}

/// Serves console clients on `listener` until `halt` is set.
pub fn spawn(
    listener: UnixListener,
    bus: Arc<LinuxBus>,
    sink: ConsoleSink,
    halt: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                flush_waiting_line(&sink);
                if !readable(&listener) {
                    continue;
                }
                match listener.accept() {
                    Ok((stream, _)) => serve_client(stream, &bus, &sink, &halt),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => log::warn!("console socket: {e}"),
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log file shared with other writers (the VMM's log lines).
    #[derive(Clone, Default)]
    struct SharedLog(Arc<Mutex<Vec<u8>>>);

    impl SharedLog {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl Write for SharedLog {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Writes `text` as the UART does: a byte and a flush at a time.
    fn uart_writes(out: &mut ConsoleOutput, text: &str) {
        for b in text.bytes() {
            out.write_all(&[b]).unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn a_vmm_log_line_never_lands_inside_a_guest_line() {
        let log = SharedLog::default();
        let sink = ConsoleSink::new(Box::new(log.clone()), true);
        let mut out = sink.output();
        uart_writes(&mut out, "L2-WAITING-BUTTO");
        log.clone()
            .write_all(b"INFO console client detached\n")
            .unwrap();
        uart_writes(&mut out, "N /dev/input/event0\nnext");
        assert_eq!(
            log.text(),
            "INFO console client detached\nL2-WAITING-BUTTON /dev/input/event0\n"
        );
        drop(out);
        drop(sink);
        assert!(log.text().ends_with("event0\nnext"), "{}", log.text());
    }

    #[test]
    fn a_prompt_reaches_the_log_once_it_has_waited() {
        let log = SharedLog::default();
        let sink = ConsoleSink::new(Box::new(log.clone()), true);
        let mut out = sink.output();
        uart_writes(&mut out, "login: ");
        sink.flush_partial_older_than(Duration::from_secs(60))
            .unwrap();
        assert_eq!(log.text(), "");
        sink.flush_partial_older_than(Duration::ZERO).unwrap();
        assert_eq!(log.text(), "login: ");
        uart_writes(&mut out, "root\n");
        assert_eq!(log.text(), "login: root\n");
    }

    #[test]
    fn an_endless_line_is_not_held_back_whole() {
        let log = SharedLog::default();
        let sink = ConsoleSink::new(Box::new(log.clone()), true);
        let mut out = sink.output();
        uart_writes(&mut out, &"x".repeat(PARTIAL_LINE_MAX + 10));
        assert_eq!(log.text().len(), PARTIAL_LINE_MAX);
    }

    #[test]
    fn without_whole_lines_every_byte_goes_out_at_once() {
        let log = SharedLog::default();
        let sink = ConsoleSink::new(Box::new(log.clone()), false);
        let mut out = sink.output();
        uart_writes(&mut out, "# ");
        assert_eq!(log.text(), "# ");
    }

    #[test]
    fn the_client_gets_a_line_start_at_once_and_a_gone_client_is_dropped() {
        let log = SharedLog::default();
        let sink = ConsoleSink::new(Box::new(log.clone()), true);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        sink.set_client(Some(ours));
        let mut out = sink.output();
        uart_writes(&mut out, "# ");
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"# ");
        drop(theirs);
        uart_writes(&mut out, "ls\n");
        assert!(sink.lock().client.is_none());
        assert_eq!(log.text(), "# ls\n");
    }
}
