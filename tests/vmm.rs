//! berth-vmm end to end, on real KVM: heartbeat guests, pinning, cgroups, hugepages,
//! hot-add, crashes, bad input, the control protocol. Run as root with /dev/kvm.
//!
//! Every test cleans up what it made (VMM processes by pid, state directories, cgroups,
//! hugepages) through guards, also when it fails.

use berth_tests::{proc_affinity, unique, wait_until};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_hypervisor::control::{
    Client, ClientError, ErrorCode, GuestRunState, Retune, Status, VcpuRegisters,
};
use berth_hypervisor::host::cgroup::Cgroups;
use berth_hypervisor::host::hugepages::{HugePagePool, PoolReservation};
use berth_schema::{CpuSet, PageSize, Pinning};

/// A berth-vmm process and its state root; killed (by pid) and cleaned up on drop.
struct Vmm {
    child: Option<Child>,
    root: tempfile::TempDir,
    name: String,
    socket: PathBuf,
}

/// A failed start: exit code and stderr.
#[derive(Debug)]
struct StartError {
    code: Option<i32>,
    stderr: String,
}

fn spec(name: &str, cpu: &str, memory: &str, boot: &str) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: kvm01\n  cpu: {cpu}\n  memory: {memory}\n  boot: {boot}\n"
    )
}

fn heartbeat(tick_hz: u32, per_line: u32, dirty: u32) -> String {
    format!(
        "{{kernel: builtin:heartbeat, heartbeat: {{tickHz: {tick_hz}, ticksPerLine: {per_line}, dirtyPagesPerTick: {dirty}}}}}"
    )
}

impl Vmm {
    fn start(name: &str, spec_text: &str) -> Result<Vmm, StartError> {
        let root = tempfile::tempdir().expect("temp state root");
        Vmm::start_in(root, name, spec_text)
    }

    fn start_in(root: tempfile::TempDir, name: &str, spec_text: &str) -> Result<Vmm, StartError> {
        Vmm::start_with(root, name, spec_text, &[])
    }

    /// [`Vmm::start_in`] with `extra` arguments to `berth-vmm run`.
    fn start_with(
        root: tempfile::TempDir,
        name: &str,
        spec_text: &str,
        extra: &[String],
    ) -> Result<Vmm, StartError> {
        let spec_path = root.path().join(format!("{name}.yaml"));
        std::fs::write(&spec_path, spec_text).unwrap();
        let stderr_path = root.path().join(format!("{name}.stderr"));
        let mut child = Command::new(berth_tests::bin("berth-vmm"))
            .arg("run")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--state-dir")
            .arg(root.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn berth-vmm");
        let line = berth_tests::first_stdout_line(&mut child, Duration::from_secs(20));
        let mut vmm = Vmm {
            child: Some(child),
            root,
            name: name.to_owned(),
            socket: PathBuf::new(),
        };
        match line.trim().strip_prefix("ready ") {
            Some(path) => {
                vmm.socket = PathBuf::from(path);
                Ok(vmm)
            }
            None => {
                let code = vmm.wait_exit(Duration::from_secs(10));
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                Err(StartError { code, stderr })
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("guests").join(&self.name)
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect to the control socket")
    }

    fn status(&self) -> Status {
        self.client().status().expect("status")
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir().join("console.log")).unwrap_or_default()
    }

    /// Waits for the process to exit; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "berth-vmm did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.kill().expect("SIGKILL the VMM by pid");
            child.wait().unwrap();
            self.child = None;
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill9();
        if let Ok(cgroups) = Cgroups::detect() {
            let _ = cgroups.remove_stale(&self.name);
        }
    }
}

fn set_affinity(tid: i32, cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE; `set` is a valid cpu_set_t of the size given.
    let rc = unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set)
    };
    assert_eq!(rc, 0, "sched_setaffinity");
}

/// Resident bytes of process `pid`'s mapping of exactly `size` bytes (guest memory),
/// from /proc/<pid>/smaps.
fn mapping_rss(pid: i32, size: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_mapping = false;
    for line in smaps.lines() {
        let range = line.split(' ').next().and_then(|r| r.split_once('-'));
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_mapping = b - a == size;
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("Rss:").filter(|_| in_mapping) {
            return kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
        }
    }
    panic!("no mapping of {size} bytes in /proc/{pid}/smaps");
}

fn ticks(status: &Status, index: usize) -> u64 {
    status.vcpu[index].ticks.unwrap_or(0)
}

