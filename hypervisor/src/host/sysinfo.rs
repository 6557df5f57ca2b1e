//! Host-wide memory settings and facts: transparent hugepages, KSM, NUMA nodes, memory
//! totals, the memory and CPU time of one process, and the CPU model and flags.
//!
//! The THP and KSM settings are what the reconciler converges from the `Host` manifest;
//! their readers and writers take the directory as an argument (`*_at`) so they can be
//! tested on a copy. The CPU facts feed migration pre-checks: same vendor, no flag missing
//! on the destination, 64-bit (`lm`).

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use berth_schema::{Bytes, CpuSet, KsmSpec, ThpMode};
use serde::{Deserialize, Serialize};

use super::affinity::Pid;
use super::{colon_fields, os_message, parse_kib, read_file, write_file};

/// The transparent hugepage mode file.
pub const THP_ENABLED_PATH: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The KSM directory.
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// The list of NUMA nodes that are online.
pub const NODE_ONLINE_PATH: &str = "/sys/devices/system/node/online";

/// The CPU description.
pub const CPUINFO_PATH: &str = "/proc/cpuinfo";

/// Why a host setting or fact could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    /// A file could not be read.
    #[error("Cannot read {}: {}", .path.display(), os_message(.error))]
    Read {
        /// The file.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
    /// The kernel refused a value.
    #[error("Cannot write {value} to {}: {}", .path.display(), os_message(.error))]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
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
}

fn read(path: &Path) -> Result<String, SysInfoError> {
    read_file(path).map_err(|error| SysInfoError::Read {
        path: path.to_owned(),
        error,
    })
}

fn write(path: &Path, value: String) -> Result<(), SysInfoError> {
    write_file(path, &value).map_err(|error| SysInfoError::Write {
        path: path.to_owned(),
        value,
        error,
    })
}

fn parsed<T>(path: &Path, result: Result<T, String>) -> Result<T, SysInfoError> {
    result.map_err(|reason| SysInfoError::Parse {
        path: path.to_owned(),
        reason,
    })
}

// ---------------------------------------------------------------- transparent hugepages

fn thp_name(mode: ThpMode) -> &'static str {
    match mode {
        ThpMode::Always => "always",
        ThpMode::Madvise => "madvise",
        ThpMode::Never => "never",
    }
}

/// The selected mode of a THP `enabled` file: the bracketed word of
/// `always [madvise] never`.
///
/// # Errors
/// When no word is bracketed or the bracketed word is not a mode berth knows.
pub fn parse_thp_mode(text: &str) -> Result<ThpMode, String> {
    let selected = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .ok_or_else(|| format!("{:?} has no [selected] mode", text.trim()))?;
    [ThpMode::Always, ThpMode::Madvise, ThpMode::Never]
        .into_iter()
        .find(|m| thp_name(*m) == selected)
        .ok_or_else(|| format!("unknown transparent hugepage mode {selected:?}"))
}

/// The host's transparent hugepage mode.
///
/// # Errors
/// [`SysInfoError::Read`] (a kernel without THP has no such file) or
/// [`SysInfoError::Parse`].
pub fn read_thp_mode() -> Result<ThpMode, SysInfoError> {
    read_thp_mode_at(Path::new(THP_ENABLED_PATH))
}

/// The THP mode in the `enabled` file at `path`.
///
/// # Errors
/// As [`read_thp_mode`].
pub fn read_thp_mode_at(path: &Path) -> Result<ThpMode, SysInfoError> {
    let text = read(path)?;
    parsed(path, parse_thp_mode(&text))
}

/// Sets the host's transparent hugepage mode.
///
/// # Errors
/// [`SysInfoError::Write`] when the kernel refuses (not root, no THP).
pub fn write_thp_mode(mode: ThpMode) -> Result<(), SysInfoError> {
    write_thp_mode_at(Path::new(THP_ENABLED_PATH), mode)
}

