//! `BERTH_FAULT`: **test-only** fault injection for the migration's exactly-once
//! corners, which a real part cannot be made to fail at on demand. Never set it in
//! production. The value is a comma-separated list of faults, read by the VMM process
//! it is set for:
//!
//! - `exit-after-commit`: the destination exits (status 101, no clean-up) right after
//!   it read `Commit` and wrote its committed marker, before any vCPU starts;
//! - `start-fails`: the destination's vCPU start fails after `Commit` (as if a vCPU
//!   thread could not be created once the first had started);
//! - `delay-loaded-ms=N`: the destination waits N ms after loading the state before it
//!   answers `Loaded` (so a source keepalive arrives after it);
//! - `resume-fails`: the source's resume fails, after "the destination did not run it"
//!   or after a migration failed before `Commit` with the guest paused;
//! - `handover-fails`: the destination's handover of the guest's directory, lock and
//!   cgroup after the commit fails, every time it is tried.
//! - `skip-done`: the source does not answer `Running` with `Done` (as if that frame
//!   were lost), so the destination keeps its committed marker;
//! - `delay-reply-ms=N`: the control server waits N ms before it writes each reply
//!   (status replies excepted), as a loaded machine may; a request that ends the VMM
//!   (`migrateResolve`, `shutdown`) must still be answered.

/// The value of fault `name` when `BERTH_FAULT` lists it: `Some("")` for a bare name,
/// `Some("N")` for `name=N`.
pub fn injected(name: &str) -> Option<String> {
    let list = std::env::var("BERTH_FAULT").ok()?;
    list.split(',')
        .map(str::trim)
        .find_map(|f| match f.split_once('=') {
            Some((n, v)) if n == name => Some(v.to_owned()),
            None if f == name => Some(String::new()),
            _ => None,
        })
}

/// Whether fault `name` is injected.
pub fn on(name: &str) -> bool {
    injected(name).is_some()
}