fn cpuset(s: &str) -> CpuSet {
    s.parse().unwrap()
}

#[test]
fn two_pinned_vcpus_beat_repin_drift_pause_memtune_and_shut_down() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-two");
    let text = spec(
        &name,
        "{vcpus: 2, pinning: {vcpus: {0: \"0\", 1: \"1\"}, emulator: \"0-1\"}}",
        "{size: 64MiB, tune: {hardLimit: 512MiB}}",
        &heartbeat(100, 10, 2),
    );
    let mut vmm = Vmm::start(&name, &text).unwrap();
    let pid = vmm.pid();

    wait_until(
        "heartbeats from both vCPUs",
        Duration::from_secs(10),
        || {
            let log = vmm.console();
            log.contains("hb vcpu=0 n=10\n") && log.contains("hb vcpu=1 n=10\n")
        },
    );
    let status = vmm.status();
    assert_eq!(status.state, GuestRunState::Running);
    assert_eq!(status.vcpus, 2);
    assert!(
        ticks(&status, 0) >= 10 && ticks(&status, 1) >= 10,
        "{:?}",
        status.vcpu
    );
    assert!(status.console.lines >= 2);

    // Pinning is in force, as /proc shows it.
    let tids: Vec<i32> = status.vcpu.iter().map(|v| v.tid.unwrap()).collect();
    assert_eq!(proc_affinity(pid, tids[0]), "0");
    assert_eq!(proc_affinity(pid, tids[1]), "1");
    assert_eq!(status.vcpu[0].affinity, Some(cpuset("0")));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", tids[1])).unwrap();
    assert_eq!(comm.trim(), "vcpu1");
    for t in &status.emulator_threads {
        assert_eq!(t.affinity, Some(cpuset("0-1")), "{t:?}");
    }

    // Re-pin live: swap the vCPUs.
    let mut pins = Pinning::default();
    pins.vcpus.insert(0, cpuset("1"));
    pins.vcpus.insert(1, cpuset("0"));
    let status = vmm
        .client()
        .retune(&Retune {
            pinning: Some(pins),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(proc_affinity(pid, tids[0]), "1");
    assert_eq!(proc_affinity(pid, tids[1]), "0");
    assert_eq!(status.vcpu[0].affinity, Some(cpuset("1")));

    // Drift made by hand (taskset -p) shows in the next status.
    set_affinity(tids[0], 0);
    assert_eq!(vmm.status().vcpu[0].affinity, Some(cpuset("0")));

    // memtune live, read back from the cgroup files.
    let cgroup_dir = vmm
        .status()
        .cgroup
        .and_then(|c| c["paths"].as_array().cloned())
        .unwrap()
        .into_iter()
        .filter_map(|p| p.as_str().map(PathBuf::from))
        .find(|p| p.join("memory.limit_in_bytes").exists() || p.join("memory.max").exists())
        .expect("a memory cgroup");
    let limit_file = if cgroup_dir.join("memory.limit_in_bytes").exists() {
        cgroup_dir.join("memory.limit_in_bytes")
    } else {
        cgroup_dir.join("memory.max")
    };
    assert_eq!(
        std::fs::read_to_string(&limit_file).unwrap().trim(),
        (512u64 << 20).to_string()
    );
    let tune: berth_schema::MemTune =
        serde_json::from_value(serde_json::json!({"hardLimit": "384MiB", "softLimit": "256MiB"}))
            .unwrap();
    let status = vmm
        .client()
        .retune(&Retune {
            memtune: Some(tune),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&limit_file).unwrap().trim(),
        (384u64 << 20).to_string()
    );
    let hard = &status.cgroup.unwrap()["values"]["memory"]["hardLimit"]["enforced"];
    assert_eq!(hard, "384MiB", "status reads the file back");

    // Pause freezes the counters; resume continues them. Registers can be read only
    // while the vCPUs hold still.
    match vmm.client().vcpu_registers().unwrap_err() {
        ClientError::Refused { error, .. } => assert_eq!(error.code, ErrorCode::Refused),
        other => panic!("{other}"),
    }
    let paused = vmm.client().pause().unwrap();
    assert_eq!(paused.state, GuestRunState::Paused);
    let regs = vmm.client().vcpu_registers().unwrap();
    assert_eq!(regs.len(), paused.vcpus as usize);
    for r in &regs {
        assert!(r.efer & EFER_LMA != 0 && r.cs == 0x10, "{r:x?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let still = vmm.status();
    assert_eq!(ticks(&still, 0), ticks(&paused, 0));
    vmm.client().resume().unwrap();
    wait_until("ticks after resume", Duration::from_secs(5), || {
        ticks(&vmm.status(), 0) > ticks(&paused, 0)
    });

    // The dirtied pages hold their pattern.
    let report = vmm.client().verify_memory().unwrap();
    assert!(report.ok(), "{:?}", report.bad);
    assert!(report.written > 0);

    // Every thread of the VMM is in the guest's cgroup in every hierarchy (the main
    // thread joins before it starts any other), and what the guest wrote is charged
    // there.
    let ours = format!(":/berth/{name}");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().to_string_lossy().into_owned();
        // A thread may end meanwhile (a control connection's).
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")) else {
            continue;
        };
        for line in text.lines().filter(|l| {
            ["memory", "cpuset", "blkio"]
                .iter()
                .any(|c| l.split(':').nth(1) == Some(*c))
        }) {
            assert!(line.ends_with(&ours), "thread {tid}: {line}");
        }
    }
    // The guest's resident memory (the 64 MiB mapping, at least the payload's first
    // pages) is anonymous memory of this cgroup: were it charged elsewhere, the cgroup
    // would hold only the VMM's own few hundred KiB.
    let guest_rss = mapping_rss(pid, 64 << 20);
    let stat = std::fs::read_to_string(cgroup_dir.join("memory.stat")).unwrap();
    let anon: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("rss ").or_else(|| l.strip_prefix("anon ")))
        .and_then(|v| v.trim().parse().ok())
        .expect("rss (v1) or anon (v2) in memory.stat");
    assert!(
        guest_rss >= 1 << 20 && anon >= guest_rss,
        "cgroup anon {anon} for a guest mapping of {guest_rss} resident bytes"
    );

    // Graceful shutdown: the process exits 0 and cleans up socket, pid and cgroup.
    vmm.client().shutdown(Duration::from_secs(5)).unwrap();
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!vmm.socket.exists());
    assert!(!vmm.dir().join("pid").exists());
    assert!(!cgroup_dir.exists(), "{} left behind", cgroup_dir.display());
}

