//! What the serve benchmarks share (`serve`, `serve_libvirt`): git, a free port, a
//! thread's CPU affinity as the kernel reports it, percentiles.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

pub fn git(repo: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("run git");
    assert!(status.success(), "git {args:?}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// The CPUs the kernel lets the thread named `comm` of process `pid` run on
/// (`Cpus_allowed_list`), if it has one.
pub fn thread_affinity(pid: i32, comm: &str) -> Option<String> {
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
    {
        if fs::read_to_string(task.path().join("comm"))
            .unwrap_or_default()
            .trim()
            == comm
        {
            return fs::read_to_string(task.path().join("status"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|s| s.trim().to_owned());
        }
    }
    None
}

/// The nearest-rank percentile `p` of sorted samples (NaN when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
