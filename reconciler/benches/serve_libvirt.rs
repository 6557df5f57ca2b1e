//! `berth serve` on a libvirt host (root, libvirtd and virtlogd running): commit to a
//! live vcpupin in force, through the filesystem watch and through the webhook.
//!
//! A throwaway git repository with Host virt01 (`driver: libvirt`, `qemu:///system`,
//! `domainType: qemu`) and one small TCG guest (1 vCPU, 64 MiB, booting from an empty
//! disk: SeaBIOS keeps looking for a boot device). Each of N commits flips the guest's
//! vCPU pinning between CPU 0 and CPU 1; the time runs from just before `git commit`
//! starts to the moment the kernel shows the new `Cpus_allowed_list` of QEMU's vCPU
//! thread (`CPU 0/TCG`), polled every 0.2 ms: what the berth-vmm figure of
//! `--bench serve` measures, through libvirt's live API instead of berth-vmm's socket.
//!
//! Run (as root): `cargo bench -p berth-reconciler --bench serve_libvirt`
//! (`BENCH_COMMITS` overrides 50).

use std::fs;
use std::os::unix::fs::PermissionsExt;
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
    assert_eq!(euid, 0, "this benchmark needs root (qemu:///system)");
    let commits: usize = std::env::var("BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let load = || fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
    let watch = latency(commits, false);
    let webhook = latency(commits, true);
    println!();
    println!("| path (libvirt host, TCG guest) | commits | median | p99 | max |");
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
    println!("load average before: {}", load_before.trim());
    println!("load average after:  {}", load().trim());
}

/// A running `berth serve` of a libvirt host with its repository; on drop the service
/// is killed (by pid) and the domain destroyed and undefined.
struct Bench {
    dir: tempfile::TempDir,
    addr: String,
    serve: Child,
    name: String,
}

impl Bench {
    fn new(name: &str, webhook: bool) -> Bench {
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-libvirt-")
            .tempdir()
            .expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let disk = dir.path().join("empty.raw");
        fs::File::create(&disk)
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk");
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o666)).expect("chmod");
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
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut bench = Bench {
            addr: addr.clone(),
            serve: Command::new("true").spawn().expect("placeholder"),
            name: name.to_owned(),
            dir,
        };
        let _ = bench.serve.wait();
        bench.write("0");
        git(&repo, &["add", "--all"]);
        git(&repo, &["commit", "--quiet", "-m", "start"]);
        let berth = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("berth")))
            .expect("target dir");
        let mut serve = Command::new(berth);
        serve
            .args(["serve", "--host", "virt01", "--listen", &addr])
            .arg("--repo")
            .arg(&repo)
            .arg("--state-dir")
            .arg(bench.dir.path().join("state"))
            .arg("--webhook-secret-file")
            .arg(&secret)
            .arg("--insecure-plain-http")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(bench.dir.path().join("serve.log")).expect("log"));
        if webhook {
            serve.arg("--no-watch");
        }
        bench.serve = serve.spawn().expect("start berth serve");
        bench
    }

    fn write(&self, pins: &str) {
        let thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .expect("THP")
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']').map(str::to_owned))
            .expect("THP mode");
        let ksm = fs::read_to_string("/sys/kernel/mm/ksm/run")
            .unwrap_or_default()
            .trim()
            == "1";
        let text = format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: virt01}}\n\
             spec: {{address: '{addr}', cpus: 0-1, memory: 8GiB, transparentHugepages: {thp}, \
             ksm: {{enabled: {ksm}}}, driver: libvirt, libvirt: {{uri: 'qemu:///system', domainType: qemu}}}}\n\
             ---\napiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: virt01\n  \
             boot: {{from: disk}}\n  cpu: {{vcpus: 1, pinning: {{vcpus: {{0: '{pins}'}}}}}}\n  \
             memory: {{size: 64MiB}}\n  disks:\n    - {{source: {disk}, bootOrder: 1}}\n",
            addr = self.addr,
            name = self.name,
            disk = self.dir.path().join("empty.raw").display(),
        );
        fs::write(self.dir.path().join("repo/fleet.yaml"), text).expect("write");
    }

    fn commit(&self, pins: &str) {
        self.write(pins);
        git(
            &self.dir.path().join("repo"),
            &["commit", "--quiet", "-a", "-m", pins],
        );
    }

    fn webhook(&self) {
        support::webhook(&self.addr);
    }

    fn qemu_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
        for args in [["destroy", &self.name], ["undefine", &self.name]] {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_file(PathBuf::from(format!(
            "/var/log/libvirt/qemu/{}-console.log",
            self.name
        )));
    }
}

/// Commit-to-in-force latencies in ms.
fn latency(commits: usize, webhook: bool) -> Vec<f64> {
    let name = format!("bench-lv-{}-{}", std::process::id(), u8::from(webhook));
    let bench = Bench::new(&name, webhook);
    let deadline = Instant::now() + Duration::from_secs(60);
    while bench
        .qemu_pid()
        .is_none_or(|p| thread_affinity(p, "CPU 0/TCG").as_deref() != Some("0"))
    {
        assert!(
            Instant::now() < deadline,
            "the guest did not start; berth serve said:\n{}",
            fs::read_to_string(bench.dir.path().join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = bench.qemu_pid().expect("running");
    let mut out = Vec::with_capacity(commits);
    for i in 0..commits {
        let pins = if i % 2 == 0 { "1" } else { "0" };
        let start = Instant::now();
        bench.commit(pins);
        if webhook {
            bench.webhook();
        }
        let deadline = start + Duration::from_secs(10);
        while thread_affinity(pid, "CPU 0/TCG").as_deref() != Some(pins) {
            assert!(
                Instant::now() < deadline,
                "commit {i} not in force within 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        out.push(start.elapsed().as_secs_f64() * 1000.0);
        eprintln!("webhook={webhook} {i}: {:.1} ms", out[i]);
        // Commits do not come back to back.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(bench.qemu_pid(), Some(pid), "retuned in place");
    out.sort_by(f64::total_cmp);
    out
}
