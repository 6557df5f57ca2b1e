//! Live migration on loopback, berth-vmm beside QEMU, same memory size and content.
//!
//! `migrate-bench [--runs N] [--connections N] [--qemu-default-bandwidth]`, as root with /dev/kvm and
//! `qemu-system-x86_64` on the PATH. Two cases:
//! - `random`: a 256 MiB guest holding 200 MiB of random data (at 8 MiB);
//! - `zero`: a mostly-zero 1 GiB guest.
//!
//! berth: this process is the source VMM (a heartbeat guest, idle, with the random data
//! written into its RAM), the destination a `berth-vmm run --incoming` process; the
//! migration goes through the `migrate` op exactly as over the control socket. Total
//! time is from the op to `Running`; downtime is the source's pause to `Running`
//! (guest-visible: its vCPUs are paused for exactly that long).
//!
//! QEMU: `-machine pc -cpu kvm64`, the random data through `-device loader`, the
//! destination with `-incoming`, `migrate-set-parameters downtime-limit=30` (and
//! max-bandwidth raised to 100 GiB/s so its default cap does not decide), times from
//! `query-migrate`.
//!
//! Prints a markdown table of medians.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_hypervisor::migration::{self, MigrateArgs, MigrationPhase};
use berth_hypervisor::{VmConfig, Vmm};
use vm_memory::{Bytes as _, GuestAddress};

const RANDOM_AT: u64 = 8 << 20;

struct Case {
    name: &'static str,
    memory_mib: u64,
    random_mib: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let mut runs = 3usize;
    let mut connections = 2u32;
    let mut qemu_default_bandwidth = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--connections" => connections = args.next().context("--connections N")?.parse()?,
            "--qemu-default-bandwidth" => qemu_default_bandwidth = true,
            other => bail!(
                "unknown argument {other} (usage: migrate-bench [--runs N] [--connections N] \
                 [--qemu-default-bandwidth])"
            ),
        }
    }
    let vmm_bin = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .join("berth-vmm");
    let work = tempfile::tempdir()?;
    let random = work.path().join("random.bin");
    let mut data = vec![0u8; 200 << 20];
    getrandom::fill(&mut data).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    std::fs::write(&random, &data)?;

    let cases = [
        Case {
            name: "256 MiB, 200 MiB random",
            memory_mib: 256,
            random_mib: 200,
        },
        Case {
            name: "1 GiB, mostly zero",
            memory_mib: 1024,
            random_mib: 0,
        },
    ];
    println!("| case | VMM | total ms | downtime ms | bytes sent | guest bytes |");
    println!("|---|---|---:|---:|---:|---:|");
    for case in &cases {
        let mut berth = Vec::new();
        let mut qemu = Vec::new();
        for run in 0..runs {
            berth.push(
                berth_run(&vmm_bin, work.path(), case, &data, connections, run)
                    .with_context(|| format!("berth, {}", case.name))?,
            );
            qemu.push(
                qemu_run(work.path(), case, &random, run, qemu_default_bandwidth)
                    .with_context(|| format!("QEMU, {}", case.name))?,
            );
        }
        let guest = case.memory_mib << 20;
        for (who, samples) in [("berth-vmm", &berth), ("QEMU 7.2", &qemu)] {
            let m = median(samples);
            println!(
                "| {} | {who} | {:.1} | {:.2} | {} | {} |",
                case.name,
                m.total_ms,
                m.downtime_ms,
                mib(m.bytes),
                mib(guest)
            );
        }
        eprintln!("{}: berth {berth:?}\n  QEMU {qemu:?}", case.name);
    }
    Ok(())
}

/// CPU time (user + system) of process `pid` so far, ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks * 10.0
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn median(samples: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut bytes: Vec<u64> = samples.iter().map(|s| s.bytes).collect();
    bytes.sort_unstable();
    Sample {
        total_ms: pick(|s| s.total_ms),
        downtime_ms: pick(|s| s.downtime_ms),
        bytes: bytes[bytes.len() / 2],
    }
}

fn guest_spec(name: &str, memory_mib: u64) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: bench\n  cpu: {{vcpus: 1}}\n  memory: {{size: {memory_mib}MiB}}\n  boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 100, ticksPerLine: 100, dirtyPagesPerTick: 0}}}}\n"
    )
}

