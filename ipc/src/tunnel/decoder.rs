//! The streaming decoder: bytes in as they arrive from the serial port, frames out. A header
//! that cannot be trusted (bad magic, a limit broken, an unknown kind) is reported once and the
//! decoder then scans for the next magic; a frame with a trusted header but a bad shape or bad
//! references is reported and skipped whole.

use super::frame::{check_shape, Frame, Header, Ref, TunnelError, HEADER_LEN, MAGIC, REF_LEN};

/// Decodes tunnel frames from a byte stream, holding at most one partial frame (plus whatever
/// the last [`FrameDecoder::push`] added).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Looking for the magic after a bad header.
    resyncing: bool,
    /// Bytes thrown away while resynchronising, over the decoder's life.
    discarded: u64,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held, not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes skipped while resynchronising.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or an error for bytes it
    /// has consumed (call again: the decoder has moved past them).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TunnelError> {
        if self.resyncing && !self.resync() {
            return Ok(None);
        }
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = match Header::decode(head) {
            Ok(h) => h,
            Err(e) => {
                // Not a frame start we can trust: scan on from the next byte.
                self.buf.drain(..1);
                self.discarded += 1;
                self.resyncing = true;
                return Err(e);
            }
        };
        let frame_len = header.frame_len();
        if self.buf.len() < frame_len {
            return Ok(None);
        }
        let bytes: Vec<u8> = self.buf.drain(..frame_len).collect();
        check_shape(header.channel, header.kind, header.nrefs, header.len)?;
        let mut refs = Vec::with_capacity(header.nrefs);
        for chunk in bytes[HEADER_LEN..HEADER_LEN + header.nrefs * REF_LEN].chunks_exact(REF_LEN) {
            let raw: &[u8; REF_LEN] = chunk.try_into().map_err(|_| TunnelError::BadShape {
                channel: header.channel,
                kind: header.kind,
                nrefs: header.nrefs,
                len: header.len,
            })?;
            refs.push(Ref::decode(header.channel, raw)?);
        }
        Ok(Some(Frame {
            channel: header.channel,
            kind: header.kind,
            refs,
            payload: bytes[HEADER_LEN + header.nrefs * REF_LEN..].to_vec(),
        }))
    }

    /// Drops bytes up to the next magic; true once the buffer starts with it. Keeps the last
    /// three bytes when none is found, as a magic may be split across pushes.
    fn resync(&mut self) -> bool {
        let magic = MAGIC.to_le_bytes();
        if let Some(at) = self.buf.windows(magic.len()).position(|w| w == magic) {
            self.buf.drain(..at);
            self.discarded += at as u64;
            self.resyncing = false;
            return true;
        }
        let keep = (magic.len() - 1).min(self.buf.len());
        let drop = self.buf.len() - keep;
        self.buf.drain(..drop);
        self.discarded += drop as u64;
        false
    }
}
