//! The built-in heartbeat payload.
//!
//! Each vCPU starts in 64-bit mode at [`Layout::entry`] with `r15` pointing at its
//! [record](Layout::record_addr). It programs its LAPIC timer (periodic, `tickHz`) and
//! sits in `sti; hlt`. On each tick the handler:
//! 1. fills `dirtyPagesPerTick` pages of its share of the data region, each page with one
//!    qword `(page_number << 32) | generation` (`rep stosq`), moving a cursor that wraps
//!    around its share and bumps the generation each lap;
//! 2. counts the tick;
//! 3. every `ticksPerLine` ticks writes `hb vcpu=<i> n=<ticks>\n` to COM1 in one
//!    `rep outsb`, under a spinlock in guest memory;
//! 4. EOIs and returns.
//!
//! All payload state lives in guest memory, so a migrated guest carries it, and
//! [`verify_memory`] can check every data page from the VMM. A destination with more
//! vCPUs than the source's maxVcpus gives the new ones records and shares of their own
//! ([`add_vcpus`]) and boot registers ([`boot_vcpu`]), as a fresh start would.
//!
//! Guest-physical layout:
//!
//! | address | what |
//! |---|---|
//! | 0x1000 | IDT: vector 0x40 timer, 0xFF spurious |
//! | 0x10000 | code |
//! | 0x12000 | shared page: spinlock, timer count, ticksPerLine, dirtyPagesPerTick |
//! | 0x13000 | per-vCPU records, 64 bytes each |
//! | 0x20000 | per-vCPU stacks, 4 KiB each |
//! | 0x200000.. | data region, split evenly between the vCPUs (up to `maxVcpus`) |

use berth_schema::HeartbeatSpec;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::heartbeat_layout::*;
pub use super::heartbeat_layout::{
    CODE_ADDR, DATA_ADDR, MAGIC, RECORDS_ADDR, RECORD_SIZE, SHARED_ADDR, SPURIOUS_VECTOR,
    STACKS_ADDR, TIMER_VECTOR,
};
use crate::arch::x86_64::layout::IDT_ADDR;
use crate::vstate::memory::GuestMemory;

/// KVM's LAPIC timer runs at 1 GHz (one count per nanosecond) with divide-by-1.
const LAPIC_TIMER_HZ: u64 = 1_000_000_000;

/// Why the payload could not be built, loaded or verified.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// Guest memory too small or a write failed.
    #[error("Cannot write the heartbeat payload into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
    /// Reading guest memory failed.
    #[error("Cannot read the heartbeat state from guest memory: {0}")]
    Read(vm_memory::GuestMemoryError),
    /// Too many vCPUs for the records area.
    #[error("The heartbeat payload supports at most {max} vCPUs, not {wanted}")]
    TooManyVcpus {
        /// Asked for.
        wanted: u32,
        /// Limit.
        max: u32,
    },
    /// The shared page does not hold a heartbeat payload.
    #[error("Guest memory holds no heartbeat payload (bad magic {0:#x})")]
    NoPayload(u64),
}

/// A data page whose content does not match the payload's pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BadPage {
    /// Guest physical address of the page.
    pub gpa: u64,
    /// The vCPU whose share it is.
    pub vcpu: u32,
    /// Offset of the first unexpected qword in the page.
    pub offset: u64,
    /// What the qword should be (or one of two values).
    pub expected: u64,
    /// What it is.
    pub found: u64,
}

/// The outcome of [`verify_memory`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Data pages checked.
    pub pages: u64,
    /// Pages holding a written pattern (the rest are still zero).
    pub written: u64,
    /// Pages that match nothing; empty when memory is intact.
    pub bad: Vec<BadPage>,
}

impl VerifyReport {
    /// Whether every page matched.
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// One vCPU's payload state, read from guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpuRecord {
    /// Timer ticks handled.
    pub ticks: u64,
    /// Heartbeat lines written.
    pub lines: u64,
    /// Next page of its share to dirty.
    pub cursor: u64,
    /// Generation of the current lap (starts at 1).
    pub generation: u64,
    /// First page of its share (guest physical address).
    pub base: u64,
    /// Pages in its share.
    pub pages: u64,
    /// The vCPU index.
    pub index: u64,
}