#[test]
fn hugepage_guest_takes_exactly_its_pages_and_gives_them_back() {
    berth_tests::require_root_and_kvm();
    let pool = HugePagePool::new(PageSize::Huge2M);
    // Restored on drop, also when the test fails.
    let reservation = PoolReservation::grow(pool.clone(), 40).unwrap();
    assert_eq!(
        reservation.added(),
        40,
        "the kernel could not grow the pool"
    );
    let before = pool.stats().unwrap();
    let name = unique("hb-huge");
    let text = spec(
        &name,
        "{vcpus: 1}",
        "{size: 64MiB, hugepages: {pageSize: 2MiB}}",
        &heartbeat(100, 10, 1),
    );
    let mut vmm = Vmm::start(&name, &text).unwrap();
    let during = pool.stats().unwrap();
    assert_eq!(before.free - during.free, 32, "64MiB is 32 pages of 2MiB");
    let status = vmm.status();
    assert_eq!(status.memory.hugepages, 32);
    assert_eq!(status.memory.backing, "hugetlb-2MiB");
    wait_until("a heartbeat", Duration::from_secs(10), || {
        vmm.console().contains("hb vcpu=0 n=10\n")
    });
    vmm.client().shutdown(Duration::from_secs(5)).unwrap();
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(pool.stats().unwrap().free, before.free);

    // A guest the pool cannot back fails before the VM exists, with the counts.
    let text = spec(
        &unique("hb-short"),
        "{vcpus: 1}",
        "{size: 1GiB, hugepages: {pageSize: 2MiB}}",
        &heartbeat(100, 10, 0),
    );
    let err = Vmm::start(&unique("hb-short"), &text)
        .err()
        .expect("refused");
    assert_eq!(err.code, Some(1), "{}", err.stderr);
    assert!(
        err.stderr.contains(&format!(
            "needs 512 pages of 2MiB, {} free",
            before.available()
        )),
        "{}",
        err.stderr
    );
    drop(reservation);
}

