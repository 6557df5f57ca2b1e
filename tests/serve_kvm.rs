//! `berth serve --driver local` end to end on real KVM: two "hosts" as network
//! namespaces joined by a veth pair, each running the real `berth serve` (entered with
//! `nsenter --net`, which keeps the host's /sys and cgroup mounts) against one local
//! git repository, each with its own state directory. Guests are small heartbeat guests.
//!
//! Covered: a pinning commit applied live within a second (read from /proc), the
//! service restarted (SIGKILL) adopting its guest, an invalid commit refused while the
//! guest keeps its last good state, a webhook with a bad signature refused, a kill -9
//! in the middle of an apply converging after a restart with exactly one VMM per guest,
//! a placement change migrating the guest live between the namespaces with heartbeats
//! continuing, the destination's service stopped mid-migration leaving the guest on
//! its source, the source's service stopped mid-migration cancelling it (the guest
//! stays), a cold move (stopped on the source, booted on the destination), and the
//! source's service SIGKILLed while its VMM waits in `switchoverUnknown` (the `Commit`
//! or the `Running` frame dropped on the veth by a tc filter, the peer API cut): started
//! again, it asks the destination and the guest runs exactly once, on the destination
//! if it read `Commit`, else on the source.
//!
//! Every process is killed by pid, and every namespace, state directory and cgroup is
//! removed when a test ends, even when it fails.

use berth_tests::wait_until;
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use berth_hypervisor::control::{Client, GuestRunState, Op};
use berth_hypervisor::migration::{MigrationPhase, MigrationStatus};
use berth_tests::host::Host;
use berth_tests::{github_signature, GitRepo};

const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";

use berth_tests::run_ok as run;

/// Two network namespaces joined by a veth pair, with a /30 between them; deleted on
/// drop.
struct NetPair {
    ns: [String; 2],
    ips: [String; 2],
    devs: [String; 2],
}

