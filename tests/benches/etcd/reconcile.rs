//! The fleet's whole reconcile path at scale: 1,000 simulated hosts in this process and
//! 10,000 selector-placed guests, against one real etcd.
//!
//! Each simulated host runs what `berth serve --etcd` runs for a host, minus git and
//! HTTP: its own etcd session (lease, default timeouts), [`EtcdCoordination`] (publishing
//! what it observes, ownership records taken before a start and fencing tokens checked
//! before a retune or stop), the placement watch, and the real reconcile loop
//! ([`Controller`]: observe, plan, apply through its driver, status). Its driver is the
//! simulated driver scoped to that one host (named as the mock it is: it runs no guest).
//! Host 0 also leads (schedules, keeps the placement records).
//!
//! A "commit" is the parsed revision handed to every host's loop at once: a real host
//! reads and validates it from its own git clone; that cost, paid by every host in
//! parallel, is measured once here and shown apart.
//!
//! Measured: from the first revision to etcd showing all 10,000 guests running (every
//! host started its guests: 10,000 ownership records taken); etcd's requests at rest
//! with all 1,000 loops following; and from a commit that changes 1% of the guests (100
//! io weights, a live retune) to etcd showing all 100 changed, as their hosts
//! published them.
//!
//! Run only when named (`-- reconcile`); `BERTH_BENCH_FLEET=HOSTSxGUESTS` sets the size
//! (default 1000x10000). Progress goes to stderr every 10 s while it waits.
//!
//! All 1,000 hosts share this machine's 2 cores, so the times are what 1,000 hosts'
//! work takes on 2 cores, not what one host waits for. Each phase also shows this
//! process's CPU time and etcd's, and the loops' passes (they share one `Metrics`):
//! how many, and their mean wall time (which includes waiting for a core).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_reconciler::backoff::BackoffPolicy;
use berth_reconciler::client::Transport;
use berth_reconciler::diff::{Field, HostSetting};
use berth_reconciler::driver::{Driver, DriverError, DriverKind, Scope, SimDriver};
use berth_reconciler::etcd::{
    follow_placements_for, lead_on, placements_of, read_fleet, EtcdConfig, EtcdStore, HostSession,
    LeaderSettings,
};
use berth_reconciler::fleet::etcd::EtcdCoordination;
use berth_reconciler::fleet::http::HttpPeers;
use berth_reconciler::fleet::placement::Placements;
use berth_reconciler::fleet::Coordination;
use berth_reconciler::git::CommitId;
use berth_reconciler::metrics::Metrics;
use berth_reconciler::model::{Desired, Observed, ObservedGuest, ObservedHost};
use berth_reconciler::serve::controller::{Controller, ControllerConfig};
use berth_reconciler::serve::source::{Revision, SourceEvent, Trigger};
use berth_reconciler::serve::status::{Status, StatusStore};
use berth_schema::{Guest, GuestState};
use berth_tests::etcd::Etcd;
use etcd_client::{EventType, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::{median, metric, selector_fleet_with, writes};

/// The fleet's size: `BERTH_BENCH_FLEET=HOSTSxGUESTS` (default 1000x10000).
fn size() -> (usize, usize) {
    std::env::var("BERTH_BENCH_FLEET")
        .ok()
        .and_then(|v| {
            let (h, g) = v.split_once('x')?;
            Some((h.parse().ok()?, g.parse().ok()?))
        })
        .unwrap_or((1000, 10_000))
}
/// Hosts per etcd client connection (a real host has its own).
const HOSTS_PER_CONNECTION: usize = 50;

/// One simulated host's driver: the simulated driver (a mock: no guest runs) seeing this
/// host only, publishing each observe and checking the fencing token before it changes
/// a guest, as `berth serve`'s driver does.
struct SimHost {
    name: String,
    sim: SimDriver,
    coordination: Arc<EtcdCoordination>,
    runtime: tokio::runtime::Handle,
}

impl SimHost {
    fn fenced(&self, guest: &str) -> Result<(), DriverError> {
        self.runtime
            .block_on(self.coordination.may_act(guest))
            .map_err(|e| DriverError::Refused(e.to_string()))
    }
}

impl Driver for SimHost {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }

    fn scope(&self) -> Scope {
        Scope::Host(self.name.clone())
    }

    /// The reconcile loop publishes what it observes (its start guard is the
    /// coordination), as `berth serve`'s does.
    fn observe(&self) -> Result<Observed, DriverError> {
        self.sim.observe()
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.sim.configure_host(host, settings)
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        // The loop asked `may_start` (the ownership record) before dispatching.
        self.sim.start(guest, host)
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.fenced(&guest.metadata.name)?;
        self.sim.retune(guest, host, fields)
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.fenced(name)?;
        self.sim.stop(name, host)?;
        self.runtime.block_on(self.coordination.released(name));
        Ok(())
    }

    fn migrate(&self, guest: &Guest, _: &str, _: &str) -> Result<(), DriverError> {
        Err(DriverError::Refused(format!(
            "{}: a simulated host migrates nothing",
            guest.metadata.name
        )))
    }
}