#[test]
fn hot_add_starts_the_next_vcpu_and_decrease_is_refused() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-hotadd");
    let text = spec(
        &name,
        "{vcpus: 1, maxVcpus: 2, pinning: {vcpus: {0: \"0\", 1: \"1\"}}}",
        "{size: 32MiB}",
        &heartbeat(100, 10, 1),
    );
    let vmm = Vmm::start(&name, &text).unwrap();
    let before = vmm.status();
    assert_eq!(before.vcpus, 1);
    assert!(before.vcpu[1].tid.is_none());
    let after = vmm
        .client()
        .retune(&Retune {
            vcpus: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(after.vcpus, 2);
    let tid = after.vcpu[1].tid.unwrap();
    assert_eq!(proc_affinity(vmm.pid(), tid), "1");
    wait_until(
        "heartbeats from the new vCPU",
        Duration::from_secs(10),
        || vmm.console().contains("hb vcpu=1 n=10\n"),
    );
    let refuse = |vcpus| {
        vmm.client()
            .retune(&Retune {
                vcpus: Some(vcpus),
                ..Default::default()
            })
            .unwrap_err()
    };
    match refuse(1) {
        ClientError::Refused { error, .. } => {
            assert_eq!(error.code, ErrorCode::Refused);
            assert!(
                error.message.contains("cannot remove vCPUs live"),
                "{}",
                error.message
            );
        }
        other => panic!("{other}"),
    }
    match refuse(3) {
        ClientError::Refused { error, .. } => {
            assert_eq!(error.code, ErrorCode::InvalidArgument);
            assert!(error.message.contains("maxVcpus is 2"), "{}", error.message);
        }
        other => panic!("{other}"),
    }
    let report = vmm.client().verify_memory().unwrap();
    assert!(report.ok(), "{:?}", report.bad);
}

#[test]
fn sigkill_then_restart_cleans_stale_state_and_second_vmm_is_refused() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-kill");
    let text = spec(&name, "{vcpus: 1}", "{size: 16MiB}", &heartbeat(50, 10, 0));
    let mut first = Vmm::start(&name, &text).unwrap();

    // Never two VMMs for one guest.
    let root_path = first.root.path().to_owned();
    let second = Command::new(berth_tests::bin("berth-vmm"))
        .args(["run", "--spec"])
        .arg(root_path.join(format!("{name}.yaml")))
        .arg("--state-dir")
        .arg(&root_path)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1), "exit codes: 0 or 1, never 2");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("already has a running VMM")
            && stderr.contains(&format!("pid {}", first.pid())),
        "{stderr}"
    );
    assert!(first.status().state == GuestRunState::Running);

    first.kill9();
    assert!(first.socket.exists(), "SIGKILL leaves the socket behind");
    let root = std::mem::replace(&mut first.root, tempfile::tempdir().unwrap());
    drop(first);
    let again = Vmm::start_in(root, &name, &text).unwrap();
    wait_until(
        "heartbeats after the restart",
        Duration::from_secs(10),
        || again.console().contains("hb vcpu=0 n=10\n"),
    );
    let pid: i32 = std::fs::read_to_string(again.dir().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, again.pid());
}

#[test]
fn sigterm_is_a_graceful_shutdown() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-term");
    let text = spec(&name, "{vcpus: 1}", "{size: 16MiB}", &heartbeat(50, 10, 0));
    let mut vmm = Vmm::start(&name, &text).unwrap();
    // SAFETY: kill with a pid this test spawned and still owns (not yet reaped).
    assert_eq!(unsafe { libc::kill(vmm.pid(), libc::SIGTERM) }, 0);
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!vmm.socket.exists());
}

#[test]
fn the_fence_deadline_stops_the_guest_unless_renewed() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-fence");
    let text = spec(&name, "{vcpus: 1}", "{size: 16MiB}", &heartbeat(50, 10, 0));
    let mut vmm = Vmm::start(&name, &text).unwrap();
    let mut client = vmm.client();
    let armed = client
        .fence_deadline(Some(Duration::from_millis(400)))
        .unwrap();
    assert!(armed.armed);
    assert!(armed.remaining_ms.is_some_and(|ms| ms <= 400), "{armed:?}");
    // Renewed in time, for three times the deadline: the guest keeps running.
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_millis(1200) {
        std::thread::sleep(Duration::from_millis(100));
        client
            .fence_deadline(Some(Duration::from_millis(400)))
            .unwrap();
    }
    assert_eq!(client.status().unwrap().state, GuestRunState::Running);
    // Disarmed: no deadline at all.
    let disarmed = client.fence_deadline(None).unwrap();
    assert!(!disarmed.armed);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(client.status().unwrap().state, GuestRunState::Running);

    // Armed again and never renewed (the service died): the VMM stops the guest at the
    // deadline and exits, cleaning up.
    client
        .fence_deadline(Some(Duration::from_millis(300)))
        .unwrap();
    let armed_at = Instant::now();
    drop(client);
    assert_eq!(vmm.wait_exit(Duration::from_secs(5)), Some(0));
    let stopped_after = armed_at.elapsed();
    assert!(
        stopped_after >= Duration::from_millis(300) && stopped_after < Duration::from_millis(1300),
        "{stopped_after:?}"
    );
    let stderr = std::fs::read_to_string(vmm.root.path().join(format!("{name}.stderr"))).unwrap();
    assert!(
        stderr.contains("fence deadline passed without a renewal from berth serve"),
        "{stderr}"
    );
    assert!(!vmm.socket.exists());
    eprintln!("fenced {stopped_after:?} after a 300 ms deadline was armed");
}

