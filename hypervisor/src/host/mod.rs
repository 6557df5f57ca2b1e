//! Host-side Linux plumbing: everything berth-vmm and the reconciler touch on the host
//! besides `/dev/kvm`.
//!
//! - [`cgroup`]: one cgroup per guest (`berth/<name>`), cgroup v1 and v2: memory limits,
//!   cpuset, I/O weight, read back from the files.
//! - [`affinity`]: thread pinning (sched_setaffinity), the affinity as `/proc` shows it,
//!   the threads of a process, online CPUs.
//! - [`hugepages`]: hugepage pools per page size: counters, resizing, a test guard.
//! - [`sysinfo`]: transparent hugepages, KSM, NUMA nodes, per-process memory and the CPU
//!   model and flags.
//!
//! Every function reads or writes the kernel's files directly and names the file in its
//! errors. The parsers are public and tolerant of whitespace, so they can be unit-tested on
//! sample contents.

#![deny(missing_docs)]

pub mod affinity;
pub mod cgroup;
pub mod hugepages;
pub mod sysinfo;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The text of an I/O error without the trailing `(os error N)`, so that messages read
/// "Cannot write ... : Device or resource busy".
pub(crate) fn os_message(error: &io::Error) -> String {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .map_or_else(|| text.clone(), str::to_owned),
        None => text,
    }
}

/// Reads a small kernel file (procfs, sysfs, cgroupfs) into a string.
pub(crate) fn read_file(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path)
}

/// Kernel files (procfs, sysfs, cgroupfs) kept open and read again from offset 0, which
/// makes the kernel generate their text afresh: what a VMM's status reads on every
/// request costs a `pread` instead of a path walk, `open`, `statx` and `close`. A file
/// that cannot be read through its kept descriptor (its cgroup was removed and made
/// again) is opened again by path once.
#[derive(Debug, Default)]
pub struct KeptFiles {
    keep: bool,
    open: HashMap<PathBuf, File>,
}

impl KeptFiles {
    /// Keeps every file it reads open.
    pub fn new() -> KeptFiles {
        KeptFiles {
            keep: true,
            open: HashMap::new(),
        }
    }

    /// Opens every file afresh and keeps none (for one-off reads).
    pub fn passing() -> KeptFiles {
        KeptFiles::default()
    }

    /// The text of the kernel file at `path`, now.
    ///
    /// # Errors
    /// As opening and reading it by path.
    pub fn read(&mut self, path: &Path) -> io::Result<String> {
        if let Some(file) = self.open.get(path) {
            match read_from_start(file) {
                Ok(text) => return Ok(text),
                Err(_) => {
                    self.open.remove(path);
                }
            }
        }
        if !self.keep {
            return read_file(path);
        }
        let file = File::open(path)?;
        let text = read_from_start(&file)?;
        self.open.insert(path.to_owned(), file);
        Ok(text)
    }

    /// Closes every kept file (before the cgroup they belong to is removed).
    pub fn close_all(&mut self) {
        self.open.clear();
    }
}

/// The whole text of `file`, read with `pread` from offset 0. A read that does not fill
/// the buffer is the end: a kernel file (`seq_file`) fills it up to its last record.
fn read_from_start(file: &File) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) if len + n < buf.len() => {
                len += n;
                break;
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes `value` to an existing kernel file in one `write(2)`, as `echo value > path`
/// does. The file is never created: a missing file means the kernel lacks the feature.
pub(crate) fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    let written = file.write(value.as_bytes())?;
    if written != value.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write: {written} of {} bytes", value.len()),
        ));
    }
    Ok(())
}

/// The `Key: value` lines of `/proc/<pid>/status` and `/proc/meminfo`, values trimmed.
/// Lines without a colon are skipped.
pub(crate) fn colon_fields(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect()
}

/// A `kB` value such as `1732 kB` (or a bare number of kB) in bytes.
pub(crate) fn parse_kib(value: &str) -> Option<u64> {
    let number = value.trim();
    let number = number
        .strip_suffix("kB")
        .or_else(|| number.strip_suffix("KB"))
        .unwrap_or(number)
        .trim();
    number.parse::<u64>().ok()?.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_messages_drop_the_error_number() {
        let e = io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(os_message(&e), "Device or resource busy");
        let e = io::Error::other("plain");
        assert_eq!(os_message(&e), "plain");
    }

    #[test]
    fn colon_fields_are_trimmed() {
        let fields = colon_fields("VmRSS:\t    1732 kB\nName:\tbash\nno colon here\n");
        assert_eq!(fields.get("Name"), Some(&"bash"));
        assert_eq!(fields.get("VmRSS"), Some(&"1732 kB"));
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn kib_values() {
        assert_eq!(parse_kib("1732 kB"), Some(1732 * 1024));
        assert_eq!(parse_kib(" 12 "), Some(12 * 1024));
        assert_eq!(parse_kib("x kB"), None);
        assert_eq!(parse_kib(&format!("{} kB", u64::MAX)), None);
    }
}