/// A simulated host's loop and what feeds it.
struct Running {
    revisions: mpsc::Sender<SourceEvent>,
}

fn commit(n: u64, desired: &Arc<Desired>) -> SourceEvent {
    SourceEvent::Revision(Revision {
        commit: CommitId::parse(&format!("{n:040x}")).expect("a commit id"),
        trigger: Trigger::Poll,
        manifests: Ok(Arc::clone(desired)),
        warnings: Vec::new(),
    })
}

async fn start_host(
    store: &EtcdStore,
    host: &ObservedHost,
    state: &std::path::Path,
    endpoint: &str,
    metrics: &Arc<Metrics>,
    stop: &watch::Receiver<bool>,
) -> (Running, Arc<HostSession>) {
    let session = Arc::new(
        HostSession::open(store, &host.name, None)
            .await
            .expect("a session"),
    );
    let direct = HttpPeers::new(
        Arc::new(Placements::open(None)),
        Transport::Plain { fleet_secret: None },
    );
    let coordination = Arc::new(EtcdCoordination::new(
        Arc::clone(&session),
        &state.join(&host.name),
        direct,
        endpoint.to_owned(),
    ));
    tokio::spawn(Arc::clone(&coordination).run(stop.clone()));
    let driver = Arc::new(SimHost {
        name: host.name.clone(),
        sim: SimDriver::new([host.clone()]),
        coordination: Arc::clone(&coordination),
        runtime: tokio::runtime::Handle::current(),
    });
    let controller = Controller::new(
        ControllerConfig {
            host: host.name.clone(),
            resync: Duration::from_secs(60),
            backoff: BackoffPolicy::default(),
        },
        driver,
        StatusStore::new(Status {
            host: host.name.clone(),
            ..Status::default()
        }),
        Arc::clone(metrics),
    )
    .with_start_guard(coordination);
    let shared = follow_placements_for(
        store.clone(),
        host.name.clone(),
        controller.pokes(),
        stop.clone(),
    );
    let controller = controller.with_placer(shared);
    let (revisions, events) = mpsc::channel(4);
    tokio::spawn(controller.run(events, stop.clone()));
    (Running { revisions }, session)
}

/// The whole fleet in one read, asked again while etcd is too busy to answer in time
/// (1,000 hosts starting up on 2 cores).
async fn fleet_view(store: &EtcdStore) -> berth_reconciler::etcd::FleetView {
    let mut tries = 0;
    loop {
        match read_fleet(store).await {
            Ok(view) => return view,
            Err(e) if tries < 30 => {
                tries += 1;
                eprintln!("reading the fleet again: {e}");
            }
            Err(e) => panic!("cannot read the fleet: {e}"),
        }
    }
}

