//! A connection's output queue: encoded replies and watch events waiting to
//! be written, each remembering whom it is charged to.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::perms::DomId;

/// What a queued message is and whom it is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// A reply: outstanding for the receiving connection's domain.
    Reply,
    /// A watch event: outstanding for the unprivileged domain whose request
    /// caused it (`None`: caused by dom0 or the store), dropped unread after
    /// the watch-event timeout.
    Event {
        causer: Option<DomId>,
        queued_at: Instant,
    },
}

/// Messages waiting to be written to one connection.
#[derive(Debug, Default)]
pub struct OutQueue {
    items: VecDeque<(Vec<u8>, Queued)>,
    /// Bytes of the front message already written.
    offset: usize,
    bytes: usize,
}

impl OutQueue {
    /// Queues an encoded message.
    pub fn push(&mut self, bytes: Vec<u8>, kind: Queued) {
        self.bytes += bytes.len();
        self.items.push_back((bytes, kind));
    }

    /// Bytes queued, the partly written front included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The unwritten part of the front message.
    pub fn unsent(&self) -> Option<&[u8]> {
        self.items.front().map(|(b, _)| &b[self.offset..])
    }

    /// Records that `n` bytes of the front were written; returns the front's
    /// kind once it is written completely (and drops it).
    pub fn advance(&mut self, n: usize) -> Option<Queued> {
        let (front, _) = self.items.front()?;
        self.offset += n;
        if self.offset < front.len() {
            return None;
        }
        let (front, kind) = self.items.pop_front()?;
        self.bytes -= front.len();
        self.offset = 0;
        Some(kind)
    }

    /// Drops watch events queued for `timeout` or longer (never the partly
    /// written front); returns the kinds dropped, to discharge them.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<Queued> {
        let mut dropped = Vec::new();
        let keep_front = self.offset > 0;
        let mut i = 0;
        self.items.retain(|(b, kind)| {
            let first = i == 0;
            i += 1;
            let expired = matches!(kind, Queued::Event { queued_at, .. }
                if now.saturating_duration_since(*queued_at) >= timeout);
            if expired && !(first && keep_front) {
                self.bytes -= b.len();
                dropped.push(*kind);
                false
            } else {
                true
            }
        });
        dropped
    }

    /// When the oldest queued watch event was queued.
    pub fn oldest_event(&self) -> Option<Instant> {
        self.items
            .iter()
            .filter_map(|(_, k)| match k {
                Queued::Event { queued_at, .. } => Some(*queued_at),
                Queued::Reply => None,
            })
            .min()
    }

    /// Empties the queue; returns the kinds dropped, to discharge them.
    pub fn clear(&mut self) -> Vec<Queued> {
        self.offset = 0;
        self.bytes = 0;
        self.items.drain(..).map(|(_, k)| k).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn expiry_keeps_replies_and_the_partly_sent_front() {
        let t0 = Instant::now();
        let ev = Queued::Event {
            causer: Some(5),
            queued_at: t0,
        };
        let mut q = OutQueue::default();
        q.push(vec![0; 10], ev);
        q.push(vec![0; 10], Queued::Reply);
        q.push(vec![0; 10], ev);
        assert_eq!(q.advance(4), None);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(q.expire(later, Duration::from_secs(1)), vec![ev]);
        assert_eq!(q.bytes(), 20);
        assert_eq!(q.unsent().unwrap().len(), 6);
        assert_eq!(q.advance(6), Some(ev));
        assert_eq!(q.advance(10), Some(Queued::Reply));
        assert!(q.is_empty());
    }
}
