//! The fleet on etcd end to end: three "hosts" as network namespaces on one bridge (in
//! a hub namespace that also runs a real etcd), each running the real
//! `berth serve --driver local --etcd` with short leases (TTL 3 s, self-fence after
//! 1.5 s). Guests are small heartbeat guests placed by `hostSelector`.
//!
//! Covered: the leader places selector guests on hosts with room, and a guest that fits
//! nowhere is blocked with the reason in every host's status; the `berth serve` of the
//! host running an HA guest is killed (SIGKILL) and its link cut: its VMM fences the
//! guest (no one renews its deadline), and only after that, once the lease expired,
//! the guest runs on another host, while a sampler that reads every VMM of every host
//! every 50 ms for the whole test never finds it running on two hosts; the non-HA
//! guest of the dead host is not restarted elsewhere.
//!
//! Every process is killed by pid, and every namespace, state directory and cgroup is
//! removed when the test ends, even when it fails.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_tests::etcd::Etcd;
use berth_tests::host::Host;
use berth_tests::net::Bridge;
use berth_tests::{wait_until, GitRepo};

const HOSTS: usize = 3;

/// Starts `host`'s `berth serve` on etcd with short HA timeouts (lease 3 s, self-fence
/// 1.5 s), without waiting for it.
fn start(host: &mut Host, repo: &std::path::Path, etcd: &str) {
    host.spawn(
        repo,
        &[
            "--poll-interval",
            "1s",
            "--etcd",
            etcd,
            "--lease-ttl",
            "3",
            "--self-fence-ms",
            "1500",
            "--etcd-timeout-ms",
            "500",
        ],
        &[],
    );
}

/// Whether a VMM of guest `name` runs under host `host`'s state directory and says
/// its guest runs (a fenced VMM stops its guest, then exits).
fn runs_on(host: &Host, name: &str) -> bool {
    runs_among(&berth_tests::vmms(), host, name)
}

/// [`runs_on`] with the VMMs already listed.
fn runs_among(vmms: &[(i32, String)], host: &Host, name: &str) -> bool {
    let dir = host.guest_dir(name).display().to_string() + "/";
    if !vmms.iter().any(|(_, c)| c.contains(&dir)) {
        return false;
    }
    berth_hypervisor::control::Client::connect(host.guest_dir(name).join("control.sock"))
        .and_then(|mut c| c.status())
        .map(|s| s.state == berth_hypervisor::control::GuestRunState::Running)
        // A VMM that cannot answer may still run its vCPUs: count it as running.
        .unwrap_or(true)
}

struct Fleet {
    net: Bridge,
    etcd: Option<Etcd>,
    /// Holds the hosts' state directories, removed after the teardown.
    _dir: tempfile::TempDir,
    repo: GitRepo,
    hosts: Vec<Host>,
    guests: Vec<String>,
}

