//! Helpers shared by the end-to-end tests in this directory: they run the real `berth`
//! and `berth-vmm` binaries of this workspace.

pub mod etcd;
pub mod host;
pub mod net;

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

/// Runs `program` with `args` and panics unless it succeeds (network namespace setup).
pub fn run_ok(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
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

/// Runs `cmd` with `input` on its standard input; returns its exit status and output.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("piped");
    // Written from a thread: a child that answers before reading all of it must not
    // block the write.
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for the child");
    writer.join().expect("the writer does not panic");
    out
}

/// GitHub's `X-Hub-Signature-256` value for `body`: `sha256=<hex HMAC-SHA256>`, computed
/// by openssl, independently of berth's own code.
pub fn github_signature(secret: &str, body: &str) -> String {
    let out = output_with_stdin(
        Command::new("openssl").args(["dgst", "-sha256", "-hmac", secret]),
        body.as_bytes(),
    );
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

/// One HTTP/1.1 exchange on a fresh `stream` (TCP, or TLS over TCP) to `host`: sends
/// the request (closing the connection after it), reads the whole response (10 s read
/// timeout, set by the caller on the TCP stream) and returns its status code and body.
pub fn http_exchange(
    mut stream: impl std::io::Read + std::io::Write,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
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
    stream.flush()?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify, after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let response = String::from_utf8_lossy(&raw);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// A fleet's certificates made by the real `berth certs` in `dir`: `ca.pem`, and
/// `<host>.pem`/`<host>.key` for each host (naming it and 127.0.0.1 and `ips`).
pub fn berth_certs(dir: &Path, hosts: &[&str], ips: &[&str]) {
    let mut cmd = command("berth");
    cmd.args(["certs", "--days", "2", "--out"]).arg(dir);
    for host in hosts {
        let mut addresses = vec!["127.0.0.1"];
        addresses.extend_from_slice(ips);
        cmd.args(["--host", &format!("{host}={}", addresses.join(","))]);
    }
    let out = cmd.output().expect("run berth certs");
    assert!(
        out.status.success(),
        "berth certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `berth serve` arguments for `host`'s certificate in `dir`.
pub fn tls_args(dir: &Path, host: &str) -> Vec<std::ffi::OsString> {
    vec![
        "--tls-ca".into(),
        dir.join("ca.pem").into(),
        "--tls-cert".into(),
        dir.join(format!("{host}.pem")).into(),
        "--tls-key".into(),
        dir.join(format!("{host}.key")).into(),
    ]
}

/// A TLS client for the tests (rustls, TLS 1.3): trusts `ca`, presents `identity`
/// (certificate and key PEM files) when given.
#[derive(Clone)]
pub struct TlsClient {
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl TlsClient {
    /// A client trusting the CA in `ca`, with the certificate and key `identity`.
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> TlsClient {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let certs = |p: &Path| -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_slice_iter(&read(p))
                .collect::<Result<_, _>>()
                .expect("PEM certificates")
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(ca) {
            roots.add(cert).expect("a CA certificate");
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    certs(cert),
                    PrivateKeyDer::from_pem_slice(&read(key)).expect("a PEM key"),
                )
                .expect("a client certificate"),
            None => builder.with_no_client_auth(),
        };
        TlsClient {
            config: std::sync::Arc::new(config),
        }
    }

    /// The client of host `host` of the fleet in `dir` (see [`berth_certs`]).
    pub fn host(dir: &Path, host: &str) -> TlsClient {
        TlsClient::new(
            &dir.join("ca.pem"),
            Some((
                &dir.join(format!("{host}.pem")),
                &dir.join(format!("{host}.key")),
            )),
        )
    }

    /// One HTTP exchange over TLS on `stream` with a server that must be `name`.
    pub fn exchange(
        &self,
        stream: std::net::TcpStream,
        name: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(std::io::Error::other)?;
        let connection =
            rustls::ClientConnection::new(std::sync::Arc::clone(&self.config), server_name)
                .map_err(std::io::Error::other)?;
        let tls = rustls::StreamOwned::new(connection, stream);
        http_exchange(tls, name, method, path, headers, body)
    }
}

/// The heartbeat lines (`hb vcpu=N n=M ...`, what the built-in payload writes to its
/// console) of each vCPU, in order, from the console logs given; a missing log counts
/// as empty (a rotated `console.log.1` may not exist yet).
pub fn heartbeats(logs: &[PathBuf]) -> std::collections::BTreeMap<u32, Vec<u64>> {
    let mut out: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            if it.next() != Some("hb") {
                continue;
            }
            let field = |s: Option<&str>, key: &str| {
                s.and_then(|s| s.strip_prefix(key))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let (Some(v), Some(n)) = (field(it.next(), "vcpu="), field(it.next(), "n=")) {
                out.entry(v as u32).or_default().push(n);
            }
        }
    }
    out
}

/// vCPU `vcpu`'s counters go up by exactly `per_line` per line (no gap, no repeat), over
/// at least `at_least` lines.
pub fn assert_continuous(vcpu: u32, ns: &[u64], per_line: u64, at_least: usize) {
    assert!(
        ns.len() >= at_least,
        "vCPU {vcpu}: only {} heartbeat lines",
        ns.len()
    );
    for w in ns.windows(2) {
        assert_eq!(
            w[1],
            w[0] + per_line,
            "vCPU {vcpu}: heartbeat {} followed by {} (gap or repeat)",
            w[0],
            w[1]
        );
    }
}

/// Every live (not zombie) berth-vmm process, as (pid, command line with its NULs as
/// spaces), in one pass over /proc.
pub fn vmms() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
    {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !raw.windows(9).any(|w| w == b"berth-vmm") {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if !zombie {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Pids of the live berth-vmm processes whose command line matches.
pub fn vmm_pids(matches: impl Fn(&str) -> bool) -> Vec<i32> {
    vmms()
        .into_iter()
        .filter(|(_, cmdline)| matches(cmdline))
        .map(|(pid, _)| pid)
        .collect()
}

/// Kills the VMMs `pids` (ones this test started) with SIGKILL and waits up to 10 s for
/// them to be gone, so their cgroups can be removed after.
pub fn kill_vmms(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill(2) by pid of a berth-vmm this test started (the callers select
        // them by this test's own state directories).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
