//! Helpers shared by the end-to-end tests in this directory: they run the real `berth`
//! and `berth-vmm` binaries of this workspace.

pub mod etcd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root. Read at run time (cargo sets `CARGO_MANIFEST_DIR` for test
/// processes) so that a library built in another checkout never points elsewhere.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The path of a binary of this workspace (`berth`, `berth-vmm`), built once per test
/// process with the same profile as the tests.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "berth-reconciler",
                "-p",
                "berth-hypervisor",
            ])
            .status()
            .expect("run cargo build for the binaries");
        assert!(status.success(), "building the berth binaries failed");
        // The test executable lives in target/<profile>/deps/; the binaries one level up.
        let exe = std::env::current_exe().expect("current test executable");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps")
            .to_path_buf()
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A `Command` for a workspace binary.
pub fn command(name: &str) -> Command {
    Command::new(bin(name))
}

/// Whether this process may use KVM, cgroups and hugepages: root with /dev/kvm.
/// Tests that need them still run in CI (root, /dev/kvm); on a machine without them
/// they fail with this reason rather than pass silently.
pub fn require_root_and_kvm() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (cgroups, hugepages)");
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
}

/// A throwaway git repository with a local identity, for tests that follow or plan
/// revisions.
pub struct GitRepo {
    /// The work tree.
    pub dir: PathBuf,
}

impl GitRepo {
    /// `git init` in `dir` (created if needed), branch `main`, a local user, no signing.
    pub fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("mkdir");
        let repo = GitRepo { dir };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo.git(&["config", "user.name", "berth tests"]);
        repo.git(&["config", "user.email", "tests@berth.invalid"]);
        repo.git(&["config", "commit.gpgsign", "false"]);
        repo
    }

    /// Runs git in the repository; panics with git's stderr when it fails.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Writes the files and commits them; returns the commit id.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (path, text) in files {
            std::fs::write(self.dir.join(path), text).expect("write");
        }
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }
}

/// The first line `child` writes to its piped stdout (the VMM's `ready ...` line), or
/// an empty string if none comes within `timeout`. The rest of stdout is left unread.
pub fn first_stdout_line(child: &mut std::process::Child, timeout: std::time::Duration) -> String {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(timeout).unwrap_or_default()
}

/// GitHub's `X-Hub-Signature-256` value for `body`: `sha256=<hex HMAC-SHA256>`, computed
/// by openssl, independently of berth's own code.
pub fn github_signature(secret: &str, body: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(body.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("openssl output");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let hex = text.trim().rsplit(' ').next().expect("digest");
    assert_eq!(hex.len(), 64, "{text}");
    format!("sha256={hex}")
}

/// Polls `cond` every 10 ms until it holds; fails the test naming `what` after
/// `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The CPUs thread `tid` of process `pid` may run on, as /proc shows them
/// (`Cpus_allowed_list`, for example `0-1`).
pub fn proc_affinity(pid: i32, tid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// A guest name unique to this test process: `<prefix>-<pid>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

/// One HTTP/1.1 exchange on a fresh `stream` to `host`: sends the request (closing the
/// connection after it), reads the whole response (10 s read timeout) and returns its
/// status code and body.
pub fn http_exchange(
    mut stream: std::net::TcpStream,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}
