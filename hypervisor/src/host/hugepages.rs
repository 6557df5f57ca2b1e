//! Hugepage pools, one per page size, under `/sys/kernel/mm/hugepages/hugepages-<kB>kB/`.
//!
//! The pool size (`nr_hugepages`) is a request: the kernel may give fewer pages than asked
//! (fragmented memory, especially for 1 GiB pages), so [`HugePagePool::set_total`] reads
//! back what the pool really holds. `/proc/sys/vm/nr_hugepages` is the pool of the default
//! page size (2 MiB on x86_64), the same file as this module's 2 MiB pool.
//!
//! Counters, as the kernel defines them: `total` pages in the pool, of which `free` are not
//! faulted in by any mapping; `reserved` of the free pages are promised to mappings that
//! have not touched them yet; `surplus` pages were allocated above `nr_hugepages` through
//! overcommit (or stayed after a shrink while in use). A new mapping can get
//! [`PoolStats::available`] = free - reserved pages.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use berth_schema::{Bytes, PageSize};
use serde::{Deserialize, Serialize};

use super::{colon_fields, os_message, parse_kib, read_file, write_file};

/// Where the kernel keeps one directory per hugepage size.
pub const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages";

/// Where the kernel summarises memory, including the default-size hugepage pool.
pub const MEMINFO_PATH: &str = "/proc/meminfo";

/// The lock file that serialises hugepage pool changes ([`PoolReservation`]s, berth's
/// pool resizes) across processes, in [`POOL_LOCK_DIR`].
pub const RESERVATION_LOCK_NAME: &str = "berth-hugepages.lock";

/// Where the pool lock lives: a directory every berth process on the host sees (apply,
/// serve and every VMM). Not `$TMPDIR`: the systemd unit gives the service a private
/// `/tmp` (its `RuntimeDirectory=berth` makes this one writable).
pub const POOL_LOCK_DIR: &str = "/run/berth";

/// The pool lock's path.
pub fn pool_lock_path() -> PathBuf {
    Path::new(POOL_LOCK_DIR).join(RESERVATION_LOCK_NAME)
}

/// Why a hugepage pool could not be read or resized.
#[derive(Debug, thiserror::Error)]
pub enum HugePageError {
    /// The kernel has no pool of this page size.
    #[error("The kernel offers no {page_size} hugepages ({} does not exist)", .path.display())]
    Unsupported {
        /// The page size.
        page_size: PageSize,
        /// The pool directory that is missing.
        path: PathBuf,
    },
    /// A pool or meminfo file could not be read.
    #[error("Cannot read {}: {}", .path.display(), os_message(.error))]
    Read {
        /// The file.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
    /// The kernel refused a pool size.
    #[error("Cannot write {value} to {}: {}", .path.display(), os_message(.error))]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: u64,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A file held something unexpected.
    #[error("Cannot parse {}: {reason}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The pool has fewer pages available than needed.
    #[error(
        "Not enough {page_size} hugepages: {needed} needed, {available} available \
         (pool of {total}, {free} free, {reserved} of them reserved)"
    )]
    Short {
        /// The page size.
        page_size: PageSize,
        /// The pages needed.
        needed: u64,
        /// The pages a new mapping can get.
        available: u64,
        /// The pool size.
        total: u64,
        /// The free pages.
        free: u64,
        /// The free pages promised to existing mappings.
        reserved: u64,
    },
    /// The reservation lock could not be taken.
    #[error("Cannot lock {}: {}", .path.display(), os_message(.error))]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
}

/// The counters of one pool, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStats {
    /// The page size.
    pub page_size: PageSize,
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages not faulted in by any mapping (`free_hugepages`).
    pub free: u64,
    /// Free pages promised to mappings (`resv_hugepages`).
    pub reserved: u64,
    /// Pages above `nr_hugepages` (`surplus_hugepages`).
    pub surplus: u64,
}

impl PoolStats {
    /// Pages a new mapping can still get: free pages not promised to anyone.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// Pages held by mappings: faulted in, or reserved for them.
    pub fn in_use(&self) -> u64 {
        self.total.saturating_sub(self.free) + self.reserved
    }

    /// `pages` pages of this size in bytes.
    pub fn bytes(&self, pages: u64) -> Bytes {
        Bytes(pages.saturating_mul(self.page_size.bytes()))
    }
}

/// One hugepage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugePagePool {
    page_size: PageSize,
    dir: PathBuf,
}

impl HugePagePool {
    /// The host's pool of `page_size` pages.
    pub fn new(page_size: PageSize) -> Self {
        Self::at(HUGEPAGES_DIR, page_size)
    }

