//! The loop over the simulated fleet (`SimDriver`, no real guests).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use berth_schema::Guest;
use tokio::task::JoinHandle;

use super::*;
use crate::diff::{Field, HostSetting};
use crate::driver::sim::{SimDriver, SimOp};
use crate::driver::{DriverError, DriverKind, Scope};
use crate::model::ObservedHost;
use crate::serve::source::Trigger;
use crate::serve::status::{ConditionStatus, Status};

const HOSTS: &str = "\
apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm01}
spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 4GiB}
---
apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm02}
spec: {address: 127.0.0.2:1, cpus: 0-1, memory: 4GiB}
";

fn guest(name: &str, host: &str, weight: u16, annotations: &str) -> String {
    format!(
        "---\napiVersion: berth.dev/v1\nkind: Guest\n\
         metadata: {{name: {name}{annotations}}}\n\
         spec:\n  host: {host}\n  cpu: {{vcpus: 1}}\n  memory: {{size: 64MiB}}\n  io: {{weight: {weight}}}\n"
    )
}

fn commit(n: u8) -> CommitId {
    CommitId::parse(&format!("{n:040x}")).expect("commit id")
}

fn revision(n: u8, guests: &[String]) -> SourceEvent {
    let text = format!("{HOSTS}{}", guests.concat());
    let manifests = berth_schema::load_files([("fleet.yaml", text)])
        .map(|v| Arc::new(Desired::from_manifests(&v.manifests)));
    SourceEvent::Revision(Revision {
        commit: commit(n),
        trigger: Trigger::Poll,
        manifests,
        warnings: Vec::new(),
    })
}

fn empty_sim() -> Arc<SimDriver> {
    let text = HOSTS.to_owned();
    let v = berth_schema::load_files([("hosts.yaml", text)]).expect("valid hosts");
    let hosts = Desired::from_manifests(&v.manifests)
        .hosts
        .iter()
        .map(|h| ObservedHost::as_written(h, []))
        .collect::<Vec<_>>();
    Arc::new(SimDriver::new(hosts))
}

struct Harness {
    events: mpsc::Sender<SourceEvent>,
    shutdown: watch::Sender<bool>,
    status: StatusStore,
    metrics: Arc<Metrics>,
    task: JoinHandle<()>,
}

impl Harness {
    fn start(driver: Arc<dyn Driver>) -> Self {
        let config = ControllerConfig {
            host: "kvm01".into(),
            resync: Duration::from_millis(100),
            backoff: BackoffPolicy {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(400),
            },
        };
        let status = StatusStore::default();
        let metrics = Arc::new(Metrics::new());
        let controller = Controller::new(config, driver, status.clone(), Arc::clone(&metrics));
        let (events, events_rx) = mpsc::channel(8);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(controller.run(events_rx, shutdown_rx));
        Harness {
            events,
            shutdown,
            status,
            metrics,
            task,
        }
    }

    async fn send(&self, event: SourceEvent) {
        self.events.send(event).await.expect("controller runs");
    }

    /// Waits up to 5 s for the status to satisfy `done`; fails with the status.
    async fn wait_for(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.status.snapshot();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.send(true).expect("controller runs");
        self.task.await.expect("controller ends cleanly");
    }
}

fn applied(n: u8) -> impl Fn(&Status) -> bool {
    move |s| {
        s.last_applied
            .as_ref()
            .is_some_and(|a| a.revision == commit(n).as_str())
    }
}

fn guest_phase<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status
        .guests
        .iter()
        .find(|g| g.name == name)
        .map(|g| g.phase.as_str())
}

#[tokio::test]
async fn acts_only_on_guests_placed_on_its_host() {
    let sim = empty_sim();
    let h = Harness::start(sim.clone());
    h.send(revision(
        1,
        &[guest("a", "kvm01", 100, ""), guest("b", "kvm02", 100, "")],
    ))
    .await;
    let status = h.wait_for("revision 1 applied", applied(1)).await;
    assert_eq!(sim.log(), vec!["start a on kvm01"]);
    assert_eq!(guest_phase(&status, "a"), Some("Running"));
    assert_eq!(
        guest_phase(&status, "b"),
        None,
        "kvm02's guest is not ours to report"
    );
    assert!(status.ready);
    assert_eq!(status.enforcing.as_deref(), Some(commit(1).as_str()));
    h.stop().await;
}

