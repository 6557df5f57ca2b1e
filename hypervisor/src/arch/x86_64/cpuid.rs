//! The CPUID a guest sees: KVM's supported set, filtered per CPU mode, with per-vCPU
//! APIC IDs. [`feature_flags`] names the flags migration pre-checks compare.

use std::collections::BTreeSet;

use berth_schema::CpuMode;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 EDX bits of QEMU's `kvm64` model.
const KVM64_LEAF1_EDX: u32 = 0x078B_FBFD;
/// Leaf 1 ECX of `kvm64`: sse3, cx16.
const KVM64_LEAF1_ECX: u32 = (1 << 0) | (1 << 13);
/// Leaf 0x80000001 EDX of `kvm64`: syscall, nx, lm.
const KVM64_EXT_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 29);
/// Leaf 0x80000001 ECX of `kvm64`: lahf_lm.
const KVM64_EXT_ECX: u32 = 1;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC deadline timer (the heartbeat uses the periodic LAPIC timer).
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
/// Leaf 0x80000007 EDX: invariant TSC, not migratable across hosts.
const INVARIANT_TSC: u32 = 1 << 8;

/// Why the CPU model cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The named model is not one berth knows.
    #[error("Unknown CPU model {0:?} (known: kvm64)")]
    UnknownModel(String),
}

/// The CPUID for vCPU `index` of `count`, from KVM's supported set.
///
/// # Errors
/// [`CpuidError::UnknownModel`] for a custom model berth does not know.
pub fn for_vcpu(
    supported: &CpuId,
    mode: CpuMode,
    model: Option<&str>,
    index: u32,
    count: u32,
) -> Result<CpuId, CpuidError> {
    if mode == CpuMode::Custom {
        match model.unwrap_or("kvm64") {
            "kvm64" | "qemu64" => {}
            other => return Err(CpuidError::UnknownModel(other.to_owned())),
        }
    }
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, mode, index, count);
    }
    Ok(cpuid)
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, mode: CpuMode, index: u32, count: u32) {
    match entry.function {
        1 => {
            entry.ebx = (entry.ebx & 0x0000_FFFF) | (index << 24) | ((count.min(255)) << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if mode == CpuMode::Custom {
                entry.edx &= KVM64_LEAF1_EDX;
                entry.ecx &= KVM64_LEAF1_ECX | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC;
            }
        }
        0xB | 0x1F => entry.edx = index,
        7 | 0xD | 0x14 | 0x19 if mode == CpuMode::Custom => {
            if entry.function == 0xD && entry.index <= 1 {
                // Keep x87/SSE state sizes; drop AVX and later components.
                entry.eax &= 0x3;
            } else {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
        }
        0x8000_0001 if mode == CpuMode::Custom => {
            entry.edx &= KVM64_EXT_EDX;
            entry.ecx &= KVM64_EXT_ECX;
        }
        0x8000_0007 if mode != CpuMode::HostPassthrough => entry.edx &= !INVARIANT_TSC,
        _ => {}
    }
}

/// The CPU vendor string (leaf 0), such as `GenuineIntel`.
pub fn vendor(cpuid: &CpuId) -> String {
    let Some(e) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return String::new();
    };
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Named feature flags the guest sees, for migration pre-checks (`nx`, `lm`, `avx2`...).
pub fn feature_flags(cpuid: &CpuId) -> BTreeSet<&'static str> {
    // (leaf, subleaf, register, bit, name); register 0..=3 = eax, ebx, ecx, edx.
    const FLAGS: &[(u32, u32, u8, u8, &str)] = &[
        (1, 0, 3, 0, "fpu"),
        (1, 0, 3, 4, "tsc"),
        (1, 0, 3, 5, "msr"),
        (1, 0, 3, 6, "pae"),
        (1, 0, 3, 8, "cx8"),
        (1, 0, 3, 9, "apic"),
        (1, 0, 3, 15, "cmov"),
        (1, 0, 3, 19, "clflush"),
        (1, 0, 3, 23, "mmx"),
        (1, 0, 3, 24, "fxsr"),
        (1, 0, 3, 25, "sse"),
        (1, 0, 3, 26, "sse2"),
        (1, 0, 2, 0, "sse3"),
        (1, 0, 2, 1, "pclmulqdq"),
        (1, 0, 2, 9, "ssse3"),
        (1, 0, 2, 12, "fma"),
        (1, 0, 2, 13, "cx16"),
        (1, 0, 2, 19, "sse4_1"),
        (1, 0, 2, 20, "sse4_2"),
        (1, 0, 2, 21, "x2apic"),
        (1, 0, 2, 22, "movbe"),
        (1, 0, 2, 23, "popcnt"),
        (1, 0, 2, 25, "aes"),
        (1, 0, 2, 26, "xsave"),
        (1, 0, 2, 28, "avx"),
        (1, 0, 2, 29, "f16c"),
        (1, 0, 2, 30, "rdrand"),
        (1, 0, 2, 31, "hypervisor"),
        (7, 0, 1, 3, "bmi1"),
        (7, 0, 1, 5, "avx2"),
        (7, 0, 1, 8, "bmi2"),
        (7, 0, 1, 9, "erms"),
        (7, 0, 1, 16, "avx512f"),
        (7, 0, 1, 18, "rdseed"),
        (7, 0, 1, 19, "adx"),
        (7, 0, 1, 29, "sha_ni"),
        (0x8000_0001, 0, 3, 11, "syscall"),
        (0x8000_0001, 0, 3, 20, "nx"),
        (0x8000_0001, 0, 3, 26, "pdpe1gb"),
        (0x8000_0001, 0, 3, 27, "rdtscp"),
        (0x8000_0001, 0, 3, 29, "lm"),
        (0x8000_0001, 0, 2, 0, "lahf_lm"),
        (0x8000_0001, 0, 2, 5, "abm"),
    ];
    let mut out = BTreeSet::new();
    for &(leaf, sub, reg, bit, name) in FLAGS {
        let Some(e) = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || leaf == 1 || leaf >= 0x8000_0000))
        else {
            continue;
        };
        let value = [e.eax, e.ebx, e.ecx, e.edx][reg as usize];
        if value & (1 << bit) != 0 {
            out.insert(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                ebx: u32::from_le_bytes(*b"Genu"),
                edx: u32::from_le_bytes(*b"ineI"),
                ecx: u32::from_le_bytes(*b"ntel"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0xFFFF_FFFF,
                edx: 0xFFFF_FFFF,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 1 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0001,
                edx: 0xFFFF_FFFF,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_id_and_models() {
        let passthrough = for_vcpu(&sample(), CpuMode::HostPassthrough, None, 3, 4).unwrap();
        let leaf1 = passthrough.as_slice()[1];
        assert_eq!(leaf1.ebx >> 24, 3);
        let flags = feature_flags(&passthrough);
        assert!(flags.contains("avx2") && flags.contains("nx") && flags.contains("avx"));
        let kvm64 = for_vcpu(&sample(), CpuMode::Custom, Some("kvm64"), 0, 1).unwrap();
        let flags = feature_flags(&kvm64);
        assert!(flags.contains("nx") && flags.contains("lm") && flags.contains("sse2"));
        assert!(!flags.contains("avx2") && !flags.contains("avx"));
        assert_eq!(vendor(&kvm64), "GenuineIntel");
        assert!(for_vcpu(&sample(), CpuMode::Custom, Some("epyc"), 0, 1).is_err());
    }
}
