//! Guest RAM as migration sees it: pages read out of a running guest (source), page
//! writes into a guest that does not run yet (destination), and the dirty set (KVM's
//! dirty log OR'ed with the VMM's own writes, which vm-memory's bitmap records).
//!
//! Pages travel in runs of at most [`CHUNK_PAGES`] that never cross a 2 MiB boundary;
//! a page always goes over connection `(gpa / 2 MiB) % connections`, so two versions of
//! one page always share a connection and arrive in order.

use std::fs::File;
use std::ops::Deref as _;
use std::os::unix::fs::FileExt as _;

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::seal::SharedBytes;
use super::wire::{MemoryBounds, PAGE_SIZE};
use crate::vstate::vm::{Vm, VmError};

/// Pages per 2 MiB chunk.
pub const CHUNK_PAGES: u32 = 512;
const PAGE: u64 = PAGE_SIZE as u64;

/// Words of a bitmask with one bit per page of a chunk.
pub const CHUNK_WORDS: usize = CHUNK_PAGES as usize / 64;
/// A pagemap entry's "present in RAM" bit (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
/// A pagemap entry's "swapped out" bit (also set for pages being migrated by the kernel).
const PM_SWAPPED: u64 = 1 << 62;

/// `/proc/self/pagemap`, open for [`GuestRam::untouched`].
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Which of the `pages` pages mapped from `host` are neither present nor swapped
    /// out, as a bitmask (see [`GuestRam::untouched`]); `None` for more than a chunk of
    /// pages or when the read fails.
    fn untouched(&self, host: *const u8, pages: u32) -> Option<[u64; CHUNK_WORDS]> {
        if pages == 0 || pages > CHUNK_PAGES {
            return None;
        }
        let mut raw = [0u8; CHUNK_PAGES as usize * 8];
        let raw = &mut raw[..pages as usize * 8];
        self.file
            .read_exact_at(raw, (host as u64 / PAGE) * 8)
            .ok()?;
        let mut mask = [0u64; CHUNK_WORDS];
        for (i, entry) in raw.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PM_PRESENT | PM_SWAPPED) == 0 {
                mask[i / 64] |= 1 << (i % 64);
            }
        }
        Some(mask)
    }
}

/// A run of pages: first guest address and count, within one 2 MiB chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First page's guest physical address.
    pub gpa: u64,
    /// Pages in the run.
    pub pages: u32,
}

/// The connection that carries the pages of the chunk holding `gpa`.
pub fn connection_of(gpa: u64, connections: u32) -> usize {
    ((gpa >> 21) % u64::from(connections.max(1))) as usize
}

#[derive(Debug, Clone, Copy)]
struct Range {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The guest's RAM ranges and where they are mapped in this process.
#[derive(Debug)]
pub struct GuestRam<'a> {
    vm: &'a Vm,
    ranges: Vec<Range>,
}

// SAFETY: the raw host pointers point into the mappings of `vm`'s guest memory, which
// the `&'a Vm` keeps alive and mapped for 'a; guest RAM is shared with the vCPUs anyway,
// and every access below goes through raw copies, never through Rust references held
// across threads.
unsafe impl Sync for GuestRam<'_> {}
// SAFETY: as above; nothing in it is tied to the creating thread.
unsafe impl Send for GuestRam<'_> {}

impl<'a> GuestRam<'a> {
    /// The RAM of `vm`.
    pub fn new(vm: &'a Vm) -> GuestRam<'a> {
        let ranges = vm
            .slots()
            .iter()
            .map(|s| Range {
                gpa: s.guest_addr.0,
                len: s.len,
                host: s.host_addr as *mut u8,
            })
            .collect();
        GuestRam { vm, ranges }
    }

    /// `(start, length)` of every range.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|r| (r.gpa, r.len)).collect()
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// The bounds a receiver checks page addresses against.
    pub fn bounds(&self) -> MemoryBounds {
        MemoryBounds::new(self.ranges())
    }

    /// Every page, as runs (the first pass).
    pub fn all_runs(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        for r in &self.ranges {
            push_runs(&mut runs, r.gpa, r.len / PAGE);
        }
        runs
    }

    /// The host address of the page at `gpa`, if the page lies wholly in RAM.
    fn host(&self, gpa: u64) -> Option<*mut u8> {
        self.host_run(gpa, PAGE)
    }

    /// The host address of the `bytes` from `gpa`, if they lie wholly in one range (so
    /// they are contiguous in this process too).
    fn host_run(&self, gpa: u64, bytes: u64) -> Option<*mut u8> {
        let r = self
            .ranges
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(bytes).is_some_and(|e| e <= r.gpa + r.len))?;
        // The offset is below the range length, so the result stays in the mapping.
        Some(r.host.wrapping_add((gpa - r.gpa) as usize))
    }