    /// The pool of `page_size` pages under `hugepages_dir` (a directory shaped like
    /// `/sys/kernel/mm/hugepages`), for tests.
    pub fn at(hugepages_dir: impl AsRef<Path>, page_size: PageSize) -> Self {
        HugePagePool {
            page_size,
            dir: hugepages_dir
                .as_ref()
                .join(format!("hugepages-{}kB", page_size.kib())),
        }
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel offers this page size.
    pub fn is_supported(&self) -> bool {
        self.dir.is_dir()
    }

    fn read_counter(&self, file: &str) -> Result<u64, HugePageError> {
        let path = self.dir.join(file);
        let text = read_file(&path).map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound && !self.is_supported() {
                HugePageError::Unsupported {
                    page_size: self.page_size,
                    path: self.dir.clone(),
                }
            } else {
                HugePageError::Read {
                    path: path.clone(),
                    error,
                }
            }
        })?;
        text.trim().parse().map_err(|_| HugePageError::Parse {
            path,
            reason: format!("{:?} is not a page count", text.trim()),
        })
    }

    /// The pool's counters.
    ///
    /// # Errors
    /// [`HugePageError::Unsupported`] when the kernel lacks this page size, or the read
    /// or parse error of a counter file.
    pub fn stats(&self) -> Result<PoolStats, HugePageError> {
        Ok(PoolStats {
            page_size: self.page_size,
            total: self.read_counter("nr_hugepages")?,
            free: self.read_counter("free_hugepages")?,
            reserved: self.read_counter("resv_hugepages")?,
            surplus: self.read_counter("surplus_hugepages")?,
        })
    }

    /// Asks the kernel for a pool of `pages` pages and returns the counters afterwards:
    /// `total` may be below `pages` when the kernel could not find the memory. Shrinking
    /// below the pages in use leaves those as surplus until they are freed.
    ///
    /// # Errors
    /// [`HugePageError::Unsupported`], or [`HugePageError::Write`] when the kernel
    /// refuses the value.
    pub fn set_total(&self, pages: u64) -> Result<PoolStats, HugePageError> {
        if !self.is_supported() {
            return Err(HugePageError::Unsupported {
                page_size: self.page_size,
                path: self.dir.clone(),
            });
        }
        let path = self.dir.join("nr_hugepages");
        write_file(&path, &pages.to_string()).map_err(|error| HugePageError::Write {
            path,
            value: pages,
            error,
        })?;
        self.stats()
    }

    /// Checks that a mapping of `pages` pages would get them, before anything is built.
    ///
    /// # Errors
    /// [`HugePageError::Short`] with the numbers, or the errors of [`HugePagePool::stats`].
    pub fn ensure_available(&self, pages: u64) -> Result<PoolStats, HugePageError> {
        let stats = self.stats()?;
        if stats.available() < pages {
            return Err(HugePageError::Short {
                page_size: self.page_size,
                needed: pages,
                available: stats.available(),
                total: stats.total,
                free: stats.free,
                reserved: stats.reserved,
            });
        }
        Ok(stats)
    }
}

/// The page sizes the kernel offers pools for (among those berth knows: 2 MiB, 1 GiB).
///
/// # Errors
/// [`HugePageError::Read`] when `/sys/kernel/mm/hugepages` cannot be listed (a kernel
/// without hugetlbfs has no such directory: that is an empty list, not an error).
pub fn supported_page_sizes() -> Result<Vec<PageSize>, HugePageError> {
    let dir = Path::new(HUGEPAGES_DIR);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(HugePageError::Read {
                path: dir.to_owned(),
                error,
            })
        }
    };
    let mut sizes: Vec<PageSize> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let kib = name
                .to_str()?
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse::<u64>()
                .ok()?;
            [PageSize::Huge2M, PageSize::Huge1G]
                .into_iter()
                .find(|p| p.kib() == kib)
        })
        .collect();
    sizes.sort();
    Ok(sizes)
}

/// The default-size pool as `/proc/meminfo` summarises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeminfoHugePages {
    /// `HugePages_Total`.
    pub total: u64,
    /// `HugePages_Free`.
    pub free: u64,
    /// `HugePages_Rsvd`.
    pub reserved: u64,
    /// `HugePages_Surp`.
    pub surplus: u64,
    /// `Hugepagesize`: the default page size.
    pub page_size: Bytes,
    /// `Hugetlb`: memory in all hugepage pools, every size (absent before Linux 4.16).
    pub hugetlb: Option<Bytes>,
}