/// `--fence-file`: the fence is armed from the deadline berth serve keeps in a file,
/// before the VMM can be reached (the service may die before its first renewal); a
/// deadline already past, or no file, means no start at all.
#[test]
fn a_fence_armed_at_start_stops_the_guest_unless_renewed() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-fenceat");
    let text = spec(&name, "{vcpus: 1}", "{size: 16MiB}", &heartbeat(50, 10, 0));
    // Built first (berth_tests::bin builds once per test process): the deadline is
    // for the VMM's start, not for cargo.
    berth_tests::bin("berth-vmm");
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("fence-deadline");
    let fence_file = ["--fence-file".to_owned(), file.display().to_string()];
    let at = berth_hypervisor::fence::monotonic_ms() + 1500;
    std::fs::write(&file, format!("{at}\n")).unwrap();
    let started = Instant::now();
    let mut vmm = Vmm::start_with(tempfile::tempdir().unwrap(), &name, &text, &fence_file).unwrap();
    let status = vmm.status();
    assert_eq!(status.state, GuestRunState::Running);
    let left = status
        .fence_in_ms
        .expect("the fence is armed from the start");
    assert!(left <= 1500, "{left} ms left");
    // Never renewed (the service died right after the start): stopped at the deadline.
    assert_eq!(vmm.wait_exit(Duration::from_secs(6)), Some(0));
    let stopped_after = started.elapsed();
    assert!(
        stopped_after >= Duration::from_millis(1400) && stopped_after < Duration::from_millis(3000),
        "{stopped_after:?}"
    );
    let stderr = std::fs::read_to_string(vmm.root.path().join(format!("{name}.stderr"))).unwrap();
    assert!(stderr.contains("fence deadline passed"), "{stderr}");
    assert!(!vmm.socket.exists());

    // The deadline passed (the service stopped renewing it): refused, nothing runs.
    for why in ["has passed", "cannot read"] {
        if why == "cannot read" {
            std::fs::remove_file(&file).unwrap();
        }
        let refused = Vmm::start_with(tempfile::tempdir().unwrap(), &name, &text, &fence_file)
            .err()
            .expect("a start past the fence deadline is refused");
        assert_eq!(refused.code, Some(1), "{refused:?}");
        assert!(
            refused.stderr.contains(why) && refused.stderr.contains("not started"),
            "{}",
            refused.stderr
        );
    }
}

#[test]
fn triple_fault_is_reported_as_crashed_without_spinning() {
    berth_tests::require_root_and_kvm();
    let name = unique("crash");
    let text = spec(
        &name,
        "{vcpus: 1}",
        "{size: 16MiB}",
        "{kernel: \"builtin:triple-fault\"}",
    );
    let vmm = Vmm::start(&name, &text).unwrap();
    wait_until("the crash", Duration::from_secs(10), || {
        vmm.status().state == GuestRunState::Crashed
    });
    let status = vmm.status();
    assert!(
        status.reason.as_deref().unwrap().contains("triple fault"),
        "{status:?}"
    );
    // The crashed vCPU thread sleeps: its CPU time does not grow.
    let tid = status.vcpu[0].tid.unwrap();
    let cpu_time = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", vmm.pid())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let t0 = cpu_time();
    std::thread::sleep(Duration::from_millis(500));
    assert!(cpu_time() - t0 <= 2, "a crashed vCPU must not spin");
    assert_eq!(vmm.client().vcpu_registers().unwrap().len(), 1);
    match vmm.client().resume().unwrap_err() {
        ClientError::Refused { error, .. } => assert_eq!(error.code, ErrorCode::Refused),
        other => panic!("{other}"),
    }
}