/// Where the payload's pieces are: enough to start vCPUs and read their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// Entry point of every vCPU.
    pub entry: u64,
    /// vCPUs the records area was set up for.
    pub max_vcpus: u32,
}

impl Layout {
    /// The record of vCPU `index`.
    pub fn record_addr(&self, index: u32) -> u64 {
        RECORDS_ADDR + u64::from(index) * RECORD_SIZE
    }

    /// vCPU `index`'s initial stack pointer.
    pub fn stack_top(&self, index: u32) -> u64 {
        STACKS_ADDR + (u64::from(index) + 1) * 4096
    }

    /// The IDT as `kvm_sregs` wants it (base, limit).
    pub fn idt(&self) -> (u64, u16) {
        (IDT_ADDR, 256 * 16 - 1)
    }

    /// Reads vCPU `index`'s record.
    ///
    /// # Errors
    /// [`HeartbeatError::Read`].
    pub fn record(&self, mem: &GuestMemory, index: u32) -> Result<VcpuRecord, HeartbeatError> {
        let base = self.record_addr(index);
        let q = |off: i32| -> Result<u64, HeartbeatError> {
            mem.read_obj::<u64>(GuestAddress(base + off as u64))
                .map_err(HeartbeatError::Read)
        };
        Ok(VcpuRecord {
            ticks: q(REC_TICKS)?,
            lines: q(REC_LINES)?,
            cursor: q(REC_CURSOR)?,
            generation: q(REC_GEN)?,
            base: q(REC_BASE)?,
            pages: q(REC_PAGES)?,
            index: q(REC_INDEX)?,
        })
    }
}

/// The maximum vCPUs the records area and stacks hold.
pub const MAX_VCPUS: u32 = ((DATA_ADDR - STACKS_ADDR) / 4096 - 1) as u32;

/// The payload's code, assembled at build time by `build.rs` from `heartbeat_asm.rs`.
const CODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/heartbeat.bin"));
// ENTRY_ADDR, TIMER_ADDR and SPURIOUS_ADDR: where the assembler put the handlers.
include!(concat!(env!("OUT_DIR"), "/heartbeat_labels.rs"));

/// The payload's code (for [`CODE_ADDR`]) and the addresses of its entry, timer and
/// spurious handlers.
pub fn assemble() -> (&'static [u8], u64, u64, u64) {
    (CODE, ENTRY_ADDR, TIMER_ADDR, SPURIOUS_ADDR)
}

fn idt_gate(handler: u64) -> [u64; 2] {
    let selector = u64::from(crate::arch::x86_64::gdt::CODE_SELECTOR);
    let low = (handler & 0xFFFF)
        | selector << 16
        | 0x8E << 40 // present, DPL 0, 64-bit interrupt gate
        | ((handler >> 16) & 0xFFFF) << 48;
    [low, handler >> 32]
}

/// Writes the payload (code, IDT, shared page, records) into guest memory for
/// `max_vcpus` vCPUs with `spec`'s settings. The data region (from 2 MiB to the end of
/// the first memory region) is split evenly between the vCPUs.
///
/// # Errors
/// [`HeartbeatError`] when memory is too small or there are too many vCPUs.
pub fn load(
    mem: &GuestMemory,
    spec: &HeartbeatSpec,
    max_vcpus: u32,
) -> Result<Layout, HeartbeatError> {
    let (code, entry, timer, spurious) = assemble();
    let w = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(HeartbeatError::Write)
    };
    let q = |value: u64, addr: u64| w(&value.to_le_bytes(), addr);
    w(code, CODE_ADDR)?;
    for (vector, handler) in [(TIMER_VECTOR, timer), (SPURIOUS_VECTOR, spurious)] {
        let gate = idt_gate(handler);
        let addr = IDT_ADDR + u64::from(vector) * 16;
        q(gate[0], addr)?;
        q(gate[1], addr + 8)?;
    }
    q(0, SHARED_ADDR + SH_LOCK as u64)?;
    q(
        LAPIC_TIMER_HZ / u64::from(spec.tick_hz.max(1)),
        SHARED_ADDR + SH_TIMER_COUNT as u64,
    )?;
    q(
        u64::from(spec.ticks_per_line.max(1)),
        SHARED_ADDR + SH_TICKS_PER_LINE as u64,
    )?;
    q(
        u64::from(spec.dirty_pages_per_tick),
        SHARED_ADDR + SH_DIRTY_PER_TICK as u64,
    )?;
    q(MAGIC, SHARED_ADDR + SH_MAGIC as u64)?;

    let layout = Layout {
        entry,
        max_vcpus: 0,
    };
    add_records(mem, layout, DATA_ADDR, max_vcpus)
}

