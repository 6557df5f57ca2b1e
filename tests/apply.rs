//! `berth apply` end to end on real KVM, through the local driver: the example
//! manifests come up, pinning and memtune changes are retuned live, a hugepage backing
//! change is done by a local live migration, drift made by hand is planned and
//! corrected, a second apply is a no-op, an invalid revision changes nothing, and the
//! apply lock refuses a second apply. Run as root with /dev/kvm.
//!
//! Each test works in its own temporary state directory, with guest names (and so
//! cgroups) prefixed by the test and the process id. The tests of this file run one at
//! a time (they share two CPUs and the hugepage pool); the pool is resized under the
//! lock that `PoolReservation` takes, and given back on drop. Every VMM is stopped by
//! pid on drop, even when a test fails.

use berth_tests::proc_affinity;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_hypervisor::control::{Client, Status};
use berth_hypervisor::host::cgroup::Cgroups;
use berth_hypervisor::host::hugepages::HugePagePool;
use berth_schema::PageSize;

/// The tests of this file share two CPUs and the hugepage pool: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Pages of the example web guest (128 MiB of 2 MiB pages).
const WEB_PAGES: u64 = 64;

/// A manifest directory, a state directory, and everything to undo.
struct Fleet {
    _serial: MutexGuard<'static, ()>,
    root: tempfile::TempDir,
    web: String,
    batch: String,
    /// The pool size before the test; the Host manifest asks for this plus WEB_PAGES.
    pool_before: u64,
}

impl Fleet {
    fn new(test: &str) -> Fleet {
        berth_tests::require_root_and_kvm();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let root = tempfile::tempdir().expect("temp dir");
        let prefix = format!("{test}-{}", std::process::id());
        // Read under the pool lock, so that no other test's reservation is counted in.
        let pool_before = {
            let _lock = pool_lock();
            HugePagePool::new(PageSize::Huge2M).stats().unwrap().total
        };
        let fleet = Fleet {
            _serial: serial,
            root,
            web: format!("{prefix}-web"),
            batch: format!("{prefix}-batch"),
            pool_before,
        };
        std::fs::create_dir_all(fleet.manifests()).unwrap();
        fleet.write_hosts();
        fleet.write_guests(&Guests::default());
        fleet
    }

    fn manifests(&self) -> PathBuf {
        self.root.path().join("manifests")
    }

    fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }

    /// The example Host, with the pool grown by what the web guest needs, and KSM and
    /// THP as this host has them (other tests must not see them change).
    fn write_hosts(&self) {
        let (ksm, thp) = ksm_and_thp();
        let text = format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm01}}\nspec:\n  \
             address: 127.0.0.1:7410\n  cpus: \"0-1\"\n  memory: 16GiB\n  hugepages: {{2MiB: {}}}\n  \
             ksm: {{enabled: {ksm}}}\n  transparentHugepages: {thp}\n",
            self.pool_before + WEB_PAGES
        );
        std::fs::write(self.manifests().join("hosts.yaml"), text).unwrap();
    }

    /// The example guests (manifests/guests.yaml) with this test's names.
    fn write_guests(&self, g: &Guests) {
        let example =
            std::fs::read_to_string(berth_tests::workspace_root().join("manifests/guests.yaml"))
                .unwrap();
        let mut text = example
            .replace("name: web-1", &format!("name: {}", self.web))
            .replace("name: batch-1", &format!("name: {}", self.batch));
        for (from, to) in &g.edits {
            assert!(text.contains(from.as_str()), "the example has {from:?}");
            text = text.replace(from.as_str(), to);
        }
        std::fs::write(self.manifests().join("guests.yaml"), text).unwrap();
    }

    fn berth(&self, args: &[&str]) -> Output {
        self.berth_with_env(args, &[])
    }

    /// [`Fleet::berth`] with `env` added to its environment (and so to the VMMs it
    /// starts).
    fn berth_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = berth_tests::command("berth")
            .args(args)
            .envs(env.iter().copied())
            .arg("--state-dir")
            .arg(self.state())
            .arg("--host")
            .arg("kvm01")
            .output()
            .expect("run berth");
        eprintln!(
            "$ berth {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn apply(&self) -> String {
        let m = self.manifests();
        let out = self.berth(&["apply", "--yes", m.to_str().unwrap()]);
        assert!(out.status.success(), "berth apply failed");
        String::from_utf8(out.stdout).unwrap()
    }

    /// `berth plan --detailed-exitcode` with plan's default driver (local, as apply's):
    /// (exit code, stdout).
    fn plan(&self) -> (i32, String) {
        let m = self.manifests();
        let out = self.berth(&[
            "plan",
            "--detailed-exitcode",
            "--color",
            "never",
            m.to_str().unwrap(),
        ]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
        )
    }

    fn status(&self, name: &str) -> Status {
        Client::connect(self.state().join("guests").join(name).join("control.sock"))
            .and_then(|mut c| c.status())
            .unwrap_or_else(|e| panic!("status of {name}: {e}"))
    }

    fn pids(&self) -> Vec<i32> {
        [&self.web, &self.batch]
            .iter()
            .filter_map(|n| {
                Client::connect(self.state().join("guests").join(n).join("control.sock"))
                    .and_then(|mut c| c.status())
                    .ok()
                    .map(|s| s.pid)
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let pids = self.pids();
        let stopped = self.berth(&["stop", "--all"]);
        for pid in pids {
            if !stopped.status.success() || Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: kill takes no memory; the pid is a VMM this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(cgroups) = Cgroups::detect() {
            for name in [&self.web, &self.batch] {
                let _ = cgroups.remove_stale(name);
                let _ = cgroups.remove_stale(&format!("{name}.incoming"));
            }
            let _ = cgroups.remove_stale(&format!("{}-bad", self.web));
        }
        let _lock = pool_lock();
        let pool = HugePagePool::new(PageSize::Huge2M);
        if let Ok(now) = pool.stats() {
            if now.total > self.pool_before {
                let _ = pool.set_total(now.total.saturating_sub(WEB_PAGES).max(self.pool_before));
            }
        }
    }
}

/// Whether KSM runs, and the THP mode, as this host has them: the tests' Host manifests
/// ask for them, so that other tests do not see them change.
fn ksm_and_thp() -> (bool, String) {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap()
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']').map(str::to_owned))
        .unwrap();
    let ksm = std::fs::read_to_string("/sys/kernel/mm/ksm/run")
        .unwrap()
        .trim()
        == "1";
    (ksm, thp)
}

