//! One "host" of an end-to-end fleet: a network namespace, a state directory, and its
//! `berth serve` when running. serve_kvm, fleet_etcd and fleet_ha build their fleets
//! from these.

use std::fs;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One host. See the module documentation.
pub struct Host {
    /// Its Host manifest's name (`kvm01`).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its service's address, `ip:port`.
    pub addr: String,
    /// Its state directory.
    pub state: PathBuf,
    /// Its service's log (appended across restarts).
    pub log: PathBuf,
    /// Its service, while it runs.
    pub serve: Option<Child>,
    /// The fleet's certificates (`berth certs`): the service's own, and kvm01's, with
    /// which the test asks the service.
    pub tls: PathBuf,
}

impl Host {
    /// Host `name` in namespace `ns`, serving on `addr`; its state directory and log
    /// are `state-{i}` and `serve-{i}.log` in `dir`.
    pub fn new(name: &str, ns: &str, addr: &str, dir: &Path, i: usize, tls: &Path) -> Host {
        Host {
            name: name.to_owned(),
            ns: ns.to_owned(),
            addr: addr.to_owned(),
            state: dir.join(format!("state-{i}")),
            log: dir.join(format!("serve-{i}.log")),
            serve: None,
            tls: tls.to_owned(),
        }
    }

    /// Starts `berth serve --driver local` of this host on `repo` in its namespace,
    /// with `args` after the common ones, and returns without waiting for it.
    pub fn spawn(&mut self, repo: &Path, args: &[&str], env: &[(&str, &str)]) {
        assert!(self.serve.is_none(), "{} already serves", self.name);
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .arg(crate::bin("berth"))
            .args(["serve", "--driver", "local", "--host", &self.name])
            .arg("--repo")
            .arg(repo)
            .arg("--state-dir")
            .arg(&self.state)
            .args(crate::tls_args(&self.tls, &self.name))
            .args(["--listen", &self.addr])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start berth serve");
        self.serve = Some(child);
    }

    /// [`Host::spawn`], then waits until its API answers.
    pub fn start(&mut self, repo: &Path, args: &[&str], env: &[(&str, &str)]) {
        self.spawn(repo, args, env);
        crate::wait_until(
            &format!("{}'s API", self.name),
            Duration::from_secs(20),
            || self.get("/healthz").is_some_and(|(c, _)| c == 200),
        );
    }

    /// SIGKILL to its service, and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the service to exit; its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.serve.take()?;
        // SAFETY: kill on the pid of our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not stop within 30 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An HTTPS request to its service from inside its namespace (a thread that joins
    /// it), with kvm01's certificate of the fleet.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        let ns_path = format!("/var/run/netns/{}", self.ns);
        let addr = self.addr.clone();
        let client = crate::TlsClient::host(&self.tls, "kvm01");
        let name = self.name.clone();
        let (method, path, body) = (method.to_owned(), path.to_owned(), body.to_owned());
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        std::thread::spawn(move || {
            let file = fs::File::open(&ns_path)?;
            // SAFETY: setns on a valid namespace fd; it changes only this thread, which
            // ends after the request.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sock = addr.parse().map_err(std::io::Error::other)?;
            let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            client.exchange(stream, &name, &method, &path, &headers, &body)
        })
        .join()
        .expect("the request thread does not panic")
    }

    /// `GET path`; `None` when the service does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        self.request("GET", path, &[], "").ok()
    }

    /// Its `/status`, when it answers 200.
    pub fn try_status(&self) -> Option<Value> {
        let (code, body) = self.get("/status")?;
        (code == 200).then(|| serde_json::from_str(&body).expect("status JSON"))
    }

    /// Its `/status`; it must answer.
    pub fn status(&self) -> Value {
        let (code, body) = self.get("/status").expect("status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// Guest `name` in its `/status`.
    pub fn guest_status(&self, name: &str) -> Option<Value> {
        self.status()["guests"]
            .as_array()
            .expect("guests")
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
    }

    /// The directory of guest `name` in its state directory.
    pub fn guest_dir(&self, name: &str) -> PathBuf {
        self.state.join("guests").join(name)
    }

    /// Its service's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Ends a fleet of hosts under test, even a failed one: prints each service's log when
/// the test is panicking, kills every service, then every VMM under their state
/// directories, and removes the cgroups of `guests` (and of their incoming VMMs).
pub fn tear_down(hosts: &mut [Host], guests: &[String]) {
    if std::thread::panicking() {
        for host in hosts.iter() {
            eprintln!("--- {} log ---\n{}", host.name, host.log_text());
        }
    }
    for host in hosts.iter_mut() {
        host.kill9();
    }
    let roots: Vec<String> = hosts
        .iter()
        .map(|h| h.state.display().to_string() + "/")
        .collect();
    let pids = crate::vmm_pids(|cmdline| roots.iter().any(|r| cmdline.contains(r.as_str())));
    crate::kill_vmms(&pids);
    if let Ok(cgroups) = berth_hypervisor::host::cgroup::Cgroups::detect() {
        for name in guests {
            let _ = cgroups.remove_stale(name);
            let _ = cgroups.remove_stale(&format!("{name}.incoming"));
        }
    }
}
