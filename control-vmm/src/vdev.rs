//! Virtual disk names (`xvda`, `xvdb`, ...) and the device numbers Xen gives them.
//!
//! splitvmm numbers disks as Xen does (docs/misc/vbd-interface.txt in Xen's tree), so the
//! number in the store is the one a Xen guest would see: disk `n` (0 for `xvda`) below 16 is
//! `202 << 8 | n << 4` (51712 for `xvda`, 51728 for `xvdb`), and from 16 on the extended form
//! `1 << 28 | n << 8`. Names go on with `xvdaa` after `xvdz`. Only whole disks are named:
//! a vbd is a whole disk here, never a partition. Wherever the command line or the host file
//! takes a disk number it takes the name too.

use std::fmt;

/// Major number of Xen's `xvd` disks.
const XVD_MAJOR: u32 = 202;
/// Flag of the extended numbering.
const EXTENDED: u32 = 1 << 28;
/// Disks the extended numbering can name (20 bits of disk number).
const MAX_DISKS: u32 = 1 << 20;

/// A disk name or number that does not name a whole disk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a disk: give a name (xvda, xvdb, ...) or a Xen device number (51712 is xvda)"
)]
pub struct VdevError(pub String);

/// The device number of disk `index` (0 for `xvda`).
pub fn devid_of_index(index: u32) -> Option<u32> {
    match index {
        0..=15 => Some(XVD_MAJOR << 8 | index << 4),
        16.. if index < MAX_DISKS => Some(EXTENDED | index << 8),
        _ => None,
    }
}

/// The disk index a device number names, if it is a whole xvd disk.
pub fn index_of_devid(devid: u32) -> Option<u32> {
    if devid & EXTENDED != 0 {
        let index = (devid & !EXTENDED) >> 8;
        (devid & 0xff == 0 && devid >> 29 == 0 && index >= 16).then_some(index)
    } else {
        (devid >> 8 == XVD_MAJOR && devid & 0xf == 0).then_some((devid >> 4) & 0xf)
    }
}

/// `xvda`, ..., `xvdz`, `xvdaa`, ...: the letters of disk `index` (bijective base 26).
fn letters(index: u32) -> String {
    let mut n = index + 1;
    let mut out = Vec::new();
    while n > 0 {
        n -= 1;
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The name of a device number, if it names a whole xvd disk.
pub fn name_of(devid: u32) -> Option<String> {
    index_of_devid(devid).map(|i| format!("xvd{}", letters(i)))
}

/// Parses a disk name (`xvdb`) or a device number (`51728`).
pub fn parse(text: &str) -> Result<u32, VdevError> {
    let bad = || VdevError(text.to_owned());
    if let Ok(number) = text.parse::<u32>() {
        return index_of_devid(number).map(|_| number).ok_or_else(bad);
    }
    let letters = text.strip_prefix("xvd").ok_or_else(bad)?;
    if letters.is_empty() || letters.len() > 5 || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(bad());
    }
    let mut n: u32 = 0;
    for b in letters.bytes() {
        n = n * 26 + u32::from(b - b'a') + 1;
    }
    devid_of_index(n - 1).ok_or_else(bad)
}

/// A disk number as the command line takes it: a name or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vdev(pub u32);

impl std::str::FromStr for Vdev {
    type Err = VdevError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Vdev)
    }
}

impl fmt::Display for Vdev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match name_of(self.0) {
            Some(name) => f.write_str(&name),
            None => write!(f, "{}", self.0),
        }
    }
}

/// For serde: a disk number in the host file, given as `51728` or `"xvdb"`.
pub fn deserialize_devid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum NameOrNumber {
        Number(u32),
        Name(String),
    }
    let text = match NameOrNumber::deserialize(d)? {
        NameOrNumber::Number(n) => n.to_string(),
        NameOrNumber::Name(s) => s,
    };
    parse(&text).map_err(serde::de::Error::custom)
}

use serde::Deserialize;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_xen_numbers() {
        assert_eq!(parse("xvda"), Ok(51712));
        assert_eq!(parse("xvdb"), Ok(51728));
        assert_eq!(parse("xvdp"), Ok(51712 + 15 * 16));
        // From the 17th disk on, Xen's extended numbering.
        assert_eq!(parse("xvdq"), Ok(EXTENDED | 16 << 8));
        assert_eq!(parse("xvdaa"), Ok(EXTENDED | 26 << 8));
        assert_eq!(parse("51728"), Ok(51728));
    }

    #[test]
    fn names_round_trip() {
        for index in [0, 1, 15, 16, 25, 26, 27, 701, 702, 100_000] {
            let devid = devid_of_index(index).unwrap();
            let name = name_of(devid).unwrap();
            assert_eq!(parse(&name), Ok(devid), "{name}");
            assert_eq!(index_of_devid(devid), Some(index));
        }
    }

    #[test]
    fn partitions_and_junk_are_refused() {
        for bad in ["xvd", "xvdA", "sda", "51713", "0", "xvda1", "", "xvdzzzzzz"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(name_of(51713), None);
        assert_eq!(Vdev(51713).to_string(), "51713");
        assert_eq!(Vdev(51728).to_string(), "xvdb");
    }
}
