//! berth's manifest language: the `Guest`, `Host` and `Fleet` documents, the units and
//! cpusets they are written in, their JSON Schema, and their validation.
//!
//! This crate does no I/O besides reading manifest text.
//!
//! ```
//! let text = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
//!             spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 16GiB}\n";
//! let validated = berth_schema::load_files([("hosts.yaml", text)]).unwrap();
//! assert_eq!(validated.manifests.hosts["kvm01"].spec.cpus.len(), 2);
//! ```

#![warn(missing_docs)]

pub mod cpuset;
pub mod diagnostic;
pub mod json_schema;
pub mod load;
pub mod manifest;
mod node;
pub mod reference;
pub mod semantic;
pub mod source;
mod structure;
pub mod units;

pub use cpuset::{CpuSet, CpuSetError};
pub use diagnostic::{Diagnostic, Location, Severity};
pub use json_schema::{json_schema, json_schema_text};
pub use load::{load_files, load_path, Invalid, ManifestSet, Validated, MAX_FILE_SIZE};
pub use manifest::*;
pub use source::{Manifest, Origin, SourceMap};
pub use units::{Bandwidth, Bytes, Duration, PageSize, UnitError};