    /// This process's page table for guest RAM (`/proc/self/pagemap`), to find pages
    /// that were never faulted in ([`GuestRam::untouched`]); `None` when it cannot be
    /// read (the sender then reads every page).
    pub fn pagemap(&self) -> Option<Pagemap> {
        File::open("/proc/self/pagemap")
            .ok()
            .map(|file| Pagemap { file })
    }

    /// The pages of `run` that were never faulted in, as a bitmask (bit `i` of word
    /// `i / 64`: page `i` of the run): neither present in this process's page table nor
    /// swapped out. Guest RAM is private anonymous memory, or private hugetlb memory
    /// (`vstate/memory.rs`), where such a page reads as zeroes: the sender counts it
    /// as zero without reading it, which would fault the shared zero page in, one fault
    /// per 4 KiB. A guest write after the look-up is in the dirty log (on before the
    /// first pass), so the page goes in a later pass. `None` when the look-up fails.
    pub fn untouched(&self, pagemap: &Pagemap, run: Run) -> Option<[u64; CHUNK_WORDS]> {
        let host = self.host_run(run.gpa, u64::from(run.pages) * PAGE)?;
        pagemap.untouched(host, run.pages)
    }

    /// The pages of `run` whose first 16 bytes are not all zero right now (so they are
    /// not zero pages), as a bitmask like [`GuestRam::untouched`]'s; pages in `skip`
    /// are not read. One load per page in a loop without early exits, so the CPU has
    /// the cache misses of many pages in flight at once, where [`GuestRam::is_zero`]
    /// would wait for each page in turn; only pages that pass this go on to that full
    /// check.
    pub fn nonzero_heads(&self, run: Run, skip: &[u64; CHUNK_WORDS]) -> [u64; CHUNK_WORDS] {
        let mut mask = [0u64; CHUNK_WORDS];
        let pages = run.pages.min(CHUNK_PAGES) as usize;
        let Some(host) = self.host_run(run.gpa, pages as u64 * PAGE) else {
            return mask;
        };
        for (i, word) in mask.iter_mut().enumerate().take(pages.div_ceil(64)) {
            for bit in 0..64.min(pages - i * 64) {
                let page = i * 64 + bit;
                if skip[i] & (1 << bit) != 0 {
                    continue;
                }
                // SAFETY: the page lies in one live mapping of guest RAM (checked by
                // `host_run` for the whole run); a volatile read of 16 bytes through a
                // raw pointer, so a concurrent guest write only makes it stale, which the
                // dirty log covers.
                let head = unsafe {
                    std::ptr::read_volatile(host.add(page * PAGE_SIZE).cast::<[u64; 2]>())
                };
                *word |= u64::from(head[0] | head[1] != 0) << bit;
            }
        }
        mask
    }