impl NetPair {
    fn new(k: u32) -> NetPair {
        let pid = std::process::id();
        let ns = [format!("bsk-{pid}-{k}-a"), format!("bsk-{pid}-{k}-b")];
        let (va, vb) = (
            format!("bka{}x{k}", pid % 100_000),
            format!("bkb{}x{k}", pid % 100_000),
        );
        let net = format!("10.254.{}", pid % 250);
        let ips = [
            format!("{net}.{}", 4 * k + 1),
            format!("{net}.{}", 4 * k + 2),
        ];
        let pair = NetPair {
            ns,
            ips,
            devs: [va.clone(), vb.clone()],
        };
        for ns in &pair.ns {
            run("ip", &["netns", "add", ns]);
        }
        run(
            "ip",
            &[
                "link",
                "add",
                &va,
                "netns",
                &pair.ns[0],
                "type",
                "veth",
                "peer",
                "name",
                &vb,
                "netns",
                &pair.ns[1],
            ],
        );
        for (i, dev) in [&va, &vb].into_iter().enumerate() {
            let ns = &pair.ns[i];
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/30", pair.ips[i]),
                    "dev",
                    dev,
                ],
            );
            run("ip", &["-n", ns, "link", "set", dev, "up"]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

/// The migration stream's frame kinds the tests drop (`berth_hypervisor`'s wire
/// format: a frame header is `kind u8 | 0 u8 * 3 | payload length u32 LE`).
const FRAME_COMMIT: u8 = 7;
const FRAME_RUNNING: u8 = 9;

impl NetPair {
    /// From now on, the IPv4 packets that namespace `i` sends on its veth and that
    /// `matches` (tc u32 selectors) select are lost: redirected to the namespace's
    /// loopback, where nothing accepts them (forwarding is off). `prio` names the rule
    /// for [`NetPair::heal`].
    fn lose(&self, i: usize, prio: u32, matches: &[&str]) {
        let (ns, dev) = (self.ns[i].as_str(), self.devs[i].as_str());
        // Already there from an earlier rule: fine.
        let _ = Command::new("tc")
            .args(["-n", ns, "qdisc", "add", "dev", dev, "clsact"])
            .stderr(Stdio::null())
            .status();
        let prio = prio.to_string();
        let mut args = vec![
            "-n", ns, "filter", "add", "dev", dev, "egress", "protocol", "ip", "prio", &prio, "u32",
        ];
        args.extend_from_slice(matches);
        args.extend_from_slice(&["action", "mirred", "egress", "redirect", "dev", "lo"]);
        run("tc", &args);
    }

    /// Loses the migration frames of `kind` with no payload that namespace `i` sends:
    /// a TCP segment (20-byte IP header, 32-byte TCP header with timestamps) whose data
    /// starts with that frame header, retransmissions included.
    fn lose_frames(&self, i: usize, prio: u32, kind: u8) {
        let header = format!("0x{kind:02x}000000");
        self.lose(
            i,
            prio,
            &[
                "match",
                "u8",
                "0x45",
                "0xff",
                "at",
                "0", // IPv4, no options
                "match",
                "u8",
                "6",
                "0xff",
                "at",
                "9", // TCP
                "match",
                "u16",
                "0",
                "0xff00",
                "at",
                "2", // a small packet
                "match",
                "u8",
                "0x80",
                "0xf0",
                "at",
                "32", // data at 32 bytes
                "match",
                "u32",
                &header,
                "0xffffffff",
                "at",
                "52", //
                "match",
                "u32",
                "0",
                "0xffffffff",
                "at",
                "56", // no payload
            ],
        );
    }

    /// Loses every TCP segment namespace `i` sends to `port`.
    fn lose_port(&self, i: usize, prio: u32, port: u16) {
        let port = port.to_string();
        self.lose(
            i,
            prio,
            &[
                "match", "ip", "protocol", "6", "0xff", "match", "ip", "dport", &port, "0xffff",
            ],
        );
    }

    /// Removes the rule `prio` of namespace `i`.
    fn heal(&self, i: usize, prio: u32) {
        let (ns, dev) = (self.ns[i].as_str(), self.devs[i].as_str());
        run(
            "tc",
            &[
                "-n",
                ns,
                "filter",
                "del",
                "dev",
                dev,
                "egress",
                "prio",
                &prio.to_string(),
            ],
        );
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Two hosts, a repository, and the guests the test made: everything is removed on
/// drop, processes by pid.
struct Fleet {
    net: NetPair,
    _dir: tempfile::TempDir,
    repo: GitRepo,
    secrets: PathBuf,
    hosts: [Host; 2],
    guests: Vec<String>,
    /// This fleet's number in the test process: guest names carry it, since the
    /// fleets of this file run side by side and share one cgroup tree.
    k: u32,
}

static FLEETS: AtomicU32 = AtomicU32::new(0);

impl Fleet {
    fn new() -> Fleet {
        berth_tests::require_root_and_kvm();
        let k = FLEETS.fetch_add(1, Ordering::SeqCst);
        let net = NetPair::new(k);
        let dir = tempfile::tempdir().expect("temp dir");
        let secrets = dir.path().join("secrets");
        fs::create_dir_all(&secrets).expect("mkdir");
        let path = secrets.join("webhook");
        fs::write(&path, format!("{WEBHOOK_SECRET}\n")).expect("write secret");
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        // The fleet's certificates, made by `berth certs`: the hosts verify each other
        // by Host name.
        berth_tests::berth_certs(&secrets, &["kvm01", "kvm02"], &[]);
        let host = |i: usize| {
            Host::new(
                &format!("kvm0{}", i + 1),
                &net.ns[i],
                &format!("{}:7410", net.ips[i]),
                dir.path(),
                i,
                &secrets,
            )
        };
        let hosts = [host(0), host(1)];
        Fleet {
            repo: GitRepo::new(dir.path().join("repo")),
            net,
            secrets,
            hosts,
            _dir: dir,
            guests: Vec::new(),
            k,
        }
    }

    /// A guest name unique to this test process, test and fleet.
    fn guest_name(&mut self, tag: &str) -> String {
        // Two tests that share a tag (the forged-peer test runs the unknown switchover
        // of another) ran side by side with one guest name, so one cgroup: kvm01's
        // start was refused by the other fleet's VMM in it.
        let name = format!("{tag}-{}-{}", std::process::id(), self.k);
        self.guests.push(name.clone());
        name
    }

    fn start(&mut self, i: usize) {
        let (repo, secrets) = (self.repo.dir.clone(), self.secrets.clone());
        let webhook = secrets.join("webhook");
        self.hosts[i].start(
            &repo,
            &[
                "--webhook-secret-file",
                webhook.to_str().expect("UTF-8 path"),
                "--poll-interval",
                "1h",
            ],
            &[],
        );
    }

    fn hosts_yaml(&self) -> String {
        self.hosts
            .iter()
            .map(|h| {
                format!(
                    "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {}}}\n\
                     spec: {{address: '{}', cpus: 0-1, memory: 8GiB}}\n---\n",
                    h.name, h.addr
                )
            })
            .collect()
    }

    fn commit(&self, guests: &str, message: &str) -> String {
        let text = format!("{}{guests}", self.hosts_yaml());
        self.repo.commit(&[("fleet.yaml", &text)], message)
    }

    /// Every berth-vmm process of guest `name`, in either state directory.
    fn vmms(&self, name: &str) -> Vec<i32> {
        let needles: Vec<String> = self
            .hosts
            .iter()
            .map(|h| h.guest_dir(name).display().to_string() + "/")
            .collect();
        berth_tests::vmm_pids(|cmdline| needles.iter().any(|n| cmdline.contains(n.as_str())))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        berth_tests::host::tear_down(&mut self.hosts, &self.guests);
    }
}

/// A heartbeat guest: 100 ticks a second, a line every 10 ticks.
fn guest_yaml(name: &str, host: &str, cpu: &str, migration: &str, dirty: u32) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: {host}\n  \
         cpu: {{vcpus: 1, pinning: {{vcpus: {{0: '{cpu}'}}}}}}\n  memory: {{size: 32MiB}}\n  \
         boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 100, ticksPerLine: 10, dirtyPagesPerTick: {dirty}}}}}\n  \
         migration: {migration}\n---\n"
    )
}

const FAST: &str = "{mode: live, maxDowntime: 30ms}";

