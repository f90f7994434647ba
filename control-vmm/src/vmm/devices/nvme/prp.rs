//! Physical Region Page entries (NVMe 1.2, 4.3): a command's data as guest-physical segments.
//! PRP1 may start inside a page (dword-aligned); PRP2 is the second page or, for more than two
//! pages, a PRP list whose last entry on each list page points to the next list page. Every
//! address comes from the guest: each entry and each segment is checked against guest RAM, and
//! the walk is bounded by the transfer length (checked against MDTS before).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Memory page size (CC.MPS = 0).
pub const PAGE: u64 = 4096;

/// A PRP the guest got wrong; each maps to a command status.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrpError {
    #[error("PRP entry {0:#x} has an invalid offset")]
    Offset(u64),
    #[error("{len} bytes at {gpa:#x} are not guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
}

/// A guest-physical range of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub len: usize,
}

fn in_ram(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), PrpError> {
    let ok = usize::try_from(len)
        .is_ok_and(|n| GuestMemoryBackend::check_range(mem, GuestAddress(gpa), n));
    if ok {
        Ok(())
    } else {
        Err(PrpError::OutsideRam { gpa, len })
    }
}

fn read_entry(mem: &GuestMemoryMmap, at: u64) -> Result<u64, PrpError> {
    mem.read_obj::<u64>(GuestAddress(at))
        .map_err(|_| PrpError::OutsideRam { gpa: at, len: 8 })
}

/// The segments of a `len`-byte transfer described by `prp1` and `prp2`.
pub fn segments(
    mem: &GuestMemoryMmap,
    prp1: u64,
    prp2: u64,
    len: u64,
) -> Result<Vec<Segment>, PrpError> {
    let mut out = Vec::new();
    if len == 0 {
        return Ok(out);
    }
    if !prp1.is_multiple_of(4) {
        return Err(PrpError::Offset(prp1));
    }
    let mut push = |gpa: u64, n: u64| -> Result<(), PrpError> {
        in_ram(mem, gpa, n)?;
        out.push(Segment {
            gpa,
            // `n` is at most one page.
            len: n as usize,
        });
        Ok(())
    };
    let first = len.min(PAGE - prp1 % PAGE);
    push(prp1, first)?;
    let mut left = len - first;
    if left == 0 {
        return Ok(out);
    }
    if left <= PAGE {
        if !prp2.is_multiple_of(PAGE) {
            return Err(PrpError::Offset(prp2));
        }
        push(prp2, left)?;
        return Ok(out);
    }
    // A PRP list: qword-aligned, possibly starting inside its page.
    if !prp2.is_multiple_of(8) {
        return Err(PrpError::Offset(prp2));
    }
    let mut entry = prp2;
    while left > 0 {
        let last_in_page = (entry + 8).is_multiple_of(PAGE);
        let value = read_entry(mem, entry)?;
        if last_in_page && left > PAGE {
            // A pointer to the next list page.
            if value % 8 != 0 {
                return Err(PrpError::Offset(value));
            }
            entry = value;
            continue;
        }
        if value % PAGE != 0 {
            return Err(PrpError::Offset(value));
        }
        let n = left.min(PAGE);
        push(value, n)?;
        left -= n;
        entry += 8;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn one_two_and_many_pages() {
        let m = mem();
        let s = segments(&m, 0x1200, 0, 0x200).unwrap();
        assert_eq!(
            s,
            [Segment {
                gpa: 0x1200,
                len: 0x200
            }]
        );
        let s = segments(&m, 0x1800, 0x5000, 0x1000).unwrap();
        assert_eq!(
            s,
            [
                Segment {
                    gpa: 0x1800,
                    len: 0x800
                },
                Segment {
                    gpa: 0x5000,
                    len: 0x800
                }
            ]
        );
        // Three pages: a list at 0x8000 with two entries.
        m.write_obj(0x20000u64, GuestAddress(0x8000)).unwrap();
        m.write_obj(0x30000u64, GuestAddress(0x8008)).unwrap();
        let s = segments(&m, 0x10000, 0x8000, 3 * PAGE).unwrap();
        let gpas: Vec<u64> = s.iter().map(|s| s.gpa).collect();
        assert_eq!(gpas, [0x10000, 0x20000, 0x30000]);
        // A list starting at the page's last entry chains to the next list page.
        m.write_obj(0x9000u64, GuestAddress(0x8ff8)).unwrap();
        m.write_obj(0x40000u64, GuestAddress(0x9000)).unwrap();
        m.write_obj(0x50000u64, GuestAddress(0x9008)).unwrap();
        let s = segments(&m, 0x10000, 0x8ff8, 3 * PAGE).unwrap();
        let gpas: Vec<u64> = s.iter().map(|s| s.gpa).collect();
        assert_eq!(gpas, [0x10000, 0x40000, 0x50000]);
    }

    #[test]
    fn hostile_prps_fail_without_touching_anything() {
        let m = mem();
        assert_eq!(segments(&m, 0x1001, 0, 8), Err(PrpError::Offset(0x1001)));
        assert_eq!(
            segments(&m, 1 << 32, 0, 0x1000),
            Err(PrpError::OutsideRam {
                gpa: 1 << 32,
                len: 0x1000
            })
        );
        assert_eq!(
            segments(&m, 0x1000, 0x5008, 0x2000),
            Err(PrpError::Offset(0x5008))
        );
        // A list outside RAM, and a list entry outside RAM.
        assert_eq!(
            segments(&m, 0x1000, 1 << 40, 3 * PAGE),
            Err(PrpError::OutsideRam {
                gpa: 1 << 40,
                len: 8
            })
        );
        m.write_obj(0xfff0_0000u64, GuestAddress(0x8000)).unwrap();
        assert!(matches!(
            segments(&m, 0x1000, 0x8000, 3 * PAGE),
            Err(PrpError::OutsideRam {
                gpa: 0xfff0_0000,
                ..
            })
        ));
        // The last page of RAM plus one byte.
        assert!(segments(&m, (1 << 20) - 0x1000, 0, 0x1000).is_ok());
        assert!(segments(&m, (1 << 20) - 0x1000, 1 << 20, 0x1001).is_err());
    }
}
