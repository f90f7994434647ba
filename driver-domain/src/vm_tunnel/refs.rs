//! References back into descriptors: a frontend's message arrives with its fds replaced by
//! references to what dom0 set up (docs/protocol.md, "The driver-VM tunnel"); this turns each
//! into the descriptor the backend expects, and keeps what each channel bound so it can be
//! released when the channel closes:
//!
//! - MEMORY (a memory-table region; dom0 mapped it into BAR2 and rewrote its `mmap_offset`):
//!   a duplicate of BAR2's `resource2` file;
//! - DOORBELL n (a call): an eventfd the doorbell relay turns into writes of doorbell n;
//! - POLLED (a kick): an eventfd the ring poller signals when the ring's avail index moves;
//! - NONE (an error fd dom0 dropped): an eventfd nobody reads;
//! - MEMORY for SET_INFLIGHT_FD (the in-flight log dom0 keeps, mapped into BAR2 and its
//!   `mmap_offset` rewritten): a duplicate of `resource2` too.
//!
//! Each reference must be the kind its message's fd calls for, a doorbell must be one of its
//! channel's (channel * 16 + queue) and a region's offset the one in the table: anything else
//! fails the channel.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use ipc::tunnel::vhost_msg::{frontend_fd_roles, mem_table_regions, FdRole, VhostMsgError};
use ipc::tunnel::{Ref, RefKind};
use log::warn;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::doorbell::{DoorbellError, DoorbellRelay};
use super::poller::{PollerError, RingPoller};
use super::rings::{RingEvent, RingTable, RingsError};
use super::xvm_device::QUEUES_PER_CHANNEL;

