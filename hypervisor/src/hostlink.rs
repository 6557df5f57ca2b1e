//! The one place where the VMM calls into host plumbing ([`crate::host`]): thread
//! affinity, `/proc` and sysfs readers, hugepage pools. Errors are flattened into
//! `io::Error`-like messages the VMM's own errors wrap.

use std::path::Path;

use berth_schema::{CpuSet, PageSize};

use crate::host::{affinity, hugepages, sysinfo};

pub use crate::host::affinity::Pid;
pub use crate::host::sysinfo::ProcessMemory;

/// The calling thread's id.
pub fn current_tid() -> Pid {
    affinity::current_tid()
}

/// This process's id.
pub fn current_pid() -> Pid {
    std::process::id() as Pid
}

/// Pins thread `tid` to `cpus`.
///
/// # Errors
/// The kernel's refusal, or an empty set.
pub fn set_thread_affinity(tid: Pid, cpus: &CpuSet) -> Result<(), affinity::AffinityError> {
    affinity::set_thread_affinity(tid, cpus)
}

/// Thread `tid`'s affinity in force, from the kernel (`sched_getaffinity`, what
/// `taskset -p` shows; one system call instead of formatting
/// `/proc/<pid>/task/<tid>/status`, which made up a tenth of a status request).
///
/// # Errors
/// The thread is gone.
pub fn read_thread_affinity(_pid: Pid, tid: Pid) -> Result<CpuSet, affinity::AffinityError> {
    affinity::get_thread_affinity(tid)
}

/// The threads of this process: (tid, name).
///
/// # Errors
/// `/proc/<pid>/task` is unreadable.
pub fn threads() -> Result<Vec<(Pid, String)>, affinity::AffinityError> {
    Ok(affinity::threads(current_pid())?
        .into_iter()
        .map(|t| (t.tid, t.name))
        .collect())
}

/// The thread ids of this process, sorted.
///
/// # Errors
/// `/proc/<pid>/task` is unreadable.
pub fn thread_ids() -> Result<Vec<Pid>, affinity::AffinityError> {
    affinity::thread_ids(current_pid())
}

/// The name of thread `tid` of this process; `None` when it is gone or unreadable.
pub fn thread_name(tid: Pid) -> Option<String> {
    affinity::thread_name(current_pid(), tid).ok().flatten()
}

/// The CPUs online on this host.
///
/// # Errors
/// The sysfs file is unreadable.
pub fn online_cpus() -> Result<CpuSet, affinity::AffinityError> {
    affinity::online_cpus()
}

/// The NUMA nodes online (node 0 alone when the kernel has no NUMA sysfs).
pub fn numa_nodes() -> CpuSet {
    sysinfo::numa_nodes_online().unwrap_or_else(|_| std::iter::once(0).collect())
}

/// Pages of a hugepage pool that a new mapping can still take: free minus reserved.
///
/// # Errors
/// The pool's sysfs files are unreadable (no such page size on this host).
pub fn hugepages_available(size: PageSize) -> Result<u64, hugepages::HugePageError> {
    Ok(hugepages::HugePagePool::new(size).stats()?.available())
}

/// The host's transparent hugepage mode.
pub fn thp_mode() -> Option<berth_schema::ThpMode> {
    sysinfo::read_thp_mode().ok()
}

/// The host's transparent hugepage mode, read through `files`.
pub fn thp_mode_in(files: &mut crate::host::KeptFiles) -> Option<berth_schema::ThpMode> {
    let text = files.read(Path::new(sysinfo::THP_ENABLED_PATH)).ok()?;
    sysinfo::parse_thp_mode(&text).ok()
}

/// The memory figures of a `/proc/<pid>/status` text.
///
/// # Errors
/// The text is malformed.
pub fn parse_process_memory(status: &str) -> Result<ProcessMemory, String> {
    sysinfo::parse_process_memory(status)
}

/// The `Threads:` count of a `/proc/<pid>/status` text.
pub fn parse_thread_count(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// The host's total RAM (`MemTotal`), when readable.
pub fn host_memory() -> Option<u64> {
    sysinfo::read_meminfo().ok().map(|m| m.total.get())
}
