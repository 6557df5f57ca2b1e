//! Thread CPU affinity: pinning with `sched_setaffinity(2)`, and reading it back the way
//! an operator sees it, from `/proc/<pid>/task/<tid>/status` (`Cpus_allowed_list`).
//!
//! Reading `/proc` rather than remembering what was set is what makes drift visible: a
//! thread re-pinned by hand with `taskset -p` shows its new CPUs at the next read.
//!
//! Note that a thread's affinity is always intersected with its cpuset cgroup: pin
//! threads after the guest's cgroup cpuset is set, and re-pin after changing it.

use std::io;
use std::mem::size_of;
use std::path::{Path, PathBuf};

use berth_schema::CpuSet;
use serde::{Deserialize, Serialize};

use super::{colon_fields, os_message, read_file};

/// A process or thread id, as the kernel numbers them.
pub type Pid = libc::pid_t;

/// Where the kernel lists the CPUs that are online.
pub const CPU_ONLINE_PATH: &str = "/sys/devices/system/cpu/online";

/// The CPU mask size used to read affinities: enough for [`berth_schema::cpuset::MAX_CPU`].
const MASK_WORDS: usize = (berth_schema::cpuset::MAX_CPU as usize + 1) / 64;

/// Why an affinity could not be set or read.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// Pinning to no CPU at all is refused before asking the kernel.
    #[error("Cannot pin thread {tid}: the CPU set is empty")]
    EmptySet {
        /// The thread.
        tid: Pid,
    },
    /// `sched_setaffinity` failed.
    #[error("Cannot pin thread {tid} to CPUs {cpus}: {}", os_message(.error))]
    SetAffinity {
        /// The thread.
        tid: Pid,
        /// The CPUs asked for.
        cpus: CpuSet,
        /// The error from the kernel.
        error: io::Error,
    },
    /// `sched_getaffinity` failed.
    #[error("Cannot read the CPU affinity of thread {tid}: {}", os_message(.error))]
    GetAffinity {
        /// The thread.
        tid: Pid,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A procfs or sysfs file could not be read.
    #[error("Cannot read {}: {}", .path.display(), os_message(.error))]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A procfs or sysfs file did not hold what was expected.
    #[error("Cannot parse {}: {reason}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The CPU set names CPUs that are not online on this host.
    #[error("{}", offline_message(.requested, .missing, .online))]
    Offline {
        /// The CPUs asked for.
        requested: CpuSet,
        /// The CPUs asked for that are not online.
        missing: CpuSet,
        /// The CPUs online on this host.
        online: CpuSet,
    },
}

impl AffinityError {
    /// Whether the error says the thread or process does not exist (it may have exited).
    pub fn is_gone(&self) -> bool {
        match self {
            AffinityError::SetAffinity { error, .. }
            | AffinityError::GetAffinity { error, .. }
            | AffinityError::Read { error, .. } => {
                error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
            }
            _ => false,
        }
    }
}

fn offline_message(requested: &CpuSet, missing: &CpuSet, online: &CpuSet) -> String {
    let (noun, verb) = if missing.len() == 1 {
        ("CPU", "is")
    } else {
        ("CPUs", "are")
    };
    format!("{noun} {missing} {verb} not online on this host (asked for {requested}; online CPUs: {online})")
}

/// A thread of a process: its id and its name (`comm`, at most 15 bytes, such as `vcpu0`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ThreadInfo {
    /// The thread id.
    pub tid: Pid,
    /// The thread name from `/proc/<pid>/task/<tid>/comm`.
    pub name: String,
}

/// The calling thread's id (`gettid(2)`).
pub fn current_tid() -> Pid {
    // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::gettid() }
}