fn berth_run(
    vmm_bin: &Path,
    work: &Path,
    case: &Case,
    data: &[u8],
    connections: u32,
    run: usize,
) -> anyhow::Result<Sample> {
    let name = format!("bench-{}-{run}", case.memory_mib);
    let root = work.join(&name);
    std::fs::create_dir_all(&root)?;
    let text = guest_spec(&name, case.memory_mib);
    let spec_path = root.join("spec.yaml");
    std::fs::write(&spec_path, &text)?;
    // The destination process.
    let mut dest = Command::new(vmm_bin)
        .args(["run", "--spec"])
        .arg(&spec_path)
        .arg("--state-dir")
        .arg(&root)
        .args(["--incoming", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(dest.stdout.take().context("stdout")?).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let ["ready", socket, "incoming", addr, token] = words.as_slice() else {
        let _ = dest.kill();
        bail!("the incoming VMM said {line:?}");
    };
    let socket = PathBuf::from(socket);
    // The source: this process.
    let guest: berth_schema::Guest = serde_yaml::from_str(&text)?;
    let config = VmConfig::from_guest(&guest)?;
    let (events, _inbox) = std::sync::mpsc::channel();
    let vmm = Arc::new(Vmm::create(
        config,
        &root.join("source-console.log"),
        events,
        Instant::now(),
    )?);
    vmm.load_payload()?;
    let random = &data[..(case.random_mib << 20) as usize];
    vmm.vm()
        .memory()
        .write_slice(random, GuestAddress(RANDOM_AT))?;
    vmm.start()?;
    std::thread::sleep(Duration::from_millis(200));
    let args = MigrateArgs {
        destination: addr.to_string(),
        token: token.to_string(),
        policy: serde_json::from_str(r#"{"maxDowntime":"30ms"}"#)?,
        connections: Some(connections),
    };
    let cpu_before = (cpu_ms(std::process::id()), cpu_ms(dest.id()));
    let t = Instant::now();
    migration::send::start(&vmm, args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let status = loop {
        let st = vmm.migration().status().clone();
        if !matches!(
            st.phase,
            MigrationPhase::Prechecks | MigrationPhase::Precopy | MigrationPhase::Switchover
        ) {
            break st;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let total = t.elapsed();
    eprintln!(
        "berth: {:.0} ms; CPU ms source {:.0}, destination {:.0}",
        total.as_secs_f64() * 1000.0,
        cpu_ms(std::process::id()) - cpu_before.0,
        cpu_ms(dest.id()) - cpu_before.1
    );
    if status.phase != MigrationPhase::Completed {
        let _ = dest.kill();
        bail!("the migration ended {:?}: {:?}", status.phase, status.error);
    }
    vmm.stop_vcpus(Duration::from_secs(2));
    // Check the destination really has the data, then stop it.
    let final_socket = root.join("guests").join(&name).join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !final_socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let socket = if final_socket.exists() {
        final_socket
    } else {
        socket
    };
    let mut client = berth_hypervisor::control::Client::connect(&socket)?;
    let running = client.status()?.state;
    client.shutdown(Duration::from_secs(10))?;
    let _ = dest.wait();
    anyhow::ensure!(
        running == berth_hypervisor::control::GuestRunState::Running,
        "the destination guest is {running:?}"
    );
    Ok(Sample {
        total_ms: total.as_secs_f64() * 1000.0,
        downtime_ms: status.downtime_ms.unwrap_or(f64::NAN),
        bytes: status.bytes_sent,
    })
}

struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu(
    work: &Path,
    case: &Case,
    random: &Path,
    qmp: &Path,
    incoming: Option<u16>,
) -> anyhow::Result<Qemu> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "pc,accel=kvm", "-cpu", "kvm64", "-m"])
        .arg(format!("{}M", case.memory_mib))
        .args([
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-serial",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if case.random_mib > 0 {
        cmd.arg("-device").arg(format!(
            "loader,file={},addr={RANDOM_AT:#x},force-raw=on",
            random.display()
        ));
    }
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

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
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

    fn call(&mut self, cmd: &str) -> anyhow::Result<serde_json::Value> {
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
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn qemu_run(
    work: &Path,
    case: &Case,
    random: &Path,
    run: usize,
    default_bandwidth: bool,
) -> anyhow::Result<Sample> {
    let src_qmp = work.join(format!("qemu-src-{}-{run}.qmp", case.memory_mib));
    let dst_qmp = work.join(format!("qemu-dst-{}-{run}.qmp", case.memory_mib));
    let port = free_port()?;
    let _src = qemu(work, case, random, &src_qmp, None)?;
    let _dst = qemu(work, case, random, &dst_qmp, Some(port))?;
    let mut src = Qmp::connect(&src_qmp)?;
    let _dst_qmp = Qmp::connect(&dst_qmp)?;
    std::thread::sleep(Duration::from_millis(500));
    // The issue's setup sets only the downtime limit; by default the cap is raised too,
    // so that QEMU's bandwidth limit does not decide the comparison.
    src.call(if default_bandwidth {
        r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":30}}"#
    } else {
        r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":30,"max-bandwidth":107374182400}}"#
    })?;
    src.call(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
    ))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = src.call(r#"{"execute":"query-migrate"}"#)?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("completed") => {
                return Ok(Sample {
                    total_ms: st["total-time"].as_f64().unwrap_or(f64::NAN),
                    downtime_ms: st["downtime"].as_f64().unwrap_or(f64::NAN),
                    bytes: st["ram"]["transferred"].as_u64().unwrap_or(0),
                })
            }
            Some("failed") | Some("cancelled") => bail!("QEMU migration {st}"),
            _ => {}
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "QEMU migration did not finish: {st}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
