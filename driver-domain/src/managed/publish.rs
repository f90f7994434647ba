//! Publishing each device's counters in the store, under the driver domain's own
//! `data/io/<kind>/<frontend>/<devid>/{requests,bytes,kicks,interrupts,errors}`, where
//! `splitvmm list` and `block-list` read them. A device's counters add up over its sessions
//! (a detach and re-attach goes on counting); its node goes when its directory does.

use std::time::{Duration, Instant};

use ipc::xenbus::domain_path;
use ipc::xenstore::wire::XsError;

use super::{DevKey, ManagedDriverDomain};
use crate::virtio_core::counters::CounterValues;

/// How often live counters are written.
pub(super) const PUBLISH_EVERY: Duration = Duration::from_millis(500);

impl ManagedDriverDomain {
    fn counters_dir(&self, (kind, frontend, devid): DevKey) -> String {
        format!(
            "{}/data/io/{kind}/{frontend}/{devid}",
            domain_path(self.domid)
        )
    }

    /// The counters of a device over all its sessions.
    pub(super) fn device_counters(&self, key: DevKey) -> CounterValues {
        let past = self.past_counters.get(&key).copied().unwrap_or_default();
        match self.devices.get(&key).and_then(|d| d.session.as_ref()) {
            Some(session) => session.counters().plus(&past),
            None => past,
        }
    }

    /// Ends a device's session, keeping what it counted.
    pub(super) fn end_session(&mut self, key: DevKey, session: super::Session) {
        let last = session.stop();
        let total = last.plus(&self.past_counters.get(&key).copied().unwrap_or_default());
        self.past_counters.insert(key, total);
    }

    /// Writes the counters that changed since the last time, if it is time.
    pub(super) fn publish_counters(&mut self) {
        if self.last_publish.elapsed() < PUBLISH_EVERY {
            return;
        }
        self.last_publish = Instant::now();
        let keys: Vec<DevKey> = self.devices.keys().copied().collect();
        for key in keys {
            let now = self.device_counters(key);
            if self.published.get(&key) == Some(&now) {
                continue;
            }
            let dir = self.counters_dir(key);
            for (name, value) in now.named() {
                let path = format!("{dir}/{name}");
                if let Err(e) = self.store.write(&path, value.to_string().as_bytes()) {
                    log::warn!("publishing {path}: {e}");
                }
            }
            self.published.insert(key, now);
        }
        // Devices whose directories went: their counters go from the store too.
        let gone: Vec<DevKey> = self
            .published
            .keys()
            .filter(|k| !self.devices.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.published.remove(&key);
            let dir = self.counters_dir(key);
            match self.store.rm(&dir) {
                Ok(()) => {}
                Err(e) if e.xs_error() == Some(XsError::ENOENT) => {}
                Err(e) => log::warn!("removing {dir}: {e}"),
            }
        }
    }
}
