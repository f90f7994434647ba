//! Direct access to a split virtqueue for the net data path: the descriptor table and the
//! available ring are translated to host addresses once per pass ([`RingView`]), and buffers
//! through a one-region cache ([`RegionCache`]), instead of one guest-memory lookup per
//! descriptor, ring entry and copy.
//!
//! A chain is walked exactly as virtio-queue's `DescriptorChain` walks it: at most the table's
//! size of descriptors (so a link loop ends), one level of indirect table (whose length must
//! be a multiple of 16 and at most 65535 entries), and a link past the table or a descriptor
//! outside guest memory ends the chain. Everything read from the ring is validated before use;
//! the driver may change it meanwhile.
//!
//! Host addresses are valid while the memory snapshot they came from is borrowed: a view and
//! a cache live for one pass over a queue.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;

use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions,
};

/// `VIRTQ_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`.
const DESC_F_INDIRECT: u16 = 4;

/// One split-ring descriptor, as read (not yet validated beyond its links).
#[derive(Clone, Copy, Debug)]
pub struct Descriptor {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    flags: u16,
    next: u16,
}

impl Descriptor {
    /// The device writes this buffer.
    pub fn is_write_only(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }
}

/// The host address of the `len` (> 0) bytes of guest memory at `addr` if they lie in one
/// mapped region. Valid while `mem` is borrowed.
pub fn host_range<M: GuestMemory>(mem: &M, addr: u64, len: usize) -> Option<usize> {
    if let Some(phys) = mem.physical_memory() {
        let r = phys.find_region(GuestAddress(addr))?;
        let off = addr.checked_sub(r.start_addr().raw_value())?;
        if off.checked_add(len as u64)? > r.len() {
            return None;
        }
        let base = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
        return Some(base + off as usize);
    }
    let mut slices = mem
        .get_slices(GuestAddress(addr), len, Permissions::ReadWrite)
        .ok()?;
    let first = slices.next()?.ok()?;
    (first.len() == len).then(|| first.ptr_guard().as_ptr() as usize)
}

/// The region a pass found its last buffer in (drivers' buffers usually share one).
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionCache(Option<(u64, u64, usize)>);

impl RegionCache {
    /// The host address of `len` (> 0) bytes at `addr` if they lie in one region of plain
    /// memory (`None`: spanning regions, behind an IOMMU, or outside memory; the caller
    /// goes through `mem` instead).
    pub fn host<M: GuestMemory>(&mut self, mem: &M, addr: u64, len: usize) -> Option<usize> {
        let within = |(start, size, host): (u64, u64, usize)| {
            let off = addr.checked_sub(start)?;
            (off.checked_add(len as u64)? <= size).then(|| host + off as usize)
        };
        if let Some(h) = self.0.and_then(within) {
            return Some(h);
        }
        let r = mem.physical_memory()?.find_region(GuestAddress(addr))?;
        let base = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
        let region = (r.start_addr().raw_value(), r.len(), base);
        self.0 = Some(region);
        within(region)
    }
}

/// A split queue's descriptor table and available ring for one pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingView {
    /// Guest address, entries, host address (if in one region) of the descriptor table.
    table: (u64, u16, Option<usize>),
    /// Guest address and host address (if in one region) of the available ring.
    avail: (u64, Option<usize>),
}

impl RingView {
    /// `queue`'s rings in `mem`.
    pub fn new<M: GuestMemory>(queue: &Queue, mem: &M) -> Self {
        let size = queue.size();
        let (table, avail) = (queue.desc_table(), queue.avail_ring());
        RingView {
            table: (table, size, host_range(mem, table, 16 * usize::from(size))),
            avail: (avail, host_range(mem, avail, 4 + 2 * usize::from(size))),
        }
    }

    /// The head index in slot `slot` (modulo the size) of the available ring. Read after
    /// the available index that published it (acquire).
    pub fn avail_entry<M: GuestMemory>(&self, mem: &M, slot: u16) -> Result<u16, Error> {
        let off = 4 + 2 * usize::from(slot % self.table.1.max(1));
        match self.avail.1 {
            // SAFETY: the ring's `4 + 2 * size` bytes lie in one region of `mem`
            // (`host_range`), borrowed for the pass; `off + 2` is within them.
            Some(h) => Ok(u16::from_le_bytes(unsafe {
                std::ptr::read_volatile((h + off) as *const [u8; 2])
            })),
            None => {
                let at = GuestAddress(self.avail.0)
                    .checked_add(off as u64)
                    .ok_or(Error::AddressOverflow)?;
                mem.load(at, Ordering::Acquire)
                    .map(u16::from_le)
                    .map_err(Error::GuestMemory)
            }
        }
    }

    /// The host address of descriptor `index` of the table, if the table is in one region
    /// and `index` is inside it (for prefetching; nothing is read).
    pub fn descriptor_address(&self, index: u16) -> Option<usize> {
        let (_, size, host) = self.table;
        (index < size).then_some(host? + 16 * usize::from(index))
    }

    /// Pass every descriptor of the chain at `head` to `each` (indirect tables followed),
    /// until the chain ends or `each` breaks.
    pub fn walk<M: GuestMemory>(
        &self,
        mem: &M,
        head: u16,
        mut each: impl FnMut(Descriptor) -> ControlFlow<()>,
    ) {
        let (mut table, mut size, mut host) = self.table;
        let (mut next, mut ttl, mut indirect, mut yielded) = (head, size, false, 0u32);
        while ttl > 0 && next < size {
            let Some(desc) = read_descriptor(mem, table, host, next) else {
                return;
            };
            if desc.flags & DESC_F_INDIRECT != 0 {
                if indirect || desc.len % 16 != 0 || desc.len / 16 > u32::from(u16::MAX) {
                    return;
                }
                table = desc.addr;
                size = (desc.len / 16) as u16;
                host = host_range(mem, desc.addr, desc.len as usize);
                (next, ttl, indirect) = (0, size, true);
                continue;
            }
            // A chain longer than 2^32 bytes is illegal (virtio 1.2, 2.7.5.2).
            let Some(y) = yielded.checked_add(desc.len) else {
                return;
            };
            yielded = y;
            if desc.flags & DESC_F_NEXT != 0 {
                next = desc.next;
                ttl -= 1;
            } else {
                ttl = 0;
            }
            if each(desc).is_break() {
                return;
            }
        }
    }
}

/// Descriptor `index` of the table at `table` (host address `host` when it lies in one
/// region); `None` if it is outside guest memory.
fn read_descriptor<M: GuestMemory>(
    mem: &M,
    table: u64,
    host: Option<usize>,
    index: u16,
) -> Option<Descriptor> {
    let off = 16 * usize::from(index);
    let raw: [u8; 16] = match host {
        // SAFETY: the table's `16 * entries` bytes lie in one region of `mem` (`host_range`),
        // borrowed for the pass, and `index` < entries (checked by the caller).
        Some(h) => unsafe { std::ptr::read_volatile((h + off) as *const [u8; 16]) },
        None => mem
            .read_obj(GuestAddress(table.checked_add(off as u64)?))
            .ok()?,
    };
    let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&raw[0..8]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&raw[8..12]);
    Some(Descriptor {
        addr: u64::from_le_bytes(addr),
        len: u32::from_le_bytes(len),
        flags: u16_at(12),
        next: u16_at(14),
    })
}
