//! The control socket: a unix socket (mode 0600) in the guest's state directory speaking
//! versioned JSON lines. [`protocol`] has the message types, [`client`] a synchronous
//! client for the reconciler and tests, [`server`] the VMM's side.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError};
pub use protocol::*;