#[test]
fn bad_inputs_are_refused_with_clear_messages() {
    berth_tests::require_root_and_kvm();
    let cases = [
        (
            spec(
                "bad-cpu",
                "{vcpus: 1, pinning: {vcpus: {0: \"64\"}}}",
                "{size: 16MiB}",
                &heartbeat(10, 10, 0),
            ),
            "CPU 64 is not online on this host",
        ),
        (
            spec(
                "bad-kernel",
                "{vcpus: 1}",
                "{size: 16MiB}",
                "{kernel: /nonexistent/vmlinuz}",
            ),
            "Cannot open the kernel /nonexistent/vmlinuz",
        ),
        (
            spec(
                "bad-kernel2",
                "{vcpus: 1}",
                "{size: 16MiB}",
                "{kernel: /etc/hostname}",
            ),
            "/etc/hostname is not a Linux kernel",
        ),
        (
            spec(
                "../escape",
                "{vcpus: 1}",
                "{size: 16MiB}",
                &heartbeat(10, 10, 0),
            ),
            "must not contain '/' or '..'",
        ),
        (
            spec(
                "bad-numa",
                "{vcpus: 1}",
                "{size: 16MiB, numa: {mode: strict, nodeset: \"7\"}}",
                &heartbeat(10, 10, 0),
            ),
            "NUMA node 7 does not exist",
        ),
        (
            spec(
                "bad-mem",
                "{vcpus: 1}",
                "{size: 64TiB}",
                &heartbeat(10, 10, 0),
            ),
            "Cannot back 64TiB of guest memory: the host has",
        ),
    ];
    for (text, expected) in cases {
        // The guard cleans up under the manifest's name.
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("metadata: {name: "))
            .and_then(|l| l.strip_suffix('}'))
            .unwrap()
            .to_owned();
        let err = Vmm::start(&name, &text).err().expect("refused");
        if !name.contains('/') {
            let cgroups = Cgroups::detect().unwrap();
            assert!(
                cgroups.open(&name).unwrap().is_none(),
                "{name}: cgroup left behind"
            );
        }
        assert_eq!(err.code, Some(1), "{expected}: {}", err.stderr);
        assert!(
            err.stderr.contains(expected),
            "expected {expected:?} in {}",
            err.stderr
        );
    }
}

