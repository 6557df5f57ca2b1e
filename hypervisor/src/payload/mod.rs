//! What a guest runs: the built-in payloads and Linux.

pub mod heartbeat;
mod heartbeat_layout;
pub mod linux;

/// The `boot.kernel` value of the test payload that triple-faults at its first
/// instruction (a `ud2` with no IDT): used to test crash handling.
pub const TRIPLE_FAULT: &str = "builtin:triple-fault";
