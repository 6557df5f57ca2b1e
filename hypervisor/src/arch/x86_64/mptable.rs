//! The Intel MultiProcessor table that tells Linux how many CPUs there are and where
//! the IOAPIC is (MP spec 1.4). Written into the last KiB of conventional memory.

use vm_memory::{Bytes, GuestAddress};

use super::layout::MPTABLE_ADDR;
use crate::vstate::memory::GuestMemory;

const IOAPIC_ADDR: u32 = 0xFEC0_0000;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_ENTRY_PROCESSOR: u8 = 0;
const MP_ENTRY_BUS: u8 = 1;
const MP_ENTRY_IOAPIC: u8 = 2;
const MP_ENTRY_INTSRC: u8 = 3;
const MP_ENTRY_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// IRQ lines routed from the ISA bus to the IOAPIC.
const IRQ_LINES: u8 = 24;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many CPUs for the space.
    #[error("Cannot describe {0} CPUs in the MP table (at most 254)")]
    TooManyCpus(u32),
    /// Guest memory write failed.
    #[error("Cannot write the MP table: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `cpus` CPUs, the table
/// placed at `addr`. Returned as bytes so it can be unit-tested.
pub fn build(cpus: u32, addr: u64) -> Result<Vec<u8>, MptableError> {
    if cpus > 254 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8 + 1;
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let mut e = vec![MP_ENTRY_PROCESSOR, cpu as u8, APIC_VERSION];
        e.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        e.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        e.extend_from_slice(&0x201u32.to_le_bytes()); // features: fpu, apic
        e.extend_from_slice(&[0; 8]);
        entries.push(e);
    }
    entries.push([MP_ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' '].to_vec());
    let mut ioapic = vec![MP_ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.push(ioapic);
    for irq in 0..IRQ_LINES {
        entries.push(vec![MP_ENTRY_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.push(vec![MP_ENTRY_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.push(vec![MP_ENTRY_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xFF, 1]);

    let body: Vec<u8> = entries.concat();
    let table_addr = addr + 16;
    let mut table = Vec::with_capacity(44 + body.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + body.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"BERTH   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    table.extend_from_slice(&0xFEE0_0000u32.to_le_bytes()); // LAPIC address
    table.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]);
    floating[10] = checksum(&floating);

    Ok([floating, table].concat())
}

/// Writes the MP table for `cpus` CPUs at [`MPTABLE_ADDR`].
///
/// # Errors
/// [`MptableError`] when there are too many CPUs or memory is too small.
pub fn write(mem: &GuestMemory, cpus: u32) -> Result<(), MptableError> {
    let bytes = build(cpus, MPTABLE_ADDR)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let bytes = build(2, MPTABLE_ADDR).unwrap();
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 0x9FC10);
        assert!(build(300, 0).is_err());
    }
}
