//! What the serve benchmarks share (`serve`, `serve_libvirt`): git, a free port, a
//! thread's CPU affinity as the kernel reports it, percentiles, the webhook secret and a
//! signed push to the service's webhook.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use berth_reconciler::auth::Secret;

/// The webhook secret the benchmarks' services are given.
pub const WEBHOOK_SECRET: &str = "bench-webhook-secret";

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

/// A signed GitHub push event to the webhook of the service at `addr`; panics unless it
/// is accepted (202).
pub fn webhook(addr: &str) {
    let body = r#"{"ref":"refs/heads/main"}"#;
    let signature = format!(
        "sha256={}",
        Secret::new(WEBHOOK_SECRET).sign(body.as_bytes())
    );
    let mut stream = TcpStream::connect(addr).expect("connect");
    let request = format!(
        "POST /hooks/git HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nX-GitHub-Event: push\r\n\
         X-Hub-Signature-256: {signature}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
}
