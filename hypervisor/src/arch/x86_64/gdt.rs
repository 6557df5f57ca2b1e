//! The boot GDT. Selectors follow Linux's 64-bit boot protocol: `__BOOT_CS` is 0x10 and
//! `__BOOT_DS` is 0x18, so the same table serves Linux and the heartbeat payload.

use kvm_bindings::kvm_segment;

/// Code segment selector (`__BOOT_CS`).
pub const CODE_SELECTOR: u16 = 0x10;
/// Data segment selector (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// TSS selector; the 64-bit TSS descriptor takes two slots.
pub const TSS_SELECTOR: u16 = 0x20;

/// Size of the TSS the TR descriptor points at.
pub const TSS_LIMIT: u32 = 0x67;

/// A segment in the shape both the GDT and `kvm_sregs` need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (or pages when `g`).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Code/data (1) or system (0).
    pub s: u8,
    /// Long mode code.
    pub l: u8,
    /// Default operand size 32.
    pub db: u8,
    /// Granularity 4 KiB.
    pub g: u8,
}

impl Segment {
    /// 64-bit code, execute/read, accessed.
    pub const fn code64() -> Segment {
        Segment {
            base: 0,
            limit: 0xFFFFF,
            selector: CODE_SELECTOR,
            type_: 0xB,
            s: 1,
            l: 1,
            db: 0,
            g: 1,
        }
    }

    /// Flat data, read/write, accessed.
    pub const fn data() -> Segment {
        Segment {
            base: 0,
            limit: 0xFFFFF,
            selector: DATA_SELECTOR,
            type_: 0x3,
            s: 1,
            l: 0,
            db: 1,
            g: 1,
        }
    }

    /// A busy 64-bit TSS at `base`.
    pub const fn tss(base: u64) -> Segment {
        Segment {
            base,
            limit: TSS_LIMIT,
            selector: TSS_SELECTOR,
            type_: 0xB,
            s: 0,
            l: 0,
            db: 0,
            g: 0,
        }
    }

    /// The 8-byte descriptor (the low half for a system segment).
    pub fn descriptor(&self) -> u64 {
        let base = self.base & 0xFFFF_FFFF;
        let limit = u64::from(self.limit);
        let access = u64::from(self.type_) | u64::from(self.s) << 4 | 1 << 7; // present, DPL 0
        let flags = u64::from(self.l) << 1 | u64::from(self.db) << 2 | u64::from(self.g) << 3;
        (limit & 0xFFFF)
            | (base & 0xFF_FFFF) << 16
            | access << 40
            | ((limit >> 16) & 0xF) << 48
            | flags << 52
            | (base >> 24) << 56
    }

    /// The segment as `kvm_sregs` holds it.
    pub fn kvm(&self) -> kvm_segment {
        let limit = if self.g == 1 {
            (self.limit << 12) | 0xFFF
        } else {
            self.limit
        };
        kvm_segment {
            base: self.base,
            limit,
            selector: self.selector,
            type_: self.type_,
            present: 1,
            dpl: 0,
            db: self.db,
            s: self.s,
            l: self.l,
            g: self.g,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// The GDT entries, in order: null, null, code, data, TSS (two slots).
pub fn table(tss_base: u64) -> [u64; 6] {
    [
        0,
        0,
        Segment::code64().descriptor(),
        Segment::data().descriptor(),
        Segment::tss(tss_base).descriptor(),
        tss_base >> 32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_known_encodings() {
        // The values Linux and Firecracker use for flat 64-bit code and data.
        assert_eq!(Segment::code64().descriptor(), 0x00AF_9B00_0000_FFFF);
        assert_eq!(Segment::data().descriptor(), 0x00CF_9300_0000_FFFF);
        let tss = Segment::tss(0x600).descriptor();
        assert_eq!(tss, 0x0000_8B00_0600_0067);
        assert_eq!(Segment::code64().kvm().limit, 0xFFFF_FFFF);
        assert_eq!(table(0x600)[4], tss);
    }
}