/// Waits until the guests etcd shows as observed satisfy `done` for `count` guests,
/// following them with one watch from `from` on.
async fn until_observed(
    store: &EtcdStore,
    count: usize,
    done: impl Fn(&ObservedGuest) -> bool,
) -> usize {
    let fleet = fleet_view(store).await;
    let mut state: BTreeMap<String, bool> = fleet
        .observed
        .iter()
        .map(|g| (g.name.clone(), done(g)))
        .collect();
    let prefix = store.keys().observed_all();
    let mut client = store.client();
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(fleet.revision + 1),
            ),
        )
        .await
        .expect("a watch");
    let mut events = 0;
    let started = Instant::now();
    let limit = Duration::from_secs(
        std::env::var("BERTH_BENCH_TIMEOUT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(900),
    );
    loop {
        let finished = state.values().filter(|d| **d).count();
        if finished >= count {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "{finished} of {count} guests done in etcd after {limit:?}"
        );
        let Ok(answer) = tokio::time::timeout(Duration::from_secs(10), stream.message()).await
        else {
            eprintln!(
                "reconcile: {finished} of {count} done after {:.0?}; load average {}",
                started.elapsed(),
                loadavg()
            );
            continue;
        };
        let answer = answer.expect("the watch").expect("the watch goes on");
        for event in answer.events() {
            events += 1;
            let Some(kv) = event.kv() else { continue };
            let key = kv.key_str().unwrap_or_default();
            let name = key.rsplit('/').next().unwrap_or_default().to_owned();
            match event.event_type() {
                EventType::Put => {
                    let g: ObservedGuest =
                        serde_json::from_slice(kv.value()).expect("an observed guest");
                    state.insert(name, done(&g));
                }
                EventType::Delete => {
                    state.remove(&name);
                }
            }
        }
    }
    events
}

/// [`until_observed`] on its own thread, runtime and connection, so that the 1,000
/// loops keeping this process's runtime busy do not starve the measurement.
async fn until_observed_apart(endpoint: &str, count: usize, done: fn(&ObservedGuest) -> bool) {
    let endpoint = endpoint.to_owned();
    let waiter = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let store = EtcdConfig::new(&endpoint).connect().await.expect("etcd");
            until_observed(&store, count, done).await;
        });
    });
    tokio::task::spawn_blocking(move || waiter.join().expect("the watcher"))
        .await
        .expect("the watcher");
}

/// One host's plan of the whole of `desired` (placed by the leader's records), median
/// of 5: what each pass of a host's loop cost before a pass planned only the guests that
/// concern its host.
async fn one_plan(store: &EtcdStore, desired: &Desired, host: &str) -> Duration {
    let fleet = fleet_view(store).await;
    let observed = Observed {
        guests: fleet
            .observed
            .into_iter()
            .filter(|g| g.host == host)
            .collect(),
        hosts: desired
            .hosts
            .iter()
            .filter(|h| h.metadata.name == host)
            .map(|h| ObservedHost::as_written(h, []))
            .collect(),
    };
    let capabilities = berth_reconciler::driver::FleetCapabilities::from_manifests(desired)
        .with_host(host, DriverKind::Sim.capabilities());
    median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let mut again = desired.clone();
                berth_reconciler::scheduler::assign(
                    &mut again,
                    placements_of(desired, &fleet.placements),
                );
                let plan = berth_reconciler::plan(&again, &observed, &capabilities);
                assert!(!plan.guests.is_empty());
                t.elapsed()
            })
            .collect(),
    )
}

/// This process's CPU time (user + system) and peak resident memory so far.
fn usage() -> (Duration, u64) {
    // SAFETY: getrusage writes only into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(u.ru_utime) + tv(u.ru_stime), u.ru_maxrss as u64 * 1024)
}

/// A process's CPU time (user + system) from `/proc/<pid>/stat`.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    Duration::from_secs_f64(ticks / hz)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The reconcile passes of every loop so far (they share one [`Metrics`]): how many,
/// and their total time.
fn passes(metrics: &Metrics) -> (f64, f64) {
    let text = metrics.encode();
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("berth_reconcile_duration_seconds_count"),
        value("berth_reconcile_duration_seconds_sum"),
    )
}

/// What a phase cost: wall time, this process's CPU, etcd's CPU, the loops' passes.
struct Phase {
    wall: Duration,
    cpu: Duration,
    etcd_cpu: Duration,
    passes: f64,
    pass_seconds: f64,
}

