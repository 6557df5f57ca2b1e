//! The heartbeat payload's code, assembled with iced-x86 by `hypervisor/build.rs` at
//! build time: the code takes no parameters (everything it varies by lives in guest
//! memory), so the VMM embeds the bytes and does not carry an assembler.

use iced_x86::code_asm::*;

use super::heartbeat_layout::*;

/// Assembles the payload for [`CODE_ADDR`]; returns the code and the addresses of the
/// entry, timer and spurious handlers.
pub fn build() -> Result<(Vec<u8>, u64, u64, u64), iced_x86::IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut entry = a.create_label();
    let mut idle = a.create_label();
    let mut timer = a.create_label();
    let mut dirty_loop = a.create_label();
    let mut no_wrap = a.create_label();
    let mut count = a.create_label();
    let mut eoi = a.create_label();
    let mut acquire = a.create_label();
    let mut spin = a.create_label();
    let mut spurious = a.create_label();
    let mut prepend_dec = a.create_label();
    let mut digit = a.create_label();

    // Entry: rsp = stack top, r15 = record, interrupts off.
    a.set_label(&mut entry)?;
    a.mov(r9, qword_ptr(r15 + REC_SHARED))?;
    a.mov(rbx, LAPIC_BASE)?;
    a.mov(dword_ptr(rbx + 0xF0), 0x100 | u32::from(SPURIOUS_VECTOR))?; // SVR: enable
    a.mov(dword_ptr(rbx + 0x3E0), 0xBu32)?; // divide by 1
    a.mov(
        dword_ptr(rbx + 0x320),
        (1u32 << 17) | u32::from(TIMER_VECTOR),
    )?; // periodic
    a.mov(eax, dword_ptr(r9 + SH_TIMER_COUNT))?;
    a.mov(dword_ptr(rbx + 0x380), eax)?; // initial count: starts the timer
    a.set_label(&mut idle)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(idle)?;

    // Timer interrupt.
    a.set_label(&mut timer)?;
    for r in [rax, rcx, rdx, rsi, rdi, r8, r9] {
        a.push(r)?;
    }
    a.cld()?;
    a.mov(r9, qword_ptr(r15 + REC_SHARED))?;
    a.mov(r8, qword_ptr(r9 + SH_DIRTY_PER_TICK))?;
    a.test(r8, r8)?;
    a.jz(count)?;
    a.cmp(qword_ptr(r15 + REC_PAGES), 0)?;
    a.je(count)?;
    a.set_label(&mut dirty_loop)?;
    a.mov(rdi, qword_ptr(r15 + REC_CURSOR))?;
    a.shl(rdi, 12)?;
    a.add(rdi, qword_ptr(r15 + REC_BASE))?;
    a.mov(rax, rdi)?;
    a.shl(rax, 20)?; // (gpa >> 12) << 32
    a.or(rax, qword_ptr(r15 + REC_GEN))?;
    a.mov(ecx, 512u32)?;
    a.rep().stosq()?;
    a.mov(rax, qword_ptr(r15 + REC_CURSOR))?;
    a.inc(rax)?;
    a.cmp(rax, qword_ptr(r15 + REC_PAGES))?;
    a.jb(no_wrap)?;
    a.xor(eax, eax)?;
    a.inc(qword_ptr(r15 + REC_GEN))?;
    a.set_label(&mut no_wrap)?;
    a.mov(qword_ptr(r15 + REC_CURSOR), rax)?;
    a.dec(r8)?;
    a.jnz(dirty_loop)?;

    a.set_label(&mut count)?;
    a.mov(rax, qword_ptr(r15 + REC_TICKS))?;
    a.inc(rax)?;
    a.mov(qword_ptr(r15 + REC_TICKS), rax)?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(r9 + SH_TICKS_PER_LINE))?;
    a.test(rdx, rdx)?;
    a.jnz(eoi)?;

    // Build "hb vcpu=<i> n=<ticks>\n" backwards in a stack buffer.
    a.sub(rsp, 64)?;
    a.lea(rdi, qword_ptr(rsp + 64))?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), b'\n' as u32)?;
    a.mov(rax, qword_ptr(r15 + REC_TICKS))?;
    a.call(prepend_dec)?;
    a.sub(rdi, 3)?;
    a.mov(byte_ptr(rdi), b' ' as u32)?;
    a.mov(byte_ptr(rdi + 1), b'n' as u32)?;
    a.mov(byte_ptr(rdi + 2), b'=' as u32)?;
    a.mov(rax, qword_ptr(r15 + REC_INDEX))?;
    a.call(prepend_dec)?;
    a.sub(rdi, 8)?;
    a.mov(rax, u64::from_le_bytes(*b"hb vcpu="))?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rsi, rdi)?;
    a.lea(rcx, qword_ptr(rsp + 64))?;
    a.sub(rcx, rdi)?;
    a.mov(edx, u32::from(COM1))?;
    // Take the console spinlock.
    a.set_label(&mut acquire)?;
    a.mov(eax, 1u32)?;
    a.xchg(qword_ptr(r9 + SH_LOCK), rax)?;
    a.test(rax, rax)?;
    a.jz(spin)?; // got it: jump over the wait
    a.pause()?;
    a.jmp(acquire)?;
    a.set_label(&mut spin)?;
    a.rep().outsb()?;
    a.mov(qword_ptr(r9 + SH_LOCK), 0)?;
    a.inc(qword_ptr(r15 + REC_LINES))?;
    a.add(rsp, 64)?;

    a.set_label(&mut eoi)?;
    a.mov(rax, LAPIC_BASE)?;
    a.mov(dword_ptr(rax + 0xB0), 0u32)?;
    for r in [r9, r8, rdi, rsi, rdx, rcx, rax] {
        a.pop(r)?;
    }
    a.iretq()?;

    a.set_label(&mut spurious)?;
    a.iretq()?;

    // rdi: cursor moving down; rax: value. Clobbers rax, rdx, r8.
    a.set_label(&mut prepend_dec)?;
    a.mov(r8, 10u64)?;
    a.set_label(&mut digit)?;
    a.xor(edx, edx)?;
    a.div(r8)?;
    a.add(dl, b'0' as u32)?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), dl)?;
    a.test(rax, rax)?;
    a.jnz(digit)?;
    a.ret()?;

    let result = a.assemble_options(
        CODE_ADDR,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let entry_ip = result.label_ip(&entry)?;
    let timer_ip = result.label_ip(&timer)?;
    let spurious_ip = result.label_ip(&spurious)?;
    Ok((result.inner.code_buffer, entry_ip, timer_ip, spurious_ip))
}