/// Pins thread `tid` (of any process; 0 is the calling thread) to `cpus`.
///
/// The kernel intersects the mask with the thread's cpuset cgroup; read the result back
/// with [`read_thread_affinity`] to see what is in force.
///
/// # Errors
/// [`AffinityError::EmptySet`] for an empty set, [`AffinityError::SetAffinity`] when the
/// kernel refuses (no such thread, no CPU of the set allowed, no permission).
pub fn set_thread_affinity(tid: Pid, cpus: &CpuSet) -> Result<(), AffinityError> {
    if cpus.is_empty() {
        return Err(AffinityError::EmptySet { tid });
    }
    let mut mask = vec![0u64; MASK_WORDS];
    for cpu in cpus.iter() {
        // CpuSet never holds a CPU above MAX_CPU, so the index is in bounds.
        mask[cpu as usize / 64] |= 1u64 << (cpu % 64);
    }
    // Passing only the words in use keeps the call valid on kernels with a small NR_CPUS,
    // but never less than the C library's cpu_set_t.
    let used_words = cpus.iter().last().map_or(1, |max| max as usize / 64 + 1);
    let words = used_words.max(size_of::<libc::cpu_set_t>() / size_of::<u64>());
    // SAFETY: `mask` holds MASK_WORDS >= `words` initialised u64s, 8-byte aligned like
    // cpu_set_t; the kernel reads exactly `words * 8` bytes from it and keeps no pointer.
    let rc = unsafe {
        libc::sched_setaffinity(
            tid,
            words * size_of::<u64>(),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if rc != 0 {
        return Err(AffinityError::SetAffinity {
            tid,
            cpus: cpus.clone(),
            error: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The affinity of thread `tid` as `sched_getaffinity(2)` reports it.
///
/// # Errors
/// [`AffinityError::GetAffinity`] when the thread does not exist.
pub fn get_thread_affinity(tid: Pid) -> Result<CpuSet, AffinityError> {
    let mut mask = vec![0u64; MASK_WORDS];
    // SAFETY: the kernel writes at most `MASK_WORDS * 8` bytes into `mask`, which is that
    // long and 8-byte aligned like cpu_set_t; it keeps no pointer.
    let rc = unsafe {
        libc::sched_getaffinity(
            tid,
            MASK_WORDS * size_of::<u64>(),
            mask.as_mut_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if rc != 0 {
        return Err(AffinityError::GetAffinity {
            tid,
            error: io::Error::last_os_error(),
        });
    }
    // Only the set bits are visited: the mask has room for 16384 CPUs, and a bit by
    // bit walk made up most of a VMM's status request.
    let mut cpus = Vec::new();
    for (i, &word) in mask.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let bit = word.trailing_zeros();
            cpus.push(i as u32 * 64 + bit);
            word &= word - 1;
        }
    }
    Ok(cpus.into_iter().collect())
}

/// The affinity of thread `tid` of process `pid`, from `Cpus_allowed_list` in
/// `/proc/<pid>/task/<tid>/status`: what `taskset -p` shows and sets.
///
/// # Errors
/// [`AffinityError::Read`] when the thread does not exist, [`AffinityError::Parse`] when
/// the file lacks the field.
pub fn read_thread_affinity(pid: Pid, tid: Pid) -> Result<CpuSet, AffinityError> {
    let path = PathBuf::from(format!("/proc/{pid}/task/{tid}/status"));
    let text = read_file(&path).map_err(|error| AffinityError::Read {
        path: path.clone(),
        error,
    })?;
    parse_cpus_allowed_list(&text).map_err(|reason| AffinityError::Parse { path, reason })
}

/// `Cpus_allowed_list` of a `/proc/<pid>/status` text.
///
/// # Errors
/// A description of what is missing or malformed.
pub fn parse_cpus_allowed_list(status: &str) -> Result<CpuSet, String> {
    let value = colon_fields(status)
        .get("Cpus_allowed_list")
        .copied()
        .ok_or_else(|| "no Cpus_allowed_list field".to_owned())?;
    CpuSet::parse_list(value).map_err(|e| format!("Cpus_allowed_list {value:?}: {e}"))
}

/// The threads of process `pid` with their names, sorted by thread id. Threads that exit
/// while the list is read are left out.
///
/// # Errors
/// [`AffinityError::Read`] when the process does not exist.
pub fn threads(pid: Pid) -> Result<Vec<ThreadInfo>, AffinityError> {
    let mut threads = Vec::new();
    for tid in thread_ids(pid)? {
        if let Some(name) = thread_name(pid, tid)? {
            threads.push(ThreadInfo { tid, name });
        }
    }
    Ok(threads)
}

/// The thread ids of process `pid`, sorted, from `/proc/<pid>/task` (no name read).
///
/// # Errors
/// [`AffinityError::Read`] when the process does not exist.
pub fn thread_ids(pid: Pid) -> Result<Vec<Pid>, AffinityError> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries = std::fs::read_dir(&dir).map_err(|error| AffinityError::Read {
        path: dir.clone(),
        error,
    })?;
    let mut tids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| AffinityError::Read {
            path: dir.clone(),
            error,
        })?;
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<Pid>().ok())
        {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// The name (`comm`) of thread `tid` of process `pid`; `None` when it has exited.
///
/// # Errors
/// [`AffinityError::Read`] when `comm` exists but cannot be read.
pub fn thread_name(pid: Pid, tid: Pid) -> Result<Option<String>, AffinityError> {
    let comm = PathBuf::from(format!("/proc/{pid}/task/{tid}/comm"));
    match read_file(&comm) {
        Ok(name) => Ok(Some(name.trim_end_matches('\n').to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(error) => Err(AffinityError::Read { path: comm, error }),
    }
}

/// The CPUs online on this host, from `/sys/devices/system/cpu/online`.
///
/// # Errors
/// [`AffinityError::Read`] or [`AffinityError::Parse`] on the sysfs file.
pub fn online_cpus() -> Result<CpuSet, AffinityError> {
    read_cpu_list(Path::new(CPU_ONLINE_PATH))
}

/// A sysfs CPU or node list file (`0-1`, `0,2-3`), parsed.
fn read_cpu_list(path: &Path) -> Result<CpuSet, AffinityError> {
    let text = read_file(path).map_err(|error| AffinityError::Read {
        path: path.to_owned(),
        error,
    })?;
    CpuSet::parse_list(&text).map_err(|e| AffinityError::Parse {
        path: path.to_owned(),
        reason: format!("{e}"),
    })
}

/// Checks that every CPU of `cpus` is online on this host.
///
/// # Errors
/// [`AffinityError::Offline`] naming the missing CPUs, or the errors of [`online_cpus`].
pub fn ensure_online(cpus: &CpuSet) -> Result<(), AffinityError> {
    check_online(cpus, &online_cpus()?)
}

/// Checks that every CPU of `cpus` is in `online`.
///
/// # Errors
/// [`AffinityError::Offline`] naming the missing CPUs.
pub fn check_online(cpus: &CpuSet, online: &CpuSet) -> Result<(), AffinityError> {
    let missing = cpus.difference(online);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(AffinityError::Offline {
            requested: cpus.clone(),
            missing,
            online: online.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn set(s: &str) -> CpuSet {
        s.parse().unwrap()
    }

    const STATUS: &str = "Name:\tvcpu0\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        Pid:\t4243\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\nMems_allowed:\t1\n\
        Mems_allowed_list:\t0\nvoluntary_ctxt_switches:\t3\n";

    #[test]
    fn parses_cpus_allowed_list() {
        assert_eq!(parse_cpus_allowed_list(STATUS), Ok(set("0-1")));
        let odd = "Cpus_allowed_list:   0,2-3,7  \n";
        assert_eq!(parse_cpus_allowed_list(odd), Ok(set("0,2,3,7")));
        let e = parse_cpus_allowed_list("Name:\tx\n").unwrap_err();
        assert!(e.contains("no Cpus_allowed_list"), "{e}");
        let e = parse_cpus_allowed_list("Cpus_allowed_list:\tzz\n").unwrap_err();
        assert!(e.contains("zz"), "{e}");
    }

    #[test]
    fn offline_cpus_are_named() {
        let online = set("0-1");
        assert!(check_online(&set("0-1"), &online).is_ok());
        assert!(check_online(&CpuSet::new(), &online).is_ok());
        let e = check_online(&set("1,3"), &online).unwrap_err().to_string();
        assert_eq!(
            e,
            "CPU 3 is not online on this host (asked for 1,3; online CPUs: 0-1)"
        );
        let e = check_online(&set("0-5"), &online).unwrap_err().to_string();
        assert!(e.starts_with("CPUs 2-5 are not online"), "{e}");
    }

    #[test]
    fn empty_set_is_refused() {
        let e = set_thread_affinity(current_tid(), &CpuSet::new()).unwrap_err();
        assert!(matches!(e, AffinityError::EmptySet { .. }), "{e}");
    }

    #[test]
    fn online_cpus_on_this_host() {
        let online = online_cpus().unwrap();
        assert!(online.contains(0), "{online}");
        ensure_online(&set("0")).unwrap();
        let e = ensure_online(&set("8191")).unwrap_err();
        assert!(e.to_string().contains("CPU 8191 is not online"), "{e}");
    }

    /// Pins a spawned, named thread, reads the affinity back from /proc and from the
    /// kernel, re-pins it with `taskset` (drift) and sees that too.
    #[test]
    fn pins_a_real_thread_and_sees_drift() {
        let online = online_cpus().unwrap();
        let last = online.iter().last().unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                tid_tx.send(current_tid()).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        // Dropping the sender (also when an assertion fails) ends the thread.
        let pid = std::process::id() as Pid;
        let tid = tid_rx.recv().unwrap();

        let listed = threads(pid).unwrap();
        assert!(
            listed.contains(&ThreadInfo {
                tid,
                name: "vcpu7".into()
            }),
            "{listed:?}"
        );

        let one: CpuSet = [last].into_iter().collect();
        set_thread_affinity(tid, &one).unwrap();
        assert_eq!(read_thread_affinity(pid, tid).unwrap(), one);
        assert_eq!(get_thread_affinity(tid).unwrap(), one);

        set_thread_affinity(tid, &online).unwrap();
        assert_eq!(read_thread_affinity(pid, tid).unwrap(), online);

        if let Ok(out) = std::process::Command::new("taskset")
            .args(["-p", "-c", "0", &tid.to_string()])
            .output()
        {
            assert!(out.status.success(), "{out:?}");
            assert_eq!(read_thread_affinity(pid, tid).unwrap(), set("0"));
        }

        drop(stop_tx);
        handle.join().unwrap();
        let e = read_thread_affinity(pid, tid).unwrap_err();
        assert!(e.is_gone(), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("/proc/{pid}/task/{tid}/status")),
            "{e}"
        );
    }
}