/// The end of the first memory region: the data region ends there.
/// Writes fresh records for vCPUs `layout.max_vcpus..max_vcpus`, splitting the data
/// pages from `free` to the end of the first memory region evenly between them.
fn add_records(
    mem: &GuestMemory,
    layout: Layout,
    free: u64,
    max_vcpus: u32,
) -> Result<Layout, HeartbeatError> {
    let added = max_vcpus.saturating_sub(layout.max_vcpus);
    if added == 0 {
        return Ok(layout);
    }
    if max_vcpus > MAX_VCPUS {
        return Err(HeartbeatError::TooManyVcpus {
            wanted: max_vcpus,
            max: MAX_VCPUS,
        });
    }
    let share = crate::vstate::memory::low_end(mem).saturating_sub(free) / 4096 / u64::from(added);
    for (k, i) in (layout.max_vcpus..max_vcpus).enumerate() {
        let rec = layout.record_addr(i);
        let fields = [
            (REC_TICKS, 0),
            (REC_LINES, 0),
            (REC_CURSOR, 0),
            (REC_GEN, 1),
            (REC_BASE, free + k as u64 * share * 4096),
            (REC_PAGES, share),
            (REC_INDEX, u64::from(i)),
            (REC_SHARED, SHARED_ADDR),
        ];
        for (off, value) in fields {
            mem.write_obj(value, GuestAddress(rec + off as u64))
                .map_err(HeartbeatError::Write)?;
        }
    }
    Ok(Layout {
        max_vcpus,
        ..layout
    })
}

/// Extends a running payload (a migrated guest's, in `mem`) to `max_vcpus` vCPUs: the
/// new vCPUs get fresh records (counting from zero) and share the data pages after the
/// existing shares (memory that grew), or none when there are no such pages. The
/// existing vCPUs' records are left alone. Returns the extended layout.
///
/// # Errors
/// [`HeartbeatError`] when memory holds no payload or there are too many vCPUs.
pub fn add_vcpus(
    mem: &GuestMemory,
    layout: &Layout,
    max_vcpus: u32,
) -> Result<Layout, HeartbeatError> {
    let magic: u64 = mem
        .read_obj(GuestAddress(SHARED_ADDR + SH_MAGIC as u64))
        .map_err(HeartbeatError::Read)?;
    if magic != MAGIC {
        return Err(HeartbeatError::NoPayload(magic));
    }
    let mut free = DATA_ADDR;
    for i in 0..layout.max_vcpus {
        let rec = layout.record(mem, i)?;
        free = free.max(rec.base + rec.pages * 4096);
    }
    add_records(mem, *layout, free, max_vcpus)
}

/// Puts vCPU `index` at the payload's entry in 64-bit mode, with its stack and record.
///
/// # Errors
/// The failing KVM call.
pub fn boot_vcpu(
    fd: &kvm_ioctls::VcpuFd,
    layout: &Layout,
    index: u32,
) -> Result<(), crate::arch::x86_64::regs::RegsError> {
    crate::arch::x86_64::regs::setup_long_mode(
        fd,
        layout.entry,
        layout.stack_top(index),
        Some(layout.idt()),
        vcpu_regs(layout, index),
    )
}

/// The initial registers of vCPU `index`: r15 holds its record.
fn vcpu_regs(layout: &Layout, index: u32) -> impl FnOnce(&mut kvm_bindings::kvm_regs) {
    let record = layout.record_addr(index);
    move |regs| regs.r15 = record
}

/// The pattern qword of data page `gpa` in lap `generation`.
pub fn pattern(gpa: u64, generation: u64) -> u64 {
    ((gpa >> 12) << 32) | generation
}

