//! Long mode from the first instruction: the VMM writes the GDT and identity page
//! tables into guest memory and sets each vCPU's registers so that it starts in 64-bit
//! mode at the payload's entry point.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, Segment};
use super::layout::{GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, TSS_ADDR};
use crate::vstate::memory::GuestMemory;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Present, writable.
const PTE_PW: u64 = 0x3;
/// Present, writable, 2 MiB page.
const PDE_2M: u64 = 0x83;

/// Why the boot state could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory too small for the boot tables.
    #[error("Cannot write the boot tables into guest memory: {0}")]
    WriteTables(vm_memory::GuestMemoryError),
    /// KVM_GET_SREGS failed.
    #[error("Cannot get the special registers: {0}")]
    GetSregs(kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("Cannot set the special registers: {0}")]
    SetSregs(kvm_ioctls::Error),
    /// KVM_SET_REGS failed.
    #[error("Cannot set the general registers: {0}")]
    SetRegs(kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("Cannot set the FPU registers: {0}")]
    SetFpu(kvm_ioctls::Error),
}

/// Writes the GDT, an empty TSS and identity page tables for the first 4 GiB.
///
/// # Errors
/// [`RegsError::WriteTables`] when guest memory does not hold the fixed addresses.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(RegsError::WriteTables)
    };
    for (i, entry) in gdt::table(TSS_ADDR).into_iter().enumerate() {
        w(entry, GDT_ADDR + 8 * i as u64)?;
    }
    mem.write_slice(&[0u8; 0x68], GuestAddress(TSS_ADDR))
        .map_err(RegsError::WriteTables)?;
    w(PDPT_ADDR | PTE_PW, PML4_ADDR)?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        w(pd | PTE_PW, PDPT_ADDR + gib * 8)?;
        for i in 0..512u64 {
            w(((gib << 30) + (i << 21)) | PDE_2M, pd + i * 8)?;
        }
    }
    Ok(())
}

/// The special registers of a vCPU in 64-bit mode with the boot GDT and page tables,
/// starting from `base` (KVM's reset values).
pub fn long_mode_sregs(mut sregs: kvm_sregs, idt: Option<(u64, u16)>) -> kvm_sregs {
    let code = Segment::code64().kvm();
    let data = Segment::data().kvm();
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = Segment::tss(TSS_ADDR).kvm();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt::table(0).len() * 8 - 1) as u16;
    let (idt_base, idt_limit) = idt.unwrap_or((0, 0));
    sregs.idt.base = idt_base;
    sregs.idt.limit = idt_limit;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Puts `vcpu` in 64-bit mode at `rip` with stack `rsp`; `setup` adjusts the general
/// registers (payload arguments).
///
/// # Errors
/// The failing KVM call.
pub fn setup_long_mode(
    vcpu: &VcpuFd,
    rip: u64,
    rsp: u64,
    idt: Option<(u64, u16)>,
    setup: impl FnOnce(&mut kvm_regs),
) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&long_mode_sregs(sregs, idt))
        .map_err(RegsError::SetSregs)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsp,
        rbp: rsp,
        ..Default::default()
    };
    setup(&mut regs);
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default(), Some((0x1000, 0xfff)));
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ss.selector, 0x18);
        assert_eq!(s.gdt.limit, 47);
        assert_eq!(s.idt.base, 0x1000);
    }

    #[test]
    fn identity_map_covers_4_gib() {
        let mem = crate::vstate::memory::create(&crate::config::MemoryConfig::anonymous(4 << 20))
            .unwrap();
        write_boot_tables(&mem).unwrap();
        let pde = |gib: u64, i: u64| -> u64 {
            mem.read_obj(GuestAddress(PD_ADDR + gib * 0x1000 + i * 8))
                .unwrap()
        };
        assert_eq!(pde(0, 1), 0x20_0000 | PDE_2M);
        // The LAPIC page, 0xFEE00000, is in the fourth GiB, entry 503.
        assert_eq!(pde(3, 503), 0xFEE0_0000 | PDE_2M);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | PTE_PW);
    }
}
