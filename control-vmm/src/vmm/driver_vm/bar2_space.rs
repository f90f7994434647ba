//! Where in BAR2 each memory region of a channel's table goes: first fit over the free space,
//! page-aligned (2 MiB-aligned for regions of 2 MiB or more, so that the driver VM can back
//! them with huge pages); a region's space is freed when its channel closes or sends a new
//! table.

use std::collections::BTreeMap;

/// Alignment of small regions.
const PAGE: u64 = 4096;
/// Alignment of regions of at least this size.
const HUGE: u64 = 2 << 20;

/// The offsets of BAR2 in use.
#[derive(Debug)]
pub struct Bar2Space {
    size: u64,
    /// offset -> length.
    used: BTreeMap<u64, u64>,
}

impl Bar2Space {
    /// An empty BAR2 of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            used: BTreeMap::new(),
        }
    }

    /// A free, aligned range of `len` bytes (rounded up to whole pages), or None when none is
    /// left.
    pub fn allocate(&mut self, len: u64) -> Option<u64> {
        let len = len.checked_next_multiple_of(PAGE)?;
        if len == 0 {
            return None;
        }
        let align = if len >= HUGE { HUGE } else { PAGE };
        let mut at = 0u64;
        for (&start, &used) in &self.used {
            let candidate = at.checked_next_multiple_of(align)?;
            if candidate.checked_add(len)? <= start {
                break;
            }
            at = start + used;
        }
        let candidate = at.checked_next_multiple_of(align)?;
        if candidate.checked_add(len)? > self.size {
            return None;
        }
        self.used.insert(candidate, len);
        Some(candidate)
    }

    /// Frees the range allocated at `offset`.
    pub fn free(&mut self, offset: u64) {
        self.used.remove(&offset);
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.used.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_aligned_and_reused_after_free() {
        let mut s = Bar2Space::new(16 << 20);
        assert_eq!(s.allocate(0x1000), Some(0));
        assert_eq!(s.allocate(0x1800), Some(0x1000), "rounded up to pages");
        assert_eq!(s.allocate(4 << 20), Some(2 << 20), "2 MiB-aligned");
        assert_eq!(
            s.allocate(0x1000),
            Some(0x3000),
            "the gap below is used first"
        );
        assert_eq!(s.used(), 0x1000 + 0x2000 + (4 << 20) + 0x1000);
        assert_eq!(s.allocate(12 << 20), None, "does not fit");
        s.free(2 << 20);
        assert_eq!(s.allocate(12 << 20), Some(2 << 20));
        assert_eq!(s.allocate(2 << 20), Some(14 << 20), "the end");
        assert_eq!(s.allocate(0x1000), Some(0x4000));
        assert_eq!(s.allocate(2 << 20), None, "full");
        s.free(0);
        assert_eq!(s.allocate(0x1000), Some(0));
        assert_eq!(s.allocate(0), None);
        assert_eq!(s.allocate(u64::MAX), None);
    }
}
