//! Bytes written as hex digit pairs on a command line (the driver VM's isolation test passes
//! its markers this way: docs/driver-vm.md, "What the driver VM can see").

/// The bytes of `s`, an even number of hex digits, each passed through `f` as it is parsed
/// (so that a caller can keep a transform of the bytes and never the bytes themselves); None
/// if `s` is empty, odd or not hex.
pub fn bytes_with(s: &str, f: impl Fn(u8) -> u8) -> Option<Vec<u8>> {
    // (from_str_radix alone would take a sign: "+1")
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .map(&f)
        })
        .collect()
}

/// The bytes of `s`, an even number of hex digits.
pub fn bytes(s: &str) -> Option<Vec<u8>> {
    bytes_with(s, |b| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_of_digits_become_bytes_and_anything_else_is_refused() {
        assert_eq!(bytes("00ff1A"), Some(vec![0x00, 0xff, 0x1a]));
        assert_eq!(bytes_with("00ff", |b| !b), Some(vec![0xff, 0x00]));
        for bad in ["", "abc", "zz", "+1", "é1"] {
            assert_eq!(bytes(bad), None, "{bad:?}");
        }
    }
}