/// Why a message's references cannot be turned into descriptors.
#[derive(Debug, Error)]
pub enum RefError {
    /// The message is malformed or its references are not as many as its fds.
    #[error(transparent)]
    Message(#[from] VhostMsgError),
    /// A reference of the wrong kind for its fd.
    #[error("{role:?} came as a {kind:?} reference")]
    Mismatch { role: FdRole, kind: RefKind },
    /// A doorbell that is not this channel's queue's.
    #[error("queue {queue}'s call bound to doorbell {door}, not {expected}")]
    WrongDoorbell {
        queue: u32,
        door: u32,
        expected: u32,
    },
    /// A polled kick naming another queue than its message.
    #[error("queue {queue}'s kick refers to queue {named}")]
    WrongQueue { queue: u32, named: u32 },
    /// A memory reference whose offset is not its region's.
    #[error("region {region}: reference at BAR2 {value:#x}, the table says {table:#x}")]
    WrongOffset {
        region: usize,
        value: u64,
        table: u64,
    },
    /// The ring's avail index cannot be found.
    #[error(transparent)]
    Ring(#[from] RingsError),
    /// The doorbell relay refused.
    #[error(transparent)]
    Doorbell(#[from] DoorbellError),
    /// The poller refused.
    #[error(transparent)]
    Poller(#[from] PollerError),
    /// A descriptor could not be made.
    #[error("cannot make a descriptor: {0}")]
    Fd(#[source] io::Error),
}

/// What the in-VM side has for a channel's signals: BAR2 and the two threads.
#[derive(Clone, Copy)]
pub struct SignalPaths<'a> {
    pub shm: &'a File,
    pub relay: &'a DoorbellRelay,
    pub poller: &'a RingPoller,
}

/// What one channel bound: its doorbells and its polled kicks.
#[derive(Debug)]
pub struct ChannelSignals {
    channel: u16,
    doorbells: HashSet<u32>,
    kicks: HashMap<u32, EventFd>,
}

impl ChannelSignals {
    pub fn new(channel: u16) -> Self {
        ChannelSignals {
            channel,
            doorbells: HashSet::new(),
            kicks: HashMap::new(),
        }
    }

    /// The descriptors for the references of `msg` (header + body), in order.
    pub fn resolve(
        &mut self,
        msg: &[u8],
        refs: &[Ref],
        rings: &RingTable,
        paths: SignalPaths<'_>,
    ) -> Result<Vec<OwnedFd>, RefError> {
        let roles = frontend_fd_roles(msg, refs.len())?;
        let mut fds = Vec::with_capacity(refs.len());
        for (role, r) in roles.into_iter().zip(refs) {
            let mismatch = RefError::Mismatch { role, kind: r.kind };
            let fd = match (role, r.kind) {
                (FdRole::MemoryRegion { region }, RefKind::Memory) => {
                    let body = msg.get(ipc::tunnel::vhost_msg::HEADER_LEN..).unwrap_or(&[]);
                    let table = mem_table_regions(body)?
                        .get(region)
                        .map(|r| r.mmap_offset)
                        .unwrap_or(u64::MAX);
                    if table != r.value {
                        return Err(RefError::WrongOffset {
                            region,
                            value: r.value,
                            table,
                        });
                    }
                    OwnedFd::from(paths.shm.try_clone().map_err(RefError::Fd)?)
                }
                (FdRole::Inflight, RefKind::Memory) => {
                    let body = msg.get(ipc::tunnel::vhost_msg::HEADER_LEN..).unwrap_or(&[]);
                    let shape = ipc::tunnel::vhost_msg::inflight_body(
                        vhost::vhost_user::message::FrontendReq::SET_INFLIGHT_FD,
                        body,
                    )?;
                    if shape.mmap_offset != r.value {
                        return Err(RefError::WrongOffset {
                            region: 0,
                            value: r.value,
                            table: shape.mmap_offset,
                        });
                    }
                    OwnedFd::from(paths.shm.try_clone().map_err(RefError::Fd)?)
                }
                (FdRole::Call { queue }, RefKind::Doorbell) => {
                    let expected = u32::from(self.channel) * QUEUES_PER_CHANNEL + queue;
                    if queue >= QUEUES_PER_CHANNEL || r.index != expected {
                        return Err(RefError::WrongDoorbell {
                            queue,
                            door: r.index,
                            expected,
                        });
                    }
                    let call = paths.relay.bind(r.index)?;
                    self.doorbells.insert(r.index);
                    eventfd_into_fd(call)
                }
                (FdRole::Kick { queue }, RefKind::Polled) => {
                    if r.index != queue {
                        return Err(RefError::WrongQueue {
                            queue,
                            named: r.index,
                        });
                    }
                    let offset = rings.avail_idx_offset(queue)?;
                    let kick = EventFd::new(EFD_NONBLOCK).map_err(RefError::Fd)?;
                    let theirs = kick.try_clone().map_err(RefError::Fd)?;
                    paths.poller.watch(
                        (self.channel, queue),
                        paths.shm,
                        offset,
                        kick.try_clone().map_err(RefError::Fd)?,
                    )?;
                    self.kicks.insert(queue, kick);
                    eventfd_into_fd(theirs)
                }
                (FdRole::Err { .. }, RefKind::None) => {
                    eventfd_into_fd(EventFd::new(EFD_NONBLOCK).map_err(RefError::Fd)?)
                }
                _ => return Err(mismatch),
            };
            fds.push(fd);
        }
        Ok(fds)
    }

    /// Follows a change of the memory table or of a ring: a polled ring's avail index is
    /// looked up again (or no longer polled once the ring stopped).
    pub fn follow(&mut self, event: RingEvent, rings: &RingTable, paths: SignalPaths<'_>) {
        let queues: Vec<u32> = match event {
            RingEvent::None => return,
            RingEvent::RingStopped(q) => {
                paths.poller.unwatch((self.channel, q));
                self.kicks.remove(&q);
                return;
            }
            RingEvent::MemTable => self.kicks.keys().copied().collect(),
            RingEvent::RingAddress(q) if self.kicks.contains_key(&q) => vec![q],
            RingEvent::RingAddress(_) => return,
        };
        for q in queues {
            let key = (self.channel, q);
            let Some(kick) = self.kicks.get(&q) else {
                continue;
            };
            let watched = rings
                .avail_idx_offset(q)
                .map_err(RefError::from)
                .and_then(|off| {
                    let kick = kick.try_clone().map_err(RefError::Fd)?;
                    Ok(paths.poller.watch(key, paths.shm, off, kick)?)
                });
            if let Err(e) = watched {
                warn!("channel {} queue {q}: no longer polled: {e}", self.channel);
                paths.poller.unwatch(key);
            }
        }
    }

    /// Releases everything the channel bound.
    pub fn release(&mut self, paths: SignalPaths<'_>) {
        paths.poller.unwatch_channel(self.channel);
        self.kicks.clear();
        for n in self.doorbells.drain() {
            paths.relay.unbind(n);
        }
    }
}

fn eventfd_into_fd(e: EventFd) -> OwnedFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` gives up the EventFd's ownership of its open descriptor, which
    // the OwnedFd takes over alone.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}