impl Fleet {
    fn new() -> Fleet {
        berth_tests::require_root_and_kvm();
        let net = Bridge::new("bha", HOSTS);
        let etcd = Etcd::start_in_netns(&net.hub, &net.hub_ip);
        let dir = tempfile::tempdir().expect("temp dir");
        let secrets = dir.path().join("secrets");
        fs::create_dir_all(&secrets).expect("mkdir");
        let names: Vec<String> = (1..=HOSTS).map(|i| format!("kvm0{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let ips: Vec<&str> = net.hosts.iter().map(|(_, ip)| ip.as_str()).collect();
        berth_tests::berth_certs(&secrets, &refs, &ips);
        let hosts = (0..HOSTS)
            .map(|i| {
                Host::new(
                    &names[i],
                    &net.hosts[i].0,
                    &format!("{}:7410", net.hosts[i].1),
                    dir.path(),
                    i,
                    &secrets,
                )
            })
            .collect();
        Fleet {
            repo: GitRepo::new(dir.path().join("repo")),
            net,
            etcd: Some(etcd),
            _dir: dir,
            hosts,
            guests: Vec::new(),
        }
    }

    fn hosts_yaml(&self) -> String {
        self.hosts
            .iter()
            .map(|h| {
                format!(
                    "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {}, labels: {{rack: a, box: {}}}}}\n\
                     spec: {{address: '{}', cpus: 0-1, memory: 1GiB}}\n---\n",
                    h.name, h.name, h.addr
                )
            })
            .collect()
    }

    fn commit(&self, guests: &str, message: &str) {
        let text = format!("{}{guests}", self.hosts_yaml());
        self.repo.commit(&[("fleet.yaml", &text)], message);
    }

    /// Starts every host's service: kvm01 first, which then leads; then the others.
    fn start_all(&mut self) {
        let endpoint = self.etcd.as_ref().expect("etcd").endpoint();
        let repo = self.repo.dir.clone();
        start(&mut self.hosts[0], &repo, &endpoint);
        wait_until("kvm01 to lead", Duration::from_secs(30), || {
            self.hosts[0].log_text().contains("leading the fleet")
        });
        for host in &mut self.hosts[1..] {
            start(host, &repo, &endpoint);
        }
    }

    fn running_hosts(&self, name: &str) -> Vec<usize> {
        (0..HOSTS)
            .filter(|&i| runs_on(&self.hosts[i], name))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        berth_tests::host::tear_down(&mut self.hosts, &self.guests);
        self.etcd.take();
        let _ = &self.net;
    }
}

fn guest_yaml(name: &str, memory: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  \
         hostSelector: {{rack: a}}\n  cpu: {{vcpus: 1}}\n  memory: {{size: {memory}}}\n  \
         boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 100, ticksPerLine: 10}}}}\n{extra}---\n"
    )
}

/// A guest named to one host (`host:`), without the HA policy.
fn pinned_yaml(name: &str, host: &str) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  \
         host: {host}\n  cpu: {{vcpus: 1}}\n  memory: {{size: 32MiB}}\n  \
         boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 100, ticksPerLine: 10}}}}\n---\n"
    )
}

/// The pid of the VMM running `name` under `host`, when one runs.
fn vmm_of(host: &Host, name: &str) -> Option<i32> {
    let dir = host.guest_dir(name).display().to_string() + "/";
    berth_tests::vmm_pids(|c| c.contains(&dir)).first().copied()
}

