//! The driver VM's isolation probe (`driver-domain vm-probe`, docs/driver-vm.md, "What the
//! driver VM can see"): run inside the driver VM, it tries to reach a guest's memory and
//! says what it found. It maps all of BAR2 of the cross-VM device (the only place dom0 puts
//! guest memory), reads from BAR0 which regions dom0 maps there, waits until one of them holds
//! a marker the guest's side wrote into its I/O window (proof that the scan sees the guest's
//! shared memory), then scans every mapped byte for a secret the guest keeps outside its
//! window (which must not be there), samples the unmapped rest (which must read zero), tries
//! to map past BAR2's end (which the kernel must refuse), and optionally scans the driver
//! VM's own RAM through `/proc/kcore` for the secret and tries `/dev/mem` on it.
//!
//! The secret is held complemented ([`Secret`]): the plain bytes never sit in this process's
//! memory, so a scan of the VM's RAM cannot find the probe's own copy.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::mapping::{Mapping, MappingError};
use super::xvm_device::{CrossVmDevice, XvmDeviceError};

/// Bytes copied out of BAR2 (or read from kcore) at a time.
const CHUNK: usize = 1 << 20;
/// Unmapped BAR2 is sampled once per this many bytes (each read an exit to dom0's VMM).
const SAMPLE_STRIDE: u64 = 256 << 10;
/// Looks at the region table after the marker is seen, until two in a row agree (dom0 maps a
/// memory table's regions one by one, and a frontend may send more than one table).
const SETTLE_LOOKS: u32 = 10;

