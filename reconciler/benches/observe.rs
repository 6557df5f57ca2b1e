//! How long the local driver takes to observe N running heartbeat guests: what every
//! `berth get guests`, `berth plan --driver local`, `berth apply` and reconcile pass of
//! `berth serve` pays before it plans.
//!
//! N small heartbeat guests (1 vCPU, 4 MiB, 1 tick/s) are started through the local
//! driver in a temporary state directory; then `LocalDriver::observe` is timed
//! `BENCH_ROUNDS` times (after 3 rounds of warm-up) asking the VMMs one after the other
//! (1 worker: how berth observed before) and all at once from one thread (the default), in
//! alternating rounds; the median, p90 and the cost per guest are printed, with the
//! load average. Then `BENCH_ROUNDS` concurrent observes in a row are counted in CPU
//! time, berth's (`getrusage`) and the VMMs' (`/proc/<pid>/stat`), which a shared
//! machine's load does not inflate the way it does wall time. Every VMM is stopped at
//! the end.
//!
//! Run (as root): `cargo build --release -p berth-hypervisor --bin berth-vmm &&
//! cargo bench -p berth-reconciler --bench observe` (`BENCH_GUESTS`, `BENCH_ROUNDS`
//! override 200 and 30).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_reconciler::driver::{Driver, LocalDriver};
use berth_schema::Guest;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this benchmark needs root (KVM, cgroups)");
    let guests: usize = env_or("BENCH_GUESTS", 200);
    let rounds: usize = env_or("BENCH_ROUNDS", 30);
    let vmm = vmm_path();
    let dir = tempfile::tempdir().expect("temp dir");
    let driver = LocalDriver::new("kvm01", dir.path(), vmm);
    let names: Vec<String> = (0..guests)
        .map(|i| format!("obs{}-{i:03}", std::process::id()))
        .collect();
    let _cleanup = Cleanup {
        driver: &driver,
        names: names.clone(),
        state: dir.path().to_owned(),
    };
    let started = Instant::now();
    for name in &names {
        driver.start(&guest(name), "kvm01").expect("start a guest");
    }
    eprintln!("started {guests} guests in {:.1?}", started.elapsed());

    let state = dir.path().to_owned();
    let vmm = vmm_path();
    let sequential = LocalDriver::new("kvm01", &state, vmm.clone()).observe_workers(1);
    let concurrent = LocalDriver::new("kvm01", &state, vmm);
    for d in [&sequential, &concurrent] {
        for _ in 0..3 {
            assert_eq!(d.observe().expect("observe").guests.len(), guests);
        }
    }
    let time = |d: &LocalDriver| {
        let t = Instant::now();
        let observed = d.observe().expect("observe");
        let took = t.elapsed();
        assert_eq!(observed.guests.len(), guests, "every guest observed");
        took.as_secs_f64() * 1000.0
    };
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        one.push(time(&sequential));
        many.push(time(&concurrent));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    println!();
    println!("| observe {guests} guests | rounds | median | p90 | per guest |");
    println!("|---|---|---|---|---|");
    let row = |what: &str, ms: &mut Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        let p90 = ms[(ms.len() * 9 / 10).min(ms.len() - 1)];
        println!(
            "| {what} | {rounds} | {median:.1} ms | {p90:.1} ms | {:.3} ms |",
            median / guests as f64
        );
        median
    };
    let before = row("one VMM at a time (before)", &mut one);
    let after = row("all at once", &mut many);
    println!();
    println!(
        "ratio {:.1}x; load average (1/5/15 min) after: {load}",
        before / after
    );

    // CPU time of `rounds` observes (all at once) in a row, per observe.
    let pids: Vec<i32> = names
        .iter()
        .filter_map(|n| std::fs::read_to_string(state.join("guests").join(n).join("pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), guests, "every VMM's pid");
    let vmms_before = vmm_cpu_ms(&pids);
    let self_before = self_cpu_ms();
    for _ in 0..rounds {
        time(&concurrent);
    }
    let berth = (self_cpu_ms() - self_before) / rounds as f64;
    let vmms = (vmm_cpu_ms(&pids) - vmms_before) / rounds as f64;
    println!(
        "CPU per observe (all at once, {rounds} in a row): berth {berth:.1} ms + \
         VMMs {vmms:.1} ms = {:.1} ms ({:.0} us per guest)",
        berth + vmms,
        (berth + vmms) * 1000.0 / guests as f64
    );
}

/// User + system CPU time of this process, all its threads, in ms.
fn self_cpu_ms() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// User + system CPU time of the processes `pids` (all their threads, exited ones
/// too), in ms, from `/proc/<pid>/stat` (clock ticks: summed over many rounds, the
/// truncation of each process's count averages out).
fn vmm_cpu_ms(pids: &[i32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("a VMM's stat");
        // Fields after the `(comm)`: state is field 3, utime 14 and stime 15.
        let rest = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    ticks as f64 * 1000.0 / tick
}

fn guest(name: &str) -> Guest {
    let text = format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\n\
         spec:\n  host: kvm01\n  boot: {{kernel: \"builtin:heartbeat\", heartbeat: {{tickHz: 1}}}}\n  \
         cpu: {{vcpus: 1}}\n  memory: {{size: 4MiB}}\n"
    );
    serde_yaml::from_str(&text).expect("a valid guest")
}

/// Stops every guest, by its VMM's pid when the driver cannot.
struct Cleanup<'a> {
    driver: &'a LocalDriver,
    names: Vec<String>,
    state: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            if self.driver.stop(name, "kvm01").is_err() {
                let pid = std::fs::read_to_string(self.state.join("guests").join(name).join("pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok());
                if let Some(pid) = pid {
                    // SAFETY: kill by pid of a berth-vmm this benchmark started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(cgroups) = berth_hypervisor::host::cgroup::Cgroups::detect() {
            for name in &self.names {
                let _ = cgroups.remove_stale(name);
            }
        }
    }
}

/// berth-vmm beside the benchmark's target directory.
fn vmm_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("berth-vmm")))
        .filter(|p| p.exists())
        .expect("build berth-vmm first: cargo build --release -p berth-hypervisor --bin berth-vmm")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
