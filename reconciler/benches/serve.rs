//! `berth serve --driver local` on real KVM (root): commit-to-converged latency of a
//! live retune, and the service's idle cost with 20 guests.
//!
//! Latency: a throwaway git repository with one heartbeat guest; each of N commits
//! flips the guest's vCPU pinning between CPU 0 and CPU 1; the time runs from just
//! before `git commit` starts to the moment `/proc/<vmm>/task/<vcpu0>/status` shows the
//! new `Cpus_allowed_list`. Once through the filesystem watch, once with `--no-watch`
//! and a signed webhook sent right after each commit (as a git host would).
//!
//! Idle: 20 small heartbeat guests (10 ticks/s, 32 MiB), the service's CPU time over
//! 30 s from `/proc/<pid>/stat` and its RSS from `/proc/<pid>/status`.
//!
//! Run (as root): `cargo build --release -p berth-hypervisor --bin berth-vmm &&
//! cargo bench -p berth-reconciler --bench serve` (`BENCH_COMMITS`, `BENCH_IDLE_SECS`
//! override 50 and 30).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{free_port, git, percentile, thread_affinity, WEBHOOK_SECRET};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this benchmark needs root (KVM, cgroups)");
    let commits: usize = env_or("BENCH_COMMITS", 50);
    let idle_secs: u64 = env_or("BENCH_IDLE_SECS", 30);
    let watch = latency(commits, Mode::Watch);
    let webhook = latency(commits, Mode::Webhook);
    let (cpu, rss) = idle(20, Duration::from_secs(idle_secs));
    println!();
    println!("| path | commits | median | p99 | max |");
    println!("|---|---|---|---|---|");
    for (name, ms) in [
        ("filesystem watch", &watch),
        ("webhook (--no-watch)", &webhook),
    ] {
        println!(
            "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            ms.len(),
            percentile(ms, 50.0),
            percentile(ms, 99.0),
            percentile(ms, 100.0)
        );
    }
    println!();
    println!("| service with 20 guests | value |");
    println!("|---|---|");
    println!("| idle CPU over {idle_secs} s | {cpu:.2} % of one core |");
    println!("| RSS | {:.1} MiB |", rss as f64 / 1024.0);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Watch,
    Webhook,
}

/// A running `berth serve` with its repository; kills the service and its guests (by
/// pid) when dropped.
struct Bench {
    dir: tempfile::TempDir,
    addr: String,
    serve: Child,
    guests: Vec<String>,
}

impl Bench {
    fn new(guests: &[String], pins: &str, extra: &[&str]) -> Bench {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let repo = dir.path().join("repo");
        fs::create_dir_all(&repo).expect("mkdir");
        for args in [
            &["init", "--quiet", "--initial-branch=main"][..],
            &["config", "user.name", "bench"],
            &["config", "user.email", "bench@berth.invalid"],
            &["config", "commit.gpgsign", "false"],
        ] {
            git(&repo, args);
        }
        let secret = dir.path().join("webhook-secret");
        fs::write(&secret, WEBHOOK_SECRET).expect("secret");
        fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let bench = |serve| Bench {
            addr: addr.clone(),
            serve,
            guests: guests.to_vec(),
            dir,
        };
        let text = manifests(&addr, guests, pins);
        fs::write(repo.join("fleet.yaml"), text).expect("write");
        git(&repo, &["add", "--all"]);
        git(&repo, &["commit", "--quiet", "-m", "start"]);
        let berth = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("berth")))
            .expect("target dir");
        let serve = Command::new(berth)
            .args([
                "serve", "--driver", "local", "--host", "kvm01", "--listen", &addr,
            ])
            .arg("--repo")
            .arg(&repo)
            .arg("--state-dir")
            .arg(repo.parent().expect("dir").join("state"))
            .arg("--webhook-secret-file")
            .arg(&secret)
            // Loopback only, one host: the webhook is sent over plain HTTP, so that the
            // figures stay those of the reconcile path (a TLS handshake would add to
            // the webhook's latency, not to berth's).
            .arg("--insecure-plain-http")
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start berth serve (build it: cargo bench builds it beside this bench)");
        bench(serve)
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn vmm_pid(&self, name: &str) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.state().join("guests").join(name).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    fn commit(&self, pins: &str) {
        let text = manifests(&self.addr, &self.guests, pins);
        let repo = self.repo();
        fs::write(repo.join("fleet.yaml"), text).expect("write");
        git(&repo, &["commit", "--quiet", "-a", "-m", pins]);
    }

    fn webhook(&self) {
        support::webhook(&self.addr);
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        let pids: Vec<i32> = self.guests.iter().filter_map(|g| self.vmm_pid(g)).collect();
        for &pid in &pids {
            // SAFETY: kill by pid of a berth-vmm this benchmark's service started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(cgroups) = berth_hypervisor::host::cgroup::Cgroups::detect() {
            for g in &self.guests {
                let _ = cgroups.remove_stale(g);
            }
        }
    }
}