/// The pid of the VMM running `name` under `host`, from its pid file, when it answers.
fn vmm_pid(host: &Host, name: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(host.guest_dir(name).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The CPUs thread `vcpu0` of `pid` may run on, from /proc.
fn vcpu0_affinity(pid: i32) -> Option<String> {
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(Result::ok)
    {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "vcpu0" {
            let status = fs::read_to_string(task.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|s| s.trim().to_owned());
        }
    }
    None
}

/// Heartbeat counters of vCPU 0 from the console logs given, in order.
fn heartbeats(logs: &[PathBuf]) -> Vec<u64> {
    berth_tests::heartbeats(logs).remove(&0).unwrap_or_default()
}

/// vCPU 0's counters (10 ticks a line) go on without a gap or a repeat.
fn assert_continuous(ns: &[u64], at_least: usize) {
    berth_tests::assert_continuous(0, ns, 10, at_least);
}

fn console_logs(host: &Host, name: &str) -> Vec<PathBuf> {
    let dir = host.guest_dir(name);
    vec![dir.join("console.log.1"), dir.join("console.log")]
}

#[test]
fn live_retune_restart_adoption_invalid_commit_and_webhook() {
    let mut fleet = Fleet::new();
    let name = fleet.guest_name("kvm-retune");
    fleet.commit(
        &guest_yaml(&name, "kvm01", "0", FAST, 0),
        "one guest on cpu 0",
    );
    fleet.start(0);
    let host = &fleet.hosts[0];
    wait_until("the guest to start", Duration::from_secs(20), || {
        vmm_pid(host, &name).is_some_and(|p| vcpu0_affinity(p).as_deref() == Some("0"))
    });
    let pid = vmm_pid(host, &name).expect("running");

    // A pinning commit is applied live, within a second, in the same VMM.
    let committed = Instant::now();
    let rev = fleet.commit(&guest_yaml(&name, "kvm01", "1", FAST, 0), "pin to cpu 1");
    let host = &fleet.hosts[0];
    wait_until("the new pinning", Duration::from_secs(2), || {
        vcpu0_affinity(pid).as_deref() == Some("1")
    });
    let took = committed.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(vmm_pid(host, &name), Some(pid), "retuned in place");
    wait_until("the status", Duration::from_secs(5), || {
        host.status()["lastApplied"]["revision"] == rev.as_str()
    });
    let g = host.guest_status(&name).expect("listed");
    assert_eq!(g["phase"], "Running", "{g}");
    assert_eq!(g["runsHere"], true, "{g}");

    // SIGKILL and restart: the running guest is adopted, never started again.
    fleet.hosts[0].kill9();
    let before = heartbeats(&console_logs(&fleet.hosts[0], &name));
    let log_before = fleet.hosts[0].log_text().len();
    fleet.start(0);
    let host = &fleet.hosts[0];
    wait_until(
        "the restarted service to converge",
        Duration::from_secs(10),
        || host.status()["lastApplied"]["revision"] == rev.as_str(),
    );
    assert_eq!(vmm_pid(host, &name), Some(pid), "adopted, not restarted");
    assert_eq!(fleet.vmms(&name), vec![pid], "exactly one VMM");
    let restarted = host.log_text()[log_before..].to_owned();
    assert!(
        !restarted.contains("dispatching"),
        "the restarted service did nothing:\n{restarted}"
    );

    // An invalid commit is refused with file:line; the guest keeps its last good state.
    let bad = fleet.commit(
        &guest_yaml(&name, "kvm01", "0", FAST, 0).replace("vcpus: 1,", "vcpus: 1, bogus: 3,"),
        "invalid",
    );
    let host = &fleet.hosts[0];
    wait_until("the refusal", Duration::from_secs(5), || {
        host.status()["lastError"]["revision"] == bad.as_str()
    });
    let status = host.status();
    let error = &status["lastError"];
    assert_eq!(error["kind"], "invalid", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("fleet.yaml:"),
        "{error}"
    );
    assert_eq!(
        status["enforcing"],
        rev.as_str(),
        "the last good revision stays"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vcpu0_affinity(pid).as_deref(),
        Some("1"),
        "last good pinning kept"
    );
    assert_eq!(fleet.vmms(&name), vec![pid]);

    // A webhook with a bad signature is refused; a good one is accepted.
    let body = r#"{"ref":"refs/heads/main"}"#;
    let wrong = github_signature("not-the-secret", body);
    for sig in [None, Some(wrong.as_str())] {
        let mut headers = vec![("X-GitHub-Event", "push")];
        if let Some(s) = sig {
            headers.push(("X-Hub-Signature-256", s));
        }
        let (code, text) = host
            .request("POST", "/hooks/git", &headers, body)
            .expect("webhook");
        assert_eq!(code, 401, "{sig:?}: {text}");
    }
    let good = github_signature(WEBHOOK_SECRET, body);
    let (code, _) = host
        .request(
            "POST",
            "/hooks/git",
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &good)],
            body,
        )
        .expect("webhook");
    assert_eq!(code, 202);

    // The heartbeats went on through all of it.
    std::thread::sleep(Duration::from_millis(300));
    let after = heartbeats(&console_logs(&fleet.hosts[0], &name));
    assert!(after.len() > before.len(), "heartbeats continue");
    assert_continuous(&after, 5);

    // SIGTERM leaves the guest running.
    assert_eq!(fleet.hosts[0].terminate(), Some(0));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fleet.vmms(&name),
        vec![pid],
        "the guest outlives the service"
    );
}

#[test]
fn kill9_mid_apply_then_restart_converges_with_one_vmm_per_guest() {
    let mut fleet = Fleet::new();
    let names: Vec<String> = (0..3)
        .map(|i| fleet.guest_name(&format!("kvm-k9-{i}")))
        .collect();
    fleet.commit("", "hosts only");
    fleet.start(0);
    let host = &fleet.hosts[0];
    wait_until("the first revision", Duration::from_secs(10), || {
        host.status()["lastApplied"]["revision"].is_string()
    });
    let guests: String = names
        .iter()
        .map(|n| guest_yaml(n, "kvm01", "0", FAST, 0))
        .collect();
    let rev = fleet.commit(&guests, "three guests");
    // Killed as soon as it dispatches the starts.
    let log = fleet.hosts[0].log.clone();
    wait_until(
        "the starts to be dispatched",
        Duration::from_secs(10),
        || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("dispatching")
        },
    );
    fleet.hosts[0].kill9();
    let started_before: Vec<usize> = names.iter().map(|n| fleet.vmms(n).len()).collect();
    fleet.start(0);
    let host = &fleet.hosts[0];
    wait_until(
        "convergence after the restart",
        Duration::from_secs(30),
        || host.status()["lastApplied"]["revision"] == rev.as_str(),
    );
    for name in &names {
        let vmms = fleet.vmms(name);
        assert_eq!(
            vmms.len(),
            1,
            "{name}: {vmms:?} (before the restart: {started_before:?})"
        );
        let g = host.guest_status(name).expect("listed");
        assert_eq!(g["phase"], "Running", "{g}");
    }
}