/// Checks every data page of every vCPU's share against the payload's state in guest
/// memory: pages before the cursor hold the current generation, pages after it the
/// previous one (zero in the first lap), and the page at the cursor may be part-way
/// from the previous to the current (a vCPU paused inside `rep stosq`). Reads the layout
/// from guest memory, so it works on a migrated guest whose memory grew.
///
/// # Errors
/// [`HeartbeatError`] when guest memory holds no payload or cannot be read.
pub fn verify_memory(mem: &GuestMemory, layout: &Layout) -> Result<VerifyReport, HeartbeatError> {
    let magic: u64 = mem
        .read_obj(GuestAddress(SHARED_ADDR + SH_MAGIC as u64))
        .map_err(HeartbeatError::Read)?;
    if magic != MAGIC {
        return Err(HeartbeatError::NoPayload(magic));
    }
    let mut report = VerifyReport::default();
    let mut page = vec![0u8; 4096];
    for i in 0..layout.max_vcpus {
        let rec = layout.record(mem, i)?;
        for n in 0..rec.pages {
            let gpa = rec.base + n * 4096;
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(HeartbeatError::Read)?;
            let current = pattern(gpa, rec.generation);
            let previous = if rec.generation > 1 {
                pattern(gpa, rec.generation - 1)
            } else {
                0
            };
            let qwords = page
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
            report.pages += 1;
            let bad = |offset: usize, expected: u64, found: u64| BadPage {
                gpa,
                vcpu: i,
                offset: offset as u64 * 8,
                expected,
                found,
            };
            let problem = match n.cmp(&rec.cursor) {
                std::cmp::Ordering::Less => qwords
                    .enumerate()
                    .find(|&(_, v)| v != current)
                    .map(|(o, v)| bad(o, current, v)),
                std::cmp::Ordering::Greater => qwords
                    .enumerate()
                    .find(|&(_, v)| v != previous)
                    .map(|(o, v)| bad(o, previous, v)),
                std::cmp::Ordering::Equal => {
                    // A prefix of `current`, then `previous`.
                    let mut seen_previous = false;
                    qwords.enumerate().find_map(|(o, v)| {
                        if v == current && !seen_previous {
                            None
                        } else if v == previous {
                            seen_previous = true;
                            None
                        } else {
                            Some(bad(o, if seen_previous { previous } else { current }, v))
                        }
                    })
                }
            };
            match problem {
                Some(p) => report.bad.push(p),
                None => {
                    if page.iter().any(|&b| b != 0) {
                        report.written += 1;
                    }
                }
            }
        }
    }
    Ok(report)
}

