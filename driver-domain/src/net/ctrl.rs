//! The virtio-net control queue (virtio 1.2, 5.1.6.5): the driver's commands, each a chain of
//! a device-readable `{class, command}` header and its data, then one device-writable status
//! byte (`VIRTIO_NET_OK` or `VIRTIO_NET_ERR`).
//!
//! Understood: receive filtering (`CTRL_RX`: promiscuous, all-multicast; with `CTRL_RX` only
//! these two) and the MAC filter table (`CTRL_MAC_TABLE_SET`), both acknowledged and recorded
//! (the switch already delivers a superset: broadcast, multicast and unknown unicast to every
//! port, and the port's own address); the number of queue pairs (`CTRL_MQ_VQ_PAIRS_SET`)
//! within what the device has (frames are still received on the first pair, which virtio
//! allows). Every other class or command, and any malformed command, gets `VIRTIO_NET_ERR`.
//! A chain without a writable status byte cannot be answered: it is returned with length 0
//! and counted.

use log::{info, warn};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::ring::{needs_call, publish_used};
use crate::virtio_core::{QueueFailedEarlier, QueueFailure, QueueProgress};

/// Status byte: the command was carried out.
pub const VIRTIO_NET_OK: u8 = 0;
/// Status byte: the command was refused.
pub const VIRTIO_NET_ERR: u8 = 1;
/// Class: receive filtering.
pub const CTRL_RX: u8 = 0;
/// `CTRL_RX` command: promiscuous mode on (1) or off (0).
pub const CTRL_RX_PROMISC: u8 = 0;
/// `CTRL_RX` command: all-multicast on (1) or off (0).
pub const CTRL_RX_ALLMULTI: u8 = 1;
/// Class: MAC address filtering.
pub const CTRL_MAC: u8 = 1;
/// `CTRL_MAC` command: set the unicast and multicast filter tables.
pub const CTRL_MAC_TABLE_SET: u8 = 0;
/// Class: multiqueue.
pub const CTRL_MQ: u8 = 4;
/// `CTRL_MQ` command: the number of queue pairs in use.
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Commands carried out per call before the other queues get a turn.
const CTRL_BUDGET: usize = 64;
/// Largest command accepted (header and data): a MAC table of about 680 addresses.
pub const MAX_COMMAND: usize = 4096;

/// Errors that fail the control queue (a broken ring).
#[derive(Debug, Error)]
pub enum CtrlQueueError {
    /// The ring is invalid.
    #[error("net control queue {0}: {1}")]
    Ring(u16, virtio_queue::Error),
    /// The queue failed earlier.
    #[error(transparent)]
    Broken(#[from] QueueFailedEarlier),
}

/// What the driver asked for so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RxFilter {
    /// Promiscuous mode.
    pub promisc: bool,
    /// Every multicast frame.
    pub allmulti: bool,
    /// Unicast addresses of the last MAC table.
    pub unicast: usize,
    /// Multicast addresses of the last MAC table.
    pub multicast: usize,
    /// Queue pairs in use (`CTRL_MQ_VQ_PAIRS_SET`).
    pub pairs: u16,
}

/// The control queue of one device.
#[derive(Debug)]
pub struct CtrlQueue {
    name: String,
    index: u16,
    max_pairs: u16,
    mq: bool,
    filter: RxFilter,
    failure: QueueFailure,
    refused: u64,
}

impl CtrlQueue {
    /// Control virtqueue `index` of device `name` (in logs) with `max_pairs` queue pairs.
    pub fn new(name: &str, index: u16, max_pairs: u16) -> Self {
        CtrlQueue {
            name: name.to_string(),
            index,
            max_pairs,
            mq: false,
            filter: RxFilter {
                pairs: 1,
                ..RxFilter::default()
            },
            failure: QueueFailure::new(index),
            refused: 0,
        }
    }

    /// Whether the driver negotiated `MQ` (`CTRL_MQ` is refused without it).
    pub fn set_mq(&mut self, mq: bool) {
        self.mq = mq;
    }

    /// The filter state the driver set.
    pub fn filter(&self) -> &RxFilter {
        &self.filter
    }

    /// Commands refused or unanswerable so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Forget an earlier failure and the driver's settings (the driver reset the device).
    pub fn reset(&mut self) {
        self.failure.clear();
        self.filter = RxFilter {
            pairs: 1,
            ..RxFilter::default()
        };
    }