/// Writes `mode` to the `enabled` file at `path`.
///
/// # Errors
/// As [`write_thp_mode`].
pub fn write_thp_mode_at(path: &Path, mode: ThpMode) -> Result<(), SysInfoError> {
    write(path, thp_name(mode).to_owned())
}

// ---------------------------------------------------------------------------------- KSM

/// The value of `/sys/kernel/mm/ksm/run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KsmRun {
    /// `0`: ksmd does not run; merged pages stay merged.
    Stopped,
    /// `1`: ksmd merges.
    Running,
    /// `2`: ksmd unmerges every merged page and stops.
    Unmerging,
}

/// KSM's settings and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KsmState {
    /// `run`.
    pub run: KsmRun,
    /// `pages_to_scan`: pages per ksmd wake-up.
    pub pages_to_scan: u32,
    /// `sleep_millisecs`: the pause between wake-ups.
    pub sleep_millisecs: u32,
    /// `pages_shared`: distinct merged pages in use.
    pub pages_shared: u64,
    /// `pages_sharing`: pages mapped onto a shared one (the saving).
    pub pages_sharing: u64,
}

impl KsmState {
    /// The state in the manifest's terms, for diffing against a `Host`'s `ksm`.
    pub fn spec(&self) -> KsmSpec {
        KsmSpec {
            enabled: self.run == KsmRun::Running,
            pages_to_scan: Some(self.pages_to_scan),
            sleep_millisecs: Some(self.sleep_millisecs),
        }
    }

    /// Whether the host already does what `spec` asks (fields the spec leaves out match
    /// anything).
    pub fn satisfies(&self, spec: &KsmSpec) -> bool {
        (self.run == KsmRun::Running) == spec.enabled
            && spec.pages_to_scan.is_none_or(|n| n == self.pages_to_scan)
            && spec
                .sleep_millisecs
                .is_none_or(|n| n == self.sleep_millisecs)
    }
}

/// The host's KSM state.
///
/// # Errors
/// [`SysInfoError::Read`] (a kernel without KSM has no such directory) or
/// [`SysInfoError::Parse`].
pub fn read_ksm() -> Result<KsmState, SysInfoError> {
    read_ksm_at(Path::new(KSM_DIR))
}

/// The KSM state in the directory `dir` (shaped like `/sys/kernel/mm/ksm`).
///
/// # Errors
/// As [`read_ksm`].
pub fn read_ksm_at(dir: &Path) -> Result<KsmState, SysInfoError> {
    fn number<T: std::str::FromStr>(dir: &Path, file: &str) -> Result<T, SysInfoError> {
        let path = dir.join(file);
        let text = read(&path)?;
        let value = text.trim();
        value.parse().map_err(|_| SysInfoError::Parse {
            path: path.clone(),
            reason: format!("{value:?} is not a number"),
        })
    }
    let run = match number::<u32>(dir, "run")? {
        0 => KsmRun::Stopped,
        1 => KsmRun::Running,
        2 => KsmRun::Unmerging,
        other => {
            return Err(SysInfoError::Parse {
                path: dir.join("run"),
                reason: format!("unknown KSM run state {other}"),
            })
        }
    };
    Ok(KsmState {
        run,
        pages_to_scan: number(dir, "pages_to_scan")?,
        sleep_millisecs: number(dir, "sleep_millisecs")?,
        pages_shared: number(dir, "pages_shared")?,
        pages_sharing: number(dir, "pages_sharing")?,
    })
}

/// Applies a `Host` manifest's KSM settings: the scan rate first, then `run` (1 when
/// enabled, 0 when not: merged pages stay merged until they are written).
///
/// # Errors
/// [`SysInfoError::Write`] naming the file the kernel refused.
pub fn write_ksm(spec: &KsmSpec) -> Result<(), SysInfoError> {
    write_ksm_at(Path::new(KSM_DIR), spec)
}