#[test]
fn bad_control_requests_get_errors_and_the_vmm_keeps_running() {
    berth_tests::require_root_and_kvm();
    let name = unique("hb-proto");
    let text = spec(&name, "{vcpus: 1}", "{size: 16MiB}", &heartbeat(50, 10, 0));
    let vmm = Vmm::start(&name, &text).unwrap();
    let mut c = vmm.client();
    let code = |r: berth_hypervisor::control::Response| r.error.unwrap().code;
    assert_eq!(code(c.raw(b"not json\n").unwrap()), ErrorCode::Malformed);
    assert_eq!(
        code(c.raw(b"{\"v\":7,\"id\":1,\"op\":\"status\"}\n").unwrap()),
        ErrorCode::UnsupportedVersion
    );
    assert_eq!(
        code(c.raw(b"{\"v\":1,\"id\":2,\"op\":\"explode\"}\n").unwrap()),
        ErrorCode::UnknownOp
    );
    let mut huge = vec![b'x'; 200 * 1024];
    huge.push(b'\n');
    let reply = c.raw(&huge).unwrap();
    assert_eq!(code(reply), ErrorCode::TooLarge);
    // Same connection, still served; and the guest still runs.
    assert_eq!(c.status().unwrap().state, GuestRunState::Running);
    // A connection held open and idle (`c`) holds up no other; and a connection's
    // thread is kept for the next one, not spawned per connection.
    let conn_threads = |s: &Status| -> std::collections::BTreeSet<i32> {
        s.emulator_threads
            .iter()
            .filter(|t| t.name == "control-conn")
            .map(|t| t.tid)
            .collect()
    };
    let first = conn_threads(&vmm.status());
    let mut seen = first.clone();
    let mut last = first.clone();
    for _ in 0..20 {
        let status = vmm.status();
        assert_eq!(status.state, GuestRunState::Running);
        last = conn_threads(&status);
        seen.extend(last.iter().copied());
    }
    // Every thread that served a connection is still there (kept, not exited), and
    // 21 connections took fewer threads (a connection that comes before the last one's
    // thread is back waiting gets a new one).
    assert!(
        first.is_subset(&last) && seen.len() < 21,
        "connection threads: {first:?} at first, {last:?} at last, {seen:?} in all"
    );
    assert_eq!(c.status().unwrap().state, GuestRunState::Running);
    let mode = std::fs::metadata(&vmm.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
}

/// The command line of the opt-in Linux tests: the decompressor and the kernel print
/// to COM1 from their first lines; `nokaslr` keeps addresses predictable and makes the
/// decompressor say so on the serial port.
const LINUX_CMDLINE: &str =
    "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr reboot=k panic=1";
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// CR0.PG: paging on.
const CR0_PG: u64 = 1 << 31;

/// Boots `kernel` in a 2-vCPU, 256 MiB guest and waits until the console log satisfies
/// `reached` (at most `timeout`; a crash ends the wait at once), then pauses the guest
/// and returns the boot vCPU's registers, checked to be still in long mode (the other
/// vCPU is checked to be still waiting for the kernel to start it).
fn boot_linux_until(
    kernel: &str,
    milestone: &str,
    reached: impl Fn(&str) -> bool,
    timeout: Duration,
) -> VcpuRegisters {
    berth_tests::require_root_and_kvm();
    let name = unique("linux");
    let boot = format!("{{kernel: \"{kernel}\", cmdline: \"{LINUX_CMDLINE}\"}}");
    // Two vCPUs: the second must wait for the kernel to start it (INIT/SIPI).
    let text = spec(&name, "{vcpus: 2}", "{size: 256MiB}", &boot);
    let vmm = Vmm::start(&name, &text).unwrap();
    let started = Instant::now();
    let mut c = vmm.client();
    loop {
        let console = vmm.console();
        if reached(&console) {
            break;
        }
        let status = c.status().unwrap();
        if status.state != GuestRunState::Running || started.elapsed() > timeout {
            if status.state == GuestRunState::Running {
                c.pause().unwrap();
            }
            panic!(
                "{milestone} not reached in {:?}: {status:?}\nregisters: {:x?}\nconsole:\n{console}",
                started.elapsed(),
                c.vcpu_registers()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed();
    let status = c.pause().unwrap();
    assert_eq!(status.state, GuestRunState::Paused, "{status:?}");
    let all = c.vcpu_registers().unwrap();
    let (regs, ap) = (all[0], all[1]);
    // The application processor has not run: still at the reset vector.
    assert_eq!(
        (ap.cs, ap.rip),
        (0xf000, 0xfff0),
        "vCPU 1 ran before the kernel started it: {ap:x?}"
    );
    let console = vmm.console();
    eprintln!(
        "{milestone} after {elapsed:.1?}; {} console bytes; ignored accesses {:?}; vCPU 0 at \
         rip {:#x} rsp {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}\n{console}",
        status.console.bytes,
        status.ignored_accesses,
        regs.rip,
        regs.rsp,
        regs.cr0,
        regs.cr3,
        regs.cr4,
        regs.efer
    );
    assert!(
        regs.efer & EFER_LMA != 0 && regs.cr0 & CR0_PG != 0,
        "left long mode: {regs:x?}"
    );
    regs
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// A bzImage does not get past decompression in reasonable time on this machine (PVM:
/// ~1 µs per guest instruction), so this checks the decompressor's own work: its first
/// serial output, and a vCPU that runs in the buffer it relocated itself to, on page
/// tables it built there. Opt in with `BERTH_TEST_KERNEL=/boot/vmlinuz-...` and
/// `--ignored`.
#[test]
#[ignore = "needs BERTH_TEST_KERNEL=<bzImage>"]
fn linux_bzimage_decompressor_prints_and_runs_its_own_code() {
    let kernel = std::env::var("BERTH_TEST_KERNEL").expect("BERTH_TEST_KERNEL=<bzImage>");
    let image = std::fs::read(&kernel).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    assert_eq!(&image[0x202..0x206], b"HdrS", "{kernel} is not a bzImage");
    // The decompressor moves itself to the end of init_size bytes from pref_address.
    let buffer_start = le_u64(&image, 0x258);
    let buffer = buffer_start..buffer_start + u64::from(le_u32(&image, 0x260));
    // Its first words: the KASLR notice of a CONFIG_RANDOMIZE_BASE kernel (Debian's),
    // or the banner of a CONFIG_X86_VERBOSE_BOOTUP one.
    let regs = boot_linux_until(
        &kernel,
        "the decompressor's first serial output",
        |console| {
            console.contains("KASLR disabled: 'nokaslr' on cmdline.")
                || console.contains("Decompressing Linux")
        },
        Duration::from_secs(30),
    );
    assert!(
        buffer.contains(&regs.rip),
        "rip {:#x} is outside the decompression buffer {buffer:x?}",
        regs.rip
    );
    assert!(
        buffer.contains(&regs.cr3),
        "cr3 {:#x}: the decompressor did not switch to its own page tables in {buffer:x?}",
        regs.cr3
    );
}

/// An uncompressed vmlinux starts at `startup_64` and reaches `start_kernel`, whose
/// boot log shows that the boot parameters arrived: the command line, the e820 map and
/// the MP table. Opt in with `BERTH_TEST_VMLINUX=<vmlinux>` and `--ignored` (a vmlinux
/// can be extracted from a bzImage, see the README).
#[test]
#[ignore = "needs BERTH_TEST_VMLINUX=<vmlinux>"]
fn linux_vmlinux_prints_its_boot_log() {
    let kernel = std::env::var("BERTH_TEST_VMLINUX").expect("BERTH_TEST_VMLINUX=<vmlinux>");
    let image = std::fs::read(&kernel).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    assert_eq!(&image[..4], b"\x7fELF", "{kernel} is not an ELF vmlinux");
    // The physical span of its PT_LOAD segments.
    let (phoff, phnum) = (le_u64(&image, 0x20) as usize, image[0x38] as usize);
    let loads = (0..phnum)
        .map(|i| &image[phoff + i * 56..phoff + (i + 1) * 56])
        .filter(|ph| le_u32(ph, 0) == 1)
        .map(|ph| (le_u64(ph, 0x18), le_u64(ph, 0x18) + le_u64(ph, 0x28)));
    let span = loads
        .reduce(|(s, e), (s2, e2)| (s.min(s2), e.max(e2)))
        .expect("PT_LOAD segments");
    let expected = [
        "Linux version ".to_owned(),
        format!("Command line: {LINUX_CMDLINE}"),
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable".to_owned(),
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]".to_owned(),
    ];
    let regs = boot_linux_until(
        &kernel,
        "the kernel's boot log",
        |console| expected.iter().all(|line| console.contains(line.as_str())),
        Duration::from_secs(50),
    );
    // Running kernel code at its link address, on the kernel's own page tables.
    assert!(
        regs.rip >= 0xffff_ffff_8000_0000,
        "rip {:#x} is not in the kernel text mapping",
        regs.rip
    );
    assert!(
        (span.0..span.1).contains(&regs.cr3),
        "cr3 {:#x} is not a page table inside the kernel image {span:x?}",
        regs.cr3
    );
}

#[test]
#[ignore = "opt-in: needs one contiguous free GiB, which a machine up for hours often lacks \
            even with 23 GiB free (README, berth-vmm); run with -- --ignored one_gib"]
fn one_gib_hugepage_backs_a_guest_and_comes_back() {
    berth_tests::require_root_and_kvm();
    // A 1 GiB page needs 1 GiB of contiguous free memory; dropping clean page cache (a
    // build leaves gigabytes of it) and compacting first makes that likely on a
    // machine that is not short of memory.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
    let pool = HugePagePool::new(PageSize::Huge1G);
    // Restored on drop, also when the test fails.
    let reservation = PoolReservation::grow(pool.clone(), 1).unwrap();
    assert_eq!(
        reservation.added(),
        1,
        "the kernel found no contiguous GiB for the 1 GiB pool"
    );
    let before = pool.stats().unwrap();
    let name = unique("hb-1g");
    let text = spec(
        &name,
        "{vcpus: 1}",
        "{size: 1GiB, hugepages: {pageSize: 1GiB}}",
        &heartbeat(100, 10, 1),
    );
    let mut vmm = Vmm::start(&name, &text).unwrap();
    assert_eq!(before.free - pool.stats().unwrap().free, 1);
    let status = vmm.status();
    assert_eq!(status.memory.hugepages, 1);
    assert_eq!(status.memory.backing, "hugetlb-1GiB");
    wait_until("a heartbeat", Duration::from_secs(10), || {
        vmm.console().contains("hb vcpu=0 n=10\n")
    });
    vmm.client().shutdown(Duration::from_secs(5)).unwrap();
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(pool.stats().unwrap().free, before.free);
    drop(reservation);
}