/// Text replacements in the example guests.
#[derive(Default)]
struct Guests {
    edits: Vec<(String, String)>,
}

impl Guests {
    fn edit(mut self, from: &str, to: &str) -> Self {
        self.edits.push((from.to_owned(), to.to_owned()));
        self
    }
}

/// The lock `PoolReservation` holds while it resizes the pool.
fn pool_lock() -> File {
    berth_hypervisor::host::hugepages::lock_pools().expect("the hugepage pool lock")
}

fn vcpu_tids(status: &Status) -> Vec<i32> {
    status.vcpu.iter().filter_map(|v| v.tid).collect()
}

fn cgroup_file(status: &Status, file: &str) -> String {
    let paths = status.cgroup.as_ref().unwrap()["paths"].as_array().unwrap();
    let dir = paths
        .iter()
        .filter_map(|p| p.as_str())
        .find(|p| Path::new(p).join(file).exists())
        .unwrap_or_else(|| panic!("no cgroup dir has {file}: {paths:?}"));
    std::fs::read_to_string(Path::new(dir).join(file))
        .unwrap()
        .trim()
        .to_owned()
}

/// Heartbeat ticks per vCPU.
fn ticks(status: &Status) -> BTreeMap<u32, u64> {
    status
        .vcpu
        .iter()
        .filter_map(|v| Some((v.index, v.ticks?)))
        .collect()
}

