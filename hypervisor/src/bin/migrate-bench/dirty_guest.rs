//! A tiny QEMU guest that dirties memory at a set rate, the QEMU counterpart of berth's
//! heartbeat with `dirtyPagesPerTick`.
//!
//! The bench writes it as a 32-bit multiboot ELF that QEMU boots with `-kernel`
//! (`-machine pc`, SeaBIOS and QEMU's multiboot option ROM run first). Guest code here
//! runs about 1 us per instruction, and the dirty log is only exact in 64-bit mode (see
//! DESIGN.md, "This machine, measured"), so the guest goes to long mode at once and then
//! does what the heartbeat does, with less work per page:
//! 1. load its own GDT, enable PAE, point CR3 at page tables that identity-map the first
//!    GiB and the LAPIC page with 2 MiB pages, set EFER.LME and CR0.PG, jump to 64-bit;
//! 2. load its IDT, mask the 8259 PICs;
//! 3. touch every page of the working set once (so that the first lap does not pay the
//!    host's first-touch cost, and so that no page of it is zero: the heartbeat's
//!    pages are not either by the time the bench migrates it);
//! 4. program the LAPIC timer (periodic, divide by 1: KVM's LAPIC timer counts at 1 GHz)
//!    and sit in `sti; hlt`;
//! 5. on each tick write one qword (the tick number) into each of the next
//!    `pages_per_tick` pages of the working set, wrapping around, count the tick, the
//!    pages and the laps, EOI.
//!
//! So it dirties `pages_per_tick * tick_hz` pages per second, like the heartbeat, as long
//! as one tick's work fits in a tick; the bench reads the counters (`xp` over QMP) to
//! check the rate really achieved. A throttled vCPU loses ticks exactly like the
//! heartbeat does (a periodic LAPIC timer does not queue missed ticks).
//!
//! Guest-physical layout (all inside the ELF's one segment at 1 MiB):
//!
//! | address | what |
//! |---|---|
//! | 0x100000 | ELF header and program header (84 bytes) |
//! | 0x100054 | multiboot header |
//! | 0x100060 | parameters: working set start, end, pages per tick, LAPIC initial count (u64 each) |
//! | 0x100080 | GDT: null, 64-bit code (0x08), data (0x10) |
//! | 0x100098 | GDTR (32-bit form), 0x1000A0: IDTR (64-bit form) |
//! | 0x1000B0 | code |
//! | 0x101000 | PML4, 0x102000: PDPT, 0x103000: PD for 0-1 GiB, 0x104000: PD for 3-4 GiB |
//! | 0x105000 | IDT: vector 0x40 timer, 0xFF spurious |
//! | 0x106000 | counters (u64): ticks, pages written, laps, cursor (bss) |
//! | 0x107000 | stack (bss, grows down from 0x108000) |
//! | 2 MiB .. end of RAM | the working set, as the heartbeat's data region |

/// Where the ELF's segment is loaded.
const BASE: u64 = 0x10_0000;
/// Bytes of the segment present in the file (the rest up to [`MEM_SIZE`] is zeroed).
const FILE_SIZE: usize = 0x6000;
/// Bytes of the segment in memory: counters and stack follow the file's part.
const MEM_SIZE: usize = 0x8000;
const MULTIBOOT_AT: usize = 0x54;
const PARAMS_AT: usize = 0x60;
const GDT_AT: usize = 0x80;
const GDTR_AT: usize = 0x98;
const IDTR_AT: usize = 0xA0;
const CODE_AT: usize = 0xB0;
const PML4_AT: usize = 0x1000;
const PDPT_AT: usize = 0x2000;
const PD_LOW_AT: usize = 0x3000;
const PD_APIC_AT: usize = 0x4000;
const IDT_AT: usize = 0x5000;
/// The guest's counters: ticks, pages written, laps, cursor.
pub const COUNTERS: u64 = BASE + 0x6000;
/// The working set starts where the heartbeat's data region does.
pub const WORKING_SET_START: u64 = 2 << 20;
/// The identity map covers the first GiB.
pub const MAX_MEMORY: u64 = 1 << 30;
const LAPIC: u64 = 0xFEE0_0000;
const TIMER_VECTOR: usize = 0x40;
const SPURIOUS_VECTOR: usize = 0xFF;
/// Offsets of the timer and spurious handlers in [`CODE`].
const TIMER_OFFSET: u64 = 0xB2;
const SPURIOUS_OFFSET: u64 = 0x132;