/// Why the probe could not run (a finding is never an error: it is in the report).
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Device(#[from] XvmDeviceError),
    #[error("BAR2: {0}")]
    Map(#[from] MappingError),
    #[error("BAR2 is {0} bytes: too large to map here")]
    Bar2Size(u64),
    #[error("{0:?}: not an even number of hex digits")]
    Hex(String),
    #[error("the markers must be 8 to 4096 bytes")]
    MarkerLength,
}

/// The secret, complemented byte by byte: what the probe holds instead of the bytes it looks
/// for.
#[derive(Debug, Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// From hex digit pairs (the plain secret), complemented as they are parsed.
    pub fn from_hex(s: &str) -> Result<Self, ProbeError> {
        ipc::hex::bytes_with(s, |b| !b)
            .map(Secret)
            .ok_or_else(|| ProbeError::Hex(s.to_owned()))
    }

    /// Whether `hay` holds the secret, and where first. Candidates are found with memchr on
    /// the secret's first byte that is neither 0x00 nor 0xff (the commonest bytes of memory).
    pub fn find_in(&self, hay: &[u8]) -> Option<usize> {
        let inv = std::hint::black_box(&self.0);
        let k = inv.iter().position(|n| *n != 0 && *n != 0xff).unwrap_or(0);
        let anchor = !*inv.get(k)?;
        let mut from = k;
        while let Some(i) = memchr(anchor, hay.get(from..)?) {
            let at = from + i - k;
            let rest = hay.get(at..at + inv.len())?;
            if rest.iter().zip(inv.iter()).all(|(h, n)| *h == !*n) {
                return Some(at);
            }
            from += i + 1;
        }
        None
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Bytes from hex digit pairs.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, ProbeError> {
    ipc::hex::bytes(s).ok_or_else(|| ProbeError::Hex(s.to_owned()))
}

/// The first `byte` in `hay` (libc's memchr: fast even in a debug build).
fn memchr(byte: u8, hay: &[u8]) -> Option<usize> {
    // SAFETY: memchr reads at most `hay.len()` bytes from `hay`'s start, which is valid.
    let p = unsafe { libc::memchr(hay.as_ptr().cast(), i32::from(byte), hay.len()) };
    (!p.is_null()).then(|| p as usize - hay.as_ptr() as usize)
}

/// The first `needle` in `hay`.
fn memmem(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // SAFETY: memmem reads within both slices, which are valid for their lengths.
    let p = unsafe {
        libc::memmem(
            hay.as_ptr().cast(),
            hay.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    (!p.is_null()).then(|| p as usize - hay.as_ptr() as usize)
}

/// What to look for and where.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The window marker: must be found in BAR2.
    pub find: Vec<u8>,
    /// The secret kept outside the window: must not be found.
    pub secret: Secret,
    /// How long to wait for the window marker.
    pub wait: Duration,
    /// Pause between looks.
    pub poll: Duration,
    /// Try to read the VM's own RAM through this /dev/mem, and scan it for the secret
    /// through this kcore file (slow in the nested lab: 160 MiB take most of a minute).
    pub devmem: Option<PathBuf>,
    pub kcore: Option<PathBuf>,
}

/// What the probe found.
#[derive(Debug, Default)]
pub struct ProbeReport {
    pub bar2_bytes: u64,
    /// (offset, length) of the regions dom0 maps in BAR2, at the scan, and how long each
    /// took to scan.
    pub regions: Vec<(u64, u64)>,
    pub region_scans: Vec<Duration>,
    /// Where the window marker is in BAR2, and after how long it was seen.
    pub marker_at: Option<u64>,
    pub waited: Duration,
    /// BAR2 offsets of the secret (at most a few).
    pub secret_in_bar2: Vec<u64>,
    /// Unmapped BAR2 samples read, and how many were not zero.
    pub unmapped_samples: u64,
    pub unmapped_nonzero: u64,
    /// Whether the region table was the same after the scan as before it (else the scan may
    /// have missed what was mapped meanwhile).
    pub table_stable: bool,
    /// Time spent scanning BAR2's regions, sampling the rest, and on the VM's own RAM.
    pub timing: [Duration; 3],
    /// Mapping BAR2's file past its end, from its end and from 0: the errors (None: allowed).
    pub past_end: Option<io::Error>,
    pub oversized: Option<io::Error>,
    /// The VM's own RAM: bytes scanned through kcore (or why not), secrets found, and what
    /// /dev/mem said to a read of RAM at 16 MiB.
    pub ram: Option<RamScan>,
}

/// The VM's own RAM.
#[derive(Debug)]
pub struct RamScan {
    /// Bytes scanned through kcore, or why not; None: not asked.
    pub scanned: Option<io::Result<u64>>,
    pub secret_found: u64,
    /// Bytes /dev/mem gave for RAM at 16 MiB, or its error.
    pub devmem: io::Result<usize>,
}

impl ProbeReport {
    /// Backed bytes of BAR2.
    pub fn backed(&self) -> u64 {
        self.regions.iter().map(|(_, len)| len).sum()
    }

    /// Whether isolation held: the marker seen, no secret anywhere, nothing unmapped read
    /// non-zero, both mappings past the end refused.
    pub fn isolated(&self) -> bool {
        self.marker_at.is_some()
            && self.table_stable
            && self.secret_in_bar2.is_empty()
            && self.unmapped_nonzero == 0
            && self.past_end.is_some()
            && self.oversized.is_some()
            && self
                .ram
                .as_ref()
                .is_none_or(|r| r.secret_found == 0 && r.devmem.is_err())
    }

    /// Machine-readable lines (`DVM-PROBE ...`) for the lab.
    pub fn lines(&self) -> Vec<String> {
        let refused = |e: &Option<io::Error>| match e {
            Some(e) => format!("refused ({e})"),
            None => "ALLOWED".to_owned(),
        };
        let mut out = vec![format!(
            "DVM-PROBE bar2 {} bytes, {} region(s) mapped, backed {} bytes",
            self.bar2_bytes,
            self.regions.len(),
            self.backed()
        )];
        for (i, (offset, len)) in self.regions.iter().enumerate() {
            let took = self
                .region_scans
                .get(i)
                .map(|d| format!(" scanned in {:.2} s", d.as_secs_f64()))
                .unwrap_or_default();
            out.push(format!("DVM-PROBE region {offset:#x} +{len:#x}{took}"));
        }
        out.push(match self.marker_at {
            Some(at) => format!(
                "DVM-PROBE window-marker found at {at:#x} after {:.1} s",
                self.waited.as_secs_f64()
            ),
            None => format!(
                "DVM-PROBE window-marker NOT found in {:.1} s",
                self.waited.as_secs_f64()
            ),
        });
        out.push(format!(
            "DVM-PROBE secret in-bar2 {} (scanned {} bytes){}",
            self.secret_in_bar2.len(),
            self.backed(),
            self.secret_in_bar2
                .iter()
                .map(|at| format!(" at {at:#x}"))
                .collect::<String>()
        ));
        out.push(format!(
            "DVM-PROBE unmapped-samples {} nonzero {}",
            self.unmapped_samples, self.unmapped_nonzero
        ));
        if !self.table_stable {
            out.push("DVM-PROBE region table CHANGED during the scan".to_owned());
        }
        let [scan, sample, ram] = self.timing.map(|d| d.as_secs_f64());
        out.push(format!(
            "DVM-PROBE timing bar2-scan {scan:.2} s unmapped-samples {sample:.2} s own-ram {ram:.2} s"
        ));
        out.push(format!(
            "DVM-PROBE past-bar2 mmap-at-end {} mmap-oversized {}",
            refused(&self.past_end),
            refused(&self.oversized)
        ));
        if let Some(ram) = &self.ram {
            let scanned = match &ram.scanned {
                Some(Ok(n)) => format!("scanned {n} bytes"),
                Some(Err(e)) => format!("not scanned ({e})"),
                None => "not scanned (not asked)".to_owned(),
            };
            let devmem = match &ram.devmem {
                Ok(n) => format!("read {n} bytes"),
                Err(e) => format!("refused ({e})"),
            };
            out.push(format!(
                "DVM-PROBE own-ram kcore {scanned} secret {} devmem-16MiB {devmem}",
                ram.secret_found
            ));
        }
        out.push(format!(
            "DVM-PROBE result {}",
            if self.isolated() {
                "isolated"
            } else {
                "BREACH-OR-BLIND"
            }
        ));
        out
    }
}

/// Runs the probe on the cross-VM device `dev`; `seen` hears at once where the window marker
/// was found and after how long (the scan follows).
pub fn run(
    dev: &CrossVmDevice,
    cfg: &ProbeConfig,
    seen: &mut dyn FnMut(u64, Duration),
) -> Result<ProbeReport, ProbeError> {
    for len in [cfg.find.len(), cfg.secret.len()] {
        if !(8..=4096).contains(&len) {
            return Err(ProbeError::MarkerLength);
        }
    }
    let bar2_bytes = dev.shm_len();
    let len = usize::try_from(bar2_bytes).map_err(|_| ProbeError::Bar2Size(bar2_bytes))?;
    let bar2 = Mapping::new(dev.shm(), 0, len, false)?;
    let start = Instant::now();
    let mut report = ProbeReport {
        bar2_bytes,
        ..ProbeReport::default()
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        report.regions = dev.doorbells().bar2_regions()?;
        report.marker_at = first_in_regions(
            &bar2,
            &report.regions,
            &mut buf,
            |hay| memmem(hay, &cfg.find),
            cfg.find.len(),
        )?;
        report.waited = start.elapsed();
        if report.marker_at.is_some() || report.waited >= cfg.wait {
            break;
        }
        std::thread::sleep(cfg.poll);
    }
    if let Some(at) = report.marker_at {
        // Said at once: the lab holds the guest still (connected) from here to the report.
        seen(at, report.waited);
        for _ in 0..SETTLE_LOOKS {
            std::thread::sleep(cfg.poll);
            let again = dev.doorbells().bar2_regions()?;
            if again == report.regions {
                break;
            }
            report.regions = again;
        }
    }
    let t = Instant::now();
    // Every mapped byte, for the secret.
    let mut found = Vec::new();
    for &(offset, rlen) in &report.regions {
        let t = Instant::now();
        scan_region(
            &bar2,
            offset,
            rlen,
            &mut buf,
            cfg.secret.len(),
            |at, hay| {
                let mut from = 0;
                while let Some(i) = cfg.secret.find_in(&hay[from..]) {
                    found.push(at + (from + i) as u64);
                    from += i + 1;
                }
                found.len() < 16
            },
        )?;
        report.region_scans.push(t.elapsed());
    }
    // A match in the overlap of two chunks is seen twice.
    found.sort_unstable();
    found.dedup();
    report.secret_in_bar2 = found;
    // The rest of BAR2: one word per stride, each an exit to dom0's VMM.
    report.timing[0] = t.elapsed();
    let t = Instant::now();
    let mut at = 0;
    while at < bar2_bytes {
        if !report
            .regions
            .iter()
            .any(|&(o, l)| (o..o + l).contains(&at))
        {
            report.unmapped_samples += 1;
            let word = usize::try_from(at).map_or(Ok(0), |a| bar2.read_u64(a))?;
            if word != 0 {
                report.unmapped_nonzero += 1;
            }
        }
        at += SAMPLE_STRIDE;
    }
    report.timing[1] = t.elapsed();
    report.table_stable = dev.doorbells().bar2_regions()? == report.regions;
    (report.past_end, report.oversized) = past_bar2(dev.shm(), bar2_bytes);
    let t = Instant::now();
    if let Some(devmem) = &cfg.devmem {
        report.ram = Some(scan_own_ram(
            cfg.kcore.as_deref(),
            devmem,
            &cfg.secret,
            &mut buf,
        ));
    }
    report.timing[2] = t.elapsed();
    Ok(report)
}

/// The BAR2 offset of the first match `find` reports in the regions.
fn first_in_regions(
    bar2: &Mapping,
    regions: &[(u64, u64)],
    buf: &mut [u8],
    find: impl Fn(&[u8]) -> Option<usize>,
    needle_len: usize,
) -> Result<Option<u64>, ProbeError> {
    let mut hit = None;
    for &(offset, len) in regions {
        scan_region(bar2, offset, len, buf, needle_len, |at, hay| {
            hit = find(hay).map(|i| at + i as u64);
            hit.is_none()
        })?;
        if hit.is_some() {
            break;
        }
    }
    Ok(hit)
}

/// Copies the region at `offset` of `len` bytes out of BAR2 chunk by chunk (overlapping by
/// `overlap` bytes so that nothing straddling two chunks is missed) and hands each to `f`
/// with its BAR2 offset, while `f` says to go on. A region past the mapping is clipped.
fn scan_region(
    bar2: &Mapping,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    overlap: usize,
    mut f: impl FnMut(u64, &[u8]) -> bool,
) -> Result<(), ProbeError> {
    let end = offset.saturating_add(len).min(bar2.len() as u64);
    let step = (buf.len() - overlap.next_multiple_of(8)) as u64;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize & !7;
        if n == 0 {
            break;
        }
        let chunk = &mut buf[..n];
        bar2.read_words(at as usize, chunk)?;
        if !f(at, chunk) || at + n as u64 >= end {
            break;
        }
        at += step;
    }
    Ok(())
}

/// Tries to map `file` (BAR2's `resource2`) one page from its end, and one page longer than
/// it: the kernel must refuse both (the errors); a success is unmapped and reported as None.
fn past_bar2(file: &File, len: u64) -> (Option<io::Error>, Option<io::Error>) {
    let page = super::mapping::page_size();
    let try_map = |offset: u64, bytes: u64| -> Option<io::Error> {
        let (Ok(off), Ok(bytes)) = (libc::off_t::try_from(offset), usize::try_from(bytes)) else {
            return Some(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: a fresh read-only shared mapping chosen by the kernel (no MAP_FIXED); on
        // success it is unmapped at once and never touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Some(io::Error::last_os_error());
        }
        // SAFETY: unmaps exactly the mapping just made.
        unsafe { libc::munmap(p, bytes) };
        None
    };
    (try_map(len, page), try_map(0, len + page))
}

/// Scans the VM's RAM (the PT_LOAD segments of `kcore` that map physical memory, the
/// kernel's direct map) for the secret, if asked, and reads 8 bytes of RAM at 16 MiB through
/// `devmem`.
fn scan_own_ram(kcore: Option<&Path>, devmem: &Path, secret: &Secret, buf: &mut [u8]) -> RamScan {
    let mut found = 0;
    let scanned = kcore.map(|kcore| {
        File::open(kcore).and_then(|f| {
            let mut total = 0u64;
            for (file_offset, size) in kcore_ram_segments(&f)? {
                let overlap = secret.len() as u64;
                let step = buf.len() as u64 - overlap;
                let mut at = 0;
                while at < size {
                    let n = (size - at).min(buf.len() as u64) as usize;
                    let got = f.read_at(&mut buf[..n], file_offset + at)?;
                    if got == 0 {
                        break;
                    }
                    let last = at + got as u64 >= size || (got as u64) <= step;
                    // Matches starting in the overlap are the next chunk's to count.
                    let limit = if last { got } else { step as usize };
                    let mut from = 0;
                    while let Some(i) = secret.find_in(&buf[from..got]) {
                        if from + i >= limit {
                            break;
                        }
                        found += 1;
                        from += i + 1;
                    }
                    if last {
                        total += got as u64;
                        break;
                    }
                    total += step;
                    at += step;
                }
            }
            Ok(total)
        })
    });
    let devmem = File::open(devmem).and_then(|f| f.read_at(&mut [0u8; 8], 16 << 20));
    RamScan {
        scanned,
        secret_found: found,
        devmem,
    }
}

/// (file offset, size) of each PT_LOAD segment of the kcore ELF file with a physical address
/// (RAM) below the kernel text mapping (the direct map; the text segment repeats RAM).
fn kcore_ram_segments(f: &File) -> io::Result<Vec<(u64, u64)>> {
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a 64-bit ELF file",
        ));
    }
    let u64_at = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let u16_at = |b: &[u8], at: usize| {
        b.get(at..at + 2)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u16::from_le_bytes)
    };
    let phoff = u64_at(&eh, 0x20);
    let phentsize = u64::from(u16_at(&eh, 0x36));
    let phnum = u64::from(u16_at(&eh, 0x38));
    let mut out = Vec::new();
    for i in 0..phnum.min(4096) {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * phentsize)?;
        let p_type = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        let (offset, vaddr, paddr, filesz) = (
            u64_at(&ph, 8),
            u64_at(&ph, 16),
            u64_at(&ph, 24),
            u64_at(&ph, 32),
        );
        const PT_LOAD: u32 = 1;
        const KERNEL_TEXT: u64 = 0xffff_ffff_8000_0000;
        if p_type == PT_LOAD && paddr != u64::MAX && vaddr < KERNEL_TEXT && filesz > 0 {
            out.push((offset, filesz));
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "probe_tests.rs"]
mod tests;