    /// Carry out every command on `queue`.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueProgress, CtrlQueueError> {
        self.failure.check()?;
        let index = self.index;
        let ring = |e| CtrlQueueError::Ring(index, e);
        let old_used = queue.next_used();
        let r = (|| {
            let mut progress = QueueProgress::default();
            loop {
                queue.disable_notification(mem).map_err(ring)?;
                let mut done = Vec::new();
                for chain in queue.iter(mem).map_err(ring)?.take(CTRL_BUDGET) {
                    let head = chain.head_index();
                    done.push((head, self.command(chain, mem)));
                }
                progress.completed += done.len();
                publish_used(queue, mem, done.into_iter()).map_err(ring)?;
                if progress.completed >= CTRL_BUDGET {
                    // A driver that keeps adding commands waits for the other queues' turn.
                    progress.more = true;
                    break;
                }
                if !queue.enable_notification(mem).map_err(ring)? {
                    break;
                }
            }
            progress.notify = needs_call(queue, mem, old_used).map_err(ring)?;
            Ok(progress)
        })();
        self.failure.latch("net control", r)
    }

    /// Read, carry out and answer one command; returns the used length.
    fn command<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>, mem: &M) -> u32 {
        let mut cmd = [0u8; MAX_COMMAND];
        let mut len = 0usize;
        let mut status_at: Option<GuestAddress> = None;
        let mut fits = true;
        for desc in chain {
            if desc.is_write_only() {
                status_at.get_or_insert(desc.addr());
                continue;
            }
            if status_at.is_some() {
                // A readable descriptor after the status: malformed.
                fits = false;
                continue;
            }
            let n = desc.len() as usize;
            if len + n > MAX_COMMAND || mem.read_slice(&mut cmd[len..len + n], desc.addr()).is_err()
            {
                fits = false;
                continue;
            }
            len += n;
        }
        let status = if fits {
            self.carry_out(&cmd[..len])
        } else {
            Err("malformed chain")
        };
        let byte = match status {
            Ok(()) => VIRTIO_NET_OK,
            Err(why) => {
                self.refuse(why, &cmd[..len.min(2)]);
                VIRTIO_NET_ERR
            }
        };
        match status_at {
            Some(at) if mem.write_obj(byte, at).is_ok() => 1,
            _ => {
                self.refuse("no writable status byte", &[]);
                0
            }
        }
    }

    fn refuse(&mut self, why: &str, head: &[u8]) {
        self.refused += 1;
        if self.refused.is_power_of_two() {
            warn!(
                "{}: control queue {}: command {head:?} refused ({why}), #{}",
                self.name, self.index, self.refused
            );
        }
    }

    fn carry_out(&mut self, cmd: &[u8]) -> Result<(), &'static str> {
        let [class, command, data @ ..] = cmd else {
            return Err("shorter than its header");
        };
        match (*class, *command) {
            (CTRL_RX, c @ (CTRL_RX_PROMISC | CTRL_RX_ALLMULTI)) => {
                let [on] = data else {
                    return Err("CTRL_RX data is one byte");
                };
                let on = *on != 0;
                if c == CTRL_RX_PROMISC {
                    self.filter.promisc = on;
                } else {
                    self.filter.allmulti = on;
                }
                info!(
                    "{}: control queue {}: {} {}",
                    self.name,
                    self.index,
                    if c == CTRL_RX_PROMISC {
                        "promiscuous"
                    } else {
                        "all-multicast"
                    },
                    if on { "on" } else { "off" }
                );
                Ok(())
            }
            (CTRL_MAC, CTRL_MAC_TABLE_SET) => {
                let (unicast, rest) = mac_table(data)?;
                let (multicast, rest) = mac_table(rest)?;
                if !rest.is_empty() {
                    return Err("bytes after the MAC tables");
                }
                self.filter.unicast = unicast;
                self.filter.multicast = multicast;
                info!(
                    "{}: control queue {}: MAC table of {unicast} unicast and {multicast} multicast addresses",
                    self.name, self.index
                );
                Ok(())
            }
            (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) => {
                if !self.mq {
                    return Err("MQ not negotiated");
                }
                let [lo, hi] = data else {
                    return Err("CTRL_MQ data is two bytes");
                };
                let pairs = u16::from_le_bytes([*lo, *hi]);
                if pairs == 0 || pairs > self.max_pairs {
                    return Err("queue pairs out of range");
                }
                self.filter.pairs = pairs;
                info!(
                    "{}: control queue {}: {pairs} queue pairs",
                    self.name, self.index
                );
                Ok(())
            }
            _ => Err("unknown class or command"),
        }
    }
}

/// One table of `CTRL_MAC_TABLE_SET`: a little-endian u32 count, then that many addresses.
/// Returns the count and what follows.
fn mac_table(data: &[u8]) -> Result<(usize, &[u8]), &'static str> {
    let (count, rest) = data
        .split_first_chunk::<4>()
        .ok_or("MAC table without its count")?;
    let n = usize::try_from(u32::from_le_bytes(*count)).map_err(|_| "MAC table too long")?;
    let bytes = n
        .checked_mul(6)
        .filter(|b| *b <= rest.len())
        .ok_or("MAC table past the command")?;
    Ok((n, &rest[bytes..]))
}

#[cfg(test)]
#[path = "ctrl_tests.rs"]
mod tests;