#[tokio::test]
async fn an_invalid_revision_keeps_the_last_good_one_and_drift_is_corrected() {
    let sim = empty_sim();
    let h = Harness::start(sim.clone());
    h.send(revision(1, &[guest("a", "kvm01", 100, "")])).await;
    h.wait_for("revision 1 applied", applied(1)).await;

    // `weight: lots` is not a number: the revision is refused with file and line.
    let bad = guest("a", "kvm01", 100, "").replace("weight: 100", "weight: lots");
    h.send(revision(2, &[bad])).await;
    let status = h
        .wait_for("the refusal", |s| {
            s.last_error.as_ref().is_some_and(|e| e.kind == "invalid")
        })
        .await;
    let error = status.last_error.as_ref().expect("error");
    assert_eq!(error.revision.as_deref(), Some(commit(2).as_str()));
    let problem = &error.diagnostics[0];
    assert_eq!(
        (problem.file.as_str(), problem.line),
        ("fleet.yaml", Some(18))
    );
    assert!(error.message.contains("fleet.yaml:18"), "{}", error.message);
    assert_eq!(status.enforcing.as_deref(), Some(commit(1).as_str()));

    // A change by hand is drift from the enforced revision 1, corrected on resync.
    sim.tamper("a", |g| g.io_weight = Some(999));
    h.wait_for("drift corrected", |_| {
        sim.log().contains(&"retune a on kvm01".to_owned())
    })
    .await;
    h.wait_for("drift counted", |_| h.metrics.drift_corrections.get() == 1)
        .await;
    let status = h.status.snapshot();
    assert_eq!(
        status.last_applied.expect("applied").revision,
        commit(1).as_str()
    );
    h.stop().await;
}

#[tokio::test]
async fn failures_back_off_per_guest_and_others_go_on() {
    let sim = empty_sim();
    sim.inject_fault(SimOp::Start, "a");
    sim.inject_fault(SimOp::Start, "a");
    let h = Harness::start(sim.clone());
    h.send(revision(
        1,
        &[guest("a", "kvm01", 100, ""), guest("c", "kvm01", 100, "")],
    ))
    .await;
    let status = h
        .wait_for("a failed", |s| guest_phase(s, "a") == Some("Failed"))
        .await;
    let a = status.guests.iter().find(|g| g.name == "a").expect("a");
    let failed = a
        .conditions
        .iter()
        .find(|c| c.kind == ConditionType::Ready)
        .expect("Ready condition");
    assert_eq!(
        (failed.status, failed.reason),
        (ConditionStatus::False, Reason::ActionFailed)
    );
    assert!(a
        .conditions
        .iter()
        .any(|c| c.kind == ConditionType::Reconciling && c.reason == Reason::RetryingAfterFailure));
    assert!(
        failed.message.contains("simulated failure"),
        "{}",
        failed.message
    );
    h.wait_for("revision 1 applied after retries", applied(1))
        .await;
    let log = sim.log();
    assert!(log.contains(&"start c on kvm01".to_owned()), "{log:?}");
    assert!(log.contains(&"start a on kvm01".to_owned()), "{log:?}");
    let text = h.metrics.encode();
    assert!(
        text.contains("berth_actions_total{kind=\"start\",result=\"error\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("berth_actions_total{kind=\"start\",result=\"ok\"} 2"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test]
async fn suspended_guests_are_left_alone() {
    let sim = empty_sim();
    let h = Harness::start(sim.clone());
    h.send(revision(1, &[guest("a", "kvm01", 100, "")])).await;
    h.wait_for("revision 1 applied", applied(1)).await;
    let suspend = ", annotations: {berth.dev/suspend: \"true\"}";
    h.send(revision(2, &[guest("a", "kvm01", 300, suspend)]))
        .await;
    let status = h
        .wait_for("a suspended", |s| guest_phase(s, "a") == Some("Suspended"))
        .await;
    assert!(status.guests[0]
        .conditions
        .iter()
        .any(|c| c.kind == ConditionType::Suspended));
    // Several resyncs later, still untouched.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(sim.log(), vec!["start a on kvm01"]);
    // Resuming applies the change.
    h.send(revision(3, &[guest("a", "kvm01", 300, "")])).await;
    h.wait_for("revision 3 applied", applied(3)).await;
    assert_eq!(sim.log(), vec!["start a on kvm01", "retune a on kvm01"]);
    h.stop().await;
}

#[tokio::test]
async fn nothing_is_done_before_a_full_observe() {
    let sim = empty_sim();
    // Three observes fail (the startup pass, the revision's pass, the first retry).
    for _ in 0..3 {
        sim.inject_fault(SimOp::Observe, "");
    }
    let h = Harness::start(sim.clone());
    h.send(revision(1, &[guest("a", "kvm01", 100, "")])).await;
    let status = h
        .wait_for("the observe failure", |s| {
            s.last_error.as_ref().is_some_and(|e| e.kind == "observe")
        })
        .await;
    assert!(!status.ready);
    assert!(sim.log().is_empty());
    let status = h.wait_for("revision 1 applied", applied(1)).await;
    assert!(status.ready && status.last_error.is_none());
    assert_eq!(sim.log(), vec!["start a on kvm01"]);
    h.stop().await;
}

/// Delays every start and records how many actions run at once per guest.
struct SlowDriver {
    sim: Arc<SimDriver>,
    running: Mutex<HashMap<String, usize>>,
    most_at_once: AtomicUsize,
}

impl SlowDriver {
    fn track<T>(&self, name: &str, act: impl FnOnce() -> T) -> T {
        let now = {
            let mut running = self.running.lock().expect("lock");
            let n = running.entry(name.to_owned()).or_default();
            *n += 1;
            *n
        };
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        let result = act();
        *self
            .running
            .lock()
            .expect("lock")
            .get_mut(name)
            .expect("entry") -= 1;
        result
    }
}

impl Driver for SlowDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }
    fn scope(&self) -> Scope {
        Scope::Fleet
    }
    fn observe(&self) -> Result<Observed, DriverError> {
        self.sim.observe()
    }
    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.sim.configure_host(host, settings)
    }
    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.track(&guest.metadata.name, || self.sim.start(guest, host))
    }
    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.track(&guest.metadata.name, || {
            self.sim.retune(guest, host, fields)
        })
    }
    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.track(name, || self.sim.stop(name, host))
    }
    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        self.track(&guest.metadata.name, || self.sim.migrate(guest, from, to))
    }
}

