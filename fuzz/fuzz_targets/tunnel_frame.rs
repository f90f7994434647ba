//! Arbitrary bytes into the driver-VM tunnel's frame decoder (what a driver VM, or a guest of
//! it, can write to dom0's COM2), fed in chunks whose size the input picks; every VHOST frame's
//! message then goes through the vhost-user walk a relay runs on it, and every CONTROL frame's
//! payload through the decoding both sides run on it. Checks: no panic, a bounded buffer,
//! chunked decoding equals one-shot decoding, every frame re-encodes and decodes to itself, a
//! CONTROL message that decodes re-encodes to a frame that decodes to it.
#![no_main]

use ipc::tunnel::vhost_msg::{frontend_fd_roles, mask_protocol_features_reply, rewrite_mmap_offsets};
use ipc::tunnel::{Frame, FrameDecoder, FrameKind, TunnelControl, TunnelError, FRAME_MAX};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize) -> Vec<Result<Frame, TunnelError>> {
    let mut d = FrameDecoder::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(None) => break,
                Ok(Some(f)) => out.push(Ok(f)),
                Err(e) => out.push(Err(e)),
            }
        }
        assert!(d.buffered() < FRAME_MAX + chunk);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&c, rest)) = data.split_first() else { return };
    let chunk = usize::from(c % 64) + 1;
    let whole = run(rest, rest.len().max(1));
    let pieces = run(rest, chunk);
    assert_eq!(whole, pieces);
    for frame in whole.into_iter().flatten() {
        let bytes = frame.encode().expect("a decoded frame encodes");
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(d.next_frame(), Ok(Some(frame.clone())));
        if frame.kind == FrameKind::Vhost {
            let mut msg = frame.payload.clone();
            let _ = frontend_fd_roles(&msg, frame.refs.len());
            let offsets: Vec<u64> = frame.refs.iter().map(|r| r.value).collect();
            let _ = rewrite_mmap_offsets(&mut msg, &offsets);
            let _ = mask_protocol_features_reply(&mut msg);
            assert_eq!(msg.len(), frame.payload.len());
        }
        if frame.kind == FrameKind::Control {
            if let Ok(message) = TunnelControl::decode(&frame.payload) {
                let again = message.to_frame().expect("a decoded message encodes");
                assert_eq!(TunnelControl::decode(&again.payload).ok(), Some(message));
            }
        }
    }
});
