#![allow(clippy::unwrap_used)]
//! The isolation probe on a fake cross-VM device: BAR0's region table and BAR2 are files.

use super::*;
use crate::hw::pci::fake::FakeSysfs;
use crate::vm_tunnel::xvm_device::tests::fake_device;

const DEV: &str = "devices/pci0000:00/0000:00:04.0";
const MARKER: &str = "57494e444f572d4d41524b45522d3031";
const SECRET: &str = "5345435245542d6e6f742d7368617265";

fn file(fake: &FakeSysfs, name: &str) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fake.dir.path().join(DEV).join(name))
        .unwrap()
}

/// Lists `regions` in the fake BAR0's table.
fn set_regions(fake: &FakeSysfs, regions: &[(u64, u64)]) {
    let bar0 = file(fake, "resource0");
    bar0.write_all_at(&(regions.len() as u32).to_le_bytes(), 8)
        .unwrap();
    for (i, (offset, len)) in regions.iter().enumerate() {
        let at = 0x800 + 16 * i as u64;
        bar0.write_all_at(&offset.to_le_bytes(), at).unwrap();
        bar0.write_all_at(&len.to_le_bytes(), at + 8).unwrap();
    }
}

fn put(fake: &FakeSysfs, at: u64, hex: &str) {
    file(fake, "resource2")
        .write_all_at(&parse_hex(hex).unwrap(), at)
        .unwrap();
}

fn config(wait_ms: u64) -> ProbeConfig {
    ProbeConfig {
        find: parse_hex(MARKER).unwrap(),
        secret: Secret::from_hex(SECRET).unwrap(),
        wait: Duration::from_millis(wait_ms),
        poll: Duration::from_millis(5),
        devmem: None,
        kcore: None,
    }
}

#[test]
fn the_secret_is_held_complemented_and_found_in_plain() {
    let secret = Secret::from_hex("00ff10").unwrap();
    assert_eq!(secret.0, vec![0xff, 0x00, 0xef]);
    assert_eq!(secret.find_in(&[1, 0, 0xff, 0, 0xff, 0x10, 9]), Some(3));
    assert_eq!(secret.find_in(&[0, 0xff]), None, "cut short");
    assert_eq!(secret.find_in(&[]), None);
    assert!(Secret::from_hex("abc").is_err());
    assert!(parse_hex("zz").is_err());
}

#[test]
fn the_window_marker_is_found_and_a_secret_outside_the_regions_is_not() {
    let fake = fake_device(256, 8 << 20);
    // Two regions; the marker in the second, the secret in unmapped BAR2 between them (not
    // on a sampled word).
    set_regions(&fake, &[(0, 0x10_0000), (0x20_0000, 0x20_0000)]);
    put(&fake, 0x30_0008, MARKER);
    put(&fake, 0x18_0100, SECRET);
    let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
    let mut seen = None;
    let report = run(&dev, &config(1000), &mut |at, _| seen = Some(at)).unwrap();
    assert_eq!(seen, Some(0x30_0008), "heard before the scan");
    assert_eq!(report.bar2_bytes, 8 << 20);
    assert_eq!(report.regions, vec![(0, 0x10_0000), (0x20_0000, 0x20_0000)]);
    assert_eq!(report.backed(), 0x30_0000);
    assert_eq!(report.marker_at, Some(0x30_0008));
    assert!(report.secret_in_bar2.is_empty());
    assert_eq!(
        report.unmapped_samples,
        (8 << 20) / SAMPLE_STRIDE - 0x30_0000 / SAMPLE_STRIDE
    );
    assert_eq!(report.unmapped_nonzero, 0);
    assert!(report.table_stable);
    // A regular file maps past its end: the check reports what a BAR file must refuse.
    assert!(report.past_end.is_none() && report.oversized.is_none());
    assert!(!report.isolated());
    let lines = report.lines();
    assert!(lines
        .iter()
        .any(|l| l.contains("window-marker found at 0x300008")));
    assert!(lines.iter().any(|l| l.contains("mmap-at-end ALLOWED")));
    assert_eq!(lines.last().unwrap(), "DVM-PROBE result BREACH-OR-BLIND");
}

#[test]
fn a_secret_in_a_mapped_region_is_found_even_across_chunks_and_unmapped_data_is_seen() {
    let fake = fake_device(256, 8 << 20);
    set_regions(&fake, &[(0x10_0000, 0x30_0000)]);
    put(&fake, 0x10_0000, MARKER);
    // Straddling the first and second 1 MiB chunks of the region.
    put(&fake, 0x20_0000 - 7, SECRET);
    put(&fake, 0x38_0000, SECRET);
    // Data where nothing is mapped, on a sampled word.
    put(&fake, 0x60_0000, MARKER);
    let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
    let report = run(&dev, &config(1000), &mut |_, _| {}).unwrap();
    assert_eq!(report.marker_at, Some(0x10_0000));
    assert_eq!(report.secret_in_bar2, vec![0x20_0000 - 7, 0x38_0000]);
    assert_eq!(report.unmapped_nonzero, 1);
}