/// Waits until `name` runs on host `to` and not on `from`; returns the new pid.
fn wait_moved(fleet: &Fleet, name: &str, from: usize, to: usize, timeout: Duration) -> i32 {
    wait_until("the guest to move", timeout, || {
        vmm_pid(&fleet.hosts[to], name).is_some() && vmm_pid(&fleet.hosts[from], name).is_none()
    });
    vmm_pid(&fleet.hosts[to], name).expect("moved")
}

/// Commits guest `name` on kvm01 (vCPU 0 on CPU 0, `migration` policy, `dirty` pages
/// per tick), starts both hosts' services and waits for its VMM; returns its pid.
fn start_on_kvm01(fleet: &mut Fleet, name: &str, migration: &str, dirty: u32) -> i32 {
    fleet.commit(
        &guest_yaml(name, "kvm01", "0", migration, dirty),
        "guest on kvm01",
    );
    fleet.start(0);
    fleet.start(1);
    wait_until("the guest on kvm01", Duration::from_secs(20), || {
        vmm_pid(&fleet.hosts[0], name).is_some()
    });
    vmm_pid(&fleet.hosts[0], name).expect("running")
}

/// Commits guest `name` on kvm01 (vCPU 0 on CPU 0, fast heartbeat), starts both hosts'
/// services and waits for its VMM and five heartbeats; returns the VMM's pid.
fn guest_beating_on_kvm01(fleet: &mut Fleet, name: &str) -> i32 {
    let pid = start_on_kvm01(fleet, name, FAST, 2);
    // Generous: the suite runs the other tests' guests and services beside this one.
    wait_until("heartbeats", Duration::from_secs(30), || {
        heartbeats(&console_logs(&fleet.hosts[0], name)).len() >= 5
    });
    pid
}

#[test]
fn placement_change_migrates_live_between_namespaces() {
    let mut fleet = Fleet::new();
    let name = fleet.guest_name("kvm-move");
    let source_pid = guest_beating_on_kvm01(&mut fleet, &name);
    // kvm02 does not start a guest placed on kvm01.
    assert!(vmm_pid(&fleet.hosts[1], &name).is_none());

    let rev = fleet.commit(&guest_yaml(&name, "kvm02", "1", FAST, 2), "move to kvm02");
    let dest_pid = wait_moved(&fleet, &name, 0, 1, Duration::from_secs(30));
    assert_ne!(dest_pid, source_pid);
    wait_until("the source VMM to exit", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{source_pid}")).exists()
    });
    assert_eq!(fleet.vmms(&name), vec![dest_pid], "exactly one VMM");
    // Heartbeats continue across the hosts, no gap, no repeat.
    std::thread::sleep(Duration::from_millis(500));
    let mut logs = vec![fleet.hosts[0].guest_dir(&name).join("console.log")];
    logs.extend(console_logs(&fleet.hosts[1], &name));
    let beats = heartbeats(&logs);
    assert_continuous(&beats, 8);
    assert_eq!(
        vcpu0_affinity(dest_pid).as_deref(),
        Some("1"),
        "pinned as the manifest says"
    );

    // Status on both sides.
    let (a, b) = (&fleet.hosts[0], &fleet.hosts[1]);
    wait_until("both sides to converge", Duration::from_secs(10), || {
        a.status()["lastApplied"]["revision"] == rev.as_str()
            && b.status()["lastApplied"]["revision"] == rev.as_str()
    });
    assert!(a.guest_status(&name).is_none(), "{}", a.status());
    let g = b.guest_status(&name).expect("listed on kvm02");
    assert_eq!(g["phase"], "Running", "{g}");
    assert_eq!(g["runsHere"], true, "{g}");
    // The migration's figures, from what the VMM reported.
    let (_, metrics) = a.get("/metrics").expect("metrics");
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing:\n{metrics}"))
    };
    assert!(value("berth_migration_bytes_total{kind=\"remote\"}") > 0.0);
    assert_eq!(
        value("berth_migration_downtime_seconds_count{kind=\"remote\"}"),
        1.0
    );
    assert_eq!(
        value("berth_migration_duration_seconds_count{kind=\"remote\"}"),
        1.0
    );
    assert_eq!(
        value("berth_actions_total{kind=\"migrate\",result=\"ok\"}"),
        1.0
    );
}