/// The hugepage lines of `/proc/meminfo`.
///
/// # Errors
/// [`HugePageError::Read`], or [`HugePageError::Parse`] when a line is missing.
pub fn read_meminfo_hugepages() -> Result<MeminfoHugePages, HugePageError> {
    let path = PathBuf::from(MEMINFO_PATH);
    let text = read_file(&path).map_err(|error| HugePageError::Read {
        path: path.clone(),
        error,
    })?;
    parse_meminfo_hugepages(&text).map_err(|reason| HugePageError::Parse { path, reason })
}

/// The hugepage lines of a `/proc/meminfo` text.
///
/// # Errors
/// Which line is missing or malformed.
pub fn parse_meminfo_hugepages(text: &str) -> Result<MeminfoHugePages, String> {
    let fields = colon_fields(text);
    let count = |key: &str| -> Result<u64, String> {
        let value = fields.get(key).ok_or_else(|| format!("no {key} line"))?;
        value
            .parse()
            .map_err(|_| format!("{key} {value:?} is not a page count"))
    };
    let size = |key: &str| -> Result<Option<Bytes>, String> {
        fields
            .get(key)
            .map(|value| {
                parse_kib(value)
                    .map(Bytes)
                    .ok_or_else(|| format!("{key} {value:?} is not a size in kB"))
            })
            .transpose()
    };
    Ok(MeminfoHugePages {
        total: count("HugePages_Total")?,
        free: count("HugePages_Free")?,
        reserved: count("HugePages_Rsvd")?,
        surplus: count("HugePages_Surp")?,
        page_size: size("Hugepagesize")?.ok_or("no Hugepagesize line")?,
        hugetlb: size("Hugetlb")?,
    })
}

/// Grows a pool for as long as it lives and gives the pages back on drop: for tests that
/// need hugepages, and which must leave the host as they found it even when they fail.
///
/// Reservations hold an exclusive lock on a file in the temporary directory, so that tests
/// in other processes that use this guard do not resize the pool underneath each other. A
/// second reservation waits for the first to drop: hold one at a time per thread. On drop
/// the pool shrinks by what this reservation added, relative to its size then, so the old
/// size comes back even if something else resized it meanwhile.
#[derive(Debug)]
pub struct PoolReservation {
    pool: HugePagePool,
    before: PoolStats,
    added: u64,
    _lock: File,
}