/// Waits until every vCPU's tick counter has passed `before`.
fn wait_ticks_past(fleet: &Fleet, name: &str, before: &BTreeMap<u32, u64>) -> BTreeMap<u32, u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = ticks(&fleet.status(name));
        if before
            .iter()
            .all(|(i, t)| now.get(i).is_some_and(|n| n > t))
        {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: heartbeats did not continue: before {before:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn examples_come_up_retune_live_and_a_second_apply_does_nothing() {
    let fleet = Fleet::new("ap-live");
    let out = fleet.apply();
    assert!(
        out.contains(&format!("done      start {} on kvm01", fleet.web)),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "done      configure host kvm01: spec.hugepages.2MiB {} -> {}",
            fleet.pool_before,
            fleet.pool_before + WEB_PAGES
        )),
        "{out}"
    );
    assert!(out.contains("The fleet matches the manifests."), "{out}");
    // Right after apply, plan (its default driver and the same state directory) sees
    // what apply did.
    let (code, plan) = fleet.plan();
    assert_eq!(code, 0, "no changes right after apply: {plan}");
    let applied: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.state().join("applied.json")).unwrap())
            .unwrap();
    assert!(
        applied["revision"].as_str().unwrap().starts_with("sha256:"),
        "{applied}"
    );
    assert_eq!(applied["host"], "kvm01");

    // The example as written: pinned vCPUs, hugepages, memtune, in /proc and cgroupfs.
    let web = fleet.status(&fleet.web);
    let tids = vcpu_tids(&web);
    assert_eq!(proc_affinity(web.pid, tids[0]), "0");
    assert_eq!(proc_affinity(web.pid, tids[1]), "1");
    assert_eq!(web.memory.hugepages, WEB_PAGES);
    assert_eq!(
        cgroup_file(&web, "memory.limit_in_bytes"),
        (192 * MIB).to_string()
    );
    let batch = fleet.status(&fleet.batch);
    assert_eq!(batch.vcpus, 1);

    // berth get guests shows both, with the pinning in force.
    let out = fleet.berth(&["get", "guests"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME "), "{table}");
    let web_row = table.lines().find(|l| l.starts_with(&fleet.web)).unwrap();
    assert!(web_row.contains("0:0 1:1 emu:0-1"), "{web_row}");
    assert!(web_row.contains("64x2MiB"), "{web_row}");
    assert!(web_row.contains("192MiB"), "{web_row}");

    // A second apply does nothing.
    let out = fleet.apply();
    assert!(
        out.contains("No changes. The fleet matches the manifests."),
        "{out}"
    );
    assert_eq!(fleet.status(&fleet.web).pid, web.pid);

    // Swap the pins and raise the hard limit: retuned live, same VMM, heartbeats go on.
    let before = wait_ticks_past(&fleet, &fleet.web, &ticks(&web));
    fleet.write_guests(
        &Guests::default()
            .edit(
                "pinning: {vcpus: {0: \"0\", 1: \"1\"}, emulator: \"0-1\"}",
                "pinning: {vcpus: {0: \"1\", 1: \"0\"}, emulator: \"0-1\"}",
            )
            .edit("tune: {hardLimit: 192MiB", "tune: {hardLimit: 224MiB"),
    );
    let (code, plan) = fleet.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains(&format!("~ guest {}: retune live", fleet.web)),
        "{plan}"
    );
    let out = fleet.apply();
    assert!(
        out.contains(&format!(
            "done      retune {} on kvm01: spec.cpu.pinning.vcpus, spec.memory.tune.hardLimit",
            fleet.web
        )),
        "{out}"
    );
    let after = fleet.status(&fleet.web);
    assert_eq!(after.pid, web.pid, "the VMM was not replaced");
    assert_eq!(vcpu_tids(&after), tids);
    assert_eq!(proc_affinity(web.pid, tids[0]), "1");
    assert_eq!(proc_affinity(web.pid, tids[1]), "0");
    assert_eq!(
        cgroup_file(&after, "memory.limit_in_bytes"),
        (224 * MIB).to_string()
    );
    let now = ticks(&after);
    for (i, t) in &before {
        assert!(now[i] >= *t, "vCPU {i} went back: {before:?} -> {now:?}");
    }
    wait_ticks_past(&fleet, &fleet.web, &now);
    assert_eq!(fleet.plan().0, 0, "converged after the retune");
}

