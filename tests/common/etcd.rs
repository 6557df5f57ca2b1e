//! A real etcd (Debian's `etcd-server`, 3.4) for one test: its own data directory in a
//! temporary directory, client and peer ports on loopback chosen free at start, killed by
//! pid when dropped (also when the test fails).
//!
//! The test can stop it and start it again on the same ports and data (an etcd outage),
//! or freeze it with SIGSTOP (a host cut off from etcd: connections hang rather than
//! fail, as in a partition).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member serving `endpoint()`.
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<ServerTls>,
    /// The network namespace it runs in and the address it serves clients on, when
    /// not loopback of the test's own namespace.
    netns: Option<(String, String)>,
}

/// TLS for etcd's client port: its certificate and key, and the CA whose client
/// certificates it requires.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate (PEM), valid for IP 127.0.0.1.
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The CA that signs client certificates (PEM).
    pub client_ca: PathBuf,
}

/// A port on 127.0.0.1 that nothing listened on a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// The etcd binary: `$BERTH_TEST_ETCD`, else `etcd` on PATH. Fails the test (never skips
/// it) when there is none: `.ci/run` installs `etcd-server`.
fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BERTH_TEST_ETCD") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .expect("this test needs a real etcd on PATH (apt-get install etcd-server)")
}

impl Etcd {
    /// Starts an etcd and waits until it reports itself healthy.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// Starts an etcd that serves clients over TLS only and requires a client
    /// certificate signed by `tls.client_ca`.
    pub fn start_tls(tls: ServerTls) -> Etcd {
        Etcd::start_with(Some(tls))
    }

    fn start_with(tls: Option<ServerTls>) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("berth-etcd-")
            .tempdir()
            .expect("temporary directory for etcd");
        let mut etcd = Etcd {
            dir,
            client_port: 0,
            peer_port: 0,
            child: None,
            tls,
            netns: None,
        };
        // A port found free can be taken before etcd binds it: try again with new ports.
        for _ in 0..5 {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            if etcd.spawn_and_wait() {
                return etcd;
            }
        }
        panic!("etcd did not start in 5 attempts (its log is above)");
    }

    /// Starts an etcd inside network namespace `ns` (`/var/run/netns/<ns>`), serving
    /// clients on `ip:2379` (and its peers on that namespace's loopback), so that
    /// hosts in other namespaces reach it over their links.
    pub fn start_in_netns(ns: &str, ip: &str) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("berth-etcd-")
            .tempdir()
            .expect("temporary directory for etcd");
        let mut etcd = Etcd {
            dir,
            client_port: 2379,
            peer_port: 2380,
            child: None,
            tls: None,
            netns: Some((ns.to_owned(), ip.to_owned())),
        };
        assert!(
            etcd.spawn_and_wait(),
            "etcd did not start in namespace {ns}"
        );
        etcd
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS; the
    /// namespace's address for [`Etcd::start_in_netns`]).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let ip = self
            .netns
            .as_ref()
            .map_or("127.0.0.1", |(_, ip)| ip.as_str());
        format!("{scheme}://{ip}:{}", self.client_port)
    }

    /// The etcd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL) and waits for it: an outage. The data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data after `stop`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd still runs");
        assert!(
            self.spawn_and_wait(),
            "etcd did not come back on port {}",
            self.client_port
        );
    }

    /// Freezes etcd (SIGSTOP): clients' requests hang, as behind a partition.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a frozen etcd run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("etcd runs") as libc::pid_t;
        // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "signal {sig} to etcd {pid}");
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns etcd and waits up to 20 s for `/health`; false (with the log printed) when
    /// it exits or does not become healthy.
    fn spawn_and_wait(&mut self) -> bool {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let mut cmd = match &self.netns {
            // nsenter execs etcd in the namespace (no fork): the pid is etcd's.
            Some((ns, _)) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg(etcd_binary());
                cmd
            }
            None => Command::new(etcd_binary()),
        };
        cmd.args(["--name", "berth-test"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("berth-test={peer}")])
            // Short raft timers: a lone member elects itself at once, and leases of 2 s
            // (etcd's minimum with these timers is 1.5 s) are honoured.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(self.tls.iter().flat_map(|tls| {
                [
                    "--cert-file".into(),
                    tls.cert.clone().into_os_string(),
                    "--key-file".into(),
                    tls.key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    tls.client_ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // the parent; it makes the kernel kill etcd if the test process dies unwinding-free
        // (SIGKILL, abort), when Drop cannot run.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let log_start = std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize);
        let child = cmd.spawn().expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                eprintln!(
                    "{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
                return false;
            }
            let ready = if let Some((_, ip)) = &self.netns {
                // The test's own namespace cannot reach it: etcd's log says when it serves.
                std::fs::read(self.log_path()).is_ok_and(|log| {
                    String::from_utf8_lossy(log.get(log_start..).unwrap_or_default()).contains(
                        &format!(
                            "serving insecure client requests on {ip}:{}",
                            self.client_port
                        ),
                    )
                })
            } else if self.tls.is_some() {
                // Plain HTTP cannot ask a TLS port: etcd's log says when it serves.
                std::fs::read(self.log_path()).is_ok_and(|log| {
                    String::from_utf8_lossy(log.get(log_start..).unwrap_or_default()).contains(
                        &format!("serving client requests on 127.0.0.1:{}", self.client_port),
                    )
                })
            } else {
                healthy(self.client_port)
            };
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        eprintln!(
            "{}",
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
        false
    }

    /// The directory holding etcd's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether etcd on `port` answers `GET /health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen etcd must be woken to die promptly; SIGKILL works on a stopped
            // process, but continuing it first is harmless.
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.stop();
    }
}
