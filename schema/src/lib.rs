//! berth's manifest language: the `Guest`, `Host` and `Fleet` documents, the units and
//! cpusets they are written in, and their validation.
//!
//! This crate does no I/O besides reading manifest text.

pub mod cpuset;
pub mod manifest;
pub mod units;

pub use cpuset::{CpuSet, CpuSetError};
pub use manifest::*;
pub use units::{Bandwidth, Bytes, Duration, PageSize, UnitError};