impl PoolReservation {
    /// Adds `pages` pages to `pool` (the kernel may give fewer: see
    /// [`PoolReservation::added`]).
    ///
    /// # Errors
    /// [`HugePageError::Lock`] on the lock file, or the errors of
    /// [`HugePagePool::set_total`].
    pub fn grow(pool: HugePagePool, pages: u64) -> Result<Self, HugePageError> {
        let lock = lock_pools()?;
        let before = pool.stats()?;
        let after = pool.set_total(before.total.saturating_add(pages))?;
        let added = after.total.saturating_sub(before.total);
        Ok(PoolReservation {
            pool,
            before,
            added,
            _lock: lock,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &HugePagePool {
        &self.pool
    }

    /// The counters before the pool grew.
    pub fn before(&self) -> PoolStats {
        self.before
    }

    /// The pages the kernel really added.
    pub fn added(&self) -> u64 {
        self.added
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        let restore = self
            .pool
            .stats()
            .and_then(|now| self.pool.set_total(now.total.saturating_sub(self.added)));
        if let Err(e) = restore {
            eprintln!("berth: could not give back {} hugepages: {e}", self.added);
        }
    }
}

/// Takes the pool lock ([`pool_lock_path`]), waiting for its holder; held until the
/// file is dropped.
///
/// # Errors
/// [`HugePageError::Lock`] when the lock file cannot be created or locked.
pub fn lock_pools() -> Result<File, HugePageError> {
    let path = pool_lock_path();
    std::fs::create_dir_all(POOL_LOCK_DIR).map_err(|error| HugePageError::Lock {
        path: path.clone(),
        error,
    })?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| HugePageError::Lock {
            path: path.clone(),
            error,
        })?;
    loop {
        // SAFETY: the descriptor belongs to `file`, which is open for the whole call; flock
        // touches no memory of ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(file);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(HugePageError::Lock { path, error });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const MEMINFO: &str = "MemTotal:       24568180 kB\nMemFree:        20116824 kB\n\
        AnonHugePages:         0 kB\nHugePages_Total:      64\nHugePages_Free:       60\n\
        HugePages_Rsvd:        4\nHugePages_Surp:        0\nHugepagesize:       2048 kB\n\
        Hugetlb:          131072 kB\n";

    #[test]
    fn parses_meminfo() {
        let m = parse_meminfo_hugepages(MEMINFO).unwrap();
        assert_eq!(
            m,
            MeminfoHugePages {
                total: 64,
                free: 60,
                reserved: 4,
                surplus: 0,
                page_size: Bytes::mib(2),
                hugetlb: Some(Bytes::mib(128)),
            }
        );
        let old = MEMINFO.replace("Hugetlb:          131072 kB\n", "");
        assert_eq!(parse_meminfo_hugepages(&old).unwrap().hugetlb, None);
        let e = parse_meminfo_hugepages("MemTotal: 1 kB\n").unwrap_err();
        assert_eq!(e, "no HugePages_Total line");
        let e = parse_meminfo_hugepages(&MEMINFO.replace("      60", " lots")).unwrap_err();
        assert!(e.contains("HugePages_Free \"lots\""), "{e}");
    }

    fn fake_pool(total: u64, free: u64, reserved: u64) -> (tempfile::TempDir, HugePagePool) {
        let root = tempfile::tempdir().unwrap();
        let pool = HugePagePool::at(root.path(), PageSize::Huge2M);
        fs::create_dir(pool.dir()).unwrap();
        for (file, value) in [
            ("nr_hugepages", total),
            ("free_hugepages", free),
            ("resv_hugepages", reserved),
            ("surplus_hugepages", 0),
        ] {
            fs::write(pool.dir().join(file), format!("{value}\n")).unwrap();
        }
        (root, pool)
    }

    #[test]
    fn stats_and_shortage() {
        let (_root, pool) = fake_pool(64, 20, 4);
        assert!(pool.dir().ends_with("hugepages-2048kB"));
        let stats = pool.stats().unwrap();
        assert_eq!((stats.total, stats.free, stats.reserved), (64, 20, 4));
        assert_eq!(stats.available(), 16);
        assert_eq!(stats.in_use(), 48);
        assert_eq!(stats.bytes(16), Bytes::mib(32));
        assert!(pool.ensure_available(16).is_ok());
        let e = pool.ensure_available(128).unwrap_err().to_string();
        assert_eq!(
            e,
            "Not enough 2MiB hugepages: 128 needed, 16 available (pool of 64, 20 free, 4 of \
             them reserved)"
        );
        // A regular file takes the write; the kernel would also adjust the counters.
        assert_eq!(pool.set_total(100).unwrap().total, 100);
    }

    #[test]
    fn missing_pools_and_bad_counters() {
        let root = tempfile::tempdir().unwrap();
        let pool = HugePagePool::at(root.path(), PageSize::Huge1G);
        assert!(!pool.is_supported());
        let e = pool.stats().unwrap_err().to_string();
        assert!(
            e.starts_with("The kernel offers no 1GiB hugepages ("),
            "{e}"
        );
        assert!(e.contains("hugepages-1048576kB does not exist"), "{e}");
        assert!(matches!(
            pool.set_total(1),
            Err(HugePageError::Unsupported { .. })
        ));

        let (_root, pool) = fake_pool(1, 1, 0);
        fs::write(pool.dir().join("free_hugepages"), "one\n").unwrap();
        let e = pool.stats().unwrap_err().to_string();
        assert!(
            e.ends_with("free_hugepages: \"one\" is not a page count"),
            "{e}"
        );
    }

    #[test]
    fn this_host_offers_2mib_pages() {
        let sizes = supported_page_sizes().unwrap();
        assert!(sizes.contains(&PageSize::Huge2M), "{sizes:?}");
        let m = read_meminfo_hugepages().unwrap();
        assert_eq!(m.page_size, Bytes::mib(2));
        assert!(HugePagePool::new(PageSize::Huge2M).stats().is_ok());
    }

    /// Grows the real 2 MiB pool and checks both sysfs and /proc/meminfo, then checks the
    /// pool is back to its old size after the guard drops.
    #[test]
    fn real_pool_grows_and_is_restored() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test needs root (it resizes the hugepage pool)"
        );
        let pool = HugePagePool::new(PageSize::Huge2M);
        let before_total;
        {
            let reservation = PoolReservation::grow(pool.clone(), 4).unwrap();
            let before = reservation.before();
            before_total = before.total;
            assert_eq!(reservation.added(), 4, "this host has memory to spare");
            let now = pool.stats().unwrap();
            assert_eq!(now.total, before.total + 4);
            // Free pages are not compared exactly: a guest elsewhere may map some.
            assert!(now.free <= before.free + 4);
            assert_eq!(read_meminfo_hugepages().unwrap().total, now.total);
            assert!(pool.ensure_available(now.available()).is_ok());
            assert!(pool.ensure_available(now.available() + 1).is_err());
        }
        // The lock is free again: another reservation can be taken at once.
        let again = PoolReservation::grow(pool.clone(), 0).unwrap();
        assert_eq!(again.before().total, before_total);
        assert_eq!(again.added(), 0);
    }
}
