//! Per-domain bookkeeping of the store daemon: connections and outstanding
//! requests of each domain (dom0 is never limited).

use std::collections::{BTreeSet, HashMap};

use super::perms::DomId;

/// Connection and outstanding-request counts per domain.
#[derive(Debug, Default)]
pub struct DomainBooks {
    conns: HashMap<DomId, usize>,
    outstanding: HashMap<DomId, usize>,
    /// Domains whose outstanding count fell below the limit since the last
    /// [`DomainBooks::take_woken`]: their connections may be read again.
    woken: BTreeSet<DomId>,
}

/// Connection limits: the total, the slots only dom0 may use, and the most
/// one unprivileged domain may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub total: usize,
    pub reserved_for_dom0: usize,
    pub per_domain: usize,
}

impl DomainBooks {
    /// Whether one more connection of `domid` fits, given `open` connections overall.
    pub fn may_connect(&self, domid: DomId, open: usize, lim: ConnLimits) -> bool {
        if open >= lim.total {
            return false;
        }
        if domid == 0 {
            return true;
        }
        let unprivileged = open - self.connections(0).min(open);
        unprivileged < lim.total.saturating_sub(lim.reserved_for_dom0)
            && self.connections(domid) < lim.per_domain
    }

    /// Open connections of `domid`.
    pub fn connections(&self, domid: DomId) -> usize {
        self.conns.get(&domid).copied().unwrap_or(0)
    }

    pub fn connected(&mut self, domid: DomId) {
        *self.conns.entry(domid).or_insert(0) += 1;
    }

    pub fn disconnected(&mut self, domid: DomId) {
        if let Some(n) = self.conns.get_mut(&domid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.conns.remove(&domid);
            }
        }
    }

    /// Unread replies and unread caused watch events of `domid`.
    pub fn outstanding(&self, domid: DomId) -> usize {
        self.outstanding.get(&domid).copied().unwrap_or(0)
    }

    /// Charges one outstanding message to `domid`.
    pub fn charge(&mut self, domid: DomId) {
        *self.outstanding.entry(domid).or_insert(0) += 1;
    }

    /// Discharges one outstanding message of `domid`; remembers the domain
    /// as woken when its count drops below `limit`.
    pub fn discharge(&mut self, domid: DomId, limit: usize) {
        if let Some(n) = self.outstanding.get_mut(&domid) {
            *n = n.saturating_sub(1);
            if *n < limit {
                self.woken.insert(domid);
            }
            if *n == 0 {
                self.outstanding.remove(&domid);
            }
        }
    }

    /// Domains woken since the last call.
    pub fn take_woken(&mut self) -> BTreeSet<DomId> {
        std::mem::take(&mut self.woken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dom0_keeps_its_reserved_slots() {
        let lim = ConnLimits {
            total: 10,
            reserved_for_dom0: 3,
            per_domain: 5,
        };
        let mut b = DomainBooks::default();
        for _ in 0..5 {
            assert!(b.may_connect(5, b.connections(5) + b.connections(6), lim));
            b.connected(5);
        }
        assert!(!b.may_connect(5, 5, lim), "per-domain limit");
        b.connected(6);
        b.connected(6);
        assert!(!b.may_connect(6, 7, lim), "unprivileged share used up");
        assert!(b.may_connect(0, 7, lim));
        assert!(!b.may_connect(0, 10, lim), "total");
    }
}