fn manifests(addr: &str, guests: &[String], pins: &str) -> String {
    let mut text = format!(
        "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm01}}\n\
         spec: {{address: '{addr}', cpus: 0-1, memory: 8GiB}}\n"
    );
    let hz = if guests.len() > 1 { 10 } else { 100 };
    for g in guests {
        text.push_str(&format!(
            "---\napiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {g}}}\nspec:\n  host: kvm01\n  \
             cpu: {{vcpus: 1, pinning: {{vcpus: {{0: '{pins}'}}}}}}\n  memory: {{size: 32MiB}}\n  \
             boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: {hz}, ticksPerLine: 100}}}}\n"
        ));
    }
    text
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Commit-to-converged latencies in ms.
fn latency(commits: usize, mode: Mode) -> Vec<f64> {
    let name = format!("bench-lat-{}", std::process::id());
    let extra: &[&str] = match mode {
        Mode::Watch => &[],
        Mode::Webhook => &["--no-watch"],
    };
    let bench = Bench::new(std::slice::from_ref(&name), "0", extra);
    wait_for("the guest", Duration::from_secs(30), || {
        bench
            .vmm_pid(&name)
            .is_some_and(|p| thread_affinity(p, "vcpu0").as_deref() == Some("0"))
    });
    let pid = bench.vmm_pid(&name).expect("running");
    let mut out = Vec::with_capacity(commits);
    for i in 0..commits {
        let pins = if i % 2 == 0 { "1" } else { "0" };
        let start = Instant::now();
        bench.commit(pins);
        if mode == Mode::Webhook {
            bench.webhook();
        }
        // Polled at 0.2 ms: the poll adds at most that much.
        let deadline = start + Duration::from_secs(10);
        while thread_affinity(pid, "vcpu0").as_deref() != Some(pins) {
            assert!(
                Instant::now() < deadline,
                "commit {i} not applied within 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        out.push(start.elapsed().as_secs_f64() * 1000.0);
        eprintln!("{mode:?} {i}: {:.1} ms", out[i]);
        // Let the service settle, as commits do not come back to back.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(bench.vmm_pid(&name), Some(pid), "retuned in place");
    out.sort_by(f64::total_cmp);
    out
}

/// The service's CPU use (percent of one core) over `over`, and its RSS in KiB, with
/// `guests` guests running.
fn idle(guests: usize, over: Duration) -> (f64, u64) {
    let names: Vec<String> = (0..guests)
        .map(|i| format!("bench-idle-{i}-{}", std::process::id()))
        .collect();
    let bench = Bench::new(&names, "0-1", &[]);
    wait_for("20 guests", Duration::from_secs(120), || {
        names.iter().all(|n| bench.vmm_pid(n).is_some())
    });
    // Let the first passes and the peers' refresh settle.
    std::thread::sleep(Duration::from_secs(3));
    let pid = bench.serve.id();
    let ticks = |pid: u32| -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let rest = stat.rsplit(')').next().expect("stat format");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime: fields 14 and 15, i.e. 12 and 13 after the state.
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = ticks(pid);
    let started = Instant::now();
    std::thread::sleep(over);
    let used = (ticks(pid) - before) as f64 / hz;
    let cpu = used / started.elapsed().as_secs_f64() * 100.0;
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    assert!(
        names.iter().all(|n| bench.vmm_pid(n).is_some()),
        "every guest still runs"
    );
    (cpu, rss)
}
