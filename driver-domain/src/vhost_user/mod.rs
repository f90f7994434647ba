//! vhost-user adapters: thin glue between `vhost-user-backend` and the device cores.

pub mod blk;
pub mod checked_memory;
pub mod net;