#[test]
fn drift_by_hand_is_planned_and_corrected() {
    let fleet = Fleet::new("ap-drift");
    fleet.apply();
    let web = fleet.status(&fleet.web);
    let batch = fleet.status(&fleet.batch);
    let tids = vcpu_tids(&web);

    // taskset on a vCPU thread, a cgroup limit written by hand, a VMM killed by hand.
    let taskset = Command::new("taskset")
        .args(["-p", "-c", "1", &tids[0].to_string()])
        .output()
        .expect("run taskset");
    assert!(taskset.status.success(), "{taskset:?}");
    let limit_dir = web.cgroup.as_ref().unwrap()["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .find(|p| Path::new(p).join("memory.limit_in_bytes").exists())
        .unwrap()
        .to_owned();
    std::fs::write(
        Path::new(&limit_dir).join("memory.limit_in_bytes"),
        (256 * MIB).to_string(),
    )
    .unwrap();
    // SAFETY: kill takes no memory; the pid is the batch guest's VMM.
    assert_eq!(unsafe { libc::kill(batch.pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}/status", batch.pid)).exists()
        && std::fs::read_to_string(format!("/proc/{}/status", batch.pid))
            .is_ok_and(|s| !s.contains("State:\tZ"))
    {
        assert!(Instant::now() < deadline, "the killed VMM is still there");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (code, plan) = fleet.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains(&format!(
            "retune {} on kvm01: spec.cpu.pinning.vcpus, spec.memory.tune.hardLimit",
            fleet.web
        )),
        "{plan}"
    );
    assert!(
        plan.contains("-      0: '1'"),
        "the drifted pin in the diff: {plan}"
    );
    assert!(plan.contains("-    hardLimit: 256MiB"), "{plan}");
    assert!(
        plan.contains(&format!("start {} on kvm01", fleet.batch)),
        "{plan}"
    );

    let out = fleet.apply();
    assert!(
        out.contains("3 done, 0 failed") || out.contains("2 done, 0 failed"),
        "{out}"
    );
    assert_eq!(proc_affinity(web.pid, tids[0]), "0");
    assert_eq!(
        cgroup_file(&fleet.status(&fleet.web), "memory.limit_in_bytes"),
        (192 * MIB).to_string()
    );
    assert_eq!(fleet.status(&fleet.web).pid, web.pid);
    let restarted = fleet.status(&fleet.batch);
    assert_ne!(restarted.pid, batch.pid);
    assert_eq!(fleet.plan().0, 0, "converged after correcting the drift");
}

#[test]
fn hugepage_backing_change_is_a_local_migration() {
    let fleet = Fleet::new("ap-mig");
    // The VMMs do not confirm `Running` (as if `Done` were lost): the new VMM of the
    // local migration keeps its committed marker until apply has seen the old one go.
    let m = fleet.manifests();
    let out = fleet.berth_with_env(
        &["apply", "--yes", m.to_str().unwrap()],
        &[("BERTH_FAULT", "skip-done")],
    );
    assert!(out.status.success(), "berth apply failed");
    let web = fleet.status(&fleet.web);
    assert_eq!(web.memory.backing, "hugetlb-2MiB");
    // berth writes one start file, JSON (with the pinning's integer keys as strings),
    // and berth-vmm read it as its --spec: the guest runs pinned.
    let dir = fleet.state().join("guests").join(&fleet.web);
    let start: berth_schema::Guest =
        serde_json::from_slice(&std::fs::read(dir.join("start.json")).unwrap()).unwrap();
    assert!(start.spec.cpu.pinning.is_some());
    assert!(!dir.join("start.yaml").exists());
    let tids = vcpu_tids(&web);
    assert_eq!(proc_affinity(web.pid, tids[1]), "1");
    // A VMM started by an older berth has `start.yaml` instead: after the upgrade it is
    // observed the same (plan finds nothing to change), and migrated from.
    std::fs::write(
        dir.join("start.yaml"),
        serde_yaml::to_string(&start).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(dir.join("start.json")).unwrap();
    assert_eq!(fleet.plan().0, 0, "a start.yaml of an older berth is read");
    let before = wait_ticks_past(&fleet, &fleet.web, &ticks(&web));

    fleet.write_guests(&Guests::default().edit("    hugepages: {pageSize: 2MiB}\n", ""));
    let (code, plan) = fleet.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains(&format!(
            "<-> guest {}: migrate locally into a new VMM",
            fleet.web
        )),
        "{plan}"
    );
    let out = fleet.apply();
    assert!(
        out.contains(&format!(
            "done      migrate {} into a new VMM on kvm01",
            fleet.web
        )),
        "{out}"
    );
    let after = fleet.status(&fleet.web);
    assert_ne!(after.pid, web.pid, "a new VMM runs the guest");
    assert_eq!(after.memory.backing, "anonymous");
    assert_eq!(after.memory.hugepages, 0);
    // The guest did not restart: its counters carried over and keep rising.
    let carried = ticks(&after);
    for (i, t) in &before {
        assert!(
            carried[i] >= *t,
            "vCPU {i} restarted: {before:?} -> {carried:?}"
        );
    }
    wait_ticks_past(&fleet, &fleet.web, &carried);
    // Pinning and memtune are in force in the new VMM.
    let tids = vcpu_tids(&after);
    assert_eq!(proc_affinity(after.pid, tids[0]), "0");
    assert_eq!(proc_affinity(after.pid, tids[1]), "1");
    assert_eq!(
        cgroup_file(&after, "memory.limit_in_bytes"),
        (192 * MIB).to_string()
    );
    assert_eq!(fleet.plan().0, 0, "converged after the migration");
    // The new VMM's start file is the new one, alone.
    assert!(dir.join("start.json").exists() && !dir.join("start.yaml").exists());
    // Its committed marker went once the old VMM was gone.
    let incoming = fleet
        .state()
        .join("guests")
        .join(format!("{}.incoming", fleet.web));
    assert!(!incoming.exists(), "the committed marker was left behind");
}

#[test]
fn an_invalid_revision_changes_nothing_and_git_revisions_are_recorded() {
    let fleet = Fleet::new("ap-git");
    let repo = fleet.manifests();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .current_dir(&repo)
            .args(args)
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "add", "."]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "good",
    ]);
    let good = git(&["rev-parse", "HEAD"]);
    let repo_arg = repo.to_str().unwrap();
    let out = fleet.berth(&["apply", "--yes", "--rev", "main", "--repo", repo_arg]);
    assert!(out.status.success());
    let applied = std::fs::read_to_string(fleet.state().join("applied.json")).unwrap();
    assert!(applied.contains(&good), "{applied}");
    let pids = fleet.pids();
    assert_eq!(pids.len(), 2);

    // An invalid revision: nothing is applied, nothing changes.
    fleet.write_guests(
        &Guests::default()
            .edit("vcpus: 2\n", "vcpus: two\n")
            .edit("tune: {hardLimit: 192MiB", "tune: {hardLimit: 256MiB"),
    );
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qam",
        "bad",
    ]);
    let out = fleet.berth(&["apply", "--yes", "--rev", "main", "--repo", repo_arg]);
    assert_eq!(out.status.code(), Some(1), "invalid manifests exit 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not valid; nothing was applied"),
        "{stderr}"
    );
    assert!(stderr.contains("guests.yaml:"), "names the file: {stderr}");
    assert_eq!(fleet.pids(), pids);
    let web = fleet.status(&fleet.web);
    assert_eq!(
        cgroup_file(&web, "memory.limit_in_bytes"),
        (192 * MIB).to_string()
    );
    assert_eq!(
        std::fs::read_to_string(fleet.state().join("applied.json")).unwrap(),
        applied,
        "the applied revision stays the last good one"
    );
}

