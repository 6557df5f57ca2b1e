//! x86_64: the boot-time memory layout, the GDT, long mode, CPUID and the local APIC.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod regs;
