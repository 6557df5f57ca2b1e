//! The destination side of a berth migration: a `berth-vmm run --incoming` process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_hypervisor::host::cgroup::Cgroups;

/// An incoming `berth-vmm`; on drop it is killed by its pid (unless it exited), reaped,
/// and the guest's cgroups it may have left are removed.
pub struct IncomingVmm {
    child: Child,
    exited: Option<ExitStatus>,
    name: String,
    /// Its control socket while incoming.
    pub socket: PathBuf,
    /// The address it listens on.
    pub address: String,
    /// The one-time token to migrate with.
    pub token: String,
}

impl IncomingVmm {
    /// Starts `vmm_bin run --spec <spec> --state-dir <root> --incoming 127.0.0.1:0` for
    /// guest `name` and reads its ready line.
    pub fn spawn(vmm_bin: &Path, spec: &Path, root: &Path, name: &str) -> anyhow::Result<Self> {
        let child = Command::new(vmm_bin)
            .args(["run", "--spec"])
            .arg(spec)
            .arg("--state-dir")
            .arg(root)
            .args(["--incoming", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", vmm_bin.display()))?;
        let mut vmm = IncomingVmm {
            child,
            exited: None,
            name: name.to_owned(),
            socket: PathBuf::new(),
            address: String::new(),
            token: String::new(),
        };
        let mut line = String::new();
        BufReader::new(vmm.child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["ready", socket, "incoming", addr, token] = words.as_slice() else {
            bail!("the incoming VMM said {line:?}");
        };
        vmm.socket = PathBuf::from(socket);
        vmm.address = (*addr).to_owned();
        vmm.token = (*token).to_owned();
        Ok(vmm)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        while self.exited.is_none() {
            self.exited = self.child.try_wait()?;
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(self.exited)
    }
}

impl Drop for IncomingVmm {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(cgroups) = Cgroups::detect() {
            let _ = cgroups.remove_stale(&self.name);
            let _ = cgroups.remove_stale(&format!("{}.incoming", self.name));
        }
    }
}