/// The code, loaded at `BASE + CODE_AT` (0x1000B0). Assembled with GNU as from the
/// source in the comments (AT&T syntax; absolute addresses are the layout above) and
/// checked with `objdump -d`.
#[rustfmt::skip]
const CODE: &[u8] = &[
    // start (32-bit protected mode, from the multiboot loader; interrupts off)
    0xfa,                                     // cli
    0x0f, 0x01, 0x15, 0x98, 0x00, 0x10, 0x00, // lgdt 0x100098
    0xb8, 0x10, 0x00, 0x00, 0x00,             // mov $0x10, %eax
    0x8e, 0xd8,                               // mov %eax, %ds
    0x8e, 0xc0,                               // mov %eax, %es
    0x8e, 0xd0,                               // mov %eax, %ss
    0x0f, 0x20, 0xe0,                         // mov %cr4, %eax
    0x83, 0xc8, 0x20,                         // or $0x20, %eax          (PAE)
    0x0f, 0x22, 0xe0,                         // mov %eax, %cr4
    0xb8, 0x00, 0x10, 0x10, 0x00,             // mov $0x101000, %eax     (PML4)
    0x0f, 0x22, 0xd8,                         // mov %eax, %cr3
    0xb9, 0x80, 0x00, 0x00, 0xc0,             // mov $0xc0000080, %ecx   (EFER)
    0x0f, 0x32,                               // rdmsr
    0x0d, 0x00, 0x01, 0x00, 0x00,             // or $0x100, %eax         (LME)
    0x0f, 0x30,                               // wrmsr
    0x0f, 0x20, 0xc0,                         // mov %cr0, %eax
    0x0d, 0x01, 0x00, 0x00, 0x80,             // or $0x80000001, %eax    (PG, PE)
    0x0f, 0x22, 0xc0,                         // mov %eax, %cr0
    0xea, 0xf4, 0x00, 0x10, 0x00, 0x08, 0x00, // ljmp $0x08, $start64    (0x1000f4)
    // start64
    0xbc, 0x00, 0x80, 0x10, 0x00,             // mov $0x108000, %esp
    0x0f, 0x01, 0x1c, 0x25, 0xa0, 0x00, 0x10, 0x00, // lidt 0x1000a0
    0xb0, 0xff,                               // mov $0xff, %al
    0xe6, 0x21,                               // out %al, $0x21          (mask the PICs)
    0xe6, 0xa1,                               // out %al, $0xa1
    0x48, 0x8b, 0x3c, 0x25, 0x60, 0x00, 0x10, 0x00, // mov WS_START, %rdi
    0x48, 0x89, 0x3c, 0x25, 0x18, 0x60, 0x10, 0x00, // mov %rdi, CURSOR
    // prefill
    0xc7, 0x07, 0x01, 0x00, 0x00, 0x00,       // movl $1, (%rdi)
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add $4096, %rdi
    0x48, 0x3b, 0x3c, 0x25, 0x68, 0x00, 0x10, 0x00, // cmp WS_END, %rdi
    0x72, 0xe9,                               // jb prefill
    0xbe, 0x00, 0x00, 0xe0, 0xfe,             // mov $0xfee00000, %esi   (LAPIC)
    0xc7, 0x86, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00, // movl $0x1ff, 0xf0(%rsi)     (SVR)
    0xc7, 0x86, 0xe0, 0x03, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00, // movl $0xb, 0x3e0(%rsi)      (divide by 1)
    0xc7, 0x86, 0x20, 0x03, 0x00, 0x00, 0x40, 0x00, 0x02, 0x00, // movl $0x20040, 0x320(%rsi)  (periodic, 0x40)
    0x8b, 0x04, 0x25, 0x78, 0x00, 0x10, 0x00, // mov LAPIC_COUNT, %eax
    0x89, 0x86, 0x80, 0x03, 0x00, 0x00,       // mov %eax, 0x380(%rsi)   (initial count)
    // idle
    0xfb,                                     // sti
    0xf4,                                     // hlt
    0xeb, 0xfc,                               // jmp idle
    // timer (offset 0xb2)
    0x50,                                     // push %rax
    0x51,                                     // push %rcx
    0x57,                                     // push %rdi
    0x48, 0x8b, 0x0c, 0x25, 0x70, 0x00, 0x10, 0x00, // mov PER_TICK, %rcx
    0x48, 0x8b, 0x3c, 0x25, 0x18, 0x60, 0x10, 0x00, // mov CURSOR, %rdi
    0x48, 0x8b, 0x04, 0x25, 0x00, 0x60, 0x10, 0x00, // mov TICKS, %rax
    0x48, 0xff, 0xc0,                         // inc %rax
    0x48, 0x85, 0xc9,                         // test %rcx, %rcx
    0x74, 0x39,                               // jz done
    // dirty
    0x48, 0x89, 0x07,                         // mov %rax, (%rdi)
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add $4096, %rdi
    0x48, 0x3b, 0x3c, 0x25, 0x68, 0x00, 0x10, 0x00, // cmp WS_END, %rdi
    0x72, 0x10,                               // jb next
    0x48, 0x8b, 0x3c, 0x25, 0x60, 0x00, 0x10, 0x00, // mov WS_START, %rdi
    0x48, 0xff, 0x04, 0x25, 0x10, 0x60, 0x10, 0x00, // incq LAPS
    // next
    0x48, 0xff, 0xc9,                         // dec %rcx
    0x75, 0xd7,                               // jnz dirty
    0x48, 0x8b, 0x0c, 0x25, 0x70, 0x00, 0x10, 0x00, // mov PER_TICK, %rcx
    0x48, 0x01, 0x0c, 0x25, 0x08, 0x60, 0x10, 0x00, // add %rcx, PAGES
    // done
    0x48, 0x89, 0x3c, 0x25, 0x18, 0x60, 0x10, 0x00, // mov %rdi, CURSOR
    0x48, 0x89, 0x04, 0x25, 0x00, 0x60, 0x10, 0x00, // mov %rax, TICKS
    0xbf, 0x00, 0x00, 0xe0, 0xfe,             // mov $0xfee00000, %edi
    0xc7, 0x87, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // movl $0, 0xb0(%rdi)  (EOI)
    0x5f,                                     // pop %rdi
    0x59,                                     // pop %rcx
    0x58,                                     // pop %rax
    0x48, 0xcf,                               // iretq
    // spurious (offset 0x132)
    0x48, 0xcf,                               // iretq
];

