//! The doorbell relay: the backend signals a ring's call eventfd when it has used buffers for
//! the guest; in the driver VM that eventfd belongs to this relay, whose thread turns each
//! signal into a write to the doorbell register dom0 bound to the guest's interrupt
//! (a KVM ioeventfd there: the guest's irqfd fires without any host thread running).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::warn;
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::xvm_device::CrossVmDevice;
use crate::virtio_core::sync;

/// Epoll token of the relay's exit event (doorbells are below 2^32).
const EXIT: u64 = u64::MAX;

/// Why a call could not be relayed.
#[derive(Debug, Error)]
pub enum DoorbellError {
    /// Creating the epoll, an eventfd or the thread failed.
    #[error("cannot set up the doorbell relay: {0}")]
    Create(#[source] io::Error),
    /// Adding or removing an eventfd failed.
    #[error("doorbell {0}: epoll_ctl: {1}")]
    Watch(u32, #[source] io::Error),
    /// The doorbell is not one of the device's.
    #[error("no doorbell {0} (the device has {1})")]
    NoSuchDoorbell(u32, u32),
}

/// The relay and its thread.
pub struct DoorbellRelay {
    epoll: Arc<Epoll>,
    exit: EventFd,
    /// The eventfd watched for each doorbell (the thread reads them here).
    calls: Arc<Mutex<HashMap<u32, EventFd>>>,
    count: u32,
    thread: Option<JoinHandle<()>>,
}

impl DoorbellRelay {
    /// Starts the relay's thread, ringing `device`'s doorbells.
    pub fn start(device: Arc<CrossVmDevice>) -> Result<Self, DoorbellError> {
        let epoll = Arc::new(Epoll::new().map_err(DoorbellError::Create)?);
        let exit = EventFd::new(EFD_NONBLOCK).map_err(DoorbellError::Create)?;
        epoll
            .ctl(
                ControlOperation::Add,
                exit.as_raw_fd(),
                EpollEvent::new(EventSet::IN, EXIT),
            )
            .map_err(DoorbellError::Create)?;
        let count = device.doorbells().count();
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let (e, c) = (epoll.clone(), calls.clone());
        let thread = std::thread::Builder::new()
            .name("doorbell-relay".into())
            .spawn(move || run(&e, &c, &device))
            .map_err(DoorbellError::Create)?;
        Ok(DoorbellRelay {
            epoll,
            exit,
            calls,
            count,
            thread: Some(thread),
        })
    }

    /// A call eventfd for doorbell `n`: each signal of it rings the doorbell once (signals
    /// that pile up before the relay reads them ring it once). Replaces an earlier one of
    /// `n`. The returned eventfd goes to the backend.
    pub fn bind(&self, n: u32) -> Result<EventFd, DoorbellError> {
        if n >= self.count {
            return Err(DoorbellError::NoSuchDoorbell(n, self.count));
        }
        let call = EventFd::new(EFD_NONBLOCK).map_err(DoorbellError::Create)?;
        let theirs = call.try_clone().map_err(DoorbellError::Create)?;
        self.unbind(n);
        self.epoll
            .ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, u64::from(n)),
            )
            .map_err(|e| DoorbellError::Watch(n, e))?;
        sync::lock(&self.calls).insert(n, call);
        Ok(theirs)
    }

    /// Stops relaying doorbell `n`'s call eventfd (none bound: nothing to do).
    pub fn unbind(&self, n: u32) {
        if let Some(old) = sync::lock(&self.calls).remove(&n) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Doorbells bound now.
    pub fn bound(&self) -> usize {
        sync::lock(&self.calls).len()
    }
}

impl Drop for DoorbellRelay {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The relay's thread: wait for call signals, ring their doorbells.
fn run(epoll: &Epoll, calls: &Mutex<HashMap<u32, EventFd>>, device: &CrossVmDevice) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("doorbell relay stopped: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == EXIT {
                return;
            }
            let Ok(door) = u32::try_from(token) else {
                continue;
            };
            // Read under the lock: an eventfd unbound meanwhile is gone from the map (and
            // its descriptor number may already be reused).
            let signalled = sync::lock(calls)
                .get(&door)
                .is_some_and(|call| call.read().is_ok());
            if signalled {
                if let Err(e) = device.doorbells().ring(door) {
                    warn!("doorbell relay: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::vm_tunnel::xvm_device::tests::{doorbell_register, fake_device};
    use std::time::{Duration, Instant};

    fn wait_register(fake: &crate::hw::pci::fake::FakeSysfs, n: u32) -> u32 {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let v = doorbell_register(fake, n);
            if v != 0 {
                return v;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        0
    }

    #[test]
    fn a_call_signal_rings_its_doorbell() {
        let fake = fake_device(64, 1 << 20);
        let dev = Arc::new(CrossVmDevice::open(&fake.sysfs()).unwrap());
        let relay = DoorbellRelay::start(dev.clone()).unwrap();
        let call = relay.bind(18).unwrap();
        call.write(1).unwrap();
        assert_eq!(wait_register(&fake, 18), 1);
        assert_eq!(doorbell_register(&fake, 17), 0);
        assert_eq!(doorbell_register(&fake, 2), 0);
        assert_eq!(dev.doorbells().rung(), 1);
    }

    #[test]
    fn an_unbound_or_replaced_call_rings_nothing_and_bad_doorbells_are_refused() {
        let fake = fake_device(64, 1 << 20);
        let dev = Arc::new(CrossVmDevice::open(&fake.sysfs()).unwrap());
        let relay = DoorbellRelay::start(dev.clone()).unwrap();
        let old = relay.bind(3).unwrap();
        let new = relay.bind(3).unwrap();
        assert_eq!(relay.bound(), 1);
        old.write(1).unwrap();
        relay.unbind(5);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            dev.doorbells().rung(),
            0,
            "the replaced eventfd is not relayed"
        );
        new.write(1).unwrap();
        assert_eq!(wait_register(&fake, 3), 1);
        relay.unbind(3);
        assert_eq!(relay.bound(), 0);
        new.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(dev.doorbells().rung(), 1);
        assert!(matches!(
            relay.bind(64),
            Err(DoorbellError::NoSuchDoorbell(64, 64))
        ));
    }
}
