//! Live migration end to end, on real KVM: heartbeat guests that dirty pages every tick
//! move between two berth-vmm processes on this host and between two network
//! namespaces; faults on the way (destination killed, link cut, wrong token, a flipped
//! byte, a truncated stream, a page beyond guest memory, a lost `Commit` or `Running`)
//! leave the guest running on the source and the receiver gone cleanly. The corners of
//! exactly-once (a destination failing after `Commit`, shutdown in an unknown
//! switchover, a failed handover, a late keepalive, a failed resume, a page on the
//! wrong connection) are driven by the test-only `BERTH_FAULT` knob; a tcpdump capture
//! shows the stream encrypted. Run as root with /dev/kvm (and tcpdump).
//!
//! Every test cleans up what it made (VMM processes by pid, namespaces, state
//! directories, cgroups, hugepages) through guards, also when it fails.

use berth_tests::{proc_affinity, unique, wait_until};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_hypervisor::control::protocol::{Op, Retune};
use berth_hypervisor::control::{Client, GuestRunState, Status};
use berth_hypervisor::host::cgroup::Cgroups;
use berth_hypervisor::host::hugepages::{HugePagePool, PoolReservation};
use berth_hypervisor::migration::precheck::{SourceConfig, SourceIdentity, CONFIG_VERSION};
use berth_hypervisor::migration::wire::{self, FrameKind, FrameReader, FrameWriter, Token};
use berth_hypervisor::migration::{
    MigrateArgs, MigrateResolveArgs, MigrationPhase, MigrationStatus,
};
use berth_schema::PageSize;

fn spec(name: &str, cpu: &str, memory: &str, dirty: u32) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: kvm01\n  cpu: {cpu}\n  memory: {memory}\n  boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 100, ticksPerLine: 10, dirtyPagesPerTick: {dirty}}}}}\n"
    )
}

/// A berth-vmm process; killed by pid on drop, with its cgroups removed.
struct Vmm {
    child: Option<Child>,
    name: String,
    socket: PathBuf,
    /// For an incoming VMM: listen address and token.
    incoming: Option<(String, String)>,
    stderr: PathBuf,
    /// The exit code, once reaped.
    exit: Option<Option<i32>>,
}

impl Vmm {
    /// Starts `berth-vmm run` (with `prefix` before it, e.g. `ip netns exec NS`).
    fn start(
        root: &Path,
        name: &str,
        spec_text: &str,
        incoming: Option<&str>,
        prefix: &[&str],
    ) -> Result<Vmm, String> {
        Vmm::start_with_faults(root, name, spec_text, incoming, prefix, "")
    }

    /// [`Vmm::start`] with the test-only `BERTH_FAULT` set to `faults` (see
    /// `berth_hypervisor::migration::fault`).
    fn start_with_faults(
        root: &Path,
        name: &str,
        spec_text: &str,
        incoming: Option<&str>,
        prefix: &[&str],
        faults: &str,
    ) -> Result<Vmm, String> {
        let tag = if incoming.is_some() { "in" } else { "src" };
        let spec_path = root.join(format!("{name}-{tag}.yaml"));
        std::fs::write(&spec_path, spec_text).unwrap();
        let stderr = root.join(format!("{name}-{tag}.stderr"));
        let vmm_bin = berth_tests::bin("berth-vmm");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&vmm_bin);
                c
            }
            None => Command::new(&vmm_bin),
        };
        cmd.arg("run")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--state-dir")
            .arg(root);
        // The listen address, then any further incoming options.
        if let Some(addr) = incoming {
            cmd.arg("--incoming").args(addr.split_whitespace());
        }
        if faults.is_empty() {
            cmd.env_remove("BERTH_FAULT");
        } else {
            cmd.env("BERTH_FAULT", faults);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn berth-vmm");
        let line = berth_tests::first_stdout_line(&mut child, Duration::from_secs(20));
        let mut vmm = Vmm {
            child: Some(child),
            name: name.to_owned(),
            socket: PathBuf::new(),
            incoming: None,
            stderr,
            exit: None,
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ready", sock] => vmm.socket = PathBuf::from(sock),
            ["ready", sock, "incoming", addr, token] => {
                vmm.socket = PathBuf::from(sock);
                vmm.incoming = Some((addr.to_string(), token.to_string()));
            }
            _ => {
                vmm.wait_exit(Duration::from_secs(10));
                return Err(vmm.stderr_text());
            }
        }
        Ok(vmm)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect to the control socket")
    }

    fn status(&self) -> Status {
        self.client().status().expect("status")
    }

    /// Answers the source's `switchoverUnknown` (`migrateResolve`).
    fn resolve_switchover(&self, destination_running: bool) {
        self.client()
            .call(Op::MigrateResolve(MigrateResolveArgs {
                destination_running,
            }))
            .expect("migrateResolve");
    }

    fn migration(&self) -> MigrationStatus {
        serde_json::from_value(
            self.client()
                .call(Op::MigrateStatus)
                .expect("migrateStatus"),
        )
        .expect("a migration status")
    }

    fn migrate(&self, dest: &str, token: &str, policy: &str, connections: u32) {
        let args = MigrateArgs {
            destination: dest.to_owned(),
            token: token.to_owned(),
            policy: serde_json::from_str(policy).expect("a policy"),
            connections: Some(connections),
        };
        self.client()
            .call(Op::Migrate(args))
            .expect("migrate accepted");
    }

    /// Waits until the migration leaves its running phases; the final status. A source
    /// that completed exits at once: its status is then the last one seen, marked
    /// `Completed` when the process ended with status 0.
    fn migration_outcome(&mut self, timeout: Duration) -> MigrationStatus {
        self.watch_migration(timeout, |_| {})
    }

    /// [`Vmm::migration_outcome`], showing every status seen to `watch`.
    fn watch_migration(
        &mut self,
        timeout: Duration,
        mut watch: impl FnMut(&MigrationStatus),
    ) -> MigrationStatus {
        let deadline = Instant::now() + timeout;
        let mut last = MigrationStatus::default();
        loop {
            let st = match Client::connect(&self.socket)
                .ok()
                .and_then(|mut c| c.call(Op::MigrateStatus).ok())
            {
                Some(v) => serde_json::from_value::<MigrationStatus>(v).expect("a status"),
                None => {
                    let code = self.wait_exit(Duration::from_secs(10));
                    assert_eq!(
                        code,
                        Some(0),
                        "the VMM went away: {last:?}\n{}",
                        self.stderr_text()
                    );
                    last.phase = MigrationPhase::Completed;
                    return last;
                }
            };
            watch(&st);
            if !matches!(
                st.phase,
                MigrationPhase::Prechecks
                    | MigrationPhase::Precopy
                    | MigrationPhase::Switchover
                    | MigrationPhase::Loaded
            ) {
                return st;
            }
            last = st;
            assert!(
                Instant::now() < deadline,
                "migration still {:?}: {last:?}",
                last.phase
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let Some(child) = self.child.as_mut() else {
            return self.exit.flatten();
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.exit = Some(status.code());
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "berth-vmm {} did not exit in {timeout:?}",
                self.name
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

    fn ticks(&self) -> Vec<u64> {
        self.status().vcpu.iter().filter_map(|v| v.ticks).collect()
    }

    /// Asserts that the guest is running here: its tick counters move.
    fn assert_beating(&self) {
        let before = self.ticks();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.ticks();
            if now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a > b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guest does not beat here: {before:?} -> {now:?}"
            );
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill9();
        if let Ok(cgroups) = Cgroups::detect() {
            let _ = cgroups.remove_stale(&self.name);
            let _ = cgroups.remove_stale(&format!("{}.incoming", self.name));
        }
    }
}

use berth_tests::heartbeats;

/// Every vCPU's counters go up by exactly `per_line` per line: no gap, no repeat.
fn assert_continuous(lines: &BTreeMap<u32, Vec<u64>>, per_line: u64, at_least: usize) {
    assert!(!lines.is_empty(), "no heartbeat lines");
    for (vcpu, ns) in lines {
        berth_tests::assert_continuous(*vcpu, ns, per_line, at_least);
    }
}

fn cgroup_of(pid: i32, controller: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == controller))
        })
        .and_then(|l| l.split(':').nth(2))
        .unwrap_or_default()
        .to_owned()
}