/// Applies `spec` to the directory `dir` (shaped like `/sys/kernel/mm/ksm`).
///
/// # Errors
/// As [`write_ksm`].
pub fn write_ksm_at(dir: &Path, spec: &KsmSpec) -> Result<(), SysInfoError> {
    if let Some(pages) = spec.pages_to_scan {
        write(&dir.join("pages_to_scan"), pages.to_string())?;
    }
    if let Some(millis) = spec.sleep_millisecs {
        write(&dir.join("sleep_millisecs"), millis.to_string())?;
    }
    write(&dir.join("run"), u8::from(spec.enabled).to_string())
}

// --------------------------------------------------------------------------------- NUMA

/// The NUMA nodes online. A kernel built without NUMA has no node directory; that host is
/// node 0 alone.
///
/// # Errors
/// [`SysInfoError::Read`] or [`SysInfoError::Parse`] on the sysfs file.
pub fn numa_nodes_online() -> Result<CpuSet, SysInfoError> {
    let path = Path::new(NODE_ONLINE_PATH);
    let text = match read_file(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok([0].into_iter().collect()),
        Err(error) => {
            return Err(SysInfoError::Read {
                path: path.to_owned(),
                error,
            })
        }
    };
    parsed(path, CpuSet::parse_list(&text).map_err(|e| format!("{e}")))
}

// ------------------------------------------------------------------------------- memory

/// Host memory totals from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemInfo {
    /// `MemTotal`.
    pub total: Bytes,
    /// `MemFree`.
    pub free: Bytes,
    /// `MemAvailable`: what new allocations can get without swapping.
    pub available: Bytes,
    /// `AnonHugePages`: anonymous memory backed by transparent hugepages.
    pub anon_huge_pages: Bytes,
}

/// A `/proc/meminfo` text's totals.
///
/// # Errors
/// Which line is missing or malformed.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let fields = colon_fields(text);
    let kib = |key: &str| -> Result<Bytes, String> {
        let value = fields.get(key).ok_or_else(|| format!("no {key} line"))?;
        parse_kib(value)
            .map(Bytes)
            .ok_or_else(|| format!("{key} {value:?} is not a size in kB"))
    };
    Ok(MemInfo {
        total: kib("MemTotal")?,
        free: kib("MemFree")?,
        available: kib("MemAvailable")?,
        anon_huge_pages: kib("AnonHugePages").unwrap_or_default(),
    })
}

/// The host's memory totals.
///
/// # Errors
/// [`SysInfoError::Read`] or [`SysInfoError::Parse`].
pub fn read_meminfo() -> Result<MemInfo, SysInfoError> {
    let path = Path::new(super::hugepages::MEMINFO_PATH);
    let text = read(path)?;
    parsed(path, parse_meminfo(&text))
}

/// The memory of one process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessMemory {
    /// `VmRSS`: resident memory (anonymous + file + shared), hugetlb pages excluded.
    pub rss: Bytes,
    /// `RssAnon`.
    pub rss_anon: Bytes,
    /// `RssFile`.
    pub rss_file: Bytes,
    /// `RssShmem`: shared memory, including memfd-backed guest RAM.
    pub rss_shmem: Bytes,
    /// `HugetlbPages`: hugetlb memory mapped by the process.
    pub hugetlb: Bytes,
    /// `VmSwap`.
    pub swap: Bytes,
    /// `VmLck`: mlocked memory.
    pub locked: Bytes,
}

