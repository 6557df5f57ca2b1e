//! QEMU processes and their QMP sockets.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A `qemu-system-x86_64` process, killed (by its pid) and reaped on drop.
pub struct Qemu {
    child: Child,
}

impl Qemu {
    /// Starts `qemu-system-x86_64 -machine pc,accel=kvm -cpu kvm64 -m <memory_mib>M`,
    /// headless, QMP on `qmp`, with `extra` arguments, waiting for a migration on
    /// `incoming` when given.
    pub fn spawn(
        work: &Path,
        memory_mib: u64,
        qmp: &Path,
        extra: &[OsString],
        incoming: Option<u16>,
    ) -> anyhow::Result<Qemu> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "pc,accel=kvm", "-cpu", "kvm64", "-m"])
            .arg(format!("{memory_mib}M"))
            .args([
                "-nographic",
                "-nodefaults",
                "-no-user-config",
                "-serial",
                "none",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra);
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        let child = cmd
            .current_dir(work)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Qemu { child })
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection, past the capabilities negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the socket at `path`, waiting up to 20 s for QEMU to create it.
    pub fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e).context("QMP socket"),
            }
        };
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting)?;
        q.call(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// Sends one command (JSON text) and returns its `return` value; events are skipped.
    pub fn call(&mut self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        self.writer.write_all(cmd.as_bytes())?;
        self.writer.write_all(b"\n")?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// Runs a human monitor command (e.g. `xp`) and returns its output.
    pub fn hmp(&mut self, command: &str) -> anyhow::Result<String> {
        let cmd = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": {"command-line": command},
        });
        let out = self.call(&cmd.to_string())?;
        Ok(out.as_str().unwrap_or_default().to_owned())
    }
}

/// A TCP port free on loopback right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