/// Checks the incoming directory and cgroup are gone (the receiver cleaned up).
fn assert_incoming_gone(root: &Path, name: &str) {
    let dir = root.join("guests").join(format!("{name}.incoming"));
    wait_until(
        "the incoming directory to go",
        Duration::from_secs(5),
        || !dir.exists(),
    );
    if let Ok(cgroups) = Cgroups::detect() {
        assert!(
            cgroups.open(&format!("{name}.incoming")).unwrap().is_none(),
            "the incoming cgroup is left behind"
        );
    }
}

const FAST: &str = r#"{"maxDowntime":"30ms"}"#;

#[test]
fn local_migration_keeps_heartbeats_memory_pinning_and_memtune() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-local");
    let text = spec(
        &name,
        "{vcpus: 2, pinning: {vcpus: {0: \"0\", 1: \"1\"}, emulator: \"0-1\"}}",
        "{size: 64MiB, tune: {hardLimit: 512MiB}}",
        4,
    );
    let mut src = Vmm::start(root.path(), &name, &text, None, &[]).unwrap();
    let mut dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    let (addr, token) = dst.incoming.clone().unwrap();
    assert_eq!(dst.migration().phase, MigrationPhase::Listening);
    assert_eq!(dst.migration().token.as_deref(), Some(token.as_str()));
    // Let the guest dirty pages for a while.
    wait_until("a few heartbeats", Duration::from_secs(10), || {
        src.ticks().iter().all(|&t| t >= 50)
    });
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    // The destination took the guest's directory, lock, socket and cgroup.
    let guest_dir = root.path().join("guests").join(&name);
    dst.socket = guest_dir.join("control.sock");
    wait_until("the handover", Duration::from_secs(10), || {
        dst.socket.exists() && dst.migration().relocation.is_some()
    });
    let relocation = dst.migration().relocation.unwrap();
    assert!(relocation.ends_with(&name), "{relocation}");
    // The vCPUs' XSAVE areas came whole, at this host's KVM size.
    assert_eq!(dst.migration().xsave_bytes, Some(host_xsave_size()));
    assert_incoming_gone(root.path(), &name);
    dst.assert_beating();
    std::thread::sleep(Duration::from_millis(300));
    // The guest's whole console history stays in console.log: the source's lines, then
    // the destination's; the move rotated nothing out.
    assert!(!guest_dir.join("console.log.1").exists());
    let lines = heartbeats(&[guest_dir.join("console.log")]);
    assert_continuous(&lines, 10, 3);
    let report = dst.client().verify_memory().unwrap();
    assert!(report.ok(), "{:?}", report.bad);
    assert!(report.written > 100, "{report:?}");
    let status = dst.status();
    assert_eq!(status.state, GuestRunState::Running);
    for (i, want) in [(0, "0"), (1, "1")] {
        let tid = status.vcpu[i].tid.unwrap();
        assert_eq!(proc_affinity(dst.pid(), tid), want);
    }
    assert!(cgroup_of(dst.pid(), "memory").ends_with(&format!("/{name}")));
    let values = status.cgroup.unwrap()["values"].to_string();
    assert!(
        values.contains(r#""hardLimit":{"enforced":"512MiB"}"#),
        "{values}"
    );
    assert_eq!(
        std::fs::read_to_string(guest_dir.join("pid"))
            .unwrap()
            .trim(),
        dst.pid().to_string()
    );
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn restart_class_changes_apply_through_a_local_migration() {
    berth_tests::require_root_and_kvm();
    let pool = HugePagePool::new(PageSize::Huge2M);
    let reservation = PoolReservation::grow(pool.clone(), 48).unwrap();
    assert_eq!(
        reservation.added(),
        48,
        "the kernel could not grow the pool"
    );
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-grow");
    let before = spec(&name, "{vcpus: 2}", "{size: 64MiB}", 4);
    let after = spec(
        &name,
        "{vcpus: 2, maxVcpus: 3}",
        "{size: 96MiB, hugepages: {pageSize: 2MiB}}",
        4,
    );
    let mut src = Vmm::start(root.path(), &name, &before, None, &[]).unwrap();
    let free_before = pool.stats().unwrap().free;
    let mut dst = Vmm::start(root.path(), &name, &after, Some("127.0.0.1:0"), &[]).unwrap();
    assert_eq!(pool.stats().unwrap().free, free_before - 48);
    let (addr, token) = dst.incoming.clone().unwrap();
    wait_until("heartbeats", Duration::from_secs(10), || {
        src.ticks().iter().all(|&t| t >= 30)
    });
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    dst.socket = root.path().join("guests").join(&name).join("control.sock");
    wait_until("the handover", Duration::from_secs(10), || {
        dst.socket.exists()
    });
    dst.assert_beating();
    let status = dst.status();
    assert_eq!(status.memory.size, 96 << 20);
    assert_eq!(status.memory.backing, "hugetlb-2MiB");
    assert_eq!(status.memory.hugepages, 48);
    assert_eq!((status.vcpus, status.max_vcpus), (2, 3));
    let report = dst.client().verify_memory().unwrap();
    assert!(report.ok(), "{:?}", report.bad);
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(pool.stats().unwrap().free, free_before);
}

/// `VmLck` of process `pid`, bytes.
fn locked_bytes(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmLck in /proc/<pid>/status");
    kib << 10
}

/// Migrates `src`'s guest `name` into `dst` on this host and waits until `dst` has
/// taken the guest's directory; `src` has exited.
fn migrate_locally(root: &Path, name: &str, src: &mut Vmm, dst: &mut Vmm) {
    let (addr, token) = dst.incoming.clone().unwrap();
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    dst.socket = root.join("guests").join(name).join("control.sock");
    wait_until("the handover", Duration::from_secs(10), || {
        dst.socket.exists() && dst.migration().relocation.is_some()
    });
}

#[test]
fn local_migrations_lock_and_unlock_guest_memory() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-lock");
    let size = 64u64 << 20;
    let unlocked = spec(&name, "{vcpus: 2}", "{size: 64MiB, locked: false}", 4);
    let locked = spec(&name, "{vcpus: 2}", "{size: 64MiB, locked: true}", 4);
    let guest_dir = root.path().join("guests").join(&name);

    let mut first = Vmm::start(root.path(), &name, &unlocked, None, &[]).unwrap();
    assert_eq!(locked_bytes(first.pid()), 0);
    let mut second = Vmm::start(root.path(), &name, &locked, Some("127.0.0.1:0"), &[]).unwrap();
    wait_until("heartbeats", Duration::from_secs(10), || {
        first.ticks().iter().all(|&t| t >= 30)
    });
    migrate_locally(root.path(), &name, &mut first, &mut second);
    second.assert_beating();
    let lck = locked_bytes(second.pid());
    assert!(lck >= size, "VmLck {lck} after migrating into locked: true");
    assert!(second.status().memory.locked >= size);

    // And back: unlocked again.
    let mut third = Vmm::start(root.path(), &name, &unlocked, Some("127.0.0.1:0"), &[]).unwrap();
    migrate_locally(root.path(), &name, &mut second, &mut third);
    third.assert_beating();
    assert_eq!(locked_bytes(third.pid()), 0);
    std::thread::sleep(Duration::from_millis(300));
    // Two local migrations later, console.log holds the three VMMs' lines in order.
    assert!(!guest_dir.join("console.log.1").exists());
    let lines = heartbeats(&[guest_dir.join("console.log")]);
    assert_continuous(&lines, 10, 6);
    let report = third.client().verify_memory().unwrap();
    assert!(report.ok(), "{:?}", report.bad);
    third.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(third.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn vcpus_added_by_a_local_migration_start_beating_and_can_be_hot_added() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-vcpus");
    // vCPU 1 is the source's hot-add reserve; vCPUs 2 and 3 exist only on the
    // destination, whose memory grew.
    let before = spec(&name, "{vcpus: 1, maxVcpus: 2}", "{size: 64MiB}", 4);
    let after = spec(&name, "{vcpus: 3, maxVcpus: 4}", "{size: 96MiB}", 4);
    let guest_dir = root.path().join("guests").join(&name);
    let mut src = Vmm::start(root.path(), &name, &before, None, &[]).unwrap();
    let mut dst = Vmm::start(root.path(), &name, &after, Some("127.0.0.1:0"), &[]).unwrap();
    wait_until("heartbeats", Duration::from_secs(10), || {
        src.ticks().iter().all(|&t| t >= 30)
    });
    migrate_locally(root.path(), &name, &mut src, &mut dst);
    let status = dst.status();
    assert_eq!((status.vcpus, status.max_vcpus), (3, 4));
    dst.assert_beating();
    // vCPU 3 is hot-added after the switchover, as on any guest.
    dst.client()
        .retune(&Retune {
            vcpus: Some(4),
            ..Default::default()
        })
        .unwrap();
    wait_until("vCPU 3 to beat", Duration::from_secs(5), || {
        dst.ticks().len() == 4 && dst.ticks()[3] >= 20
    });
    dst.assert_beating();
    std::thread::sleep(Duration::from_millis(300));
    // The source's lines (vCPU 0 only) come first in console.log, then the
    // destination's.
    let log = std::fs::read_to_string(guest_dir.join("console.log")).unwrap();
    let first_other = log
        .lines()
        .position(|l| l.starts_with("hb vcpu=") && !l.starts_with("hb vcpu=0 "))
        .expect("lines of the added vCPUs");
    assert!(
        log.lines()
            .take(first_other)
            .filter(|l| l.starts_with("hb vcpu=0 "))
            .count()
            >= 3,
        "the source's history leads console.log"
    );
    let lines = heartbeats(&[guest_dir.join("console.log")]);
    assert_continuous(&lines, 10, 2);
    assert_eq!(lines.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    for vcpu in 1..4 {
        assert_eq!(lines[&vcpu][0], 10, "vCPU {vcpu} starts counting from zero");
    }
    // The new vCPUs dirty their own share of the memory that grew, and it verifies.
    let report = dst.client().verify_memory().unwrap();
    assert!(report.ok(), "{:?}", report.bad);
    let pages = |mib: u64| mib * 256;
    assert!(report.pages > pages(90), "{report:?}");
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Two network namespaces joined by a veth pair; deleted on drop.
struct NetPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl NetPair {
    fn new() -> NetPair {
        let pid = std::process::id();
        let pair = NetPair {
            a: format!("berth-t-{pid}-a"),
            b: format!("berth-t-{pid}-b"),
        };
        let net = format!("10.254.{}", pid % 250);
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        let (va, vb) = (
            format!("bta{}", pid % 100000),
            format!("btb{}", pid % 100000),
        );
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        ip(&[
            "-n",
            &pair.a,
            "addr",
            "add",
            &format!("{net}.1/30"),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            &format!("{net}.2/30"),
            "dev",
            &vb,
        ]);
        for (ns, dev) in [(&pair.a, &va), (&pair.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn addr_b(&self) -> String {
        format!("10.254.{}.2", std::process::id() % 250)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

#[test]
fn migration_between_two_network_namespaces() {
    berth_tests::require_root_and_kvm();
    let net = NetPair::new();
    // Two "hosts": separate namespaces and separate state roots.
    let root_a = tempfile::tempdir().unwrap();
    let root_b = tempfile::tempdir().unwrap();
    let name = unique("mig-netns");
    let text = spec(
        &name,
        "{vcpus: 2}",
        "{size: 64MiB, tune: {hardLimit: 256MiB}}",
        4,
    );
    // nsenter enters only the network namespace (`ip netns exec` would also remount
    // /sys, hiding the cgroup filesystems).
    let (path_a, path_b) = (
        format!("--net=/var/run/netns/{}", net.a),
        format!("--net=/var/run/netns/{}", net.b),
    );
    let ns_a = ["nsenter", path_a.as_str()];
    let ns_b = ["nsenter", path_b.as_str()];
    let mut src = Vmm::start(root_a.path(), &name, &text, None, &ns_a).unwrap();
    let listen = format!("{}:0", net.addr_b());
    let mut dst = Vmm::start(root_b.path(), &name, &text, Some(&listen), &ns_b).unwrap();
    let (addr, token) = dst.incoming.clone().unwrap();
    assert!(addr.starts_with(&net.addr_b()), "{addr}");
    wait_until("heartbeats", Duration::from_secs(10), || {
        src.ticks().iter().all(|&t| t >= 30)
    });
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    let dir_b = root_b.path().join("guests").join(&name);
    dst.socket = dir_b.join("control.sock");
    wait_until("the handover", Duration::from_secs(15), || {
        dst.socket.exists()
    });
    dst.assert_beating();
    std::thread::sleep(Duration::from_millis(300));
    let lines = heartbeats(&[
        root_a.path().join("guests").join(&name).join("console.log"),
        dir_b.join("console.log"),
    ]);
    assert_continuous(&lines, 10, 3);
    assert!(dst.client().verify_memory().unwrap().ok());
    let values = dst.status().cgroup.unwrap()["values"].to_string();
    assert!(
        values.contains(r#""hardLimit":{"enforced":"256MiB"}"#),
        "{values}"
    );
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

/// How the test proxy mistreats the stream from the source to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Flip one byte at this offset of the first connection.
    Flip(usize),
    /// Close both ways after this many bytes of the first connection.
    Truncate(usize),
    /// Stop forwarding (both ways, sockets left open) after this many bytes.
    Stall(usize),
    /// Swallow the `Commit` frame and cut the link.
    DropCommit,
    /// Swallow the `Commit` frame and hold the link open and silent (the source waits
    /// for `Running` until its timeout).
    HoldCommit,
    /// Swallow the `State` frame and cut the link (the guest is paused at the source,
    /// and `Commit` was not sent).
    CutAtState,
    /// Forward `Commit`, swallow `Running`, cut the link.
    DropRunning,
}

/// A TCP proxy in front of an incoming VMM; stops with its owner.
struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: &str, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target: SocketAddr = target.parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut first = true;
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { break };
                let server = TcpStream::connect(target).unwrap();
                held.push((client.try_clone().unwrap(), server.try_clone().unwrap()));
                let fault = first.then_some(fault);
                first = false;
                spawn_pumps(client, server, fault, Arc::clone(&stop2));
            }
        });
        Proxy { addr, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn spawn_pumps(client: TcpStream, server: TcpStream, fault: Option<Fault>, stop: Arc<AtomicBool>) {
    let cut = Arc::new(AtomicBool::new(false));
    let sockets = [client.try_clone().unwrap(), server.try_clone().unwrap()];
    let cut_all = {
        let cut = Arc::clone(&cut);
        move |close: bool| {
            cut.store(true, Ordering::SeqCst);
            if close {
                for s in &sockets {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    };
    // Destination to source: plain, unless cut.
    {
        let (mut from, mut to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        let cut = Arc::clone(&cut);
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    // Source to destination: frame by frame after the source's hello.
    let (mut from, mut to) = (client, server);
    std::thread::spawn(move || {
        let mut offset = 0usize;
        let mut forward = |bytes: &mut [u8], to: &mut TcpStream| -> bool {
            if let Some(Fault::Flip(at)) = fault {
                if (offset..offset + bytes.len()).contains(&at) {
                    bytes[at - offset] ^= 0x40;
                }
            }
            let limit = match fault {
                Some(Fault::Truncate(n)) | Some(Fault::Stall(n)) => Some(n),
                _ => None,
            };
            if let Some(limit) = limit {
                if offset + bytes.len() > limit {
                    let keep = limit.saturating_sub(offset);
                    let _ = to.write_all(&bytes[..keep]);
                    offset = limit;
                    return false;
                }
            }
            offset += bytes.len();
            to.write_all(bytes).is_ok()
        };
        let mut hello = [0u8; wire::HELLO_S_LEN];
        // The source's hello comes after the destination's (forwarded by the other pump).
        if from.read_exact(&mut hello).is_err() || !forward(&mut hello, &mut to) {
            return finish(fault, cut_all, &stop);
        }
        loop {
            let mut header = [0u8; wire::HEADER_LEN];
            if from.read_exact(&mut header).is_err() {
                break;
            }
            let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len.min(wire::MAX_PAYLOAD) + wire::TAG_LEN];
            if from.read_exact(&mut body).is_err() {
                break;
            }
            if header[0] == FrameKind::State as u8 && fault == Some(Fault::CutAtState) {
                return finish(fault, cut_all, &stop);
            }
            let commit = header[0] == FrameKind::Commit as u8;
            if commit && matches!(fault, Some(Fault::DropCommit | Fault::HoldCommit)) {
                return finish(fault, cut_all, &stop);
            }
            if !forward(&mut header, &mut to) || !forward(&mut body, &mut to) {
                return finish(fault, cut_all, &stop);
            }
            if commit && fault == Some(Fault::DropRunning) {
                // Nothing more reaches the source (Running is swallowed); the destination
                // gets time to read Commit before the link goes.
                cut_all(false);
                std::thread::sleep(Duration::from_millis(300));
                return finish(fault, cut_all, &stop);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn finish(fault: Option<Fault>, cut_all: impl Fn(bool), stop: &AtomicBool) {
    match fault {
        Some(Fault::Stall(_) | Fault::HoldCommit) => {
            // Hold the link open and silent until the test ends.
            cut_all(false);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            cut_all(true);
        }
        _ => cut_all(true),
    }
}

/// A source and an incoming VMM for one fault test.
fn fault_pair(tag: &str, dirty: u32, size: &str) -> (tempfile::TempDir, String, Vmm, Vmm) {
    let root = tempfile::tempdir().unwrap();
    let name = unique(tag);
    let text = spec(&name, "{vcpus: 2}", &format!("{{size: {size}}}"), dirty);
    let src = Vmm::start(root.path(), &name, &text, None, &[]).unwrap();
    let dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    wait_until("heartbeats", Duration::from_secs(10), || {
        src.ticks().iter().all(|&t| t >= 30)
    });
    (root, name, src, dst)
}

/// After a failed migration: the source's guest runs, untouched; the receiver exited
/// non-zero and left nothing behind.
fn assert_source_kept_guest(root: &Path, name: &str, src: &mut Vmm, dst: &mut Vmm) {
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Failed, "{outcome:?}");
    assert!(outcome.error.is_some());
    let code = dst.wait_exit(Duration::from_secs(15));
    assert!(matches!(code, Some(c) if c != 0), "receiver exit {code:?}");
    assert_eq!(src.status().state, GuestRunState::Running);
    src.assert_beating();
    assert!(src.client().verify_memory().unwrap().ok());
    assert_incoming_gone(root, name);
    let lines = heartbeats(&[root.join("guests").join(name).join("console.log")]);
    assert_continuous(&lines, 10, 3);
}

#[test]
fn killing_the_destination_mid_pass_leaves_the_guest_on_the_source() {
    berth_tests::require_root_and_kvm();
    let (root, name, mut src, mut dst) = fault_pair("mig-kill", 20, "64MiB");
    let (addr, token) = dst.incoming.clone().unwrap();
    // A slow link keeps the first pass going.
    src.migrate(
        &addr,
        &token,
        r#"{"bandwidth":"1MiB/s","autoConverge":false}"#,
        2,
    );
    wait_until("pages on the wire", Duration::from_secs(10), || {
        src.migration().bytes_sent > 256 << 10
    });
    let pid = dst.pid();
    dst.kill9();
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Failed, "{outcome:?}");
    src.assert_beating();
    assert!(src.client().verify_memory().unwrap().ok());
    assert!(std::fs::metadata(format!("/proc/{pid}")).is_err());
    let lines = heartbeats(&[root.path().join("guests").join(&name).join("console.log")]);
    assert_continuous(&lines, 10, 3);
}

#[test]
fn a_wrong_token_is_refused_and_the_receiver_stays_clean() {
    berth_tests::require_root_and_kvm();
    let (root, name, mut src, mut dst) = fault_pair("mig-token", 2, "64MiB");
    let (addr, _) = dst.incoming.clone().unwrap();
    let wrong = Token::generate().unwrap().to_hex();
    src.migrate(&addr, &wrong, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Failed);
    assert!(
        outcome
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("token"),
        "{outcome:?}"
    );
    src.assert_beating();
    // The receiver refused the connection and still waits for the real source.
    let incoming = dst.migration();
    assert_eq!(incoming.phase, MigrationPhase::Listening);
    assert!(incoming.error.unwrap_or_default().contains("token"));
    dst.client().shutdown(Duration::from_secs(5)).unwrap();
    assert!(matches!(dst.wait_exit(Duration::from_secs(10)), Some(c) if c != 0));
    assert_incoming_gone(root.path(), &name);
}

#[test]
fn an_incoming_vmm_no_source_connects_to_exits_and_leaves_nothing() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-nosource");
    let text = spec(&name, "{vcpus: 1}", "{size: 32MiB}", 0);
    let started = Instant::now();
    let mut dst = Vmm::start(
        root.path(),
        &name,
        &text,
        Some("127.0.0.1:0 --source-timeout-ms 1000"),
        &[],
    )
    .unwrap();
    eprintln!("incoming VMM ready after {:?}", started.elapsed());
    assert_eq!(dst.migration().phase, MigrationPhase::Listening);
    // Nobody connects (the service that prepared it died): it gives up by itself.
    let code = dst.wait_exit(Duration::from_secs(20));
    let waited = started.elapsed();
    eprintln!("exited {code:?} after {waited:?}");
    assert!(matches!(code, Some(c) if c != 0), "exit {code:?}");
    assert!(waited >= Duration::from_secs(1), "exited after {waited:?}");
    assert!(
        dst.stderr_text().contains("No source connected within 1s"),
        "{}",
        dst.stderr_text()
    );
    assert_incoming_gone(root.path(), &name);
}

fn proxied_fault(tag: &str, fault: Fault) {
    berth_tests::require_root_and_kvm();
    let (root, name, mut src, mut dst) = fault_pair(tag, 4, "64MiB");
    let (addr, token) = dst.incoming.clone().unwrap();
    let proxy = Proxy::start(&addr, fault);
    src.migrate(&proxy.addr.to_string(), &token, FAST, 1);
    assert_source_kept_guest(root.path(), &name, &mut src, &mut dst);
    drop(proxy);
}

#[test]
fn a_flipped_byte_aborts_the_migration() {
    // Well past the handshake and the config: inside page data.
    proxied_fault("mig-flip", Fault::Flip(200_000));
}

#[test]
fn a_truncated_stream_aborts_the_migration() {
    proxied_fault("mig-trunc", Fault::Truncate(150_000));
}

#[test]
fn a_cut_link_aborts_the_migration() {
    proxied_fault("mig-cut", Fault::Stall(150_000));
}

/// A forger's connection 0 to `dst`: it knows the token and speaks the real protocol.
fn forge_connection(dst: &Vmm) -> (FrameWriter<TcpStream>, FrameReader<TcpStream>) {
    let (addr, token) = dst.incoming.clone().unwrap();
    let token = Token::from_hex(&token).unwrap();
    let mut conn = TcpStream::connect(&addr).unwrap();
    let key = wire::connect(&mut conn, &token, 0).unwrap();
    let w = FrameWriter::new(conn.try_clone().unwrap(), key.clone());
    let r = FrameReader::new(conn, key.for_replies());
    (w, r)
}

/// A config for a 64 MiB, 1-vCPU guest `name` that passes the pre-checks here.
fn forged_config(name: &str) -> SourceConfig {
    SourceConfig {
        version: CONFIG_VERSION,
        name: name.to_owned(),
        ranges: vec![(0, 64 << 20)],
        max_vcpus: 1,
        online_vcpus: 1,
        cpu_mode: berth_schema::CpuMode::Custom,
        cpu_vendor: String::new(),
        cpu_flags: Default::default(),
        long_mode: true,
        heartbeat: None,
        connections: 1,
        source: SourceIdentity {
            boot_id: "forged".into(),
            pid: 1,
        },
        xsave_size: host_xsave_size(),
    }
}

/// The XSAVE area size of this host's KVM, asked without berth's code:
/// KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on a fresh VM, at least the legacy 4 KiB.
fn host_xsave_size() -> u32 {
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
    const KVM_CAP_XSAVE2: libc::c_ulong = 208;
    let kvm = std::fs::File::open("/dev/kvm").expect("open /dev/kvm");
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: KVM_CREATE_VM on an open /dev/kvm fd takes a machine type (0) and returns
    // a new fd, owned at once below.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    assert!(vm >= 0, "KVM_CREATE_VM failed");
    // SAFETY: `vm` is a fresh fd nobody else owns.
    let vm = unsafe { std::fs::File::from_raw_fd(vm) };
    // SAFETY: KVM_CHECK_EXTENSION takes a capability number and only returns a value.
    let size = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2) };
    (size.max(0) as u32).max(4096)
}

#[test]
fn a_larger_xsave_area_than_this_host_takes_is_refused_in_the_prechecks() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-xsave");
    let text = spec(&name, "{vcpus: 1}", "{size: 64MiB}", 0);
    let mut dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    let (mut w, mut r) = forge_connection(&dst);
    let mut config = forged_config(&name);
    config.xsave_size = host_xsave_size() + 8192;
    w.send(FrameKind::Config, &[&serde_json::to_vec(&config).unwrap()])
        .unwrap();
    let verdict = r.recv().unwrap();
    assert_eq!(verdict.kind, FrameKind::Abort);
    let why = String::from_utf8_lossy(verdict.payload).into_owned();
    let want = format!(
        "XSAVE state is {} bytes per vCPU, this host's KVM takes only {}",
        config.xsave_size,
        host_xsave_size()
    );
    assert!(why.contains(&want), "{why}");
    let code = dst.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    assert!(dst.stderr_text().contains(&want), "{}", dst.stderr_text());
    assert_incoming_gone(root.path(), &name);
}

/// What a migration does with a vCPU's XSAVE area (save on one VM, encode, decode,
/// restore on another), with AVX-512 registers planted in it: every byte arrives, at
/// the size KVM_CAP_XSAVE2 gives on this host.
#[test]
fn extended_xsave_components_survive_save_encode_decode_and_restore() {
    use berth_hypervisor::arch::x86_64::cpuid;
    use berth_hypervisor::config::{Backing, MemoryConfig};
    use berth_hypervisor::migration::state::{
        saveable_msrs, DevicesState, MachineState, Persist as _, Vcpu, XsaveAbi, STATE_VERSION,
    };
    use berth_hypervisor::vstate::{memory, vcpu::VcpuHandle, vm::Vm};

    berth_tests::require_root_and_kvm();
    let machine = || {
        let mem = memory::create(&MemoryConfig {
            size: 4 << 20,
            backing: Backing::Anonymous,
            locked: false,
            share_pages: false,
            numa: None,
        })
        .unwrap();
        let vm = Vm::new(mem).unwrap();
        let supported = vm.supported_cpuid().unwrap();
        let ids = cpuid::for_vcpu(
            &supported,
            berth_schema::CpuMode::HostPassthrough,
            None,
            0,
            1,
        )
        .unwrap();
        let vcpu = VcpuHandle::create(&vm, 0, &ids).unwrap();
        (vm, vcpu)
    };
    let (source_vm, source) = machine();
    let (dest_vm, dest) = machine();
    let abi = XsaveAbi::of(source_vm.fd());
    assert_eq!(abi.size() as u32, host_xsave_size());
    let fd = source.fd();
    let msrs = saveable_msrs(source_vm.kvm(), &fd).unwrap();
    let source_vcpu = Vcpu {
        index: 0,
        fd: &fd,
        msrs: &msrs,
        xsave: abi,
    };
    let mut saved = source_vcpu.save().unwrap();
    assert_eq!(saved.xsave.len() as u32, host_xsave_size());

    // The guest may use the components its CPUID leaf 0xD offers (XCR0 bits): fill
    // AVX (2), opmask (5), ZMM_Hi256 (6) and Hi16_ZMM (7), where offered, with a
    // pattern at their standard-format offsets, and mark them present in XSTATE_BV.
    let leaf = |index: u32| {
        saved
            .cpuid
            .iter()
            .find(|e| e.function == 0xD && e.index == index)
            .map(|e| (e.eax, e.ebx, e.edx))
    };
    let (xcr0_low, _, xcr0_high) = leaf(0).expect("CPUID leaf 0xD");
    let xcr0 = u64::from(xcr0_low) | u64::from(xcr0_high) << 32;
    let mut planted = Vec::new();
    for component in [2u32, 5, 6, 7] {
        if xcr0 & (1 << component) == 0 {
            continue;
        }
        let (size, offset, _) = leaf(component).unwrap();
        let (offset, size) = (offset as usize, size as usize);
        for (i, byte) in saved.xsave[offset..offset + size].iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31) ^ (component as u8) | 1;
        }
        let mut bv = u64::from_le_bytes(saved.xsave[512..520].try_into().unwrap());
        bv |= 1 << component;
        saved.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
        planted.push((component, offset, size));
    }
    assert!(
        planted.iter().any(|&(c, ..)| c == 6),
        "this host's guests see no AVX-512 (XCR0 {xcr0:#x}); the test needs it"
    );
    source_vcpu.restore(&saved).unwrap();
    // KVM took them: a fresh read returns the planted bytes.
    let source_state = source_vcpu.save().unwrap();
    for &(component, offset, size) in &planted {
        assert_eq!(
            source_state.xsave[offset..offset + size],
            saved.xsave[offset..offset + size],
            "component {component} after KVM_SET_XSAVE on the source"
        );
    }

    let state = MachineState {
        version: STATE_VERSION,
        xsave_size: abi.size() as u32,
        vcpus: vec![source_state],
        online: 1,
        paused: false,
        vm: source_vm.save_state().unwrap(),
        devices: DevicesState::default(),
    };
    let bytes = state.encode().unwrap();
    let arrived = MachineState::decode(&bytes).unwrap();
    let dest_abi = XsaveAbi::of(dest_vm.fd());
    arrived.check_xsave(dest_abi).unwrap();
    let dest_fd = dest.fd();
    let dest_vcpu = Vcpu {
        index: 0,
        fd: &dest_fd,
        msrs: &[],
        xsave: dest_abi,
    };
    dest_vcpu.restore(&arrived.vcpus[0]).unwrap();
    let loaded = Vcpu {
        msrs: &msrs,
        ..dest_vcpu
    }
    .save()
    .unwrap();
    assert_eq!(loaded.xsave.len() as u32, host_xsave_size());
    assert!(
        loaded.xsave == state.vcpus[0].xsave,
        "the destination's XSAVE area differs from the source's"
    );
    for &(component, offset, size) in &planted {
        assert_eq!(
            loaded.xsave[offset..offset + size],
            saved.xsave[offset..offset + size],
            "component {component} on the destination"
        );
    }

    // A state from a host with a larger area is refused here, not truncated.
    let mut larger = MachineState::decode(&bytes).unwrap();
    larger.xsave_size += 4096;
    larger.vcpus[0].xsave.resize(larger.xsave_size as usize, 0);
    let larger = MachineState::decode(&larger.encode().unwrap()).unwrap();
    let err = larger.check_xsave(dest_abi).unwrap_err().to_string();
    assert!(err.contains("XSAVE areas are"), "{err}");
    assert!(Vcpu {
        index: 0,
        fd: &dest_fd,
        msrs: &[],
        xsave: dest_abi,
    }
    .restore(&larger.vcpus[0])
    .is_err());
}

#[test]
fn a_page_beyond_guest_memory_is_refused() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-forge");
    let text = spec(&name, "{vcpus: 1}", "{size: 64MiB}", 0);
    let mut dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    let (mut w, mut r) = forge_connection(&dst);
    w.send(
        FrameKind::Config,
        &[&serde_json::to_vec(&forged_config(&name)).unwrap()],
    )
    .unwrap();
    assert_eq!(r.recv().unwrap().kind, FrameKind::Info);
    let payload = wire::run_payload(64 << 20, 1);
    w.send(FrameKind::Pages, &[&payload]).unwrap();
    let code = dst.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    assert!(
        dst.stderr_text().contains("outside guest memory"),
        "{}",
        dst.stderr_text()
    );
    assert_incoming_gone(root.path(), &name);
}

/// A migration through a proxy that loses one switchover frame (`fault`), left in
/// `switchoverUnknown` on the source.
fn unknown_switchover(tag: &str, fault: Fault) -> (tempfile::TempDir, String, Vmm, Vmm, Proxy) {
    berth_tests::require_root_and_kvm();
    let (root, name, mut src, dst) = fault_pair(tag, 4, "64MiB");
    let (addr, token) = dst.incoming.clone().unwrap();
    let proxy = Proxy::start(&addr, fault);
    src.migrate(&proxy.addr.to_string(), &token, FAST, 1);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(
        outcome.phase,
        MigrationPhase::SwitchoverUnknown,
        "{outcome:?}"
    );
    (root, name, src, dst, proxy)
}

#[test]
fn a_lost_commit_keeps_the_guest_paused_until_resolved_then_resumes() {
    let (root, name, src, mut dst, proxy) = unknown_switchover("mig-nocommit", Fault::DropCommit);
    // Never twice: the source holds the guest paused.
    assert_eq!(src.status().state, GuestRunState::Paused);
    let ticks = src.ticks();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(src.ticks(), ticks);
    // The destination never read Commit: it gives up without running the guest.
    assert!(matches!(dst.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    assert_incoming_gone(root.path(), &name);
    src.resolve_switchover(false);
    wait_until("the source to resume", Duration::from_secs(5), || {
        src.status().state == GuestRunState::Running
    });
    src.assert_beating();
    assert!(src.client().verify_memory().unwrap().ok());
    drop(proxy);
}

#[test]
fn a_lost_running_keeps_the_source_paused_and_the_destination_runs() {
    let (root, name, mut src, mut dst, proxy) =
        unknown_switchover("mig-norunning", Fault::DropRunning);
    assert_eq!(src.status().state, GuestRunState::Paused);
    // The destination read Commit: the guest runs there, and only there.
    assert_eq!(dst.migration().phase, MigrationPhase::Completed);
    dst.assert_beating();
    let marker = committed_marker(root.path(), &name);
    assert!(marker.exists(), "no committed marker on the destination");
    src.resolve_switchover(true);
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    dst.socket = root.path().join("guests").join(&name).join("control.sock");
    wait_until("the handover", Duration::from_secs(15), || {
        dst.socket.exists()
    });
    dst.assert_beating();
    // The source never said it heard Running: the marker outlives the handover and the
    // VMM (the reconciler removes it once it has resolved the source), and it is all
    // that is left of the incoming directory.
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(marker.exists(), "the committed marker went with the VMM");
    let left: Vec<_> = std::fs::read_dir(marker.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["committed"]);
    drop(proxy);
}

/// The destination read `Commit` and ran the guest, `Running` was lost, and the guest
/// stopped there before anyone asked the destination: its committed marker stays, so
/// the answer is still "it ran there" and the source never resumes its stale copy.
#[test]
fn a_destination_stopped_before_the_source_is_resolved_still_counts_as_run() {
    let (root, name, mut src, mut dst, proxy) =
        unknown_switchover("mig-stopunres", Fault::DropRunning);
    assert_eq!(dst.migration().phase, MigrationPhase::Completed);
    // The source holds the guest's directory: the destination cannot hand over yet.
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let marker = committed_marker(root.path(), &name);
    assert!(
        marker.exists(),
        "the committed marker went with the VMM:\n{}",
        dst.stderr_text()
    );
    // And it keeps the answer: a new incoming VMM of the guest is refused.
    let text = spec(&name, "{vcpus: 2}", "{size: 64MiB}", 4);
    let err = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[])
        .err()
        .expect("a new incoming VMM refused while the marker is there");
    assert!(err.contains("committed"), "{err}");
    let left: Vec<_> = std::fs::read_dir(marker.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["committed"],
        "the refused VMM left files beside the marker"
    );
    assert_eq!(src.status().state, GuestRunState::Paused);
    src.resolve_switchover(true);
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);
}

/// An HA guest's incoming VMM is fenced from its start (`--fence-file`, as berth serve
/// starts it): a deadline already past refuses it, and one never renewed ends it (before
/// the commit the guest stays on its source), leaving nothing behind.
#[test]
fn an_incoming_vmm_of_an_ha_guest_is_fenced_from_its_start() {
    berth_tests::require_root_and_kvm();
    berth_tests::bin("berth-vmm");
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-fence");
    let text = spec(&name, "{vcpus: 1}", "{size: 16MiB}", 4);
    let file = root.path().join("fence-deadline");
    let incoming = format!("127.0.0.1:0 --fence-file {}", file.display());
    let now = berth_hypervisor::fence::monotonic_ms;
    std::fs::write(&file, format!("{}\n", now() - 1)).unwrap();
    let err = Vmm::start(root.path(), &name, &text, Some(&incoming), &[])
        .err()
        .expect("an incoming VMM past its fence deadline is refused");
    assert!(
        err.contains("has passed") && err.contains("not started"),
        "{err}"
    );
    assert_incoming_gone(root.path(), &name);

    std::fs::write(&file, format!("{}\n", now() + 1500)).unwrap();
    let mut dst = Vmm::start(root.path(), &name, &text, Some(&incoming), &[]).unwrap();
    let left = dst.status().fence_in_ms.expect("armed from the start");
    assert!(left <= 1500, "{left} ms");
    // Never renewed, no source: the VMM ends at the deadline.
    assert!(matches!(dst.wait_exit(Duration::from_secs(6)), Some(c) if c != 0));
    assert!(
        dst.stderr_text().contains("fence deadline passed"),
        "{}",
        dst.stderr_text()
    );
    assert_incoming_gone(root.path(), &name);
}

#[test]
fn a_fast_dirtier_on_a_capped_link_converges_with_auto_converge_and_aborts_without() {
    berth_tests::require_root_and_kvm();
    // 2 vCPUs x 40 pages x ~100 ticks/s: about 30 MB/s of dirty memory, 8 MiB/s link.
    let (root, name, mut src, mut dst) = fault_pair("mig-conv", 40, "32MiB");
    let (addr, token) = dst.incoming.clone().unwrap();
    src.migrate(
        &addr,
        &token,
        r#"{"maxDowntime":"30ms","bandwidth":"8MiB/s","autoConverge":false,"completionTimeoutPerGiB":"96s","onTimeout":"abort"}"#,
        2,
    );
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Failed, "{outcome:?}");
    assert!(
        outcome
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("converge"),
        "{outcome:?}"
    );
    assert!(matches!(dst.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    src.assert_beating();
    assert!(src.client().verify_memory().unwrap().ok());
    assert_incoming_gone(root.path(), &name);

    // Again with auto-converge: it throttles the guest until the rest fits.
    let text = spec(&name, "{vcpus: 2}", "{size: 32MiB}", 40);
    let mut dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    let (addr, token) = dst.incoming.clone().unwrap();
    src.migrate(
        &addr,
        &token,
        r#"{"maxDowntime":"30ms","bandwidth":"8MiB/s","autoConverge":true,"completionTimeoutPerGiB":"960s"}"#,
        2,
    );
    let mut max_throttle = 0;
    let outcome = src.watch_migration(Duration::from_secs(60), |st| {
        max_throttle = max_throttle.max(st.throttle_percent)
    });
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert!(max_throttle >= 20, "throttle never rose: {max_throttle}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    dst.socket = root.path().join("guests").join(&name).join("control.sock");
    wait_until("the handover", Duration::from_secs(15), || {
        dst.socket.exists()
    });
    dst.assert_beating();
    assert!(dst.client().verify_memory().unwrap().ok());
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

/// A source and an incoming VMM started with the test-only faults given (either may be
/// empty).
fn fault_pair_with(
    tag: &str,
    source_faults: &str,
    dest_faults: &str,
) -> (tempfile::TempDir, String, Vmm, Vmm) {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique(tag);
    let text = spec(&name, "{vcpus: 2}", "{size: 64MiB}", 4);
    let src = Vmm::start_with_faults(root.path(), &name, &text, None, &[], source_faults).unwrap();
    let dst = Vmm::start_with_faults(
        root.path(),
        &name,
        &text,
        Some("127.0.0.1:0"),
        &[],
        dest_faults,
    )
    .unwrap();
    wait_until("heartbeats", Duration::from_secs(10), || {
        src.ticks().iter().all(|&t| t >= 30)
    });
    (root, name, src, dst)
}

fn committed_marker(root: &Path, name: &str) -> PathBuf {
    root.join("guests")
        .join(format!("{name}.incoming"))
        .join("committed")
}

/// A destination that read `Commit` and then failed (`fault`) leaves its durable
/// committed marker and its answer is "ran"; the source stays paused in
/// `switchoverUnknown` (never resumed by itself), and a new incoming VMM of the guest
/// refuses to start while the marker is there.
///
/// The source's replies are delayed (`delay-reply-ms`): the answer to `migrateResolve`,
/// which ends the source, still arrives (a clean-clone CI run once found the connection
/// closed instead).
fn a_destination_failing_after_commit_counts_as_run(tag: &str, fault: &str, exit: i32) {
    let (root, name, mut src, mut dst) = fault_pair_with(tag, "delay-reply-ms=300", fault);
    let (addr, token) = dst.incoming.clone().unwrap();
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(
        outcome.phase,
        MigrationPhase::SwitchoverUnknown,
        "{outcome:?}"
    );
    assert_eq!(dst.wait_exit(Duration::from_secs(15)), Some(exit));
    let marker = committed_marker(root.path(), &name);
    assert!(
        marker.exists(),
        "no committed marker after the destination read Commit:\n{}",
        dst.stderr_text()
    );
    assert_eq!(src.status().state, GuestRunState::Paused);
    // A new incoming VMM would take the directory (and the answer) away: refused.
    let text = spec(&name, "{vcpus: 2}", "{size: 64MiB}", 4);
    let err = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[])
        .err()
        .expect("a new incoming VMM refused while the marker is there");
    assert!(err.contains("committed"), "{err}");
    assert!(marker.exists());
    // The answer the marker gives: the destination ran it; the source shuts down.
    src.resolve_switchover(true);
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_destination_that_dies_after_reading_commit_counts_as_run() {
    a_destination_failing_after_commit_counts_as_run("mig-diecommit", "exit-after-commit", 101);
}

#[test]
fn a_destination_whose_vcpus_fail_to_start_after_commit_counts_as_run() {
    a_destination_failing_after_commit_counts_as_run("mig-startfail", "start-fails", 1);
}

#[test]
fn shutdown_is_refused_in_an_unknown_switchover_unless_forced() {
    let (root, name, mut src, mut dst, proxy) = unknown_switchover("mig-nostop", Fault::DropCommit);
    assert!(matches!(dst.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    // The control op.
    let refused = src.client().shutdown(Duration::from_secs(2));
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("switchover is unknown")),
        "{refused:?}"
    );
    // SIGTERM.
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(src.pid(), libc::SIGTERM) }, 0);
    // `berth stop`.
    let berth = |extra: &[&str]| {
        Command::new(berth_tests::bin("berth"))
            .args(["stop", &name, "--state-dir"])
            .arg(root.path())
            .args(extra)
            .output()
            .expect("run berth stop")
    };
    let stop = berth(&[]);
    assert!(!stop.status.success(), "berth stop was not refused");
    let stderr = String::from_utf8_lossy(&stop.stderr);
    assert!(stderr.contains("switchover is unknown"), "{stderr}");
    // A resume could run the guest twice.
    let resumed = src.client().call(Op::Resume);
    assert!(
        matches!(&resumed, Err(e) if e.to_string().contains("resume refused")),
        "{resumed:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.status().state, GuestRunState::Paused);
    assert_eq!(src.migration().phase, MigrationPhase::SwitchoverUnknown);
    // The documented override.
    let forced = berth(&["--force-unknown-switchover"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);
}

#[test]
fn shutdown_and_resume_are_refused_between_commit_and_running() {
    // Commit is swallowed and the link stays open: the source waits for Running (up to
    // its 10 s timeout) with the guest paused, not knowing whether it runs elsewhere.
    let (root, name, mut src, mut dst) = fault_pair("mig-window", 4, "64MiB");
    let (addr, token) = dst.incoming.clone().unwrap();
    let proxy = Proxy::start(&addr, Fault::HoldCommit);
    src.migrate(&proxy.addr.to_string(), &token, FAST, 1);
    wait_until("Commit sent", Duration::from_secs(30), || {
        src.migration().commit_sent
    });
    let st = src.migration();
    assert_eq!(st.phase, MigrationPhase::Switchover, "{st:?}");
    // The control op, a resume, SIGTERM and `berth stop` are all refused.
    let refused = src.client().shutdown(Duration::from_secs(2));
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("Commit sent, no Running yet")),
        "{refused:?}"
    );
    let resumed = src.client().call(Op::Resume);
    assert!(
        matches!(&resumed, Err(e) if e.to_string().contains("resume refused")),
        "{resumed:?}"
    );
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(src.pid(), libc::SIGTERM) }, 0);
    let stop = Command::new(berth_tests::bin("berth"))
        .args(["stop", &name, "--state-dir"])
        .arg(root.path())
        .output()
        .expect("run berth stop");
    assert!(!stop.status.success(), "berth stop was not refused");
    std::thread::sleep(Duration::from_millis(300));
    // Still there (its control socket answers) and still paused.
    assert_eq!(src.status().state, GuestRunState::Paused);
    // No Running within the timeout: switchoverUnknown, still refusing.
    wait_until("switchoverUnknown", Duration::from_secs(20), || {
        src.migration().phase == MigrationPhase::SwitchoverUnknown
    });
    // The destination never read Commit: it gives up without running the guest.
    assert!(matches!(dst.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    src.resolve_switchover(false);
    wait_until("the resolution", Duration::from_secs(5), || {
        src.migration().phase == MigrationPhase::Failed
    });
    src.assert_beating();
    assert_incoming_gone(root.path(), &name);
    src.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);
}

#[test]
fn a_keepalive_after_loaded_does_not_abort_the_migration() {
    // The destination answers Loaded 2.5 s after the state: the source's connection 0,
    // idle meanwhile, sends its keepalive (every 1 s) before Commit.
    let (root, name, mut src, mut dst) =
        fault_pair_with("mig-keepalive", "", "delay-loaded-ms=2500");
    let (addr, token) = dst.incoming.clone().unwrap();
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    dst.socket = root.path().join("guests").join(&name).join("control.sock");
    wait_until("the handover", Duration::from_secs(15), || {
        dst.socket.exists()
    });
    dst.assert_beating();
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_failed_resume_after_an_unknown_switchover_is_reported_and_logging_stops() {
    let (root, name, mut src, mut dst) = fault_pair_with("mig-noresume", "resume-fails", "");
    let (addr, token) = dst.incoming.clone().unwrap();
    let proxy = Proxy::start(&addr, Fault::DropCommit);
    src.migrate(&proxy.addr.to_string(), &token, FAST, 1);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(
        outcome.phase,
        MigrationPhase::SwitchoverUnknown,
        "{outcome:?}"
    );
    assert!(
        outcome.dirty_logging,
        "dirty logging is on during a migration"
    );
    assert!(matches!(dst.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    src.resolve_switchover(false);
    wait_until("the resolution", Duration::from_secs(5), || {
        src.migration().phase == MigrationPhase::Failed
    });
    let st = src.migration();
    assert!(
        st.error
            .as_deref()
            .unwrap_or_default()
            .contains("resuming the guest here FAILED"),
        "{st:?}"
    );
    assert!(!st.dirty_logging, "dirty logging still on: {st:?}");
    // The guest is paused; the operator resumes it.
    assert_eq!(src.status().state, GuestRunState::Paused);
    src.client().call(Op::Resume).unwrap();
    src.assert_beating();
    assert_incoming_gone(root.path(), &name);
    drop(proxy);
}

#[test]
fn a_failed_resume_after_a_failure_before_commit_is_reported_and_logging_stops() {
    // The link is cut while the guest is paused for the switchover, before Commit: the
    // source resumes the guest; here that resume fails (fault), and it says so.
    let (root, name, mut src, mut dst) = fault_pair_with("mig-noresume2", "resume-fails", "");
    let (addr, token) = dst.incoming.clone().unwrap();
    let proxy = Proxy::start(&addr, Fault::CutAtState);
    src.migrate(&proxy.addr.to_string(), &token, FAST, 1);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Failed, "{outcome:?}");
    let error = outcome.error.clone().unwrap_or_default();
    assert!(
        error.contains("resuming the guest here FAILED"),
        "{outcome:?}"
    );
    assert!(
        !outcome.dirty_logging,
        "dirty logging still on: {outcome:?}"
    );
    assert!(matches!(dst.wait_exit(Duration::from_secs(15)), Some(c) if c != 0));
    assert_incoming_gone(root.path(), &name);
    // The guest is paused; the operator resumes it.
    assert_eq!(src.status().state, GuestRunState::Paused);
    src.client().call(Op::Resume).unwrap();
    src.assert_beating();
    drop(proxy);
}

#[test]
fn a_guest_whose_handover_fails_stays_visible_and_is_adopted() {
    let (root, name, mut src, mut dst) = fault_pair_with("mig-handover", "", "handover-fails");
    let (addr, token) = dst.incoming.clone().unwrap();
    src.migrate(&addr, &token, FAST, 2);
    let outcome = src.migration_outcome(Duration::from_secs(30));
    assert_eq!(outcome.phase, MigrationPhase::Completed, "{outcome:?}");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    wait_until("a failed handover", Duration::from_secs(10), || {
        dst.migration()
            .relocation
            .is_some_and(|r| r.contains("handover failed"))
    });
    dst.assert_beating();
    // `berth get guests` sees it (from `<name>.incoming/`).
    let get = Command::new(berth_tests::bin("berth"))
        .args(["get", "guests", "-o", "json", "--state-dir"])
        .arg(root.path())
        .output()
        .expect("run berth get guests");
    let out = String::from_utf8_lossy(&get.stdout);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    assert!(out.contains(&name), "the arrived guest is not seen: {out}");
    // And it is acted on as the guest's VMM: `berth stop` stops it.
    let stop = Command::new(berth_tests::bin("berth"))
        .args(["stop", &name, "--state-dir"])
        .arg(root.path())
        .output()
        .expect("run berth stop");
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_page_on_the_wrong_connection_is_refused() {
    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-wrongconn");
    let text = spec(&name, "{vcpus: 1}", "{size: 64MiB}", 0);
    let mut dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    let (addr, token) = dst.incoming.clone().unwrap();
    let token = Token::from_hex(&token).unwrap();
    let (mut w0, mut r0) = forge_connection(&dst);
    let mut config = forged_config(&name);
    config.connections = 2;
    w0.send(FrameKind::Config, &[&serde_json::to_vec(&config).unwrap()])
        .unwrap();
    assert_eq!(r0.recv().unwrap().kind, FrameKind::Info);
    let mut conn1 = TcpStream::connect(&addr).unwrap();
    let key1 = wire::connect(&mut conn1, &token, 1).unwrap();
    let mut w1 = FrameWriter::new(conn1, key1);
    // The page at 0 lies in chunk 0, which the sender assigns to connection 0: on
    // connection 1 it could race connection 0's writes of the same page.
    let payload = wire::run_payload(0, 1);
    w1.send(FrameKind::Pages, &[&payload]).unwrap();
    let code = dst.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    assert!(
        dst.stderr_text()
            .contains("arrived on connection 1 but belongs to connection 0"),
        "{}",
        dst.stderr_text()
    );
    assert_incoming_gone(root.path(), &name);
}

/// `tcpdump -i lo port <port>` writing to `file` until dropped (SIGINT by pid, then
/// reaped, so the capture file is complete).
struct Capture {
    child: Option<Child>,
    file: PathBuf,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Capture {
    fn start(dir: &Path, port: u16) -> Capture {
        let file = dir.join(format!("capture-{port}.pcap"));
        let mut child = Command::new("tcpdump")
            .args([
                "-i",
                "lo",
                "-s",
                "0",
                "-U",
                "--immediate-mode",
                "-B",
                "65536",
                "-w",
            ])
            .arg(&file)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump) runs");
        // It says "listening on lo" once it captures.
        let mut stderr = child.stderr.take().unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            match stderr.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => panic!("tcpdump ended: {}", String::from_utf8_lossy(&seen)),
            }
        }
        // The rest of its stderr (the packet counts at the end).
        let log = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        Capture {
            child: Some(child),
            file,
            log: Some(log),
        }
    }

    /// Stops the capture (after a moment for the last packets); its bytes and what
    /// tcpdump said.
    fn finish(mut self) -> (Vec<u8>, String) {
        std::thread::sleep(Duration::from_millis(500));
        self.stop();
        let said = self
            .log
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (std::fs::read(&self.file).expect("the capture file"), said)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            child.wait().unwrap();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The migration stream on the wire (captured by tcpdump on loopback) never shows a
/// marker that fills 4 MiB of the guest's memory; the same capture of the same bytes
/// sent in the clear shows it.
#[test]
fn a_capture_of_the_migration_never_shows_guest_memory() {
    use berth_hypervisor::migration::send;
    use berth_hypervisor::{VmConfig, Vmm as InProcessVmm};
    use vm_memory::{Bytes as _, GuestAddress};

    berth_tests::require_root_and_kvm();
    let root = tempfile::tempdir().unwrap();
    let name = unique("mig-capture");
    let text = spec(&name, "{vcpus: 1}", "{size: 64MiB}", 0);
    let mut marker = *b"berth-capture-marker-0123456789-";
    getrandom_fill(&mut marker[21..]);
    let region: Vec<u8> = marker.repeat((4 << 20) / marker.len());

    // Control: the capture sees these bytes when they go in the clear.
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let capture = Capture::start(root.path(), port);
        let reader = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut sink = Vec::new();
            conn.read_to_end(&mut sink).unwrap();
            sink.len()
        });
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.write_all(&region).unwrap();
        drop(conn);
        assert_eq!(reader.join().unwrap(), region.len());
        let (bytes, said) = capture.finish();
        assert!(
            contains(&bytes, &marker),
            "the capture cannot see a plain stream ({} bytes captured): {said}",
            bytes.len()
        );
    }

    // The source VMM in this process, the marker in its guest's memory.
    let guest: berth_schema::Guest = serde_yaml_from(&text);
    let config = VmConfig::from_guest(&guest).unwrap();
    let (events, _inbox) = std::sync::mpsc::channel();
    let vmm = Arc::new(
        InProcessVmm::create(
            config,
            &root.path().join("source-console.log"),
            events,
            Instant::now(),
        )
        .unwrap(),
    );
    vmm.load_payload().unwrap();
    vmm.vm()
        .memory()
        .write_slice(&region, GuestAddress(16 << 20))
        .unwrap();
    vmm.start().unwrap();
    let mut check = vec![0u8; region.len()];
    vmm.vm()
        .memory()
        .read_slice(&mut check, GuestAddress(16 << 20))
        .unwrap();
    assert!(check == region, "the marker is in the guest's memory");

    let mut dst = Vmm::start(root.path(), &name, &text, Some("127.0.0.1:0"), &[]).unwrap();
    let (addr, token) = dst.incoming.clone().unwrap();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let capture = Capture::start(root.path(), port);
    let args = MigrateArgs {
        destination: addr,
        token,
        // A cap tcpdump keeps up with, so that the capture holds the whole stream.
        policy: serde_json::from_str(r#"{"maxDowntime":"30ms","bandwidth":"64MiB/s"}"#).unwrap(),
        connections: Some(2),
    };
    send::start(&vmm, args).unwrap();
    wait_until("the migration", Duration::from_secs(30), || {
        !vmm.migration().active()
    });
    let status = vmm.migration().status().clone();
    assert_eq!(status.phase, MigrationPhase::Completed, "{status:?}");
    vmm.stop_vcpus(Duration::from_secs(2));
    let (bytes, said) = capture.finish();
    assert!(
        bytes.len() as u64 >= status.bytes_sent,
        "the capture holds {} bytes of a {}-byte stream: {said}",
        bytes.len(),
        status.bytes_sent
    );
    assert!(status.bytes_sent >= region.len() as u64);
    assert!(
        !contains(&bytes, &marker),
        "guest memory is readable on the wire"
    );
    // The destination has the marker (its memory is verified by the guest's own
    // checks; the marker pages came through whole).
    dst.socket = root.path().join("guests").join(&name).join("control.sock");
    wait_until("the handover", Duration::from_secs(15), || {
        dst.socket.exists()
    });
    dst.assert_beating();
    dst.client().shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
}

fn getrandom_fill(bytes: &mut [u8]) {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    f.read_exact(bytes).unwrap();
    for b in bytes.iter_mut() {
        // Printable, so a failure message shows it.
        *b = b'a' + *b % 26;
    }
}

fn serde_yaml_from(text: &str) -> berth_schema::Guest {
    serde_yaml::from_str(text).expect("a Guest manifest")
}
