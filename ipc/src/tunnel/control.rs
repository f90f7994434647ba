//! CONTROL frames of a managed driver VM: the toolstack's control channel carried through the
//! tunnel. dom0's side (the driver VM's VMM) holds the toolstack's channel and keeps every
//! descriptor that comes with a request: a vhost-user listener becomes a tunnel channel, whose
//! OPEN follows the request. The in-VM server hands the request on to the in-VM driver domain
//! with descriptors of its own making (the device it names, opened in the VM; a listener whose
//! one connection is the channel), so the driver domain runs there as it runs in a process.

use serde::{Deserialize, Serialize};

use super::frame::{Frame, PAYLOAD_MAX};
use crate::control::messages::{BackendEvent, BackendRequest};

/// One CONTROL frame's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelControl {
    /// dom0 -> VM: a request of the toolstack for the in-VM driver domain. For `ServeBlock`
    /// and `ServeNet`, `channel` is the tunnel channel of the frontend's vhost-user
    /// connection (its OPEN comes after this frame); for other requests it is `None`.
    Request {
        request: BackendRequest,
        channel: Option<u16>,
    },
    /// VM -> dom0: an event of the in-VM driver domain for the toolstack.
    Event(BackendEvent),
}

/// Errors of CONTROL messages.
#[derive(Debug, thiserror::Error)]
pub enum ControlFrameError {
    #[error("encoding a CONTROL message: {0}")]
    Encode(postcard::Error),
    #[error("a CONTROL message of {0} bytes is over the frame limit of {PAYLOAD_MAX}")]
    TooLong(usize),
    #[error("decoding a CONTROL message: {0}")]
    Decode(postcard::Error),
    #[error("a CONTROL message with {0} bytes after its end")]
    Trailing(usize),
}

impl TunnelControl {
    /// The CONTROL frame carrying this message.
    pub fn to_frame(&self) -> Result<Frame, ControlFrameError> {
        let bytes = postcard::to_allocvec(self).map_err(ControlFrameError::Encode)?;
        if bytes.len() > PAYLOAD_MAX {
            return Err(ControlFrameError::TooLong(bytes.len()));
        }
        Ok(Frame::control(bytes))
    }

    /// The message of a CONTROL frame's payload (all of it).
    pub fn decode(payload: &[u8]) -> Result<Self, ControlFrameError> {
        let (msg, rest) =
            postcard::take_from_bytes::<Self>(payload).map_err(ControlFrameError::Decode)?;
        if rest.is_empty() {
            Ok(msg)
        } else {
            Err(ControlFrameError::Trailing(rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::messages::MemoryGrant;
    use crate::tunnel::{FrameDecoder, FrameKind};

    #[test]
    fn requests_and_events_cross_as_control_frames() {
        let messages = [
            TunnelControl::Request {
                request: BackendRequest::ServeBlock {
                    frontend: 2,
                    devid: 51712,
                    readonly: false,
                    grant: MemoryGrant::AllRam,
                    queues: 2,
                    device: Some("/dev/nvme0n1".into()),
                },
                channel: Some(3),
            },
            TunnelControl::Request {
                request: BackendRequest::Stats,
                channel: None,
            },
            TunnelControl::Event(BackendEvent::Ready),
        ];
        for m in messages {
            let bytes = m.to_frame().unwrap().encode().unwrap();
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            let frame = decoder.next_frame().unwrap().unwrap();
            assert_eq!(frame.kind, FrameKind::Control);
            assert_eq!(TunnelControl::decode(&frame.payload).unwrap(), m);
        }
    }

    #[test]
    fn malformed_control_payloads_are_refused() {
        let good = TunnelControl::Event(BackendEvent::Ready)
            .to_frame()
            .unwrap();
        let mut long = good.payload.clone();
        long.push(0);
        assert!(matches!(
            TunnelControl::decode(&long),
            Err(ControlFrameError::Trailing(1))
        ));
        assert!(matches!(
            TunnelControl::decode(&[0xff, 0xff, 0xff]),
            Err(ControlFrameError::Decode(_))
        ));
        // STORE and CONTROL frames live on channel 0 and are never empty.
        let mut on_one = good.clone();
        on_one.channel = 1;
        assert!(on_one.encode().is_err());
        assert!(Frame::store(Vec::new()).encode().is_err());
        assert!(Frame::store(b"x".to_vec()).encode().is_ok());
    }
}
