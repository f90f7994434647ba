//! COM2 of a driver VM: a second 16550 UART (vm-superio) at 0x2f8, IRQ 3, that carries the
//! tunnel. What the driver VM writes to it goes through the tunnel's decoder, whole frames to
//! the relay; frames for the driver VM go into its receive FIFO as fast as the driver VM
//! drains it (the UART says when its FIFO empties).

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use ipc::tunnel::{Frame, FrameDecoder};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::bus::{lock, Limiter};
use crate::vmm::serial::IrqLine;

/// How long the feeder waits for a full FIFO to drain before looking again.
const DRAIN_WAIT_MS: u16 = 20;

/// Signals an eventfd when the driver VM has read the last byte of the receive FIFO.
#[derive(Debug)]
pub struct FifoDrained(Arc<EventFd>);

impl SerialEvents for FifoDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A missed wake-up only costs the feeder one wait.
        let _ = self.0.write(1);
    }
}

/// The UART's output: the tunnel's decoder, frames to the relay.
pub struct TunnelOutput {
    decoder: FrameDecoder,
    frames: mpsc::Sender<Option<Frame>>,
    errors: Limiter,
}

impl Write for TunnelOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.decoder.push(buf);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    // The relay's reader ends only with the machine.
                    let _ = self.frames.send(Some(frame));
                }
                Ok(None) => break,
                Err(e) => {
                    if self.errors.allow() {
                        log::warn!("driver-VM tunnel (COM2): {e}");
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// COM2: the tunnel's UART.
pub struct TunnelUart {
    uart: Serial<IrqLine, FifoDrained, TunnelOutput>,
}

impl std::fmt::Debug for TunnelUart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelUart").finish_non_exhaustive()
    }
}

impl TunnelUart {
    /// A UART interrupting through `irq` whose output's frames go to `frames`; the eventfd
    /// returned is signalled when its receive FIFO empties.
    pub fn new(
        irq: EventFd,
        frames: mpsc::Sender<Option<Frame>>,
    ) -> std::io::Result<(Self, Arc<EventFd>)> {
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let out = TunnelOutput {
            decoder: FrameDecoder::new(),
            frames,
            errors: Limiter::default(),
        };
        let uart = Serial::with_events(IrqLine(irq), FifoDrained(Arc::clone(&drained)), out);
        Ok((Self { uart }, drained))
    }

    /// Register read at `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Register write at `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            log::warn!("COM2 write at offset {offset}: {e:?}");
        }
    }

    /// Puts what fits of `bytes` into the receive FIFO; returns how many.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or_else(|e| {
            log::warn!("COM2 input: {e:?}");
            0
        })
    }
}

/// Feeds encoded frames from `rx` into COM2's receive FIFO, in order, waiting for the driver
/// VM to drain it, until `halt` is set (an empty frame wakes it to see that). It waits for
/// frames without waking up.
pub fn spawn_feeder(
    uart: Arc<Mutex<TunnelUart>>,
    drained: Arc<EventFd>,
    rx: mpsc::Receiver<Vec<u8>>,
    halt: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tunnel-tx".into())
        .spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                let Ok(mut bytes) = rx.recv() else {
                    return;
                };
                let mut at = 0;
                while at < bytes.len() && !halt.load(Ordering::SeqCst) {
                    let n = lock(&uart).enqueue_input(&bytes[at..]);
                    at += n;
                    if n == 0 {
                        // SAFETY: the eventfd outlives this borrow (the thread owns its Arc).
                        let fd = unsafe { BorrowedFd::borrow_raw(drained.as_raw_fd()) };
                        let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
                        let _ = poll(&mut pfd, PollTimeout::from(DRAIN_WAIT_MS));
                        let _ = drained.read();
                    }
                }
                bytes.clear();
            }
        })
}

/// Hands the frames COM2 decodes to `deliver` (the relay) until a `None` comes.
pub fn spawn_reader(
    rx: mpsc::Receiver<Option<Frame>>,
    deliver: impl Fn(Frame) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tunnel-rx".into())
        .spawn(move || {
            while let Ok(Some(frame)) = rx.recv() {
                deliver(frame);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The driver VM's 8250 driver, as far as the tunnel needs it: reads the data register
    /// while the line status says data is ready.
    fn drain(uart: &Mutex<TunnelUart>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut u = lock(uart);
        while u.read(5) & 1 != 0 {
            out.push(u.read(0));
        }
        out
    }

    #[test]
    fn output_bytes_become_frames_and_noise_is_skipped() {
        let (tx, rx) = mpsc::channel();
        let (mut uart, _) = TunnelUart::new(EventFd::new(0).unwrap(), tx).unwrap();
        let mut bytes = b"noise".to_vec();
        bytes.extend(Frame::hello().encode().unwrap());
        bytes.extend(Frame::close(3).encode().unwrap());
        for b in bytes {
            uart.write(0, b);
        }
        assert_eq!(rx.try_recv().unwrap(), Some(Frame::hello()));
        assert_eq!(rx.try_recv().unwrap(), Some(Frame::close(3)));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn the_feeder_fills_the_fifo_as_the_driver_vm_drains_it() {
        let (tx, _rx) = mpsc::channel();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (uart, drained) = TunnelUart::new(irq.try_clone().unwrap(), tx).unwrap();
        let uart = Arc::new(Mutex::new(uart));
        // Receive interrupts on, as the 8250 driver has them while the port is open.
        lock(&uart).write(1, 1);
        let (to_vm, from_relay) = mpsc::channel();
        let halt = Arc::new(AtomicBool::new(false));
        let feeder =
            spawn_feeder(Arc::clone(&uart), drained, from_relay, Arc::clone(&halt)).unwrap();
        let frame = Frame::vhost(1, vec![], vec![7u8; 300]);
        let wire = frame.encode().unwrap();
        to_vm.send(wire.clone()).unwrap();
        to_vm.send(Frame::open(2).encode().unwrap()).unwrap();
        let mut got = Vec::new();
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while frames.len() < 2 && std::time::Instant::now() < deadline {
            let bytes = drain(&uart);
            // Never more than the 16550's FIFO at a time.
            assert!(bytes.len() <= 64, "{}", bytes.len());
            got.extend_from_slice(&bytes);
            decoder.push(&bytes);
            while let Ok(Some(f)) = decoder.next_frame() {
                frames.push(f);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(frames, vec![frame, Frame::open(2)]);
        assert!(irq.read().is_ok(), "the driver VM was interrupted");
        halt.store(true, Ordering::SeqCst);
        to_vm.send(Vec::new()).unwrap();
        feeder.join().unwrap();
    }
}
