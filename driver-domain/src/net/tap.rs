//! An uplink port: a host tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`) attached to the
//! switch like any guest port. A thread moves frames both ways: what the host writes to the
//! tap is switched, what the switch queues for the port is written to the tap.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::header::{MAX_FRAME, MIN_FRAME};
use super::switch::SwitchPort;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const BURST: usize = 64;

/// Errors of the tap uplink.
#[derive(Debug, Error)]
pub enum TapError {
    /// The interface name is empty or too long.
    #[error("invalid tap interface name {0:?} (1..=15 bytes, no NUL)")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] std::io::Error),
    /// `TUNSETIFF` failed.
    #[error("cannot create tap {0}: {1}")]
    SetIff(String, #[source] std::io::Error),
    /// Thread or eventfd setup failed.
    #[error("tap uplink setup: {0}")]
    Setup(#[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
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
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let tap = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (name,
        // flags, padding to 40 bytes); `req` lives across the call and `tap` is an open fd.
        let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff(
                name.to_string(),
                std::io::Error::last_os_error(),
            ));
        }
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
            match tap.write(buf.frame()) {
                Ok(_) => port.count_rx(buf.len()),
                Err(_) => port.count_rx_dropped(),
            }
            port.recycle(buf);
        }
    }
}

fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns the descriptor and outlives the returned borrow (same lifetime).
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}