#[test]
fn selector_placement_leader_death_ha_restart_and_partition_never_run_a_guest_twice() {
    let mut fleet = Fleet::new();
    let pid = std::process::id();
    let (ha, plain, huge) = (
        format!("ha-{pid}"),
        format!("plain-{pid}"),
        format!("huge-{pid}"),
    );
    let pinned: Vec<String> = (1..=HOSTS).map(|i| format!("pinned{i}-{pid}")).collect();
    fleet
        .guests
        .extend([ha.clone(), plain.clone(), huge.clone()]);
    fleet.guests.extend(pinned.iter().cloned());
    let pinned_yaml: String = pinned
        .iter()
        .enumerate()
        .map(|(i, g)| pinned_yaml(g, &fleet.hosts[i].name))
        .collect();
    fleet.commit(&pinned_yaml, "one guest named to each host");
    let began = Instant::now();
    fleet.start_all();
    wait_until(
        "the guests named to hosts to run",
        Duration::from_secs(60),
        || (0..HOSTS).all(|i| runs_on(&fleet.hosts[i], &pinned[i])),
    );
    let pinned_pids: Vec<i32> = (0..HOSTS)
        .map(|i| vmm_of(&fleet.hosts[i], &pinned[i]).expect("pinned VMM"))
        .collect();

    // Sample every VMM of every host every 50 ms, for the rest of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let twice = Arc::new(Mutex::new(Vec::<(Duration, String, Vec<usize>)>::new()));
    let samples = Arc::new(Mutex::new(0u64));
    let sampler = {
        let hosts: Vec<Host> = fleet
            .hosts
            .iter()
            .map(|h| Host {
                name: h.name.clone(),
                ns: String::new(),
                addr: String::new(),
                state: h.state.clone(),
                log: PathBuf::new(),
                serve: None,
                tls: PathBuf::new(),
            })
            .collect();
        let watched: Vec<String> = [ha.clone(), plain.clone()]
            .into_iter()
            .chain(pinned.iter().cloned())
            .collect();
        let (stop, twice, samples) = (stop.clone(), twice.clone(), samples.clone());
        std::thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let listed = berth_tests::vmms();
                for guest in &watched {
                    let on: Vec<usize> = (0..HOSTS)
                        .filter(|&i| runs_among(&listed, &hosts[i], guest))
                        .collect();
                    if on.len() > 1 {
                        twice
                            .lock()
                            .expect("samples")
                            .push((began.elapsed(), guest.clone(), on));
                    }
                }
                *samples.lock().expect("samples") += 1;
                // Every 50 ms on the clock (a late sample is not made up for).
                next += Duration::from_millis(50);
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        })
    };

    // The selector guests: equal hosts, so by name and free memory: ha on kvm01, plain
    // on kvm02; huge fits nowhere.
    let guests = format!(
        "{pinned_yaml}{}{}{}",
        guest_yaml(&ha, "32MiB", "  availability: {onHostFailure: restart}\n"),
        guest_yaml(&plain, "32MiB", ""),
        guest_yaml(&huge, "4GiB", "")
    );
    fleet.commit(&guests, "selector guests");
    wait_until(
        "the selector guests to run",
        Duration::from_secs(60),
        || fleet.running_hosts(&ha) == vec![0] && fleet.running_hosts(&plain) == vec![1],
    );
    eprintln!("selector guests running after {:?}", began.elapsed());
    // The HA guest's VMM was started with its fence armed (`--fence-file`: had the
    // service died before its first renewal, the guest would still stop in time); the
    // plain guest's has none.
    let vmms = berth_tests::vmms();
    let cmdline = |host: &Host, guest: &str| {
        let dir = host.guest_dir(guest).display().to_string() + "/";
        vmms.iter()
            .find(|(_, c)| c.contains(&dir))
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    };
    assert!(
        cmdline(&fleet.hosts[0], &ha).contains("--fence-file"),
        "{vmms:?}"
    );
    assert!(
        !cmdline(&fleet.hosts[1], &plain).contains("--fence-file"),
        "{vmms:?}"
    );
    // The huge guest fits nowhere: blocked, with the reason, on every host's status.
    wait_until(
        "the huge guest blocked in status",
        Duration::from_secs(20),
        || {
            fleet.hosts.iter().all(|h| {
                h.try_status().is_some_and(|s| {
                    s["guests"].as_array().is_some_and(|gs| {
                        gs.iter().any(|g| {
                            g["name"] == huge.as_str()
                                && g["phase"] == "Blocked"
                                && g.to_string().contains("no host fits")
                        })
                    })
                })
            })
        },
    );
    assert!(fleet.running_hosts(&huge).is_empty());
    // The service renews the HA guest's fence deadline every 375 ms: let it arm it.
    std::thread::sleep(Duration::from_secs(1));

    // kill -9 the service of kvm01 (the leader, running the HA guest) and cut its link.
    let died = Instant::now();
    fleet.hosts[0].kill9();
    fleet.net.cut(0);
    wait_until(
        "kvm01's VMM to fence the HA guest",
        Duration::from_secs(5),
        || !runs_on(&fleet.hosts[0], &ha),
    );
    let fenced = died.elapsed();
    wait_until("another host to lead", Duration::from_secs(10), || {
        fleet.hosts[1..]
            .iter()
            .any(|h| h.log_text().contains("leading the fleet"))
    });
    let led = died.elapsed();
    wait_until(
        "the HA guest to run on another host",
        Duration::from_secs(30),
        || fleet.running_hosts(&ha).iter().any(|&i| i != 0),
    );
    let restarted = died.elapsed();
    let moved_to = fleet.running_hosts(&ha);
    assert_eq!(
        moved_to,
        vec![2],
        "the HA guest goes to kvm03, which has the most room"
    );
    // Fenced by its VMM within the self-fence timeout (1.5 s) and a renewal period of
    // its last renewal; a new leader within one lease TTL (3 s) plus etcd's expiry
    // check; restarted only once the lease expired.
    assert!(
        fenced <= Duration::from_millis(2500),
        "fenced after {fenced:?}"
    );
    assert!(led <= Duration::from_millis(4000), "led after {led:?}");
    assert!(
        restarted >= Duration::from_millis(2000),
        "restarted after {restarted:?}"
    );
    eprintln!(
        "kvm01 died: HA guest fenced after {fenced:?}, new leader after {led:?}, \
         HA guest running on kvm03 after {restarted:?}"
    );
    // The guests without the HA policy of the dead host keep running there (its VMMs
    // outlive the service) and are not started elsewhere.
    assert_eq!(vmm_of(&fleet.hosts[0], &pinned[0]), Some(pinned_pids[0]));
    assert_eq!(fleet.running_hosts(&plain), vec![1]);

    // kvm03 now runs the HA guest: cut it off from etcd only.
    let cut = Instant::now();
    fleet.net.partition_from_hub(2);
    wait_until(
        "kvm03 to fence the HA guest",
        Duration::from_secs(5),
        || !runs_on(&fleet.hosts[2], &ha),
    );
    let fenced = cut.elapsed();
    wait_until(
        "the HA guest to run on kvm02",
        Duration::from_secs(30),
        || fleet.running_hosts(&ha) == vec![1],
    );
    let restarted = cut.elapsed();
    assert!(
        fenced <= Duration::from_millis(2500),
        "fenced after {fenced:?}"
    );
    assert!(
        restarted > fenced,
        "restarted after {restarted:?}, fenced after {fenced:?}"
    );
    eprintln!("kvm03 cut from etcd: HA guest fenced after {fenced:?}, running on kvm02 after {restarted:?}");
    // kvm03's guest without the policy keeps running, untouched; its status says why
    // it starts and moves nothing.
    assert_eq!(vmm_of(&fleet.hosts[2], &pinned[2]), Some(pinned_pids[2]));
    assert!(runs_on(&fleet.hosts[2], &pinned[2]));
    wait_until(
        "kvm03's status to say it lost etcd",
        Duration::from_secs(10),
        || {
            fleet.hosts[2]
                .try_status()
                .is_some_and(|s| !s["coordinationLost"].is_null())
        },
    );

    // The HA guest on kvm02 fits nowhere after this commit (no host has rack z): it is
    // blocked and keeps running where it is, and so keeps its fence renewed (the fence
    // follows where a guest runs, not where it is placed).
    let ha_pid = vmm_of(&fleet.hosts[1], &ha).expect("the HA guest's VMM on kvm02");
    let nowhere = format!(
        "{pinned_yaml}{}{}{}",
        guest_yaml(&ha, "32MiB", "  availability: {onHostFailure: restart}\n")
            .replace("{rack: a}", "{rack: z}"),
        guest_yaml(&plain, "32MiB", ""),
        guest_yaml(&huge, "4GiB", "")
    );
    fleet.commit(&nowhere, "the HA guest fits nowhere");
    let ha_entry = || {
        fleet.hosts[1].try_status().and_then(|s| {
            s["guests"]
                .as_array()?
                .iter()
                .find(|g| g["name"] == ha.as_str())
                .cloned()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entry = ha_entry();
        if entry
            .as_ref()
            .is_some_and(|g| g["phase"] == "Blocked" && g["runsHere"] == true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kvm02's status never showed the HA guest blocked and running there: {entry:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Longer than the self-fence timeout (1.5 s) and the lease (3 s) together.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        vmm_of(&fleet.hosts[1], &ha),
        Some(ha_pid),
        "the blocked HA guest was fenced although its host holds its lease"
    );

    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    let samples = *samples.lock().expect("samples");
    // One sample every 50 ms, a few late ones allowed on a loaded machine.
    let expected = began.elapsed().as_millis() as u64 / 50;
    assert!(
        samples * 10 >= expected * 8,
        "only {samples} samples of {expected}"
    );
    let twice = twice.lock().expect("samples");
    assert!(twice.is_empty(), "a guest ran on two hosts: {twice:?}");
    eprintln!(
        "{samples} samples in {:?}, never a guest on two hosts",
        began.elapsed()
    );
}

#[test]
fn an_ha_guest_its_selector_moves_keeps_its_fence_until_it_has_migrated() {
    // The fence follows where a guest runs: once the leader places the HA guest on
    // kvm02, kvm01 still renews its deadline until the migration has moved it (if it
    // stopped, the VMM would stop the guest at the deadline, mid-move).
    let mut fleet = Fleet::new();
    let ha = format!("move-{}", std::process::id());
    fleet.guests.push(ha.clone());
    // A guest that writes 500 pages a second, moved over a link capped at 4 MiB/s:
    // the move takes seconds, longer than the self-fence timeout (1.5 s).
    let on = |host: &str| {
        guest_yaml(
            &ha,
            "32MiB",
            "  availability: {onHostFailure: restart}\n  \
             migration: {bandwidth: 4MiB/s, completionTimeoutPerGiB: 1000s}\n",
        )
        .replace("{rack: a}", &format!("{{rack: a, box: {host}}}"))
        .replace(
            "ticksPerLine: 10}",
            "ticksPerLine: 10, dirtyPagesPerTick: 5}",
        )
    };
    fleet.commit(&on("kvm01"), "the HA guest on kvm01");
    fleet.start_all();
    wait_until(
        "the HA guest to run on kvm01",
        Duration::from_secs(60),
        || fleet.running_hosts(&ha) == vec![0],
    );
    // Let kvm01's service arm and renew the fence (every 375 ms), and the guest write
    // some 2,000 pages (8 MiB, 2 s on the capped link).
    std::thread::sleep(Duration::from_secs(4));
    let ticks_before = ticks(&fleet.hosts[0], &ha);
    assert!(ticks_before >= 300, "the guest beats: {ticks_before} ticks");
    let moved = Instant::now();
    fleet.commit(&on("kvm02"), "the HA guest moves to kvm02");
    wait_until(
        "the HA guest to run on kvm02",
        Duration::from_secs(40),
        || fleet.running_hosts(&ha) == vec![1],
    );
    eprintln!(
        "the HA guest runs on kvm02 {:?} after the commit",
        moved.elapsed()
    );
    // Moved live, not stopped and started again: its heartbeat counter went on (read
    // once kvm02's VMM answers at the guest's own directory, after the handover).
    wait_until("kvm02's VMM to answer", Duration::from_secs(15), || {
        ticks(&fleet.hosts[1], &ha) > 0
    });
    let ticks_after = ticks(&fleet.hosts[1], &ha);
    assert!(
        ticks_after >= ticks_before,
        "the guest restarted on kvm02 ({ticks_after} ticks, {ticks_before} before the move): \
         kvm01's VMM fenced it mid-move"
    );
}

/// The heartbeat ticks of guest `name`'s vCPUs under `host`, summed (0 when its VMM
/// does not answer).
fn ticks(host: &Host, name: &str) -> u64 {
    berth_hypervisor::control::Client::connect(host.guest_dir(name).join("control.sock"))
        .and_then(|mut c| c.status())
        .map(|s| s.vcpu.iter().filter_map(|v| v.ticks).sum())
        .unwrap_or(0)
}
