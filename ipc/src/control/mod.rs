//! The management channel between domains: postcard-encoded, versioned messages with file
//! descriptors attached (`SCM_RIGHTS`).

mod channel;
pub mod hardware;
pub mod messages;

pub use channel::{
    ChannelError, ControlChannel, ControlListener, MAX_FDS, MAX_MESSAGE, PROTOCOL_VERSION,
};