/// The triple-fault test payload: `ud2` with an empty IDT.
pub fn load_triple_fault(mem: &GuestMemory) -> Result<u64, HeartbeatError> {
    const UD2: [u8; 2] = [0x0F, 0x0B];
    mem.write_slice(&UD2, GuestAddress(CODE_ADDR))
        .map_err(HeartbeatError::Write)?;
    Ok(CODE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;

    fn memory(size: u64) -> GuestMemory {
        crate::vstate::memory::create(&MemoryConfig::anonymous(size)).unwrap()
    }

    #[test]
    fn the_payload_addresses_the_lapic_where_the_vmm_maps_it() {
        assert_eq!(LAPIC_BASE, crate::arch::x86_64::layout::LAPIC_ADDR);
    }

    #[test]
    fn assembles_small_code() {
        let (code, entry, timer, spurious) = assemble();
        assert!(code.len() < 4096, "{} bytes", code.len());
        assert_eq!(entry, CODE_ADDR);
        assert!(timer > entry && spurious > timer);
        // The handler ends in iretq (48 CF).
        let off = (spurious - CODE_ADDR) as usize;
        assert_eq!(&code[off..off + 2], &[0x48, 0xCF]);
    }

    #[test]
    fn verify_accepts_simulated_progress_and_finds_corruption() {
        let mem = memory(8 << 20);
        let spec = HeartbeatSpec {
            tick_hz: 100,
            ticks_per_line: 10,
            dirty_pages_per_tick: 3,
        };
        let layout = load(&mem, &spec, 2).unwrap();
        let rec0 = layout.record(&mem, 0).unwrap();
        assert_eq!(rec0.pages, (6 << 20) / 4096 / 2);
        assert_eq!(rec0.generation, 1);
        assert!(verify_memory(&mem, &layout).unwrap().ok());

        // Simulate vCPU 0 in its second lap, cursor at 5, page 5 half written.
        let rec_addr = layout.record_addr(0);
        mem.write_obj(2u64, GuestAddress(rec_addr + REC_GEN as u64))
            .unwrap();
        mem.write_obj(5u64, GuestAddress(rec_addr + REC_CURSOR as u64))
            .unwrap();
        for n in 0..rec0.pages {
            let gpa = rec0.base + n * 4096;
            let generation = if n < 5 { 2 } else { 1 };
            let fill: Vec<u8> = (0..512)
                .flat_map(|i| {
                    let g = if n == 5 && i < 100 { 2 } else { generation };
                    pattern(gpa, g).to_le_bytes()
                })
                .collect();
            mem.write_slice(&fill, GuestAddress(gpa)).unwrap();
        }
        let report = verify_memory(&mem, &layout).unwrap();
        assert!(report.ok(), "{:?}", report.bad);
        assert_eq!(report.written, rec0.pages);

        // One stale qword in an already-rewritten page is found.
        let stale = rec0.base + 2 * 4096 + 8 * 7;
        mem.write_obj(pattern(rec0.base + 2 * 4096, 1), GuestAddress(stale))
            .unwrap();
        let report = verify_memory(&mem, &layout).unwrap();
        assert_eq!(report.bad.len(), 1);
        assert_eq!(report.bad[0].offset, 56);
        assert_eq!(report.bad[0].vcpu, 0);
    }

    #[test]
    fn added_vcpus_get_fresh_records_and_the_free_pages() {
        let mem = memory(12 << 20);
        let spec = HeartbeatSpec {
            tick_hz: 100,
            ticks_per_line: 10,
            dirty_pages_per_tick: 3,
        };
        let layout = load(&mem, &spec, 2).unwrap();
        // vCPU 0 has run a while; vCPU 1's share ends 1 MiB before the region does
        // (as if the memory had grown by 1 MiB).
        let rec0 = layout.record_addr(0);
        mem.write_obj(77u64, GuestAddress(rec0 + REC_TICKS as u64))
            .unwrap();
        let old1 = layout.record(&mem, 1).unwrap();
        mem.write_obj(
            old1.pages - 256,
            GuestAddress(layout.record_addr(1) + REC_PAGES as u64),
        )
        .unwrap();
        let before = [0, 1].map(|i| layout.record(&mem, i).unwrap());

        let grown = add_vcpus(&mem, &layout, 4).unwrap();
        assert_eq!(grown.max_vcpus, 4);
        assert_eq!(grown.entry, layout.entry);
        assert_eq!([0, 1].map(|i| grown.record(&mem, i).unwrap()), before);
        let end1 = before[1].base + before[1].pages * 4096;
        for (k, i) in [2u32, 3].into_iter().enumerate() {
            let rec = grown.record(&mem, i).unwrap();
            assert_eq!(
                rec,
                VcpuRecord {
                    ticks: 0,
                    lines: 0,
                    cursor: 0,
                    generation: 1,
                    base: end1 + k as u64 * 128 * 4096,
                    pages: 128,
                    index: u64::from(i),
                }
            );
        }
        assert!(verify_memory(&mem, &grown).unwrap().ok());
        // No more vCPUs, no change; without free pages the new ones get none.
        assert_eq!(add_vcpus(&mem, &grown, 4).unwrap(), grown);
        let more = add_vcpus(&mem, &grown, 5).unwrap();
        assert_eq!(more.record(&mem, 4).unwrap().pages, 0);
        assert!(matches!(
            add_vcpus(&mem, &grown, MAX_VCPUS + 1),
            Err(HeartbeatError::TooManyVcpus { .. })
        ));
    }

    #[test]
    fn idt_gate_encoding() {
        let [low, high] = idt_gate(0x1_2345_6789);
        assert_eq!(low & 0xFFFF, 0x6789);
        assert_eq!((low >> 48) & 0xFFFF, 0x2345);
        assert_eq!((low >> 16) & 0xFFFF, 0x10);
        assert_eq!((low >> 40) & 0xFF, 0x8E);
        assert_eq!(high, 1);
    }
}
