//! Live migration between berth-vmm processes.

pub mod wire;