#[test]
fn a_second_apply_is_refused_by_the_lock_and_a_failed_start_is_reported() {
    let fleet = Fleet::new("ap-lock");
    std::fs::create_dir_all(fleet.state()).unwrap();
    // berth serve holds the lock in the middle of one of its actions (this process, as
    // serve does: flock, pid and name).
    let lock_path = fleet.state().join("apply.lock");
    std::fs::write(&lock_path, format!("{} berth serve\n", std::process::id())).unwrap();
    let lock = File::options()
        .read(true)
        .write(true)
        .open(&lock_path)
        .unwrap();
    // SAFETY: flock on a descriptor `lock` owns; no memory is passed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    let m = fleet.manifests();
    let out = fleet.berth(&["apply", "--yes", m.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("berth serve (pid {}) holds", std::process::id()))
            && stderr.contains("apply.lock"),
        "{stderr}"
    );
    assert!(fleet.pids().is_empty(), "nothing was started");

    // With --wait, the apply runs once the lock is released.
    let waiter = berth_tests::command("berth")
        .args(["apply", "--yes", "--wait", "--host", "kvm01", "--state-dir"])
        .arg(fleet.state())
        .arg(&m)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        fleet.pids().is_empty(),
        "the waiting apply did not start yet"
    );
    drop(lock);
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    let pids = fleet.pids();
    assert_eq!(pids.len(), 2);

    // A guest whose VMM cannot start (its kernel is missing): the report names the
    // VMM's error, the exit code says it failed, and the running guests are untouched.
    let bad = format!("{}-bad", fleet.web);
    std::fs::write(
        m.join("bad.yaml"),
        format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {bad}}}\nspec:\n  \
             host: kvm01\n  boot: {{kernel: /nonexistent/vmlinux}}\n  cpu: {{vcpus: 1}}\n  \
             memory: {{size: 64MiB}}\n"
        ),
    )
    .unwrap();
    let out = fleet.berth(&["apply", "--yes", m.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("FAILED    start {bad} on kvm01")),
        "{stdout}"
    );
    assert!(
        stdout.contains("/nonexistent/vmlinux"),
        "the VMM's error: {stdout}"
    );
    assert!(
        !fleet
            .state()
            .join("guests")
            .join(&bad)
            .join("control.sock")
            .exists(),
        "no VMM runs for the failed guest"
    );
    assert_eq!(fleet.pids(), pids, "both guests still run, once each");
}

