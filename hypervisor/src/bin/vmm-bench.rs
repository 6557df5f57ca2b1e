//! Side-by-side start-up benchmark of berth-vmm and QEMU (microvm, paused), on this host.
//!
//! `vmm-bench [--runs N] [--memory MiB] [--vmm PATH]`, as root with /dev/kvm and
//! `qemu-system-x86_64` on the PATH; berth-vmm is taken from next to this binary unless
//! `--vmm` names one. Prints a markdown table:
//! - time from process start to the control socket accepting (berth: its `ready` line,
//!   printed once the guest runs in its cgroup and `control.sock` listens; QEMU: the QMP
//!   socket answering its greeting, with `-S` so that the guest is built and paused);
//! - RSS excluding guest memory (berth: VmRSS minus the touched guest pages, which the
//!   heartbeat guest barely touches, reported both ways; QEMU: VmRSS of a paused guest);
//! - berth only: time to the first heartbeat line, and guest starts per second with two
//!   starts in flight (2 cores).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let mut runs = 20usize;
    let mut memory_mib = 256u64;
    let mut vmm = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--memory" => memory_mib = args.next().context("--memory MiB")?.parse()?,
            "--vmm" => vmm = Some(PathBuf::from(args.next().context("--vmm PATH")?)),
            other => bail!(
                "unknown argument {other} (usage: vmm-bench [--runs N] [--memory MiB] [--vmm PATH])"
            ),
        }
    }
    let vmm = match vmm {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("berth-vmm"),
    };
    println!("berth-vmm: {} ({})\n", vmm.display(), linkage(&vmm));
    let work = tempfile::tempdir()?;

    let mut berth_ready = Vec::new();
    let mut berth_rss = Vec::new();
    let mut berth_rss_no_guest = Vec::new();
    let mut berth_first_line = Vec::new();
    let mut qemu_ready = Vec::new();
    let mut qemu_rss = Vec::new();
    for i in 0..runs {
        let b = run_berth(&vmm, work.path(), &format!("bench-{i}"), memory_mib)?;
        berth_ready.push(b.ready);
        berth_rss.push(b.rss);
        berth_rss_no_guest.push(b.rss_without_guest);
        berth_first_line.push(b.first_line);
        let q = run_qemu(work.path(), i, memory_mib)?;
        qemu_ready.push(q.0);
        qemu_rss.push(q.1);
    }
    let throughput = starts_per_second(&vmm, work.path(), memory_mib, 40)?;

    let ms = |d: &[Duration]| median(d.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    let mb = |v: &[u64]| median(v.iter().map(|&b| b as f64 / (1 << 20) as f64).collect());
    println!("runs: {runs}, guest memory: {memory_mib} MiB, medians\n");
    println!("| | berth-vmm | QEMU 7.2 microvm -S | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| start to control socket ready | {:.2} ms | {:.2} ms | {:.1}x faster |",
        ms(&berth_ready),
        ms(&qemu_ready),
        ms(&qemu_ready) / ms(&berth_ready)
    );
    println!(
        "| RSS excluding guest memory | {:.2} MiB | {:.2} MiB | {:.1}x smaller |",
        mb(&berth_rss_no_guest),
        mb(&qemu_rss),
        mb(&qemu_rss) / mb(&berth_rss_no_guest)
    );
    println!(
        "| RSS including touched guest memory | {:.2} MiB | {:.2} MiB | |",
        mb(&berth_rss),
        mb(&qemu_rss)
    );
    println!(
        "| start to first heartbeat line | {:.2} ms | n/a | |",
        ms(&berth_first_line)
    );
    println!("| guest starts per second (2 in flight, 2 cores) | {throughput:.1} | n/a | |");
    Ok(())
}

/// "static" or "dynamic", from the ELF program headers (a PT_INTERP entry means the
/// binary needs the dynamic loader).
fn linkage(binary: &Path) -> &'static str {
    let Ok(bytes) = std::fs::read(binary) else {
        return "unreadable";
    };
    let field = |at: usize, len: usize| -> Option<u64> {
        let b = bytes.get(at..at + len)?;
        Some(b.iter().rev().fold(0, |acc, &x| (acc << 8) | u64::from(x)))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (field(0x20, 8), field(0x36, 2), field(0x38, 2))
    else {
        return "not ELF";
    };
    let interp = (0..phnum).any(|i| field((phoff + i * phentsize) as usize, 4) == Some(3));
    if interp {
        "dynamic"
    } else {
        "static"
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct BerthRun {
    ready: Duration,
    first_line: Duration,
    rss: u64,
    rss_without_guest: u64,
}

fn spec(name: &str, memory_mib: u64) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: bench\n  cpu: {{vcpus: 1}}\n  memory: {{size: {memory_mib}MiB}}\n  boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 1000, ticksPerLine: 1}}}}\n"
    )
}

