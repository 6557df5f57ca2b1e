//! `cargo bench -p berth-reconciler --bench plan`: plan over the simulated fleet (no
//! real guests) at 1,000 / 10,000 / 100,000 guests with about 3% of them changed, and
//! CI mode over two revisions of a git repository of 10,000 guest manifests (read,
//! parse and validate both, plan). Prints a table: wall time and peak heap.
//!
//! Peak heap is measured with a counting global allocator: the most bytes allocated at
//! once during the measured step, above what was allocated before it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_reconciler::driver::{Driver, FleetCapabilities, SimDriver};
use berth_reconciler::model::{Desired, Observed};
use berth_reconciler::{git, plan};
use berth_schema::{
    Boot, Bytes, CpuMode, CpuSpec, FleetSpec, Guest, GuestSpec, GuestState, Host, HostSpec,
    HugepageSpec, KsmSpec, MemorySpec, Metadata, MigrationPolicy, PageSize, Pinning, RestartPolicy,
    ThpMode, API_VERSION,
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator with the same arguments; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result, wall time and peak heap above the start.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    (out, elapsed, PEAK.load(Ordering::Relaxed) - base)
}

fn host(i: usize, guests_per_host: usize) -> Host {
    Host {
        api_version: API_VERSION.into(),
        kind: "Host".into(),
        metadata: Metadata {
            name: format!("kvm{i:05}"),
            ..Metadata::default()
        },
        spec: HostSpec {
            address: format!("10.0.{}.{}:7410", i / 256, i % 256),
            cpus: "0-63".parse().expect("cpuset"),
            reserved_cpus: Default::default(),
            // Room for every guest twice over, and a 2 MiB pool of 4 GiB.
            memory: Bytes::mib(256 * 2 * guests_per_host as u64 + 4096),
            hugepages: [(PageSize::Huge2M, 2048)].into(),
            ksm: KsmSpec::default(),
            transparent_hugepages: ThpMode::Madvise,
            schedulable: true,
            cpu_model: None,
            driver: Default::default(),
            libvirt: None,
        },
    }
}

fn guest(i: usize, hosts: usize) -> Guest {
    // Two CPUs of its own per guest on its host (up to 30 guests per host).
    let cpu = ((i / hosts) % 30 * 2) as u32;
    Guest {
        api_version: API_VERSION.into(),
        kind: "Guest".into(),
        metadata: Metadata {
            name: format!("guest-{i:06}"),
            labels: [("tier".to_owned(), ["web", "db", "batch"][i % 3].to_owned())].into(),
            ..Metadata::default()
        },
        spec: GuestSpec {
            host: format!("kvm{:05}", i % hosts),
            host_selector: None,
            anti_affinity: Default::default(),
            availability: Default::default(),
            state: GuestState::Running,
            boot: Boot::default(),
            cpu: CpuSpec {
                vcpus: 2,
                max_vcpus: Some(4),
                mode: CpuMode::HostModel,
                model: None,
                pinning: Some(Pinning {
                    vcpus: [
                        (0, cpu.to_string().parse().expect("cpuset")),
                        (1, (cpu + 1).to_string().parse().expect("cpuset")),
                    ]
                    .into(),
                    emulator: Some("62-63".parse().expect("cpuset")),
                }),
                dedicated: false,
            },
            memory: MemorySpec {
                size: Bytes::mib(256),
                hugepages: None,
                locked: false,
                share_pages: false,
                tune: None,
                numa: None,
            },
            io: None,
            disks: Vec::new(),
            nics: Vec::new(),
            migration: MigrationPolicy::default(),
            restart_policy: RestartPolicy::Never,
        },
    }
}

