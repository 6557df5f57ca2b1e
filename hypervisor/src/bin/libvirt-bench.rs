//! A live vCPU re-pin through berth's libvirt module beside `virsh vcpupin --live` by
//! hand, on the same domain in the same run.
//!
//! `libvirt-bench [--runs N] [--uri URI]`, as root with libvirtd running. Defines and
//! starts a small TCG domain (no kernel: the firmware finds no boot disk and waits,
//! which is enough to pin its vCPU threads), then alternates vCPU 0 between CPU 0 and
//! CPU 1, N times each way:
//! - berth: `Libvirt::pin_vcpu` (live and config, then read back from libvirt), on an
//!   open connection, as `berth serve` holds one;
//! - virsh: `virsh -c URI vcpupin NAME 0 CPU --live --config`, a process per change, as
//!   an operator types it.
//!
//! Prints a markdown table (median, p99, ratio) and the load average. The domain is
//! removed at the end, also on failure.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_hypervisor::libvirt::{ConsoleLog, Libvirt};
use berth_schema::{CpuSet, DomainType, Guest};

fn main() -> anyhow::Result<()> {
    let mut runs = 50usize;
    let mut uri = "qemu:///system".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--uri" => uri = args.next().context("--uri URI")?,
            other => {
                bail!("unknown argument {other} (usage: libvirt-bench [--runs N] [--uri URI])")
            }
        }
    }
    let libvirt = Libvirt::open(&uri)?;
    let dir = tempfile::Builder::new()
        .prefix("berth-libvirt-bench-")
        .tempdir()?;
    // QEMU runs as libvirt's user: the directory must be traversable.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let disk = dir.path().join("empty.raw");
    std::fs::File::create(&disk)?.set_len(1 << 20)?;
    let name = format!("berth-bench-{}", std::process::id());
    let text = format!(
        "apiVersion: berth.dev/v1
kind: Guest
metadata: {{name: {name}}}
spec:
  host: bench
  boot: {{from: disk}}
  cpu: {{vcpus: 1}}
  memory: {{size: 64MiB}}
  disks:
    - {{source: {}, cache: writeback}}
",
        disk.display()
    );
    let guest: Guest = serde_yaml::from_str(&text)?;
    let console = ConsoleLog(dir.path().join("console.log").display().to_string());
    libvirt.create(&guest, DomainType::Qemu, "bench", &console)?;
    let result = measure(&libvirt, &uri, &name, runs);
    let removed = libvirt.remove(&name);
    let (berth, virsh) = result?;
    removed?;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (b50, b99) = (percentile(&berth, 50), percentile(&berth, 99));
    let (v50, v99) = (percentile(&virsh, 50), percentile(&virsh, 99));
    println!(
        "| live vcpupin, in force and read back ({} changes each) | median | p99 |",
        berth.len()
    );
    println!("|---|---|---|");
    println!(
        "| berth (`Libvirt::pin_vcpu`, open connection) | {:.2} ms | {:.2} ms |",
        ms(b50),
        ms(b99)
    );
    println!(
        "| `virsh vcpupin --live --config` (a process each) | {:.2} ms | {:.2} ms |",
        ms(v50),
        ms(v99)
    );
    println!(
        "| ratio berth / virsh | {:.2} | {:.2} |",
        ms(b50) / ms(v50),
        ms(b99) / ms(v99)
    );
    println!();
    println!("load average: {}", load.trim());
    Ok(())
}

fn measure(
    libvirt: &Libvirt,
    uri: &str,
    name: &str,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let cpus: [CpuSet; 2] = ["0".parse()?, "1".parse()?];
    let mut berth = Vec::with_capacity(runs * 2);
    let mut virsh = Vec::with_capacity(runs * 2);
    for i in 0..runs * 2 {
        let want = &cpus[i % 2];
        let start = Instant::now();
        let got = libvirt.pin_vcpu(name, 0, want)?;
        berth.push(start.elapsed());
        if &got != want {
            bail!("berth pinned vCPU 0 to {want}, libvirt reads back {got}");
        }
        let other = cpus[(i + 1) % 2].to_string();
        let start = Instant::now();
        let status = Command::new("virsh")
            .args([
                "-c", uri, "vcpupin", name, "0", &other, "--live", "--config",
            ])
            .stdout(Stdio::null())
            .status()
            .context("running virsh")?;
        virsh.push(start.elapsed());
        if !status.success() {
            bail!("virsh vcpupin failed");
        }
    }
    Ok((berth, virsh))
}

fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