/// What the guest does: the same knobs as the heartbeat's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Guest RAM, MiB; the working set is 2 MiB to the end of it.
    pub memory_mib: u64,
    /// LAPIC timer ticks per second (1 to 1000, as the heartbeat's `tickHz`).
    pub tick_hz: u32,
    /// Pages written per tick (the heartbeat's `dirtyPagesPerTick`).
    pub pages_per_tick: u32,
}

impl Workload {
    /// The dirty rate asked for, bytes/s.
    pub fn nominal_rate(&self) -> f64 {
        f64::from(self.tick_hz) * f64::from(self.pages_per_tick) * 4096.0
    }

    /// Pages in the working set.
    pub fn working_set_pages(&self) -> u64 {
        ((self.memory_mib << 20) - WORKING_SET_START) / 4096
    }
}

/// The guest's counters, read back over QMP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Timer ticks handled.
    pub ticks: u64,
    /// Pages written.
    pub pages: u64,
    /// Laps over the working set.
    pub laps: u64,
}

impl Counters {
    /// Parses the output of the HMP command `xp /4gx COUNTERS`
    /// (`0000000000106000: 0x... 0x...` on two lines).
    pub fn parse(xp: &str) -> Option<Counters> {
        let words: Vec<u64> = xp
            .lines()
            .filter_map(|line| line.split_once(':'))
            .flat_map(|(_, values)| values.split_whitespace())
            .filter_map(|w| u64::from_str_radix(w.strip_prefix("0x")?, 16).ok())
            .collect();
        match words.as_slice() {
            [ticks, pages, laps, _cursor] => Some(Counters {
                ticks: *ticks,
                pages: *pages,
                laps: *laps,
            }),
            _ => None,
        }
    }
}