#[test]
fn stopping_the_destination_mid_migration_keeps_the_guest_on_the_source() {
    let mut fleet = Fleet::new();
    let name = fleet.guest_name("kvm-abort");
    // A guest dirtying pages faster than the capped link moves them: without
    // auto-converge the migration keeps copying until it is cut.
    let slow = "{mode: live, maxDowntime: 5ms, bandwidth: 2MiB/s, autoConverge: false}";
    let pid = start_on_kvm01(&mut fleet, &name, slow, 20);
    fleet.commit(&guest_yaml(&name, "kvm02", "0", slow, 20), "move to kvm02");
    let incoming = fleet.hosts[1]
        .state
        .join("guests")
        .join(format!("{name}.incoming"));
    wait_until("the incoming VMM on kvm02", Duration::from_secs(20), || {
        incoming.exists()
    });
    wait_until(
        "the migration to be under way",
        Duration::from_secs(10),
        || {
            fleet.hosts[0]
                .guest_status(&name)
                .is_some_and(|g| g["phase"] == "Migrating")
        },
    );
    assert_eq!(fleet.hosts[1].terminate(), Some(0));
    // The source's action fails, the guest stays, and the status says why.
    let a = &fleet.hosts[0];
    wait_until("the failure on kvm01", Duration::from_secs(20), || {
        a.guest_status(&name).is_some_and(|g| {
            g["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "MigrationFailed"))
        })
    });
    let g = a.guest_status(&name).expect("listed");
    let failed = g["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "MigrationFailed"))
        .expect("a MigrationFailed condition")
        .to_string();
    assert!(failed.contains("OutgoingMigrationFailed"), "{failed}");
    assert!(failed.contains("stays on kvm01"), "{failed}");
    assert_eq!(
        vmm_pid(a, &name),
        Some(pid),
        "the guest stays in its source VMM"
    );
    assert_eq!(fleet.vmms(&name), vec![pid]);
    wait_until("the incoming VMM to go", Duration::from_secs(10), || {
        !incoming.exists()
    });
    let before = heartbeats(&console_logs(a, &name)).len();
    std::thread::sleep(Duration::from_millis(500));
    let beats = heartbeats(&console_logs(a, &name));
    assert!(beats.len() > before, "the guest still beats on kvm01");
    assert_continuous(&beats, 5);
    let mut lines: BTreeMap<&str, usize> = BTreeMap::new();
    for l in fleet.hosts[1].log_text().lines() {
        if l.contains("discarding the incoming migration") {
            *lines.entry("discarded").or_default() += 1;
        }
    }
    assert_eq!(
        lines.get("discarded"),
        Some(&1),
        "{}",
        fleet.hosts[1].log_text()
    );
}

#[test]
fn sigterm_on_the_source_mid_migration_cancels_it_and_the_guest_stays() {
    let mut fleet = Fleet::new();
    let name = fleet.guest_name("kvm-term");
    let slow = "{mode: live, maxDowntime: 5ms, bandwidth: 2MiB/s, autoConverge: false}";
    let pid = start_on_kvm01(&mut fleet, &name, slow, 20);
    fleet.commit(&guest_yaml(&name, "kvm02", "0", slow, 20), "move to kvm02");
    wait_until(
        "the migration to be under way",
        Duration::from_secs(20),
        || {
            fleet.hosts[0]
                .guest_status(&name)
                .is_some_and(|g| g["phase"] == "Migrating")
        },
    );
    // kvm01's serve holds the state lock while its migration runs: a `berth stop` by
    // hand refuses, naming it (a guest that does not exist, so that a stop that got
    // the lock would change nothing).
    let lock = fleet.hosts[0].state.join("apply.lock");
    wait_until(
        "serve to hold the state lock",
        Duration::from_secs(10),
        || {
            // Read from /proc/locks: trying the lock here could take it from serve.
            let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&lock).expect("lock"));
            fs::read_to_string("/proc/locks")
                .expect("/proc/locks")
                .lines()
                .any(|l| l.contains("FLOCK") && l.contains(&format!(":{inode} ")))
        },
    );
    let stop = berth_tests::command("berth")
        .args(["stop", "no-such-guest", "--state-dir"])
        .arg(&fleet.hosts[0].state)
        .output()
        .expect("run berth stop");
    let stderr = String::from_utf8_lossy(&stop.stderr);
    let serve_pid = fleet.hosts[0].serve.as_ref().expect("serving").id();
    assert!(
        !stop.status.success()
            && stderr.contains(&format!(
                "berth serve (pid {serve_pid}) holds {}",
                lock.display()
            )),
        "{stderr}"
    );
    assert_eq!(fleet.hosts[0].terminate(), Some(0), "a clean stop");
    let log = fleet.hosts[0].log_text();
    assert!(log.contains("cancelling the migration"), "{log}");
    let stopping = log
        .lines()
        .find(|l| l.contains("stopping: cancelling the migrations in flight"))
        .unwrap_or_else(|| panic!("the stop names the migration in flight:\n{log}"));
    assert!(stopping.contains(&name), "{stopping}");
    assert_eq!(
        vmm_pid(&fleet.hosts[0], &name),
        Some(pid),
        "the guest stays on kvm01"
    );
    let incoming = fleet.hosts[1]
        .state
        .join("guests")
        .join(format!("{name}.incoming"));
    wait_until("the incoming VMM to go", Duration::from_secs(10), || {
        !incoming.exists()
    });
    assert_eq!(fleet.vmms(&name), vec![pid]);
    let before = heartbeats(&console_logs(&fleet.hosts[0], &name)).len();
    std::thread::sleep(Duration::from_millis(500));
    let beats = heartbeats(&console_logs(&fleet.hosts[0], &name));
    assert!(beats.len() > before, "the guest still beats on kvm01");
    assert_continuous(&beats, 5);
    // kvm02 reports why it does not run the guest it was given.
    let g = fleet.hosts[1].guest_status(&name).expect("listed on kvm02");
    assert_eq!(g["phase"], "WaitingForMigration", "{g}");
}

