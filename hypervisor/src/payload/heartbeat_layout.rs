//! Guest-physical layout of the heartbeat payload, shared by the VMM and by the build
//! script that assembles the payload (so it has no dependencies of its own).

/// The LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x40;
/// The LAPIC spurious vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// The code's address.
pub const CODE_ADDR: u64 = 0x10000;
/// The shared page.
pub const SHARED_ADDR: u64 = 0x12000;
/// The first per-vCPU record.
pub const RECORDS_ADDR: u64 = 0x13000;
/// Bytes per record.
pub const RECORD_SIZE: u64 = 64;
/// The stacks; vCPU `i`'s stack top is `STACKS_ADDR + (i + 1) * 4096`.
pub const STACKS_ADDR: u64 = 0x20000;
/// The data region's start.
pub const DATA_ADDR: u64 = 0x20_0000;
/// Identifies the shared page's layout version.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BERTHHB1");

// Record fields (offsets into a vCPU record).
pub const REC_TICKS: i32 = 0;
pub const REC_LINES: i32 = 8;
pub const REC_CURSOR: i32 = 16;
pub const REC_GEN: i32 = 24;
pub const REC_BASE: i32 = 32;
pub const REC_PAGES: i32 = 40;
pub const REC_INDEX: i32 = 48;
pub const REC_SHARED: i32 = 56;
// Shared page fields (offsets into the shared page).
pub const SH_LOCK: i32 = 0;
pub const SH_TIMER_COUNT: i32 = 8;
pub const SH_TICKS_PER_LINE: i32 = 16;
pub const SH_DIRTY_PER_TICK: i32 = 24;
pub const SH_MAGIC: i32 = 32;
/// The LAPIC's MMIO base, as the payload addresses it.
#[allow(dead_code)] // Used by heartbeat_asm.rs, which only build.rs compiles.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// The COM1 data port the payload writes heartbeat lines to.
#[allow(dead_code)] // Used by heartbeat_asm.rs, which only build.rs compiles.
pub const COM1: u16 = 0x3f8;