#[tokio::test]
async fn one_action_per_guest_at_a_time_and_shutdown_waits_for_it() {
    let sim = empty_sim();
    let slow = Arc::new(SlowDriver {
        sim: sim.clone(),
        running: Mutex::new(HashMap::new()),
        most_at_once: AtomicUsize::new(0),
    });
    let h = Harness::start(slow.clone());
    h.send(revision(1, &[guest("a", "kvm01", 100, "")])).await;
    // Resyncs every 100 ms while the start takes 300 ms: none starts `a` again.
    h.wait_for("revision 1 applied", applied(1)).await;
    // A new revision's retune is in flight when the service is told to stop.
    h.send(revision(2, &[guest("a", "kvm01", 300, "")])).await;
    h.wait_for("retune in flight", |s| {
        s.guests.iter().any(|g| {
            g.conditions
                .iter()
                .any(|c| c.kind == ConditionType::Reconciling && c.reason == Reason::ActionInFlight)
        })
    })
    .await;
    h.stop().await;
    assert_eq!(slow.most_at_once.load(Ordering::SeqCst), 1);
    assert_eq!(sim.log(), vec!["start a on kvm01", "retune a on kvm01"]);
}

fn condition<'a>(status: &'a Status, guest: &str, kind: ConditionType) -> Option<&'a Condition> {
    status
        .guests
        .iter()
        .find(|g| g.name == guest)
        .and_then(|g| g.conditions.iter().find(|c| c.kind == kind))
}