fn spawn_berth(
    vmm: &Path,
    root: &Path,
    name: &str,
    memory_mib: u64,
) -> anyhow::Result<(Child, Instant)> {
    let spec_path = root.join(format!("{name}.yaml"));
    std::fs::write(&spec_path, spec(name, memory_mib))?;
    let start = Instant::now();
    let child = Command::new(vmm)
        .args(["run", "--spec"])
        .arg(&spec_path)
        .arg("--state-dir")
        .arg(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning berth-vmm")?;
    Ok((child, start))
}

fn wait_ready(child: &mut Child) -> anyhow::Result<PathBuf> {
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let path = line
        .trim()
        .strip_prefix("ready ")
        .context("no ready line")?;
    Ok(PathBuf::from(path))
}

fn stop(child: &mut Child) -> anyhow::Result<()> {
    // SAFETY: kill with the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    Ok(())
}

fn run_berth(vmm: &Path, root: &Path, name: &str, memory_mib: u64) -> anyhow::Result<BerthRun> {
    let (mut child, start) = spawn_berth(vmm, root, name, memory_mib)?;
    let socket = wait_ready(&mut child)?;
    let ready = start.elapsed();
    UnixStream::connect(&socket).context("connecting to the control socket")?;
    let console = root.join("guests").join(name).join("console.log");
    let first_line = loop {
        if std::fs::read(&console).is_ok_and(|b| b.contains(&b'\n')) {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("no heartbeat line in 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    std::thread::sleep(Duration::from_millis(100));
    let pid = child.id() as i32;
    let memory = berth_hypervisor::host::sysinfo::read_process_memory(pid)?;
    let touched = guest_resident(pid, memory_mib << 20)?;
    stop(&mut child)?;
    Ok(BerthRun {
        ready,
        first_line,
        rss: memory.rss.get(),
        rss_without_guest: memory.rss.get().saturating_sub(touched),
    })
}

/// Resident bytes of the guest memory mapping (the anonymous mapping of exactly
/// `size` bytes), from /proc/<pid>/smaps.
fn guest_resident(pid: i32, size: u64) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut in_guest = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = b - a == size;
                    continue;
                }
            }
        }
        if in_guest {
            if let Some(v) = line.strip_prefix("Rss:") {
                let kib: u64 = v.trim().trim_end_matches("kB").trim().parse()?;
                return Ok(kib * 1024);
            }
        }
    }
    Ok(0)
}

fn run_qemu(root: &Path, i: usize, memory_mib: u64) -> anyhow::Result<(Duration, u64)> {
    let qmp = root.join(format!("qmp-{i}.sock"));
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-cpu", "kvm64", "-enable-kvm", "-S", "-m"])
        .arg(format!("{memory_mib}M"))
        .args(["-nodefaults", "-nographic", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let ready = loop {
        if let Ok(mut s) = UnixStream::connect(&qmp) {
            let mut greeting = [0u8; 16];
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.read_exact(&mut greeting)?;
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            bail!("QEMU's QMP socket did not come up in 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    std::thread::sleep(Duration::from_millis(100));
    let rss = berth_hypervisor::host::sysinfo::read_process_memory(child.id() as i32)?
        .rss
        .get();
    stop(&mut child)?;
    Ok((ready, rss))
}

/// Starts `total` guests, two at a time, each until its control socket is ready, then
/// stops it; guests per second.
fn starts_per_second(
    vmm: &Path,
    root: &Path,
    memory_mib: u64,
    total: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let vmm = vmm.to_owned();
            let root = root.to_owned();
            std::thread::spawn(move || -> anyhow::Result<()> {
                for i in 0..total / 2 {
                    let (mut child, _) =
                        spawn_berth(&vmm, &root, &format!("tp-{w}-{i}"), memory_mib)?;
                    wait_ready(&mut child)?;
                    stop(&mut child)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