#[test]
fn a_host_naming_a_cpu_this_machine_lacks_fails_apply_and_changes_nothing() {
    let fleet = Fleet::new("ap-cpu64");
    let hosts = fleet.manifests().join("hosts.yaml");
    let text = std::fs::read_to_string(&hosts).unwrap();
    std::fs::write(&hosts, text.replace("cpus: \"0-1\"", "cpus: \"0-1,64\"")).unwrap();
    // Validation and a simulated plan cannot know this machine: they accept it.
    let m = fleet.manifests();
    let out = berth_tests::command("berth")
        .args(["validate", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let out = fleet.berth(&["apply", "--yes", m.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:6:9: error: spec.cpus: CPU 64 is not online on this machine",
        hosts.display()
    );
    assert!(stderr.contains(&expected), "{expected} in:\n{stderr}");
    assert!(
        stderr.contains("does not match this machine; nothing was applied"),
        "{stderr}"
    );
    assert!(fleet.pids().is_empty(), "no guest was started");
    assert!(!fleet.state().join("guests").join(&fleet.web).exists());
    assert!(!fleet.state().join("applied.json").exists());
    let _lock = pool_lock();
    assert_eq!(
        HugePagePool::new(PageSize::Huge2M).stats().unwrap().total,
        fleet.pool_before,
        "the hugepage pool was not touched"
    );
}

/// One row of DESIGN.md's live table, applied to the batch guest on top of the rows
/// before it: the edit, and how the local driver declares it is applied.
struct Row {
    from: &'static str,
    to: &'static str,
    /// Each changed field (as the JSON plan names it) and its class.
    changes: &'static [(&'static str, &'static str)],
}

const LIVE: &str = "live";
const LOCAL_MIGRATION: &str = "localMigration";

/// Every row the local driver can show on one host, in an order that keeps each step
/// one row (host placement needs two services: tests/serve_kvm.rs; hugepage backing:
/// `hugepage_backing_change_is_a_local_migration`).
const ROWS: &[Row] = &[
    Row {
        from: "pinning: {emulator: \"0\"}",
        to: "pinning: {vcpus: {0: \"1\"}, emulator: \"0\"}",
        changes: &[("vcpuPinning", LIVE)],
    },
    Row {
        from: "pinning: {vcpus: {0: \"1\"}, emulator: \"0\"}",
        to: "pinning: {vcpus: {0: \"1\"}, emulator: \"1\"}",
        changes: &[("emulatorPinning", LIVE)],
    },
    Row {
        from: "tune: {hardLimit: 128MiB}",
        to: "tune: {hardLimit: 160MiB, softLimit: 96MiB, swapHardLimit: 256MiB, minGuarantee: 32MiB}",
        changes: &[
            ("hardLimit", LIVE),
            ("softLimit", LIVE),
            ("swapHardLimit", LIVE),
            ("minGuarantee", LIVE),
        ],
    },
    Row {
        from: "io: {weight: 200}",
        to: "io: {weight: 300}",
        changes: &[("ioWeight", LIVE)],
    },
    Row {
        from: "vcpus: 1\n    maxVcpus: 2",
        to: "vcpus: 2\n    maxVcpus: 2",
        changes: &[("vcpus", LIVE)],
    },
    Row {
        from: "labels: {tier: batch}\nspec:\n  host: kvm01\n",
        to: "labels: {tier: batch}\nspec:\n  host: kvm01\n  state: paused\n",
        changes: &[("state", LIVE)],
    },
    Row {
        from: "  state: paused\n",
        to: "",
        changes: &[("state", LIVE)],
    },
    Row {
        from: "labels: {tier: batch}",
        to: "labels: {tier: batch, team: infra}",
        changes: &[("labels", LIVE)],
    },
    // berth-vmm gives KSM advice and binds NUMA memory when it maps guest memory: both
    // are made by a local live migration, as its capabilities declare.
    Row {
        from: "size: 64MiB\n",
        to: "size: 64MiB\n    sharePages: true\n",
        changes: &[("sharePages", LOCAL_MIGRATION)],
    },
    Row {
        from: "sharePages: true\n",
        to: "sharePages: true\n    numa: {mode: strict, nodeset: \"0\"}\n",
        changes: &[("numa", LOCAL_MIGRATION)],
    },
    Row {
        from: "size: 64MiB\n",
        to: "size: 96MiB\n",
        changes: &[("memorySize", LOCAL_MIGRATION)],
    },
    Row {
        from: "vcpus: 2\n    maxVcpus: 2",
        to: "vcpus: 2\n    maxVcpus: 3",
        changes: &[("maxVcpus", LOCAL_MIGRATION)],
    },
    Row {
        from: "maxVcpus: 3\n",
        to: "maxVcpus: 3\n    mode: custom\n    model: kvm64\n",
        changes: &[("cpuMode", LOCAL_MIGRATION), ("cpuModel", LOCAL_MIGRATION)],
    },
    Row {
        from: "size: 96MiB\n",
        to: "size: 96MiB\n    locked: true\n",
        changes: &[("locked", LOCAL_MIGRATION)],
    },
    // A decrease: blocked without restartPolicy, then a restart with it.
    Row {
        from: "vcpus: 2\n    maxVcpus: 3",
        to: "vcpus: 1\n    maxVcpus: 3",
        changes: &[("vcpus", "blocked")],
    },
    Row {
        from: "  host: kvm01\n  cpu:\n    vcpus: 1\n",
        to: "  host: kvm01\n  restartPolicy: ifRequired\n  cpu:\n    vcpus: 1\n",
        changes: &[("vcpus", "restart")],
    },
];

impl Fleet {
    /// `berth plan --driver local --format json`, the batch guest's plan (null when
    /// nothing changes).
    fn batch_plan(&self) -> serde_json::Value {
        let m = self.manifests();
        let out = self.berth(&[
            "plan",
            "--driver",
            "local",
            "--format",
            "json",
            m.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "berth plan failed");
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        plan["guests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == self.batch.as_str())
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

#[test]
fn every_row_of_the_live_table_is_applied_as_the_local_driver_declares() {
    let fleet = Fleet::new("ap-rows");
    fleet.apply();
    let mut edits = Guests::default();
    for row in ROWS {
        edits = edits.edit(row.from, row.to);
        fleet.write_guests(&edits);
        let before = fleet.status(&fleet.batch);
        let plan = fleet.batch_plan();
        let planned: Vec<(String, String)> = plan["changes"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no changes planned: {plan}", row.to))
            .iter()
            .map(|c| {
                (
                    c["field"].as_str().unwrap().to_owned(),
                    c["class"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = row
            .changes
            .iter()
            .map(|(f, c)| ((*f).to_owned(), (*c).to_owned()))
            .collect();
        assert_eq!(planned, expected, "{}: {plan}", row.to);

        let m = fleet.manifests();
        let out = fleet.berth(&["apply", "--yes", m.to_str().unwrap()]);
        let blocked = row.changes.iter().any(|(_, c)| *c == "blocked");
        assert_eq!(out.status.success(), !blocked, "{}: apply", row.to);
        let after = fleet.status(&fleet.batch);
        let same_vmm = row.changes.iter().all(|(_, c)| *c == LIVE) || blocked;
        assert_eq!(
            after.pid == before.pid,
            same_vmm,
            "{}: the VMM was {}replaced",
            row.to,
            if same_vmm { "" } else { "not " }
        );
        if !blocked {
            // What was planned is what the driver did: nothing is left to do.
            assert_eq!(
                fleet.batch_plan(),
                serde_json::Value::Null,
                "{}: not converged",
                row.to
            );
        }
    }
    // What the rows asked for is in force in the last VMM, read back from it.
    let batch = fleet.status(&fleet.batch);
    assert_eq!(batch.vcpus, 1);
    assert!(batch.memory.share_pages, "KSM advice in force");
    assert_eq!(
        cgroup_file(&batch, "memory.limit_in_bytes"),
        (160 * MIB).to_string()
    );
}

/// Two hosts on this machine, each a state directory: `berth apply --host kvm02` does
/// not start a guest that kvm01 may still run. kvm01 runs no `berth serve`, so it
/// cannot be asked, and kvm02 applied the revision that placed the guest on kvm01:
/// kvm02 refuses and names kvm01.
#[test]
fn apply_on_a_second_host_refuses_a_guest_the_first_may_still_run() {
    berth_tests::require_root_and_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = tempfile::tempdir().unwrap();
    let guest = format!("ap-two-{}", std::process::id());
    let (kvm01, kvm02) = (root.path().join("kvm01"), root.path().join("kvm02"));
    // Addresses nothing listens on.
    let silent = || {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let (ksm, thp) = ksm_and_thp();
    let hosts: String = [("kvm01", silent()), ("kvm02", silent())]
        .iter()
        .map(|(name, address)| {
            format!(
                "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {name}}}\nspec:\n  \
                 address: \"{address}\"\n  cpus: \"0-1\"\n  memory: 4GiB\n  \
                 ksm: {{enabled: {ksm}}}\n  transparentHugepages: {thp}\n---\n"
            )
        })
        .collect();
    let manifests = root.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let place = |host: &str| {
        let text = format!(
            "{hosts}apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {guest}}}\n\
             spec: {{host: {host}, cpu: {{vcpus: 1}}, memory: {{size: 32MiB}}}}\n"
        );
        std::fs::write(manifests.join("fleet.yaml"), text).unwrap();
    };
    let apply = |host: &str, state: &Path| {
        let out = berth_tests::command("berth")
            .args(["apply", "--yes", "--host", host, "--state-dir"])
            .arg(state)
            .arg(&manifests)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("$ berth apply --host {host}\n{text}");
        (out.status.success(), text)
    };
    let socket = |state: &Path| state.join("guests").join(&guest).join("control.sock");
    struct Stop(Vec<PathBuf>, String);
    impl Drop for Stop {
        fn drop(&mut self) {
            for state in &self.0 {
                let sock = state.join("guests").join(&self.1).join("control.sock");
                if let Ok(status) = Client::connect(&sock).and_then(|mut c| c.status()) {
                    // SAFETY: kill takes no memory; the pid is a VMM this test started.
                    unsafe { libc::kill(status.pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(cgroups) = Cgroups::detect() {
                let _ = cgroups.remove_stale(&self.1);
            }
        }
    }
    let _stop = Stop(vec![kvm01.clone(), kvm02.clone()], guest.clone());

    place("kvm01");
    let (ok, out) = apply("kvm01", &kvm01);
    assert!(ok, "{out}");
    let running = Client::connect(socket(&kvm01))
        .and_then(|mut c| c.status())
        .expect("the guest runs on kvm01");
    let (ok, out) = apply("kvm02", &kvm02);
    assert!(ok && out.contains("No changes."), "{out}");

    // The manifest moves it; kvm02's apply cannot ask kvm01 and refuses, naming it.
    place("kvm02");
    let (ok, out) = apply("kvm02", &kvm02);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("kvm01 may still run {guest} and cannot be asked")),
        "{out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert!(
        !socket(&kvm02).exists(),
        "no second copy was started on kvm02"
    );
    assert!(
        Path::new(&format!("/proc/{}", running.pid)).exists(),
        "kvm01 still runs it"
    );
}

/// A VMM that holds its lock but does not answer (the real VMM, frozen with SIGSTOP, as
/// a loaded machine or a source paused in an unknown switchover can leave it) runs its
/// guest: `get guests` lists it as unresponsive, `plan` and `apply` leave it alone and
/// never start a second copy; once it answers again, nothing is left to do.
#[test]
fn a_vmm_that_does_not_answer_is_left_alone_and_never_started_twice() {
    berth_tests::require_root_and_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = tempfile::tempdir().unwrap();
    let guest = format!("ap-frozen-{}", std::process::id());
    let (state, manifests) = (root.path().join("state"), root.path().join("manifests"));
    std::fs::create_dir_all(&manifests).unwrap();
    let (ksm, thp) = ksm_and_thp();
    std::fs::write(
        manifests.join("fleet.yaml"),
        format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm01}}\nspec:\n  \
             address: 127.0.0.1:7410\n  cpus: \"0-1\"\n  memory: 4GiB\n  \
             ksm: {{enabled: {ksm}}}\n  transparentHugepages: {thp}\n---\n\
             apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {guest}}}\n\
             spec: {{host: kvm01, cpu: {{vcpus: 1}}, memory: {{size: 32MiB}}}}\n"
        ),
    )
    .unwrap();
    let berth = |args: &[&str]| {
        let out = berth_tests::command("berth")
            .args(args)
            .args(["--host", "kvm01", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "$ berth {}\n{stdout}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), stdout)
    };
    /// Thaws and kills the VMM, whatever the test's outcome.
    struct Frozen(i32, String);
    impl Drop for Frozen {
        fn drop(&mut self) {
            // SAFETY: kill takes no memory; the pid is the VMM this test started.
            unsafe {
                libc::kill(self.0, libc::SIGCONT);
                libc::kill(self.0, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(cgroups) = Cgroups::detect() {
                let _ = cgroups.remove_stale(&self.1);
            }
        }
    }
    let m = manifests.to_str().unwrap();
    let (code, out) = berth(&["apply", "--yes", m]);
    assert_eq!(code, 0, "{out}");
    let socket = state.join("guests").join(&guest).join("control.sock");
    let pid = Client::connect(&socket)
        .and_then(|mut c| c.status())
        .expect("the guest runs")
        .pid;
    let frozen = Frozen(pid, guest.clone());
    // SAFETY: kill takes no memory; the pid is the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    let (code, out) = berth(&["get", "guests", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(rows[0]["name"], guest.as_str(), "{out}");
    assert_eq!(rows[0]["state"], "unresponsive", "{out}");
    assert_eq!(rows[0]["pid"], pid, "{out}");

    let (code, out) = berth(&["plan", "--detailed-exitcode", "--color", "never", m]);
    assert_eq!(code, 2, "reported, not hidden: {out}");
    assert!(out.contains("did not answer"), "{out}");
    assert!(!out.contains("+ guest"), "no start: {out}");

    let (code, out) = berth(&["apply", "--yes", m]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("did not answer"), "{out}");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the frozen VMM still runs"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("guests").join(&guest).join("pid"))
            .unwrap()
            .trim(),
        pid.to_string(),
        "no second VMM took the guest's directory"
    );

    // SAFETY: kill takes no memory; the pid is the VMM this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (code, out) = berth(&["plan", "--detailed-exitcode", "--color", "never", m]);
    assert_eq!(code, 0, "answering again, it needs nothing: {out}");
    let (code, out) = berth(&["stop", guest.as_str()]);
    assert_eq!(code, 0, "{out}");
    drop(frozen);
}
