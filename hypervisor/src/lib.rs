//! berth-vmm: one KVM guest per process.
pub mod migration;
pub mod host;
