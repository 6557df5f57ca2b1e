//! Guest memory: anonymous or hugetlb mappings wrapped in vm-memory regions, with the
//! host-side advice (THP, KSM, mlock, NUMA policy) applied before the VM sees them.
//!
//! The layout is x86's: one region from 0 up to the MMIO hole at 3 GiB, the rest above
//! 4 GiB.

use berth_schema::PageSize;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::config::{Backing, MemoryConfig};
use crate::hostlink;

/// Guest memory with a dirty bitmap of the VMM's own writes (OR'ed with KVM's dirty log
/// by migration).
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC live in it).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The hugepage pool cannot back the guest.
    #[error(
        "Cannot back {size} of guest memory with hugepages: needs {needed} pages of {page_size}, {available} free"
    )]
    HugepagesShort {
        /// Guest memory size.
        size: berth_schema::Bytes,
        /// Page size.
        page_size: PageSize,
        /// Pages needed.
        needed: u64,
        /// Pages free (and not reserved).
        available: u64,
    },
    /// The pool's sysfs files are missing.
    #[error("Cannot read the {0} hugepage pool: {1}")]
    HugepagePool(PageSize, crate::host::hugepages::HugePageError),
    /// The guest is larger than the host's RAM.
    #[error("Cannot back {size} of guest memory: the host has {total} of RAM")]
    HostTooSmall {
        /// Guest memory size.
        size: berth_schema::Bytes,
        /// Host RAM.
        total: berth_schema::Bytes,
    },
    /// mmap failed.
    #[error("Cannot map {size} of guest memory: {source}")]
    Mmap {
        /// Region size.
        size: berth_schema::Bytes,
        /// vm-memory's error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Faulting in hugetlb pages failed (pool raced away).
    #[error("Cannot fault in the guest's hugepages: {0}")]
    Populate(std::io::Error),
    /// madvise failed.
    #[error("Cannot advise guest memory ({advice}): {source}")]
    Madvise {
        /// Which advice.
        advice: &'static str,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// mlock failed.
    #[error("Cannot lock guest memory (mlock): {0}")]
    Mlock(std::io::Error),
    /// A NUMA node that the host does not have.
    #[error("NUMA node {node} does not exist on this host (nodes: {nodes})")]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The host's nodes.
        nodes: berth_schema::CpuSet,
    },
    /// mbind failed.
    #[error("Cannot apply the NUMA policy (mbind): {0}")]
    Mbind(std::io::Error),
    /// Assembling the regions failed.
    #[error("Cannot set up the guest memory regions: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
}

/// The (guest address, size) ranges of a guest with `size` bytes of RAM.
pub fn arch_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

