//! berth-vmm: one KVM guest per process.