fn put_u16(image: &mut [u8], at: usize, v: u16) {
    image[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(image: &mut [u8], at: usize, v: u32) {
    image[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(image: &mut [u8], at: usize, v: u64) {
    image[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A 64-bit interrupt gate to `handler` through the code selector 0x08.
fn idt_gate(image: &mut [u8], vector: usize, handler: u64) {
    let at = IDT_AT + vector * 16;
    put_u16(image, at, handler as u16);
    put_u16(image, at + 2, 0x08);
    image[at + 5] = 0x8E; // present, DPL 0, interrupt gate
    put_u16(image, at + 6, (handler >> 16) as u16);
    put_u32(image, at + 8, (handler >> 32) as u32);
}

/// The ELF file for `workload`.
///
/// # Errors
/// The memory size is outside 4 MiB to 1 GiB, or the tick rate outside 1 to 1000 Hz.
pub fn image(workload: &Workload) -> anyhow::Result<Vec<u8>> {
    let memory = workload.memory_mib << 20;
    anyhow::ensure!(
        (4 << 20..=MAX_MEMORY).contains(&memory),
        "the dirtying guest needs 4 MiB to 1 GiB, not {} MiB",
        workload.memory_mib
    );
    anyhow::ensure!(
        (1..=1000).contains(&workload.tick_hz),
        "tick rate {} Hz: expected 1 to 1000",
        workload.tick_hz
    );
    let mut image = vec![0u8; FILE_SIZE];
    // ELF32 header: executable, i386, one program header right after it.
    image[..16].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    put_u16(&mut image, 16, 2); // e_type: EXEC
    put_u16(&mut image, 18, 3); // e_machine: EM_386 (QEMU refuses a 64-bit multiboot ELF)
    put_u32(&mut image, 20, 1); // e_version
    put_u32(&mut image, 24, (BASE + CODE_AT as u64) as u32); // e_entry
    put_u32(&mut image, 28, 52); // e_phoff
    put_u16(&mut image, 40, 52); // e_ehsize
    put_u16(&mut image, 42, 32); // e_phentsize
    put_u16(&mut image, 44, 1); // e_phnum
                                // The program header: one loadable RWX segment.
    let ph = 52;
    put_u32(&mut image, ph, 1); // PT_LOAD
    put_u32(&mut image, ph + 4, 0); // p_offset
    put_u32(&mut image, ph + 8, BASE as u32); // p_vaddr
    put_u32(&mut image, ph + 12, BASE as u32); // p_paddr
    put_u32(&mut image, ph + 16, FILE_SIZE as u32); // p_filesz
    put_u32(&mut image, ph + 20, MEM_SIZE as u32); // p_memsz
    put_u32(&mut image, ph + 24, 7); // p_flags: RWX
    put_u32(&mut image, ph + 28, 0x1000); // p_align
                                          // Multiboot header: no flags (QEMU then loads the ELF segments).
    const MAGIC: u32 = 0x1BAD_B002;
    put_u32(&mut image, MULTIBOOT_AT, MAGIC);
    put_u32(&mut image, MULTIBOOT_AT + 8, MAGIC.wrapping_neg());
    // Parameters.
    put_u64(&mut image, PARAMS_AT, WORKING_SET_START);
    put_u64(&mut image, PARAMS_AT + 8, memory);
    put_u64(
        &mut image,
        PARAMS_AT + 16,
        u64::from(workload.pages_per_tick),
    );
    put_u64(
        &mut image,
        PARAMS_AT + 24,
        1_000_000_000 / u64::from(workload.tick_hz),
    );
    // GDT and the two descriptor-table registers.
    put_u64(&mut image, GDT_AT + 8, 0x00AF_9A00_0000_FFFF); // 64-bit code
    put_u64(&mut image, GDT_AT + 16, 0x00CF_9200_0000_FFFF); // data
    put_u16(&mut image, GDTR_AT, 3 * 8 - 1);
    put_u32(&mut image, GDTR_AT + 2, (BASE + GDT_AT as u64) as u32);
    put_u16(&mut image, IDTR_AT, 256 * 16 - 1);
    put_u64(&mut image, IDTR_AT + 2, BASE + IDT_AT as u64);
    image[CODE_AT..CODE_AT + CODE.len()].copy_from_slice(CODE);
    // Page tables: 0-1 GiB identity-mapped with 2 MiB pages, and the LAPIC's 2 MiB page
    // (uncached) in the fourth GiB.
    let table = |at: usize| (BASE + at as u64) | 0x3; // present, writable
    put_u64(&mut image, PML4_AT, table(PDPT_AT));
    put_u64(&mut image, PDPT_AT, table(PD_LOW_AT));
    put_u64(&mut image, PDPT_AT + 3 * 8, table(PD_APIC_AT));
    for i in 0..512u64 {
        put_u64(&mut image, PD_LOW_AT + i as usize * 8, (i << 21) | 0x83);
    }
    let apic_entry = ((LAPIC - (3 << 30)) >> 21) as usize;
    put_u64(&mut image, PD_APIC_AT + apic_entry * 8, LAPIC | 0x93);
    let code = BASE + CODE_AT as u64;
    idt_gate(&mut image, TIMER_VECTOR, code + TIMER_OFFSET);
    idt_gate(&mut image, SPURIOUS_VECTOR, code + SPURIOUS_OFFSET);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(image: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(image[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn the_image_is_a_multiboot_elf_with_the_handlers_in_its_idt() {
        let w = Workload {
            memory_mib: 16,
            tick_hz: 100,
            pages_per_tick: 20,
        };
        let image = image(&w).unwrap();
        assert_eq!(&image[..4], b"\x7fELF");
        let magic = u32_at(&image, MULTIBOOT_AT);
        let flags = u32_at(&image, MULTIBOOT_AT + 4);
        let sum = u32_at(&image, MULTIBOOT_AT + 8);
        assert_eq!(magic.wrapping_add(flags).wrapping_add(sum), 0);
        // The handlers are where the listing says: push %rax, and iretq.
        assert_eq!(CODE[TIMER_OFFSET as usize], 0x50);
        assert_eq!(&CODE[SPURIOUS_OFFSET as usize..], &[0x48, 0xcf]);
        let gate = IDT_AT + TIMER_VECTOR * 16;
        let handler = u64::from(u16::from_le_bytes([image[gate], image[gate + 1]]))
            | u64::from(u16::from_le_bytes([image[gate + 6], image[gate + 7]])) << 16;
        assert_eq!(handler, BASE + CODE_AT as u64 + TIMER_OFFSET);
        assert!(CODE_AT + CODE.len() <= PML4_AT);
        assert_eq!(w.working_set_pages(), 14 * 256);
        assert_eq!(w.nominal_rate(), 2000.0 * 4096.0);
    }

    #[test]
    fn counters_parse_from_xp_output() {
        let xp = "0000000000106000: 0x0000000000000aaf 0x000000000001ab58\r\n\
                  0000000000106010: 0x0000000000000001 0x000000000b058000\r\n";
        assert_eq!(
            Counters::parse(xp),
            Some(Counters {
                ticks: 0xaaf,
                pages: 0x1ab58,
                laps: 1
            })
        );
        assert_eq!(Counters::parse("garbage"), None);
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        let w = |memory_mib, tick_hz| Workload {
            memory_mib,
            tick_hz,
            pages_per_tick: 1,
        };
        assert!(image(&w(2, 100)).is_err());
        assert!(image(&w(2048, 100)).is_err());
        assert!(image(&w(16, 0)).is_err());
        assert!(image(&w(16, 1001)).is_err());
    }
}