/// Maps and advises guest memory per `cfg`. Fails before anything is mapped when the
/// hugepage pool is short or the NUMA nodeset names a node the host lacks.
///
/// # Errors
/// A [`MemoryError`] naming the failing step.
pub fn create(cfg: &MemoryConfig) -> Result<GuestMemory, MemoryError> {
    check_numa(cfg)?;
    if let Some(total) = hostlink::host_memory().filter(|&total| cfg.size > total) {
        return Err(MemoryError::HostTooSmall {
            size: berth_schema::Bytes(cfg.size),
            total: berth_schema::Bytes(total),
        });
    }
    if let Backing::Hugetlb(page_size) = cfg.backing {
        let needed = cfg.size / page_size.bytes();
        let available = hostlink::hugepages_available(page_size)
            .map_err(|e| MemoryError::HugepagePool(page_size, e))?;
        if available < needed {
            return Err(MemoryError::HugepagesShort {
                size: berth_schema::Bytes(cfg.size),
                page_size,
                needed,
                available,
            });
        }
    }
    let thp_madvise = cfg.backing == Backing::Anonymous
        && hostlink::thp_mode() == Some(berth_schema::ThpMode::Madvise);
    let mut regions = Vec::new();
    for (addr, size) in arch_ranges(cfg.size) {
        let region = map_region(cfg, size)?;
        let host = sys::HostRange {
            addr: region.as_ptr(),
            len: region.size(),
        };
        if let Some(numa) = &cfg.numa {
            sys::mbind(host, numa.mode, numa.nodeset.iter()).map_err(MemoryError::Mbind)?;
        }
        if thp_madvise {
            sys::madvise(host, libc::MADV_HUGEPAGE).map_err(|source| MemoryError::Madvise {
                advice: "MADV_HUGEPAGE",
                source,
            })?;
        }
        apply_ksm(host, cfg.share_pages)?;
        if matches!(cfg.backing, Backing::Hugetlb(_)) {
            // Fault every hugepage in now so the pool count is exact and a race for the
            // pool fails here, not as a SIGBUS in the guest.
            sys::populate(host).map_err(MemoryError::Populate)?;
        }
        if cfg.locked {
            sys::mlock(host).map_err(MemoryError::Mlock)?;
        }
        let region = GuestRegionMmap::new(region, addr).expect("ranges do not overflow");
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

fn map_region(cfg: &MemoryConfig, size: u64) -> Result<MmapRegion<AtomicBitmap>, MemoryError> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let hugetlb = match cfg.backing {
        Backing::Anonymous => {
            flags |= libc::MAP_NORESERVE;
            false
        }
        Backing::Hugetlb(PageSize::Huge2M) => {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
            true
        }
        Backing::Hugetlb(PageSize::Huge1G) => {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_1GB;
            true
        }
    };
    vm_memory::mmap::MmapRegionBuilder::<AtomicBitmap>::new(size as usize)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(hugetlb)
        .build()
        .map_err(|source| MemoryError::Mmap {
            size: berth_schema::Bytes(size),
            source,
        })
}

fn check_numa(cfg: &MemoryConfig) -> Result<(), MemoryError> {
    let Some(numa) = &cfg.numa else {
        return Ok(());
    };
    let nodes = hostlink::numa_nodes();
    match numa.nodeset.iter().find(|n| !nodes.contains(*n)) {
        Some(node) => Err(MemoryError::NoSuchNode { node, nodes }),
        None => Ok(()),
    }
}

fn apply_ksm(host: sys::HostRange, share: bool) -> Result<(), MemoryError> {
    let (advice, name) = if share {
        (libc::MADV_MERGEABLE, "MADV_MERGEABLE")
    } else {
        (libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE")
    };
    match sys::madvise(host, advice) {
        // A kernel without KSM has nothing to unmerge.
        Err(e) if !share && e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other.map_err(|source| MemoryError::Madvise {
            advice: name,
            source,
        }),
    }
}

/// Where the first (low) RAM region ends: the top of memory below the MMIO hole.
pub fn low_end(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend as _;
    mem.iter().next().map_or(0, |r| r.start_addr().0 + r.len())
}

/// Total guest memory in bytes.
pub fn total_size(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend as _;
    mem.iter().map(|r| r.len()).sum()
}

/// The raw memory calls. Each takes a range that the caller mapped and still owns.
mod sys {
    use std::io;

    use berth_schema::NumaMode;

    /// A mapped host range owned by a live `MmapRegion`.
    #[derive(Clone, Copy)]
    pub(super) struct HostRange {
        pub addr: *mut u8,
        pub len: usize,
    }

    fn check(rc: libc::c_long) -> io::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub(super) fn madvise(r: HostRange, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is a live mapping of ours; madvise does not touch its contents
        // for these advices (THP, KSM, populate).
        check(unsafe { libc::madvise(r.addr.cast(), r.len, advice) }.into())
    }

    pub(super) fn mlock(r: HostRange) -> io::Result<()> {
        // SAFETY: the range is a live mapping of ours; mlock only faults it in and pins it.
        check(unsafe { libc::mlock(r.addr.cast(), r.len) }.into())
    }

    /// Faults in every page for writing (MADV_POPULATE_WRITE, Linux 5.14+).
    pub(super) fn populate(r: HostRange) -> io::Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        madvise(r, MADV_POPULATE_WRITE)
    }

    pub(super) fn mbind(
        r: HostRange,
        mode: NumaMode,
        nodes: impl Iterator<Item = u32>,
    ) -> io::Result<()> {
        const MPOL_PREFERRED: libc::c_long = 1;
        const MPOL_BIND: libc::c_long = 2;
        const MPOL_INTERLEAVE: libc::c_long = 3;
        const MPOL_MF_MOVE: libc::c_long = 1 << 1;
        let mut mask = [0u64; 16];
        for node in nodes {
            let node = node as usize;
            if node >= mask.len() * 64 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "node out of range",
                ));
            }
            mask[node / 64] |= 1 << (node % 64);
        }
        let mode = match mode {
            NumaMode::Strict => MPOL_BIND,
            NumaMode::Preferred => MPOL_PREFERRED,
            NumaMode::Interleave => MPOL_INTERLEAVE,
        };
        // SAFETY: the range is a live mapping of ours; `mask` outlives the call and holds
        // `mask.len() * 64` bits, the maxnode passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                r.addr,
                r.len,
                mode,
                mask.as_ptr(),
                (mask.len() * 64) as libc::c_ulong,
                MPOL_MF_MOVE,
            )
        };
        check(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_schema::NumaMode;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    fn anon(size: u64) -> MemoryConfig {
        MemoryConfig::anonymous(size)
    }

    #[test]
    fn ranges_skip_the_mmio_hole() {
        assert_eq!(arch_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        let r = arch_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(r[1], (GuestAddress(1 << 32), (4 << 30) - MMIO_HOLE_START));
    }

    #[test]
    fn anonymous_memory_with_numa_node_0_and_ksm_advice() {
        let mut cfg = anon(8 << 20);
        cfg.share_pages = true;
        cfg.numa = Some(berth_schema::NumaSpec {
            mode: NumaMode::Strict,
            nodeset: "0".parse().unwrap(),
        });
        let mem = create(&cfg).unwrap();
        assert_eq!(total_size(&mem), 8 << 20);
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        assert!(mem.num_regions() == 1);
    }

    #[test]
    fn missing_numa_node_is_refused_before_mapping() {
        let mut cfg = anon(8 << 20);
        cfg.numa = Some(berth_schema::NumaSpec {
            mode: NumaMode::Preferred,
            nodeset: "7".parse().unwrap(),
        });
        let msg = create(&cfg).unwrap_err().to_string();
        assert!(msg.contains("NUMA node 7 does not exist"), "{msg}");
    }

    #[test]
    fn short_hugepage_pool_is_refused_with_counts() {
        let available = match hostlink::hugepages_available(PageSize::Huge1G) {
            Ok(n) => n,
            Err(_) => return, // no 1 GiB pool on this kernel: nothing to check
        };
        let cfg = MemoryConfig {
            size: (available + 1) << 30,
            backing: Backing::Hugetlb(PageSize::Huge1G),
            ..anon(0)
        };
        let msg = create(&cfg).unwrap_err().to_string();
        assert!(
            msg.contains(&format!(
                "needs {} pages of 1GiB, {available} free",
                available + 1
            )),
            "{msg}"
        );
    }
}
