//! Fixed guest-physical addresses used at boot, shared by every payload.

/// The GDT (see [`super::gdt`]).
pub const GDT_ADDR: u64 = 0x500;
/// The 64-bit TSS that TR points at (VM entry needs a usable TR in long mode).
pub const TSS_ADDR: u64 = 0x600;
/// The IDT (256 gates, 4 KiB), used by the heartbeat payload.
pub const IDT_ADDR: u64 = 0x1000;
/// Linux's zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top-level page table; the identity map below covers the first 4 GiB with 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xA000;
/// Four page directories (0xB000..0xF000), one per GiB.
pub const PD_ADDR: u64 = 0xB000;
/// Kernel command line (Linux).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 0x10000;
/// The MP table lives in the last KiB of conventional memory (the EBDA's place).
pub const MPTABLE_ADDR: u64 = 0x9FC00;
/// End of conventional memory (e820 boundary).
pub const EBDA_END: u64 = 0xA0000;
/// Where high memory begins; Linux is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// The local APIC's MMIO page (the same on every vCPU).
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// KVM's TSS pages on Intel (three pages below the identity map page).
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
/// KVM's identity map page on Intel.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;