#[test]
fn a_cold_move_stops_on_the_source_then_starts_on_the_destination() {
    let mut fleet = Fleet::new();
    let name = fleet.guest_name("kvm-cold");
    let cold = "{mode: cold}";
    let source_pid = start_on_kvm01(&mut fleet, &name, cold, 0);
    let rev = fleet.commit(&guest_yaml(&name, "kvm02", "0", cold, 0), "move cold");
    let dest_pid = wait_moved(&fleet, &name, 0, 1, Duration::from_secs(30));
    assert_ne!(dest_pid, source_pid);
    assert_eq!(fleet.vmms(&name), vec![dest_pid], "exactly one VMM");
    let (a, b) = (&fleet.hosts[0], &fleet.hosts[1]);
    wait_until("both sides to converge", Duration::from_secs(10), || {
        a.status()["lastApplied"]["revision"] == rev.as_str()
            && b.status()["lastApplied"]["revision"] == rev.as_str()
    });
    assert!(a.guest_status(&name).is_none(), "{}", a.status());
    assert_eq!(b.guest_status(&name).expect("listed")["phase"], "Running");
    // A fresh boot: the counters start again on kvm02.
    wait_until("heartbeats on kvm02", Duration::from_secs(10), || {
        !heartbeats(&[b.guest_dir(&name).join("console.log")]).is_empty()
    });
    assert_eq!(heartbeats(&[b.guest_dir(&name).join("console.log")])[0], 10);
    assert!(
        a.log_text().contains("action=\"cold_migrate\""),
        "{}",
        a.log_text()
    );
}

/// The migration status of the VMM running `name` under `host`, when it answers.
fn migration_status(host: &Host, name: &str) -> Option<MigrationStatus> {
    let mut client = Client::connect(host.guest_dir(name).join("control.sock")).ok()?;
    serde_json::from_value(client.call(Op::MigrateStatus).ok()?).ok()
}

/// The run state of the VMM running `name` under `host`, when it answers.
fn run_state(host: &Host, name: &str) -> Option<GuestRunState> {
    let mut client = Client::connect(host.guest_dir(name).join("control.sock")).ok()?;
    client.status().ok().map(|s| s.state)
}

/// The value of the first metric line of `host` that starts with `prefix`.
fn metric(host: &Host, prefix: &str) -> Option<f64> {
    let (_, text) = host.get("/metrics")?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Which frame of the switchover the link loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// kvm01's `Commit`: kvm02 never runs the guest.
    Commit,
    /// kvm02's `Running`: kvm02 runs the guest, kvm01 never hears of it.
    Running,
}

/// A live move from kvm01 to kvm02 whose switchover frame `lost` is dropped on the
/// veth, while kvm01's service cannot reach kvm02's either: kvm01's VMM ends in
/// `switchoverUnknown` with the guest paused (and, with a lost `Commit`, its service
/// shows it stuck). Then the service is SIGKILLed, the link heals, and the service is
/// started again; returns the fleet, the guest, the source VMM's pid and the revision
/// enforced at the end.
fn kill_the_source_in_an_unknown_switchover(lost: Lost) -> (Fleet, String, i32, String) {
    kill_the_source_in_an_unknown_switchover_then(lost, |_| {})
}

