//! Arbitrary bytes as a manifest file, then the same bytes split into two files: the
//! loader must return diagnostics, never panic, hang or run out of memory.
//!
//!     cd schema/fuzz && cargo +nightly fuzz run load

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = berth_schema::load_files([("fuzz.yaml", data)]);
    if let Some(split) = data.iter().position(|b| *b == 0) {
        let (a, b) = data.split_at(split);
        let _ = berth_schema::load_files([("a.yaml", a), ("b.yaml", &b[1..])]);
    }
});
