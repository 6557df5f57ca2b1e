//! Assembles the built-in heartbeat payload (see `src/payload/heartbeat_asm.rs`), so
//! that berth-vmm embeds a few hundred bytes of code instead of an assembler.

use std::path::PathBuf;

#[allow(dead_code)] // The build script uses only the constants the code needs.
#[path = "src/payload/heartbeat_layout.rs"]
mod heartbeat_layout;

#[path = "src/payload/heartbeat_asm.rs"]
mod heartbeat_asm;

fn main() {
    println!("cargo::rerun-if-changed=src/payload/heartbeat_layout.rs");
    println!("cargo::rerun-if-changed=src/payload/heartbeat_asm.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let (code, entry, timer, spurious) =
        heartbeat_asm::build().expect("the heartbeat payload assembles");
    std::fs::write(out.join("heartbeat.bin"), code).expect("write heartbeat.bin");
    std::fs::write(
        out.join("heartbeat_labels.rs"),
        format!(
            "/// The entry point.\nconst ENTRY_ADDR: u64 = {entry:#x};\n\
             /// The LAPIC timer handler.\nconst TIMER_ADDR: u64 = {timer:#x};\n\
             /// The spurious-interrupt handler.\nconst SPURIOUS_ADDR: u64 = {spurious:#x};\n"
        ),
    )
    .expect("write heartbeat_labels.rs");
}
