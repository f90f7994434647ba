//! An uplink port: a host tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`) attached to the
//! switch like any guest port. A thread moves frames both ways: what the host writes to the
//! tap is switched, what the switch queues for the port is written to the tap.
//!
//! The tap is opened without `IFF_VNET_HDR`, so it takes no offloads: a frame whose sender
//! left its checksum or its segmentation to the device is finished here ([`super::offload`])
//! before the host sees it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frame::FrameBox;
use super::header::{MAX_FRAME, MIN_FRAME};
use super::offload::{complete_checksum, Segments};
use super::switch::SwitchPort;

const BURST: usize = 64;

/// Errors of the tap uplink.
#[derive(Debug, Error)]
pub enum TapError {
    /// The tap could not be opened.
    #[error("tap device")]
    Device(#[from] ipc::tap::TapDeviceError),
    /// Thread or eventfd setup failed.
    #[error("tap uplink setup: {0}")]
    Setup(#[source] std::io::Error),
}

/// A running tap uplink; stopped (and the tap closed) on drop.
#[derive(Debug)]
pub struct TapUplink {
    name: String,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl TapUplink {
    /// Create (or attach to) tap `name` and start moving frames between it and `port`.
    pub fn open(name: &str, port: SwitchPort) -> Result<TapUplink, TapError> {
        Self::from_device(ipc::tap::open(name)?, name, port)
    }

    /// Start moving frames between `tap`, an open tap device called `name` (the toolstack
    /// opened it and handed it over), and `port`.
    pub fn from_device(tap: File, name: &str, port: SwitchPort) -> Result<TapUplink, TapError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(TapError::Setup)?;
        let stop2 = stop.try_clone().map_err(TapError::Setup)?;
        let port = Arc::new(port);
        let tname = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || run(tap, &port, &stop2, &tname))
            .map_err(TapError::Setup)?;
        info!("net: tap uplink {name} attached");
        Ok(TapUplink {
            name: name.to_string(),
            stop,
            thread: Some(thread),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TapUplink {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut tap: File, port: &SwitchPort, stop: &EventFd, name: &str) {
    let mut out: VecDeque<_> = VecDeque::with_capacity(BURST);
    let mut segment = vec![0u8; MAX_FRAME];
    loop {
        let armed_empty = !port.arm();
        if armed_empty {
            let mut fds = [
                PollFd::new(tap.as_fd(), PollFlags::POLLIN),
                PollFd::new(borrow(port.wake_fd()), PollFlags::POLLIN),
                PollFd::new(borrow(stop), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    warn!("net: tap {name}: poll failed, uplink stopped: {e}");
                    return;
                }
            }
            if fds[2].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            let _ = port.wake_fd().read();
        }
        // Host -> switch.
        for _ in 0..BURST {
            let Some(mut buf) = port.take_buffer() else {
                break;
            };
            let area = buf.chain_area(0);
            match tap.read(&mut area[..MAX_FRAME]) {
                Ok(n) if n >= MIN_FRAME => {
                    buf.set_len(n);
                    port.transmit(buf);
                }
                Ok(_) => {
                    port.count_tx_invalid();
                    port.recycle(buf);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    port.recycle(buf);
                    break;
                }
                Err(e) => {
                    port.recycle(buf);
                    warn!("net: tap {name}: read failed, uplink stopped: {e}");
                    return;
                }
            }
        }
        // Switch -> host.
        port.receive(&mut out, BURST);
        for buf in out.drain(..) {
            write_frame(&mut tap, port, buf, &mut segment);
        }
    }
}

/// Write `buf` to the tap, its checksum completed or cut into segments first if its sender
/// left that to the device; counted per frame written.
fn write_frame(tap: &mut File, port: &SwitchPort, mut buf: FrameBox, segment: &mut [u8]) {
    let offload = buf.offload();
    let mut put = |frame: &[u8]| match tap.write(frame) {
        Ok(_) => port.count_rx(frame.len()),
        Err(_) => port.count_rx_dropped(),
    };
    if let Some(gso) = offload.gso {
        let mut segments = Segments::new(buf.frame(), gso);
        while let Some(n) = segments.write_next(buf.frame(), segment) {
            put(&segment[..n]);
        }
    } else {
        if let Some((start, off)) = offload.csum {
            complete_checksum(buf.frame_mut(), start, off);
        }
        put(buf.frame());
    }
    port.recycle(buf);
}

fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns the descriptor and outlives the returned borrow (same lifetime).
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}