/// A `/proc/<pid>/status` text's memory lines. `VmRSS` is required (kernel threads and
/// zombies lack it); the others count as zero when the kernel is too old to have them.
///
/// # Errors
/// Which line is missing or malformed.
pub fn parse_process_memory(status: &str) -> Result<ProcessMemory, String> {
    let fields = colon_fields(status);
    let kib = |key: &str, required: bool| -> Result<Bytes, String> {
        match fields.get(key) {
            None if required => Err(format!("no {key} line (a kernel thread or a zombie?)")),
            None => Ok(Bytes(0)),
            Some(value) => parse_kib(value)
                .map(Bytes)
                .ok_or_else(|| format!("{key} {value:?} is not a size in kB")),
        }
    };
    Ok(ProcessMemory {
        rss: kib("VmRSS", true)?,
        rss_anon: kib("RssAnon", false)?,
        rss_file: kib("RssFile", false)?,
        rss_shmem: kib("RssShmem", false)?,
        hugetlb: kib("HugetlbPages", false)?,
        swap: kib("VmSwap", false)?,
        locked: kib("VmLck", false)?,
    })
}

/// The memory of process `pid`.
///
/// # Errors
/// [`SysInfoError::Read`] when the process does not exist, [`SysInfoError::Parse`].
pub fn read_process_memory(pid: Pid) -> Result<ProcessMemory, SysInfoError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = read(&path)?;
    parsed(&path, parse_process_memory(&text))
}

// ---------------------------------------------------------------------------------- CPU

/// The host CPU as `/proc/cpuinfo` describes its first processor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuInfo {
    /// `vendor_id`: `GenuineIntel`, `AuthenticAMD`...
    pub vendor: String,
    /// `model name`.
    pub model_name: String,
    /// `cpu family`.
    pub family: Option<u32>,
    /// `model`.
    pub model: Option<u32>,
    /// `stepping`.
    pub stepping: Option<u32>,
    /// `flags`.
    pub flags: BTreeSet<String>,
    /// The number of `processor` entries.
    pub processors: u32,
}

impl CpuInfo {
    /// Whether the CPU runs 64-bit code (`lm`, long mode).
    pub fn is_64bit(&self) -> bool {
        self.flags.contains("lm")
    }

    /// The flags of this CPU that `destination` lacks: a guest that sees this CPU as it
    /// is (`host-passthrough`) may use them and cannot move there.
    pub fn flags_missing_on(&self, destination: &CpuInfo) -> BTreeSet<String> {
        self.flags.difference(&destination.flags).cloned().collect()
    }
}

/// The time clock `clock` has counted (a CPU-time clock: nanoseconds, where
/// `/proc/<pid>/stat` counts 10 ms ticks), or `None` when it cannot be read.
fn clock_time(clock: libc::clockid_t) -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(std::time::Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// CPU time of the calling thread so far (which waiting for a core does not inflate).
pub fn thread_cpu_time() -> std::time::Duration {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default()
}

/// CPU time (user and system, of all its threads, also those that ended) of process
/// `pid` so far, from its CPU clock; `None` when it cannot be read (the process is gone).
pub fn process_cpu_time(pid: u32) -> Option<std::time::Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    if unsafe { libc::clock_getcpuclockid(libc::pid_t::try_from(pid).ok()?, &mut clock) } != 0 {
        return None;
    }
    clock_time(clock)
}

/// A `/proc/cpuinfo` text, described by its first processor.
///
/// # Errors
/// When there is no processor entry or no `vendor_id` or `flags` line.
pub fn parse_cpuinfo(text: &str) -> Result<CpuInfo, String> {
    let processors = text
        .lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
        .count() as u32;
    let first = text
        .split("\n\n")
        .find(|block| !block.trim().is_empty())
        .ok_or("no processor entry")?;
    let fields = colon_fields(first);
    let text_field = |key: &str| fields.get(key).map(|v| (*v).to_owned());
    let number = |key: &str| fields.get(key).and_then(|v| v.parse().ok());
    Ok(CpuInfo {
        vendor: text_field("vendor_id").ok_or("no vendor_id line")?,
        model_name: text_field("model name").unwrap_or_default(),
        family: number("cpu family"),
        model: number("model"),
        stepping: number("stepping"),
        flags: fields
            .get("flags")
            .ok_or("no flags line")?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        processors: processors.max(1),
    })
}