/// As [`kill_the_source_in_an_unknown_switchover`], calling `meanwhile` while kvm01's
/// service is away, just before it is started again.
fn kill_the_source_in_an_unknown_switchover_then(
    lost: Lost,
    meanwhile: impl FnOnce(&mut Fleet),
) -> (Fleet, String, i32, String) {
    let mut fleet = Fleet::new();
    let name = fleet.guest_name(match lost {
        Lost::Commit => "kvm-nocommit",
        Lost::Running => "kvm-norunning",
    });
    let source_pid = guest_beating_on_kvm01(&mut fleet, &name);
    const LOST_FRAME: u32 = 10;
    const NO_API: u32 = 11;
    match lost {
        Lost::Commit => fleet.net.lose_frames(0, LOST_FRAME, FRAME_COMMIT),
        Lost::Running => fleet.net.lose_frames(1, LOST_FRAME, FRAME_RUNNING),
    }
    let moved = fleet.commit(&guest_yaml(&name, "kvm02", "0", FAST, 2), "move to kvm02");
    // Once the VMM migrates, kvm01's service cannot ask kvm02's any more.
    wait_until("the migration to start", Duration::from_secs(30), || {
        migration_status(&fleet.hosts[0], &name).is_some_and(|s| s.phase != MigrationPhase::Idle)
    });
    fleet.net.lose_port(0, NO_API, 7410);
    wait_until(
        "the switchover to be unknown",
        Duration::from_secs(20),
        || {
            migration_status(&fleet.hosts[0], &name)
                .is_some_and(|s| s.phase == MigrationPhase::SwitchoverUnknown)
        },
    );
    let a = &fleet.hosts[0];
    // With a lost Running, kvm02's VMM runs the guest but can move into cgroup
    // berth/<name> (one cgroup tree for both "hosts" here) only once the source VMM
    // exits, and gives its handover up after 30 s: the service is killed at once.
    if lost == Lost::Commit {
        show_stuck(a, &name);
    }
    // Never twice: the source holds the guest paused.
    assert_eq!(run_state(a, &name), Some(GuestRunState::Paused));
    assert_eq!(vmm_pid(a, &name), Some(source_pid));

    fleet.hosts[0].kill9();
    let a = &fleet.hosts[0];
    let paused = heartbeats(&console_logs(a, &name)).len();
    let enforced = match lost {
        Lost::Commit => {
            // kvm02 never read Commit: its incoming VMM gives up and leaves; nobody runs
            // the guest while kvm01's service is away.
            let incoming = fleet.hosts[1]
                .state
                .join("guests")
                .join(format!("{name}.incoming"));
            wait_until(
                "kvm02's incoming VMM to go",
                Duration::from_secs(20),
                || !incoming.exists(),
            );
            assert_eq!(fleet.vmms(&name), vec![source_pid]);
            // The operator gives up on the move meanwhile.
            fleet.commit(&guest_yaml(&name, "kvm01", "0", FAST, 2), "back to kvm01")
        }
        Lost::Running => {
            // kvm02 read Commit: the guest runs there (its VMM moves into the guest's
            // directory once the source's cgroup, on this one machine, is gone), and
            // is paused here.
            let incoming = fleet.hosts[1]
                .state
                .join("guests")
                .join(format!("{name}.incoming"))
                .join("control.sock");
            wait_until("the guest to run on kvm02", Duration::from_secs(20), || {
                Client::connect(&incoming)
                    .and_then(|mut c| c.status())
                    .is_ok_and(|s| s.state == GuestRunState::Running)
            });
            moved
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        heartbeats(&console_logs(a, &name)).len(),
        paused,
        "the source stays paused without its service"
    );
    assert_eq!(run_state(a, &name), Some(GuestRunState::Paused));

    fleet.net.heal(0, NO_API);
    match lost {
        Lost::Commit => fleet.net.heal(0, LOST_FRAME),
        Lost::Running => fleet.net.heal(1, LOST_FRAME),
    }
    meanwhile(&mut fleet);
    fleet.start(0);
    (fleet, name, source_pid, enforced)
}

/// kvm01's service, alive, shows the unknown switchover of `name` as stuck, naming
/// kvm02, in its status, metrics and log.
fn show_stuck(a: &Host, name: &str) {
    wait_until(
        "the stuck switchover in /status",
        Duration::from_secs(30),
        || {
            a.guest_status(name)
                .is_some_and(|g| g["phase"] == "SwitchoverUnknown")
        },
    );
    let g = a.guest_status(name).expect("listed");
    let condition = g["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "SwitchoverUnknown"))
        .unwrap_or_else(|| panic!("a SwitchoverUnknown condition: {g}"))
        .to_string();
    assert!(condition.contains("kvm02"), "{condition}");
    assert!(condition.contains("never resumed blindly"), "{condition}");
    assert_eq!(
        metric(
            a,
            &format!("berth_switchover_unknown{{guest=\"{name}\",peer=\"kvm02\"}}")
        ),
        Some(1.0)
    );
    assert!(
        a.log_text()
            .contains("switchover unknown and the destination cannot tell"),
        "{}",
        a.log_text()
    );
}

#[test]
fn a_source_killed_in_an_unknown_switchover_resumes_the_guest_the_destination_never_ran() {
    let (fleet, name, source_pid, rev) = kill_the_source_in_an_unknown_switchover(Lost::Commit);
    let a = &fleet.hosts[0];
    wait_until(
        "the guest to run again on kvm01",
        Duration::from_secs(20),
        || run_state(a, &name) == Some(GuestRunState::Running),
    );
    assert_eq!(vmm_pid(a, &name), Some(source_pid), "in its source VMM");
    assert_eq!(fleet.vmms(&name), vec![source_pid], "exactly one VMM");
    let before = heartbeats(&console_logs(a, &name)).len();
    std::thread::sleep(Duration::from_millis(500));
    let beats = heartbeats(&console_logs(a, &name));
    assert!(beats.len() > before, "the guest beats on kvm01 again");
    assert_continuous(&beats, 8);
    assert!(
        a.log_text()
            .contains("the destination does not run the guest; it runs here again"),
        "{}",
        a.log_text()
    );
    assert_eq!(
        metric(a, "berth_switchover_resolutions_total{outcome=\"source\"}"),
        Some(1.0)
    );
    let b = &fleet.hosts[1];
    wait_until("both sides to converge", Duration::from_secs(20), || {
        a.status()["lastApplied"]["revision"] == rev.as_str()
            && b.status()["lastApplied"]["revision"] == rev.as_str()
    });
    let g = a.guest_status(&name).expect("listed on kvm01");
    assert_eq!(g["phase"], "Running", "{g}");
    assert!(metric(a, "berth_switchover_unknown{").is_none());
    assert!(vmm_pid(b, &name).is_none());
}

#[test]
fn a_source_killed_in_an_unknown_switchover_drops_its_copy_when_the_destination_runs_it() {
    let (fleet, name, source_pid, rev) = kill_the_source_in_an_unknown_switchover(Lost::Running);
    let (a, b) = (&fleet.hosts[0], &fleet.hosts[1]);
    wait_until("the source VMM to exit", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{source_pid}")).exists()
    });
    wait_until("the handover on kvm02", Duration::from_secs(20), || {
        vmm_pid(b, &name).is_some()
    });
    let dest_pid = vmm_pid(b, &name).expect("runs on kvm02");
    assert_eq!(fleet.vmms(&name), vec![dest_pid], "exactly one VMM");
    // Heartbeats continue from kvm01's last one on kvm02: no gap, no repeat.
    std::thread::sleep(Duration::from_millis(500));
    let mut logs = vec![a.guest_dir(&name).join("console.log")];
    logs.extend(console_logs(b, &name));
    assert_continuous(&heartbeats(&logs), 8);
    assert!(
        a.log_text()
            .contains("the destination runs the guest; the copy here was dropped"),
        "{}",
        a.log_text()
    );
    assert_eq!(
        metric(
            a,
            "berth_switchover_resolutions_total{outcome=\"destination\"}"
        ),
        Some(1.0)
    );
    wait_until("both sides to converge", Duration::from_secs(20), || {
        a.status()["lastApplied"]["revision"] == rev.as_str()
            && b.status()["lastApplied"]["revision"] == rev.as_str()
    });
    assert!(a.guest_status(&name).is_none(), "{}", a.status());
    let g = b.guest_status(&name).expect("listed on kvm02");
    assert_eq!(g["phase"], "Running", "{g}");
}

/// A man in the middle on kvm02's address (a named mock: the fault the real kvm02
/// cannot produce): a TLS server with a certificate naming kvm02, made by `berth certs`
/// with another CA, that answers every request with "I run it" (`{"running": true}`).
/// Counts the connections it got and the answers it managed to send.
struct ForgedPeer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<AtomicU32>,
    answered: std::sync::Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ForgedPeer {
    fn start(ns: &str, addr: &str, certs: &Path) -> ForgedPeer {
        use rustls::pki_types::pem::PemObject as _;
        use std::io::{Read, Write};
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::CertificateDer::pem_file_iter(certs.join("kvm02.pem"))
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("cert");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(certs.join("kvm02.key")).expect("key");
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
        );
        let (stop, connections, answered) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicU32::new(0)),
        );
        let ns_path = format!("/var/run/netns/{ns}");
        let addr = addr.to_owned();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, connections, answered) =
                (stop.clone(), connections.clone(), answered.clone());
            std::thread::spawn(move || {
                let file = fs::File::open(&ns_path).expect("netns");
                // SAFETY: setns on a valid namespace fd; it changes only this thread.
                let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(joined, 0, "setns");
                let listener = std::net::TcpListener::bind(&addr).expect("bind kvm02's address");
                listener.set_nonblocking(true).expect("nonblocking");
                bound_tx.send(()).expect("bound");
                while !stop.load(Ordering::SeqCst) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let connection =
                        rustls::ServerConnection::new(Arc::clone(&config)).expect("connection");
                    let mut tls = rustls::StreamOwned::new(connection, stream);
                    let mut request = [0u8; 4096];
                    // The handshake happens here; a client that does not trust this
                    // certificate aborts it, and nothing is read.
                    if matches!(tls.read(&mut request), Ok(n) if n > 0) {
                        let body = r#"{"running":true,"downtimeMs":1.0}"#;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        if tls
                            .write_all(answer.as_bytes())
                            .and_then(|()| tls.flush())
                            .is_ok()
                        {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        };
        bound_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the forger listens");
        ForgedPeer {
            stop,
            connections,
            answered,
            thread: Some(thread),
        }
    }
}

impl Drop for ForgedPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The source's service, started again with its VMM in `switchoverUnknown`, asks kvm02
/// whether it runs the guest; a party without the fleet's certificate answers "I run
/// it" on kvm02's address. The answer is refused in the TLS handshake: the source
/// keeps its paused copy and shows the switchover stuck, naming the TLS failure. When
/// the real kvm02 answers (it never ran the guest), the guest resumes on kvm01, in
/// its source VMM, exactly once.
#[test]
fn a_forged_i_run_it_without_the_fleet_certificate_cannot_end_a_switchover() {
    let mut forger = None;
    let (mut fleet, name, source_pid, _) =
        kill_the_source_in_an_unknown_switchover_then(Lost::Commit, |fleet| {
            let stranger = fleet.secrets.join("stranger");
            fs::create_dir_all(&stranger).expect("mkdir");
            berth_tests::berth_certs(&stranger, &["kvm02"], &[]);
            fleet.hosts[1].terminate();
            let b = &fleet.hosts[1];
            forger = Some(ForgedPeer::start(&b.ns, &b.addr, &stranger));
        });
    let forged = forger.expect("the forger runs");
    let a = &fleet.hosts[0];
    wait_until("kvm01 to ask the forger", Duration::from_secs(30), || {
        forged.connections.load(Ordering::SeqCst) >= 1
    });
    wait_until(
        "the refusal in kvm01's status",
        Duration::from_secs(30),
        || {
            a.guest_status(&name).is_some_and(|g| {
                g["phase"] == "SwitchoverUnknown" && g.to_string().contains("TLS with kvm02 failed")
            })
        },
    );
    // Asked again with backoff meanwhile; never believed.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        forged.answered.load(Ordering::SeqCst),
        0,
        "no forged answer was read"
    );
    assert_eq!(
        run_state(a, &name),
        Some(GuestRunState::Paused),
        "not resumed"
    );
    assert_eq!(vmm_pid(a, &name), Some(source_pid), "the copy is kept");
    assert_eq!(fleet.vmms(&name), vec![source_pid], "exactly one VMM");
    assert!(
        metric(a, "berth_switchover_resolutions_total").is_none(),
        "nothing was resolved"
    );
    assert!(
        a.log_text().contains("UnknownIssuer"),
        "the reason is logged: {}",
        a.log_text()
    );

    // The real kvm02 comes back: it never ran the guest, which resumes here.
    drop(forged);
    fleet.start(1);
    let a = &fleet.hosts[0];
    wait_until(
        "the guest to run again on kvm01",
        Duration::from_secs(60),
        || run_state(a, &name) == Some(GuestRunState::Running),
    );
    assert_eq!(vmm_pid(a, &name), Some(source_pid), "in its source VMM");
    assert_eq!(fleet.vmms(&name), vec![source_pid], "exactly one VMM");
    assert_eq!(
        metric(a, "berth_switchover_resolutions_total{outcome=\"source\"}"),
        Some(1.0)
    );
}