#[tokio::test]
async fn conditions_say_drifted_and_restart_required_while_it_lasts() {
    let sim = empty_sim();
    let h = Harness::start(sim.clone());
    h.send(revision(1, &[guest("a", "kvm01", 100, "")])).await;
    let status = h
        .wait_for("a in sync at revision 1", |s| {
            applied(1)(s) && condition(s, "a", ConditionType::Ready).is_some_and(|c| c.is_true())
        })
        .await;
    let a = status.guests.iter().find(|g| g.name == "a").expect("a");
    assert_eq!(a.observed_revision.as_deref(), Some(commit(1).as_str()));
    assert_eq!(
        condition(&status, "a", ConditionType::Ready).map(|c| c.reason),
        Some(Reason::InSync)
    );

    // A change by hand on the converged revision: Drifted, until corrected (the
    // retune fails a few times first, so that it lasts).
    for _ in 0..3 {
        sim.inject_fault(SimOp::Retune, "a");
    }
    sim.tamper("a", |g| g.io_weight = Some(999));
    let status = h
        .wait_for("drift shown", |s| {
            condition(s, "a", ConditionType::Drifted).is_some()
        })
        .await;
    let drifted = condition(&status, "a", ConditionType::Drifted).expect("Drifted");
    assert_eq!(drifted.reason, Reason::ChangedOutsideBerth);
    assert!(
        drifted.message.contains("spec.io.weight"),
        "{}",
        drifted.message
    );
    assert!(!drifted.last_transition_time.is_empty());
    assert!(condition(&status, "a", ConditionType::Ready).is_some_and(|c| !c.is_true()));
    let status = h
        .wait_for("drift corrected", |s| {
            condition(s, "a", ConditionType::Ready).is_some_and(|c| c.is_true())
        })
        .await;
    assert!(condition(&status, "a", ConditionType::Drifted).is_none());

    // A restart-class change in a new revision: RestartRequired, and no drift (the
    // host has not converged to revision 2).
    for op in [SimOp::Migrate, SimOp::Stop] {
        for _ in 0..3 {
            sim.inject_fault(op, "a");
        }
    }
    let bigger = guest("a", "kvm01", 100, "").replace("size: 64MiB", "size: 128MiB");
    h.send(revision(2, &[bigger])).await;
    let status = h
        .wait_for("restart required", |s| {
            condition(s, "a", ConditionType::RestartRequired).is_some()
        })
        .await;
    let restart = condition(&status, "a", ConditionType::RestartRequired).expect("shown");
    assert!(
        matches!(restart.reason, Reason::LocalMigration | Reason::Restart),
        "{restart:?}"
    );
    assert!(
        restart.message.contains("spec.memory.size"),
        "{}",
        restart.message
    );
    assert!(condition(&status, "a", ConditionType::Drifted).is_none());
    assert!(condition(&status, "a", ConditionType::Reconciling).is_some());
    h.wait_for("revision 2 applied", applied(2)).await;
    h.stop().await;
}

/// Fails every start as a migration's preparation fails: a driver error whose cause is
/// another error with a cause of its own.
struct PrepareFails(Arc<SimDriver>);

impl Driver for PrepareFails {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }
    fn scope(&self) -> Scope {
        Scope::Fleet
    }
    fn observe(&self) -> Result<Observed, DriverError> {
        self.0.observe()
    }
    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.0.configure_host(host, settings)
    }
    fn start(&self, guest: &Guest, _: &str) -> Result<(), DriverError> {
        Err(DriverError::Failed {
            context: format!(
                "preparing the migration of {} to kvm02",
                guest.metadata.name
            ),
            cause: Box::new(crate::fleet::CoordinationError {
                host: "kvm02".into(),
                source: "the incoming VMM of a cannot be built: no 2MiB hugepages free".into(),
            }),
        })
    }
    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.0.retune(guest, host, fields)
    }
    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.0.stop(name, host)
    }
    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        self.0.migrate(guest, from, to)
    }
}

#[tokio::test]
async fn a_failed_action_reports_every_cause_once() {
    let h = Harness::start(Arc::new(PrepareFails(empty_sim())));
    h.send(revision(1, &[guest("a", "kvm01", 100, "")])).await;
    let status = h
        .wait_for("a failed", |s| guest_phase(s, "a") == Some("Failed"))
        .await;
    let a = status.guests.iter().find(|g| g.name == "a").expect("a");
    let ready = a
        .conditions
        .iter()
        .find(|c| c.kind == ConditionType::Ready)
        .expect("Ready condition");
    assert!(
        ready
            .message
            .contains("preparing the migration of a to kvm02: host kvm02: the incoming VMM of a cannot be built: no 2MiB hugepages free"),
        "{}",
        ready.message
    );
    h.stop().await;
}