struct Meter<'a> {
    started: Instant,
    cpu: Duration,
    etcd_cpu: Duration,
    passes: (f64, f64),
    metrics: &'a Metrics,
    etcd_pid: u32,
}

impl<'a> Meter<'a> {
    fn start(metrics: &'a Metrics, etcd_pid: u32) -> Self {
        Meter {
            started: Instant::now(),
            cpu: usage().0,
            etcd_cpu: cpu_of(etcd_pid),
            passes: passes(metrics),
            metrics,
            etcd_pid,
        }
    }

    fn stop(&self) -> Phase {
        let (n, sum) = passes(self.metrics);
        Phase {
            wall: self.started.elapsed(),
            cpu: usage().0.saturating_sub(self.cpu),
            etcd_cpu: cpu_of(self.etcd_pid).saturating_sub(self.etcd_cpu),
            passes: n - self.passes.0,
            pass_seconds: sum - self.passes.1,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mean = if self.passes > 0.0 {
            Duration::from_secs_f64(self.pass_seconds / self.passes)
        } else {
            Duration::ZERO
        };
        write!(
            f,
            "{:.2?} (CPU: berth {:.2?}, etcd {:.2?}; {} passes, mean {:.2?})",
            self.wall, self.cpu, self.etcd_cpu, self.passes, mean
        )
    }
}

pub fn fleet(runtime: &tokio::runtime::Runtime) {
    let (hosts_n, guests_n) = size();
    #[allow(non_snake_case)]
    let (HOSTS, GUESTS) = (hosts_n, guests_n);
    println!();
    println!(
        "reconcile: {HOSTS} simulated hosts, {GUESTS} guests; load average {}",
        loadavg()
    );
    let t = Instant::now();
    let desired = Arc::new(selector_fleet_with(HOSTS, GUESTS, ", io: {weight: 100}"));
    let parse = t.elapsed();
    let mut changed = (*desired).clone();
    let mut to_change = 0;
    for g in changed
        .guests
        .iter_mut()
        .filter(|g| g.metadata.name[1..].parse::<usize>().unwrap() % 100 == 1)
    {
        g.spec.io = Some(berth_schema::IoSpec { weight: 200 });
        to_change += 1;
    }
    assert_eq!(to_change, GUESTS / 100);
    let changed = Arc::new(changed);
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let etcd_pid = etcd.pid().expect("etcd runs");
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let state = tempfile::tempdir().expect("a state dir");
    let metrics = Arc::new(Metrics::new());
    runtime.block_on(async {
        let (stop_tx, stop) = watch::channel(false);
        let mut stores = Vec::new();
        for _ in 0..HOSTS.div_ceil(HOSTS_PER_CONNECTION) {
            stores.push(EtcdConfig::new(&endpoint).connect().await.expect("etcd"));
        }
        let meter = Meter::start(&metrics, etcd_pid);
        let mut hosts = Vec::new();
        let mut sessions = Vec::new();
        for (i, h) in desired.hosts.iter().enumerate() {
            let observed = ObservedHost::as_written(h, []);
            let (running, session) = start_host(
                &stores[i / HOSTS_PER_CONNECTION],
                &observed,
                state.path(),
                &endpoint,
                &metrics,
                &stop,
            )
            .await;
            hosts.push(running);
            sessions.push(session);
        }
        let joined = meter.stop();
        eprintln!("reconcile: {HOSTS} hosts joined: {joined}");
        // Host 0 leads.
        let (leader_revision, leader_rx) = watch::channel(None::<Arc<Desired>>);
        let leader = Arc::clone(&sessions[0]);
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let led = Arc::clone(&rounds);
        // As `berth serve` leads: campaigning again after a failed round.
        tokio::spawn(async move {
            lead_on(&leader, leader_rx, LeaderSettings::default(), move |_, round| {
                led.lock().expect("rounds").push((Instant::now(), round.written));
            })
            .await;
        });

        // The first revision: every guest is started where the leader places it.
        let meter = Meter::start(&metrics, etcd_pid);
        leader_revision.send_replace(Some(Arc::clone(&desired)));
        for h in &hosts {
            h.revisions.send(commit(1, &desired)).await.expect("a loop");
        }
        until_observed_apart(&endpoint, GUESTS, |g| {
            g.state == GuestState::Running && g.io_weight == Some(100)
        })
        .await;
        let first = meter.stop();
        eprintln!("reconcile: first revision, {GUESTS} running in etcd: {first}");
        let store = &stores[0];
        let full_plan = one_plan(store, &desired, "h0001").await;

        // At rest: every host renews its lease, follows the placements and runs its
        // loop; the leader's periodic round reads the fleet.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rest_load = loadavg();
        let received = || metric(port, "grpc_server_msg_received_total", "");
        let renewals_before = metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive");
        let ranges_before =
            metric(port, "grpc_server_msg_received_total", "grpc_method=\"Range\"");
        let received_before = received();
        let writes_before = writes(port);
        let meter = Meter::start(&metrics, etcd_pid);
        const REST: u64 = 20;
        tokio::time::sleep(Duration::from_secs(REST)).await;
        let rest = meter.stop();
        let per_s = |v: f64| v / REST as f64;
        let renewals = per_s(
            metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive") - renewals_before,
        );
        let ranges = per_s(
            metric(port, "grpc_server_msg_received_total", "grpc_method=\"Range\"")
                - ranges_before,
        );
        let requests = per_s(received() - received_before);
        let rest_writes = per_s(writes(port) - writes_before);

        // The commit that changes 1% of the guests.
        let commit_load = loadavg();
        let writes_before = writes(port);
        let meter = Meter::start(&metrics, etcd_pid);
        leader_revision.send_replace(Some(Arc::clone(&changed)));
        for h in &hosts {
            h.revisions.send(commit(2, &changed)).await.expect("a loop");
        }
        let handed = meter.started.elapsed();
        until_observed_apart(&endpoint, to_change, |g| {
            g.state == GuestState::Running && g.io_weight == Some(200)
        })
        .await;
        let one_percent = meter.stop();
        let change_writes = writes(port) - writes_before;
        let fleet = fleet_view(store).await;
        let running = fleet
            .observed
            .iter()
            .filter(|g| g.state == GuestState::Running)
            .count();
        assert_eq!(running, GUESTS, "every guest still runs, once");
        assert_eq!(fleet.owners.len(), GUESTS);
        let changed_in_etcd = fleet
            .observed
            .iter()
            .filter(|g| g.io_weight == Some(200))
            .count();
        assert_eq!(changed_in_etcd, to_change, "only the 1% changed");
        let (_, peak) = usage();
        let end_load = loadavg();

        let _ = stop_tx.send(true);
        println!();
        println!("| hosts (simulated, one process) | guests | revision parsed (each host, once) | hosts joined | first revision -> all running in etcd | 1% commit -> changed in etcd | handing the commit to the loops | etcd writes for the 1% change | full-revision plan of one host (what each pass cost before) | peak memory |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {HOSTS} | {GUESTS} | {parse:.2?} | {joined} | {first} | {one_percent} | {handed:.2?} | {change_writes:.0} | {full_plan:.2?} | {:.2} GiB |",
            peak as f64 / (1u64 << 30) as f64
        );
        println!();
        println!("| at rest, {REST} s | etcd requests/s | lease renewals/s | ranges/s | writes/s | writes/s per host | berth CPU (all loops) | etcd CPU |");
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {HOSTS} hosts | {requests:.0} | {renewals:.0} | {ranges:.1} | {rest_writes:.1} | {:.3} | {:.0}% of a core | {:.0}% of a core |",
            rest_writes / HOSTS as f64,
            rest.cpu.as_secs_f64() / REST as f64 * 100.0,
            rest.etcd_cpu.as_secs_f64() / REST as f64 * 100.0,
        );
        println!();
        println!("load average (1, 5, 15 min): at rest {rest_load}; at the commit {commit_load}; at the end {end_load}");
        drop(sessions);
    });
}