    /// Whether the page at `gpa` holds only zeroes right now. A running guest may write
    /// it meanwhile; the dirty log then has it for the next pass.
    pub fn is_zero(&self, gpa: u64) -> bool {
        let Some(host) = self.host(gpa) else {
            return false;
        };
        let mut zero = true;
        let mut buf = [0u64; 64];
        for part in 0..(PAGE_SIZE / 512) {
            // SAFETY: `host` is a page of our mapping (checked by `host`); the copy reads
            // 512 bytes inside it into a local buffer. A concurrent guest write can only
            // make the copy stale, which the dirty log covers.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host.add(part * 512),
                    buf.as_mut_ptr().cast::<u8>(),
                    512,
                )
            };
            if buf.iter().fold(0, |acc, &q| acc | q) != 0 {
                zero = false;
                break;
            }
        }
        zero
    }

    /// The `pages` pages from `gpa`, to be read where they lie (the sender encrypts them
    /// straight out of guest memory) while the guest may write them.
    ///
    /// # Panics
    /// When the run is not wholly in one range of RAM (a caller bug: the addresses come
    /// from this RAM's own runs, and no run crosses a range).
    pub fn pages(&self, gpa: u64, pages: usize) -> SharedBytes<'_> {
        let bytes = pages * PAGE_SIZE;
        let host = self
            .host_run(gpa, bytes as u64)
            .expect("a run of guest RAM");
        // SAFETY: `host..host + bytes` lies in one live mapping of guest RAM (checked by
        // `host_run`), which the `&'a Vm` keeps mapped for as long as `self` is
        // borrowed. The vCPUs may write these pages meanwhile: `SharedBytes` is read
        // through a raw pointer only, never as a Rust reference, and a page that
        // changes while it is read is dirty, so the next pass sends it again.
        unsafe { SharedBytes::from_raw(host, bytes) }
    }

    /// Lends the `pages` pages from `gpa` to `write` as one slice, to be written in
    /// place (the receiver reads and decrypts a `PageData` frame into it). The caller
    /// checked the run against [`GuestRam::bounds`] and its connection. Only for a
    /// guest that does not run.
    ///
    /// # Panics
    /// When the run is not wholly in one range of RAM (the caller skipped the bounds
    /// check).
    pub fn with_run<T>(&self, gpa: u64, pages: u32, write: impl FnOnce(&mut [u8]) -> T) -> T {
        let bytes = u64::from(pages) * PAGE;
        let host = self
            .host_run(gpa, bytes)
            .expect("run checked against the bounds");
        // SAFETY: `host..host + bytes` lies in one live mapping of guest RAM (checked by
        // `host_run`; the `&'a Vm` keeps it mapped). Nothing else reads or writes these
        // pages while the slice lives: no vCPU runs on the destination before the
        // switchover, the VMM touches guest memory only after the stream ends, and the
        // receiving threads never hold the same page: each serves one connection, a run
        // lies in one 2 MiB chunk (`wire::parse_run`), and the receiver refuses a run
        // that is not on the connection `connection_of` assigns its chunk
        // (`receive::apply`), so the slices of two threads never overlap.
        let run = unsafe { std::slice::from_raw_parts_mut(host, bytes as usize) };
        write(run)
    }

    /// Zeroes the pages at `gpas` (checked as for [`GuestRam::with_run`]).
    ///
    /// # Panics
    /// When a page is outside RAM.
    pub fn zero_pages(&self, gpas: &[u64]) {
        for gpa in gpas {
            let host = self.host(*gpa).expect("page checked against the bounds");
            // SAFETY: as in `with_run` (bounds and connection checked by the caller).
            unsafe { std::ptr::write_bytes(host, 0, PAGE_SIZE) };
        }
    }

    /// Faults every page of RAM in for writing (MADV_POPULATE_WRITE), so that pages
    /// arriving later land in memory that exists: a destination does this while it
    /// waits, which takes the kernel's page allocation and zeroing off the migration.
    ///
    /// # Errors
    /// The kernel refuses (no memory, or a kernel before 5.14).
    pub fn populate(&self) -> std::io::Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        for r in &self.ranges {
            // SAFETY: the range is a live mapping of guest RAM (kept by `self.vm`);
            // populating only faults pages in, their content stays zero.
            let rc = unsafe { libc::madvise(r.host.cast(), r.len as usize, MADV_POPULATE_WRITE) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Forgets every dirty mark of the VMM's own writes (the first pass sends all).
    pub fn reset_vmm_dirty(&self) {
        for region in self.vm.memory().iter() {
            region.deref().bitmap().reset();
        }
    }

    /// An empty dirty set shaped like this RAM.
    pub fn dirty_set(&self) -> DirtySet {
        DirtySet {
            slots: self
                .ranges
                .iter()
                .map(|r| {
                    let pages = r.len / PAGE;
                    (r.gpa, pages, vec![0u64; pages.div_ceil(64) as usize])
                })
                .collect(),
        }
    }

    /// Adds the pages dirtied since the last call (or since logging started) to `set`:
    /// KVM's dirty log of every slot OR'ed with the VMM's own writes. Returns how many
    /// pages this call found (counting pages already in `set` again), for rates.
    ///
    /// # Errors
    /// [`VmError::GetDirtyLog`].
    pub fn collect_dirty(&self, set: &mut DirtySet) -> Result<u64, VmError> {
        let logs = self.vm.dirty_log()?;
        let mut found = 0;
        for log in logs {
            let mut bitmap = log.bitmap;
            if let Some(region) = self
                .vm
                .memory()
                .iter()
                .find(|r| r.start_addr() == log.slot.guest_addr)
            {
                for (word, vmm) in bitmap
                    .iter_mut()
                    .zip(region.deref().bitmap().get_and_reset())
                {
                    *word |= vmm;
                }
            }
            found += bitmap
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
            if let Some((_, _, acc)) = set
                .slots
                .iter_mut()
                .find(|(gpa, _, _)| *gpa == log.slot.guest_addr.0)
            {
                for (a, w) in acc.iter_mut().zip(&bitmap) {
                    *a |= w;
                }
            }
        }
        Ok(found)
    }
}

/// Pages to send in the next pass, one bit per page of each RAM range.
#[derive(Debug, Clone)]
pub struct DirtySet {
    slots: Vec<(u64, u64, Vec<u64>)>,
}

impl DirtySet {
    /// Pages in the set.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|(_, _, b)| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The set as runs, and empties it.
    pub fn take_runs(&mut self) -> Vec<Run> {
        let mut runs = Vec::new();
        for (gpa, pages, bitmap) in &mut self.slots {
            bitmap_runs(&mut runs, *gpa, *pages, bitmap);
            bitmap.fill(0);
        }
        runs
    }
}

/// Runs covering `pages` pages from `gpa`, split at 2 MiB boundaries.
fn push_runs(runs: &mut Vec<Run>, gpa: u64, pages: u64) {
    let mut page = 0;
    while page < pages {
        let at = gpa + page * PAGE;
        let to_boundary =
            (u64::from(CHUNK_PAGES) - (at / PAGE) % u64::from(CHUNK_PAGES)).min(pages - page);
        runs.push(Run {
            gpa: at,
            pages: to_boundary as u32,
        });
        page += to_boundary;
    }
}

/// Runs of set bits of `bitmap` (bit n = page `base + n * 4096`), split at 2 MiB.
pub fn bitmap_runs(runs: &mut Vec<Run>, base: u64, pages: u64, bitmap: &[u64]) {
    let mut start: Option<u64> = None;
    for page in 0..=pages {
        let set = page < pages
            && bitmap
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0);
        match (set, start) {
            (true, None) => start = Some(page),
            (false, Some(s)) => {
                push_runs(runs, base + s * PAGE, page - s);
                start = None;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_never_faulted_in_are_found_untouched() {
        let pages = 16usize;
        // SAFETY: a fresh private anonymous mapping (like guest RAM), unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let base = map.cast::<u8>();
        // SAFETY: pages 1, 5 and 7 lie in the mapping; 1 and 5 are written, 7 is only
        // read (which maps the shared zero page: present, so not "untouched").
        unsafe {
            base.add(PAGE_SIZE).write(1);
            base.add(5 * PAGE_SIZE + 100).write(2);
            assert_eq!(std::ptr::read_volatile(base.add(7 * PAGE_SIZE)), 0);
        }
        let pagemap = Pagemap {
            file: File::open("/proc/self/pagemap").unwrap(),
        };
        let mask = pagemap.untouched(base, pages as u32).unwrap();
        assert_eq!(mask[0], 0xffff & !(1 << 1 | 1 << 5 | 1 << 7));
        assert!(mask[1..].iter().all(|&w| w == 0));
        assert!(pagemap.untouched(base, CHUNK_PAGES + 1).is_none());
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(map, pages * PAGE_SIZE) };
    }

    #[test]
    fn runs_split_at_chunks_and_follow_the_bitmap() {
        let mut runs = Vec::new();
        push_runs(&mut runs, 0x1f_f000, 3);
        assert_eq!(
            runs,
            vec![
                Run {
                    gpa: 0x1f_f000,
                    pages: 1
                },
                Run {
                    gpa: 0x20_0000,
                    pages: 2
                }
            ]
        );
        let mut runs = Vec::new();
        // Pages 0, 1, 3 and 63, 64.
        bitmap_runs(&mut runs, 0x1000_0000, 128, &[0b1011 | 1 << 63, 1]);
        let got: Vec<(u64, u32)> = runs.iter().map(|r| (r.gpa, r.pages)).collect();
        assert_eq!(
            got,
            vec![
                (0x1000_0000, 2),
                (0x1000_3000, 1),
                (0x1000_0000 + 63 * 4096, 2)
            ]
        );
        assert_eq!(connection_of(0x20_0000, 2), 1);
        assert_eq!(connection_of(0x40_0000, 2), 0);
    }
}
