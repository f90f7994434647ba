//! Arbitrary bytes into the incremental xenstore decoder, fed in chunks whose
//! size the input picks. Checks: no panic, payloads within the limit, chunked
//! decoding equals one-shot decoding, and every message re-encodes to the
//! bytes it came from.
#![no_main]

use ipc::xenstore::wire::{Decoder, Message, WireError, PAYLOAD_MAX};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Item {
    Msg(Message),
    Err(WireError),
}

/// Decodes `data` feeding at most `chunk` bytes at a time; stops after a fatal error.
fn run(data: &[u8], chunk: usize) -> Vec<Item> {
    let mut d = Decoder::new();
    let mut items = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + chunk).min(data.len());
        let mut piece = &data[pos..end];
        while !piece.is_empty() {
            let (used, res) = d.decode(piece);
            assert!(used <= piece.len());
            let start = pos + (end - pos - piece.len());
            piece = &piece[used..];
            match res {
                Ok(Some(m)) => {
                    assert!(m.payload.len() <= PAYLOAD_MAX);
                    // The message ends exactly where the decoder stopped.
                    let consumed_to = start + used;
                    let enc = m.encode();
                    assert!(consumed_to >= enc.len());
                    assert_eq!(&data[consumed_to - enc.len()..consumed_to], &enc[..]);
                    items.push(Item::Msg(m));
                }
                Ok(None) => assert!(piece.is_empty() || used > 0),
                Err(e @ WireError::TooLong(_)) => {
                    items.push(Item::Err(e));
                    return items;
                }
                Err(e) => items.push(Item::Err(e)),
            }
            if used == 0 && !piece.is_empty() {
                unreachable!("decoder made no progress");
            }
        }
        pos = end;
    }
    items
}

fuzz_target!(|data: &[u8]| {
    let Some((&c, rest)) = data.split_first() else { return };
    let chunk = usize::from(c % 64) + 1;
    let whole = run(rest, rest.len().max(1));
    let pieces = run(rest, chunk);
    assert_eq!(whole, pieces);
});