#[test]
fn no_marker_within_the_wait_is_reported_as_such() {
    let fake = fake_device(256, 4 << 20);
    set_regions(&fake, &[(0, 0x1000)]);
    let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
    let report = run(&dev, &config(30), &mut |_, _| panic!("nothing to see")).unwrap();
    assert_eq!(report.marker_at, None);
    assert!(report.waited >= Duration::from_millis(30));
    assert!(report
        .lines()
        .iter()
        .any(|l| l.starts_with("DVM-PROBE window-marker NOT found")));
}

#[test]
fn regions_past_the_table_or_markers_of_odd_sizes_are_refused() {
    let fake = fake_device(256, 4 << 20);
    file(&fake, "resource0")
        .write_all_at(&129u32.to_le_bytes(), 8)
        .unwrap();
    let dev = CrossVmDevice::open(&fake.sysfs()).unwrap();
    assert!(matches!(
        run(&dev, &config(10), &mut |_, _| {}),
        Err(ProbeError::Device(XvmDeviceError::TooManyRegions(129)))
    ));
    let mut short = config(10);
    short.find = vec![1, 2, 3];
    assert!(matches!(
        run(&dev, &short, &mut |_, _| {}),
        Err(ProbeError::MarkerLength)
    ));
}

/// A kcore-like ELF file: a RAM segment of 3 MiB holding the secret twice (once across the
/// 1 MiB chunks), a segment without a physical address holding it too (not RAM: skipped).
fn fake_kcore(dir: &Path) -> PathBuf {
    let path = dir.join("kcore");
    let f = File::create(&path).unwrap();
    let mut eh = [0u8; 64];
    eh[..5].copy_from_slice(b"\x7fELF\x02");
    eh[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    eh[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    eh[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
    f.write_all_at(&eh, 0).unwrap();
    let segment = |i: u64, offset: u64, vaddr: u64, paddr: u64, size: u64| {
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&1u32.to_le_bytes());
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&size.to_le_bytes());
        f.write_all_at(&ph, 64 + 56 * i).unwrap();
    };
    segment(0, 0x1000, 0xffff_8880_0000_0000, 0, 3 << 20);
    segment(1, 0x40_1000, 0xffff_c900_0000_0000, u64::MAX, 0x1000);
    let secret = parse_hex(SECRET).unwrap();
    f.write_all_at(&secret, 0x1000 + (1 << 20) - 5).unwrap();
    f.write_all_at(&secret, 0x1000 + (3 << 20) - 16).unwrap();
    f.write_all_at(&secret, 0x40_1000).unwrap();
    path
}

#[test]
fn own_ram_is_scanned_through_the_ram_segments_of_kcore() {
    let dir = tempfile::tempdir().unwrap();
    let kcore = fake_kcore(dir.path());
    let devmem = dir.path().join("mem");
    let mut buf = vec![0u8; CHUNK];
    let secret = Secret::from_hex(SECRET).unwrap();
    let scan = scan_own_ram(Some(&kcore), &devmem, &secret, &mut buf);
    assert_eq!(scan.scanned.unwrap().unwrap(), 3 << 20);
    assert_eq!(scan.secret_found, 2);
    assert!(scan.devmem.is_err(), "no such file");
    let other = Secret::from_hex("0102030405060708").unwrap();
    assert_eq!(
        scan_own_ram(Some(&kcore), &devmem, &other, &mut buf).secret_found,
        0
    );
    assert!(scan_own_ram(None, &devmem, &secret, &mut buf)
        .scanned
        .is_none());
}

#[test]
fn candidates_anchor_on_a_byte_that_is_not_zero_or_all_ones() {
    let secret = Secret::from_hex("0000ff2a00").unwrap();
    let mut hay = vec![0u8; 64];
    hay[40..45].copy_from_slice(&[0, 0, 0xff, 0x2a, 0]);
    assert_eq!(secret.find_in(&hay), Some(40));
    assert_eq!(secret.find_in(&hay[..44]), None, "cut short");
    assert_eq!(secret.find_in(&hay[41..]), None, "its start cut off");
    hay[3] = 0x2a;
    assert_eq!(
        secret.find_in(&hay),
        Some(40),
        "a lone anchor byte is no match"
    );
}