/// A fleet, and the same fleet with about 3% of the guests changed: 1% re-pinned, 1%
/// moved to the next host, 0.5% put on hugepages, 0.5% new.
fn fleet(guests: usize, hosts: usize) -> (Desired, Desired) {
    let per_host = guests.div_ceil(hosts);
    let base = Desired {
        guests: (0..guests).map(|i| guest(i, hosts)).collect(),
        hosts: (0..hosts).map(|i| host(i, per_host)).collect(),
        fleet: FleetSpec::default(),
        placements: Default::default(),
    };
    let mut head = base.clone();
    for (i, g) in head.guests.iter_mut().enumerate() {
        match i % 200 {
            0 | 1 => {
                let pinning = g.spec.cpu.pinning.as_mut().expect("pinned");
                pinning.vcpus.insert(0, "60".parse().expect("cpuset"));
            }
            2 | 3 => g.spec.host = format!("kvm{:05}", (i + 1) % hosts),
            4 => {
                g.spec.memory.hugepages = Some(HugepageSpec {
                    page_size: PageSize::Huge2M,
                })
            }
            _ => {}
        }
    }
    head.guests
        .extend((guests..guests + guests / 200).map(|i| guest(i, hosts)));
    (base, head)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn bench_sim(guests: usize, hosts: usize) {
    let (base, head) = fleet(guests, hosts);
    let sim = SimDriver::from_manifests(&base);
    let (observed, observe_time, _) = measure(|| sim.observe().expect("observe"));
    // Warm up once, then take the best of three.
    let _ = plan(&head, &observed, &FleetCapabilities::default());
    let mut best: Option<(Duration, usize)> = None;
    let mut result = None;
    for _ in 0..3 {
        let (p, t, peak) = measure(|| plan(&head, &observed, &FleetCapabilities::default()));
        if best.is_none_or(|(bt, _)| t < bt) {
            best = Some((t, peak));
        }
        result = Some(p);
    }
    let p = result.expect("planned");
    let (t, peak) = best.expect("measured");
    println!(
        "| {guests:>7} | {hosts:>6} | {:>7} | {:>5} | {:>10.1} | {:>9.1} | {:>10.1} |",
        p.steps.len(),
        p.waves(),
        observe_time.as_secs_f64() * 1e3,
        t.as_secs_f64() * 1e3,
        mib(peak),
    );
}

fn git_in(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .current_dir(dir)
        .args(args)
        .status()
        .expect("run git")
        .success();
    assert!(ok, "git {args:?}");
}

fn write_revision(dir: &Path, d: &Desired) {
    let m = dir.join("manifests");
    let _ = std::fs::remove_dir_all(&m);
    std::fs::create_dir_all(m.join("guests")).expect("mkdir");
    let hosts: Vec<String> = d
        .hosts
        .iter()
        .map(|h| serde_yaml::to_string(h).expect("yaml"))
        .collect();
    std::fs::write(m.join("hosts.yaml"), hosts.join("---\n")).expect("write hosts");
    for g in &d.guests {
        let path = m.join("guests").join(format!("{}.yaml", g.metadata.name));
        std::fs::write(path, serde_yaml::to_string(g).expect("yaml")).expect("write guest");
    }
}

/// CPU time used by this process so far (user + system, every thread), from
/// `/proc/self/stat`, in clock ticks of 10 ms.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CI mode, `runs` times; the repository is left in `keep` when given (to time the
/// real `berth plan --base HEAD~1 --head HEAD` on it), else removed.
fn bench_ci(guests: usize, hosts: usize, runs: usize, keep: Option<&Path>) {
    let (base, head) = fleet(guests, hosts);
    let dir = keep.map_or_else(
        || std::env::temp_dir().join(format!("berth-bench-ci-{}", std::process::id())),
        Path::to_path_buf,
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    git_in(&dir, &["init", "-q"]);
    git_in(&dir, &["config", "user.name", "bench"]);
    git_in(&dir, &["config", "user.email", "bench@berth.invalid"]);
    write_revision(&dir, &base);
    git_in(&dir, &["add", "-A"]);
    git_in(&dir, &["commit", "-qm", "base"]);
    write_revision(&dir, &head);
    git_in(&dir, &["add", "-A"]);
    git_in(&dir, &["commit", "-qm", "head"]);

    // As `berth plan --base --head` does it: each revision read and validated on its
    // own thread, then the plan.
    let run = || {
        let load = |rev: &str| {
            let r = git::read_revision(&dir, rev, None).expect("revision");
            let files = r.files.len();
            let (set, load, _) = measure(|| berth_schema::load_files(r.files).expect("valid"));
            (files, set, load)
        };
        let ((head, base), read_and_load, _) = measure(|| {
            std::thread::scope(|s| {
                let base = s.spawn(|| load("HEAD~1"));
                (load("HEAD"), base.join().expect("base loader"))
            })
        });
        let (files, head, load) = head;
        let (p, planning, _) = measure(|| {
            let head = Desired::from_manifests(&head.manifests);
            let base = Desired::from_manifests(&base.1.manifests);
            let observed = Observed::baseline(&base, &head);
            plan(&head, &observed, &FleetCapabilities::default())
        });
        (files, p, [read_and_load - load, load, planning])
    };
    let mut totals = Vec::new();
    let mut cpus = Vec::new();
    let mut parts_seen = Vec::new();
    let mut outcome = None;
    for _ in 0..runs {
        let cpu_start = cpu_time();
        let ((files, p, parts), t, peak) = measure(run);
        cpus.push(cpu_time().saturating_sub(cpu_start));
        totals.push(t);
        parts_seen.push(parts);
        outcome = Some((files, p.steps.len(), peak));
    }
    let (files, steps, peak) = outcome.expect("at least one run");
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let part = |i: usize| ms(median(parts_seen.iter().map(|p| p[i]).collect()));
    let (min, max) = (
        totals.iter().min().copied().unwrap_or_default(),
        totals.iter().max().copied().unwrap_or_default(),
    );
    println!(
        "| CI mode: {files} files x 2 revisions, {guests} guests, {hosts} hosts | {steps} steps | \
         total median {:.0} ms (min {:.0}, max {:.0}, {runs} runs; git read {:.0}, parse+validate {:.0}, plan {:.0}; \
         both revisions in parallel) | CPU median {:.0} ms | peak {:.1} MiB | load average {} |",
        ms(median(totals.clone())),
        ms(min),
        ms(max),
        part(0),
        part(1),
        part(2),
        ms(median(cpus)),
        mib(peak),
        load_average()
    );
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no flag:
    // keep that run small. `-- --ci` runs CI mode only; `-- --keep-repo DIR` leaves its
    // repository in DIR.
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let ci_only = args.iter().any(|a| a == "--ci");
    let keep = args
        .iter()
        .position(|a| a == "--keep-repo")
        .and_then(|i| args.get(i + 1))
        .map(Path::new);
    if !ci_only {
        println!("| guests  | hosts  | actions | waves | observe ms | plan ms   | plan peak MiB |");
        println!("|--------:|-------:|--------:|------:|-----------:|----------:|--------------:|");
    }
    if full {
        if !ci_only {
            for (guests, hosts) in [(1_000, 100), (10_000, 1_000), (100_000, 10_000)] {
                bench_sim(guests, hosts);
            }
            println!();
        }
        bench_ci(10_000, 1_000, 7, keep);
    } else {
        bench_sim(1_000, 100);
    }
}