/// The host CPU.
///
/// # Errors
/// [`SysInfoError::Read`] or [`SysInfoError::Parse`].
pub fn read_cpuinfo() -> Result<CpuInfo, SysInfoError> {
    let path = Path::new(CPUINFO_PATH);
    let text = read(path)?;
    parsed(path, parse_cpuinfo(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn thp_modes() {
        assert_eq!(
            parse_thp_mode("always [madvise] never\n"),
            Ok(ThpMode::Madvise)
        );
        assert_eq!(
            parse_thp_mode("[always] madvise never"),
            Ok(ThpMode::Always)
        );
        assert_eq!(
            parse_thp_mode("  always madvise [never]  "),
            Ok(ThpMode::Never)
        );
        let e = parse_thp_mode("always madvise never").unwrap_err();
        assert!(e.contains("no [selected] mode"), "{e}");
        let e = parse_thp_mode("always [inherit] never").unwrap_err();
        assert!(e.contains("\"inherit\""), "{e}");
    }

    #[test]
    fn thp_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enabled");
        fs::write(&path, "always [madvise] never\n").unwrap();
        assert_eq!(read_thp_mode_at(&path).unwrap(), ThpMode::Madvise);
        write_thp_mode_at(&path, ThpMode::Never).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "never");
        let missing = dir.path().join("nothing");
        let e = write_thp_mode_at(&missing, ThpMode::Always).unwrap_err();
        assert!(
            e.to_string().starts_with("Cannot write always to ")
                && e.to_string()
                    .ends_with("nothing: No such file or directory"),
            "{e}"
        );
    }

    fn fake_ksm(run: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (file, value) in [
            ("run", run),
            ("pages_to_scan", "100\n"),
            ("sleep_millisecs", "20\n"),
            ("pages_shared", "7\n"),
            ("pages_sharing", "70\n"),
        ] {
            fs::write(dir.path().join(file), value).unwrap();
        }
        dir
    }

    #[test]
    fn ksm_read_write_and_compare() {
        let dir = fake_ksm("0\n");
        let state = read_ksm_at(dir.path()).unwrap();
        assert_eq!(
            state,
            KsmState {
                run: KsmRun::Stopped,
                pages_to_scan: 100,
                sleep_millisecs: 20,
                pages_shared: 7,
                pages_sharing: 70,
            }
        );
        assert!(state.satisfies(&KsmSpec::default()));
        assert!(state.satisfies(&state.spec()));
        let wanted = KsmSpec {
            enabled: true,
            pages_to_scan: Some(1000),
            sleep_millisecs: None,
        };
        assert!(!state.satisfies(&wanted));
        write_ksm_at(dir.path(), &wanted).unwrap();
        let state = read_ksm_at(dir.path()).unwrap();
        assert_eq!(state.run, KsmRun::Running);
        assert_eq!(state.pages_to_scan, 1000);
        assert_eq!(state.sleep_millisecs, 20);
        assert!(state.satisfies(&wanted));

        let bad = fake_ksm("7\n");
        let e = read_ksm_at(bad.path()).unwrap_err().to_string();
        assert!(e.ends_with("run: unknown KSM run state 7"), "{e}");
    }

    #[test]
    fn this_host_reads() {
        if Path::new(THP_ENABLED_PATH).exists() {
            read_thp_mode().unwrap();
        }
        if Path::new(KSM_DIR).exists() {
            read_ksm().unwrap();
        }
        assert!(numa_nodes_online().unwrap().contains(0));
        let mem = read_meminfo().unwrap();
        assert!(mem.total >= mem.available && mem.available.get() > 0);
        let cpu = read_cpuinfo().unwrap();
        assert!(!cpu.vendor.is_empty() && cpu.is_64bit());
        assert!(cpu.processors >= 1);
        let me = read_process_memory(std::process::id() as Pid).unwrap();
        assert!(me.rss.get() > 0 && me.rss_anon.get() > 0);
        let e = read_process_memory(-1).unwrap_err().to_string();
        assert!(e.starts_with("Cannot read /proc/-1/status"), "{e}");
    }

    const MEMINFO: &str = "MemTotal:       24568180 kB\nMemFree:        20116824 kB\n\
        MemAvailable:   22000000 kB\nBuffers:          1 kB\nAnonHugePages:    4096 kB\n";

    #[test]
    fn meminfo_totals() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total, Bytes(24_568_180 * 1024));
        assert_eq!(m.available, Bytes(22_000_000 * 1024));
        assert_eq!(m.anon_huge_pages, Bytes::mib(4));
        let e = parse_meminfo("MemTotal: 1 kB\nMemFree: 1 kB\n").unwrap_err();
        assert_eq!(e, "no MemAvailable line");
    }

    const STATUS: &str = "Name:\tberth-vmm\nTgid:\t4242\nVmPeak:\t  300000 kB\n\
        VmLck:\t       0 kB\nVmHWM:\t    9000 kB\nVmRSS:\t    8192 kB\nRssAnon:\t    4096 kB\n\
        RssFile:\t    2048 kB\nRssShmem:\t    2048 kB\nVmSwap:\t       0 kB\n\
        HugetlbPages:\t  262144 kB\nThreads:\t3\nCpus_allowed_list:\t0-1\n";

    #[test]
    fn process_memory() {
        let m = parse_process_memory(STATUS).unwrap();
        assert_eq!(m.rss, Bytes::mib(8));
        assert_eq!(m.rss_anon, Bytes::mib(4));
        assert_eq!(m.rss_file, Bytes::mib(2));
        assert_eq!(m.rss_shmem, Bytes::mib(2));
        assert_eq!(m.hugetlb, Bytes::mib(256));
        assert_eq!(m.locked, Bytes(0));
        let kernel_thread = "Name:\tkthreadd\nThreads:\t1\n";
        let e = parse_process_memory(kernel_thread).unwrap_err();
        assert!(e.contains("no VmRSS line"), "{e}");
        let e = parse_process_memory("VmRSS: many kB\n").unwrap_err();
        assert!(e.contains("\"many kB\""), "{e}");
    }

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n\
        model\t\t: 2\nmodel name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu vme nx lm avx2 \
        avx512f\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n\
        model\t\t: 2\nmodel name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu vme nx lm avx2 \
        avx512f\n\n";

    #[test]
    fn cpuinfo_and_migration_checks() {
        let amd = parse_cpuinfo(CPUINFO).unwrap();
        assert_eq!(amd.vendor, "AuthenticAMD");
        assert_eq!(amd.model_name, "AMD EPYC");
        assert_eq!(
            (amd.family, amd.model, amd.stepping),
            (Some(26), Some(2), Some(1))
        );
        assert_eq!(amd.processors, 2);
        assert!(amd.is_64bit());
        let older = parse_cpuinfo(&CPUINFO.replace(" avx512f", "")).unwrap();
        assert_eq!(
            amd.flags_missing_on(&older),
            ["avx512f".to_owned()].into_iter().collect()
        );
        assert!(older.flags_missing_on(&amd).is_empty());
        assert_eq!(parse_cpuinfo("\n\n").unwrap_err(), "no processor entry");
        assert_eq!(
            parse_cpuinfo("processor: 0\nflags: fpu\n").unwrap_err(),
            "no vendor_id line"
        );
    }

    #[test]
    fn cpu_clocks_count_this_threads_work_and_a_gone_process_has_none() {
        let ms = std::time::Duration::from_millis;
        let process = process_cpu_time(std::process::id()).expect("this process's clock");
        let thread = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() < thread + ms(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(x > 0);
        // The process's clock counts this thread's 5 ms too (read apart, so a little less
        // may separate the two readings).
        let later = process_cpu_time(std::process::id()).expect("this process's clock");
        assert!(later >= process + ms(4), "{process:?} -> {later:?}");
        assert_eq!(process_cpu_time(u32::MAX), None);
    }
}
