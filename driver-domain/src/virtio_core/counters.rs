//! Counters of one device as its backend sees it: requests served, bytes moved, kicks
//! received, interrupts sent, requests refused. The device core counts requests, bytes and
//! errors; its transport counts kicks and interrupts. The managed driver domain publishes
//! them in the store under its own `data/io/<kind>/<frontend>/<devid>`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared between the device core, its transport and whoever reports them.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    kicks: AtomicU64,
    interrupts: AtomicU64,
    errors: AtomicU64,
}

/// A copy of a device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub requests: u64,
    pub bytes: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub errors: u64,
}

impl DeviceCounters {
    /// A request (or frame) served, moving `bytes` of data.
    pub fn add_request(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request refused or failed.
    pub fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A kick from the driver.
    pub fn add_kick(&self) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
    }

    /// An interrupt (used-buffer notification) sent to the driver.
    pub fn add_interrupt(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }

    /// The values now.
    pub fn snapshot(&self) -> CounterValues {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            requests: get(&self.requests),
            bytes: get(&self.bytes),
            kicks: get(&self.kicks),
            interrupts: get(&self.interrupts),
            errors: get(&self.errors),
        }
    }
}

impl CounterValues {
    /// Each counter with the name it is published under.
    pub fn named(&self) -> [(&'static str, u64); 5] {
        [
            ("requests", self.requests),
            ("bytes", self.bytes),
            ("kicks", self.kicks),
            ("interrupts", self.interrupts),
            ("errors", self.errors),
        ]
    }

    /// These counters plus `other`'s (a device's earlier sessions).
    pub fn plus(&self, other: &CounterValues) -> CounterValues {
        CounterValues {
            requests: self.requests + other.requests,
            bytes: self.bytes + other.bytes,
            kicks: self.kicks + other.kicks,
            interrupts: self.interrupts + other.interrupts,
            errors: self.errors + other.errors,
        }
    }
}
