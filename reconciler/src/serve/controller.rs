//! The reconcile loop: kube-rs shaped. It is told *that* something changed (a new
//! revision, a resync tick, an action ending, a backoff expiring), never *what*, and
//! each pass recomputes everything from the whole state: observe, `plan(desired,
//! observed)`, dispatch.
//!
//! - It acts only on steps that belong to its host: actions on guests and settings of
//!   that host, and migrations away from it (the source drives a migration).
//! - It never acts before a full observe succeeded, in the same pass: after a restart
//!   the first thing it does is look at what runs, so a running guest is adopted, never
//!   started a second time.
//! - One action per guest at a time (a per-guest work queue: a guest with an action in
//!   flight gets nothing new until it ends). Actions of the plan's first local wave run
//!   concurrently; later waves wait for the next pass, which replans from what then
//!   runs, so the plan's capacity order holds.
//! - A failed action backs off per guest ([`crate::backoff`]); others go on.
//! - An invalid revision is not applied: the last good one stays enforced and the
//!   status says why, with the commit id and file:line of each problem.
//! - Guests annotated `berth.dev/suspend: "true"` are left alone (the plan reports them
//!   as suspended).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use berth_schema::GuestState;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::source::{Revision, SourceEvent};
use super::status::{
    now_rfc3339, Applied, Condition, ConditionType, GuestStatus, LastError, Problem, Reason,
    StatusStore,
};
use crate::apply::execute_step;
use crate::backoff::{BackoffPolicy, Backoffs};
use crate::driver::Driver;
use crate::fleet::incoming::IncomingNotes;
use crate::fleet::switchover::Switchovers;
use crate::fleet::Coordination;
use crate::git::CommitId;
use crate::metrics::Metrics;
use crate::model::{Desired, Observed};
use crate::plan::{plan, Action, GuestPlan, Operation, Plan, Step, StopReason};
use crate::scheduler::{self, PlacementIndex};

mod scope;

/// No placements: selector-placed guests concern no host.
static NO_PLACEMENTS: std::sync::LazyLock<PlacementIndex> =
    std::sync::LazyLock::new(PlacementIndex::default);

/// The backoff key of the observe step; `/` never appears in a guest name.
const OBSERVE_KEY: &str = "observe/";

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The host this service acts for.
    pub host: String,
    /// How often to re-observe and correct drift with no other trigger.
    pub resync: Duration,
    /// Backoff of failed actions.
    pub backoff: BackoffPolicy,
}

/// Called with each new valid revision before it is enforced (the simulated fleet adds
/// the hosts it names; the local driver learns the peers' addresses). The revision is
/// shared, never copied.
pub type RevisionHook = Box<dyn Fn(&CommitId, &Arc<Desired>) + Send + Sync>;

pub use crate::scheduler::Placer;

/// The revision being enforced, indexed for per-host passes.
#[derive(Clone)]
struct Enforcing {
    commit: CommitId,
    desired: Arc<Desired>,
    index: Arc<scope::RevisionIndex>,
    /// Where its selector-placed guests go without a fleet leader: the scheduler on the
    /// revision alone (every host up, no previous placement), which gives every host
    /// the same answer; computed once per revision.
    scheduled: Option<Arc<PlacementIndex>>,
}

/// How an action ended.
#[derive(Debug)]
enum Outcome {
    Done,
    Failed(String),
    /// Not run: another host may still run the guest.
    Waiting(String),
}

/// An action that ended.
#[derive(Debug)]
struct Completion {
    key: String,
    kind: &'static str,
    outcome: Outcome,
    took: Duration,
    drift: bool,
}

/// What woke the loop.
enum Wake {
    Shutdown,
    Source(Option<SourceEvent>),
    Completed(Completion),
    Tick,
    RetryNow,
}

/// The reconcile loop. See the module documentation.
pub struct Controller {
    config: ControllerConfig,
    driver: Arc<dyn Driver>,
    status: StatusStore,
    metrics: Arc<Metrics>,
    on_revision: Option<RevisionHook>,
    placer: Option<Arc<dyn Placer>>,
    /// Asked before every start whether another host may still run the guest.
    coordination: Option<Arc<dyn Coordination>>,
    incoming_notes: Option<Arc<IncomingNotes>>,
    /// Switchovers of migrations away from this host that wait for the destination's
    /// answer, shown on their guests.
    switchovers: Option<Arc<Switchovers>>,
    /// Wakes the loop for a pass when something it cannot see changed (a peer became
    /// observed).
    pokes: Arc<tokio::sync::Notify>,
    retries: Arc<tokio::sync::Notify>,
    enforcing: Option<Enforcing>,
    /// The revision the host last converged to.
    converged_on: Option<CommitId>,
    backoffs: Backoffs,
    /// Actions in flight, by key (guest name, or `host/<name>`).
    in_flight: HashMap<String, &'static str>,
    /// The last error of each key whose last action failed, with the action's kind.
    failures: HashMap<String, (&'static str, String)>,
    /// The enforced revision each guest was last reconciled at (found in sync, or an
    /// action done): its `observedRevision`.
    observed_revisions: HashMap<String, CommitId>,
    /// Why each key's start waits for another host.
    waiting: HashMap<String, String>,
    completions: (
        mpsc::UnboundedSender<Completion>,
        mpsc::UnboundedReceiver<Completion>,
    ),
}

impl Controller {
    /// A loop acting through `driver`, reporting into `status` and `metrics`.
    pub fn new(
        config: ControllerConfig,
        driver: Arc<dyn Driver>,
        status: StatusStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        Controller {
            backoffs: Backoffs::new(config.backoff),
            config,
            driver,
            status,
            metrics,
            on_revision: None,
            placer: None,
            coordination: None,
            incoming_notes: None,
            switchovers: None,
            pokes: Arc::new(tokio::sync::Notify::new()),
            retries: Arc::new(tokio::sync::Notify::new()),
            enforcing: None,
            converged_on: None,
            in_flight: HashMap::new(),
            failures: HashMap::new(),
            observed_revisions: HashMap::new(),
            waiting: HashMap::new(),
            completions: mpsc::unbounded_channel(),
        }
    }

    /// Calls `hook` with each new valid revision before it is enforced.
    pub fn on_revision(mut self, hook: RevisionHook) -> Self {
        self.on_revision = Some(hook);
        self
    }

    /// Takes the placements of selector-placed guests from `placer` (the fleet
    /// leader's records).
    pub fn with_placer(mut self, placer: Arc<dyn Placer>) -> Self {
        self.placer = Some(placer);
        self
    }

    /// What this host plans of the enforced revision and of what it observes, its
    /// selector-placed guests placed ([`scope`]).
    fn scoped(&self, enforcing: &Enforcing, observed: Observed) -> (Desired, Observed) {
        let placer: &dyn Placer = match (&self.placer, &enforcing.scheduled) {
            (Some(placer), _) => placer.as_ref(),
            (None, Some(scheduled)) => scheduled.as_ref(),
            (None, None) => &*NO_PLACEMENTS,
        };
        scope::scope(
            &enforcing.desired,
            &enforcing.index,
            placer,
            observed,
            &self.config.host,
        )
    }

    /// Asks `coordination` before every start whether another host may still run the
    /// guest, and tells it where each enforced revision places the guests.
    pub fn with_start_guard(mut self, coordination: Arc<dyn Coordination>) -> Self {
        self.coordination = Some(coordination);
        self
    }

    /// Shows why migrations to this host failed (`notes`) on their guests' status.
    pub fn with_incoming_notes(mut self, notes: Arc<IncomingNotes>) -> Self {
        self.incoming_notes = Some(notes);
        self
    }

    /// Shows the unresolved switchovers of `switchovers` on their guests' status.
    pub fn with_switchovers(mut self, switchovers: Arc<Switchovers>) -> Self {
        self.switchovers = Some(switchovers);
        self
    }

    /// A handle whose `notify_one` makes the loop run a pass.
    pub fn pokes(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.pokes)
    }

    /// Notified when what held actions back is gone (the fleet's etcd answers again):
    /// every backoff is forgotten and a pass runs at once.
    pub fn retries(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.retries)
    }

    /// Runs until `shutdown` turns true, then waits for the actions in flight.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source_open = true;
        let pokes = Arc::clone(&self.pokes);
        let retries = Arc::clone(&self.retries);
        loop {
            let retry_at = self.backoffs.next_deadline(Instant::now());
            let wake = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => Wake::Shutdown,
                Some(done) = self.completions.1.recv() => Wake::Completed(done),
                event = events.recv(), if source_open => Wake::Source(event),
                _ = resync.tick() => Wake::Tick,
                () = pokes.notified() => Wake::Tick,
                () = retries.notified() => Wake::RetryNow,
                () = sleep_until(retry_at), if retry_at.is_some() => Wake::Tick,
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Completed(done) => self.complete(done),
                Wake::Source(Some(event)) => {
                    if !self.source_event(event) {
                        continue;
                    }
                }
                Wake::Source(None) => {
                    source_open = false;
                    continue;
                }
                Wake::Tick => {}
                Wake::RetryNow => self.backoffs = Backoffs::new(self.config.backoff),
            }
            self.pass().await;
        }
        self.drain().await;
    }

    /// Waits for the actions in flight; a driver leaves each guest running exactly
    /// once whatever happens, so nothing is started or stopped here.
    async fn drain(&mut self) {
        if !self.in_flight.is_empty() {
            info!(
                actions = self.in_flight.len(),
                "waiting for the actions in flight"
            );
        }
        while !self.in_flight.is_empty() {
            match self.completions.1.recv().await {
                Some(done) => self.complete(done),
                None => break,
            }
        }
    }

    /// Takes in a source event; returns whether a pass is needed.
    fn source_event(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::Revision(revision) => self.revision(revision),
            SourceEvent::Unreadable { commit, error } => {
                self.metrics.revision("unreadable");
                self.status.update(|s| {
                    s.last_error = Some(LastError {
                        revision: commit.map(|c| c.to_string()),
                        kind: "source".into(),
                        message: error,
                        diagnostics: Vec::new(),
                        at: now_rfc3339(),
                    });
                });
                false
            }
        }
    }

    fn revision(&mut self, revision: Revision) -> bool {
        let Revision {
            commit,
            manifests,
            warnings,
            trigger,
        } = revision;
        self.status.update(|s| {
            s.last_attempted_revision = Some(commit.to_string());
            s.source.revision = Some(commit.to_string());
            s.source.seen_at = Some(now_rfc3339());
        });
        match manifests {
            Ok(desired) => {
                for w in &warnings {
                    warn!(revision = %commit.short(), "{w}");
                }
                info!(revision = %commit, ?trigger, "enforcing revision");
                self.metrics.revision("valid");
                if let Some(hook) = &self.on_revision {
                    hook(&commit, &desired);
                }
                if let Some(coordination) = &self.coordination {
                    coordination.record_placements(&self.config.host, &desired);
                }
                // A new revision may fix what failed: try everything again at once.
                self.backoffs = Backoffs::new(self.config.backoff);
                self.failures.clear();
                self.waiting.clear();
                self.status.update(|s| {
                    s.enforcing = Some(commit.to_string());
                    s.last_error = None;
                });
                let index = scope::RevisionIndex::shared(&desired);
                let scheduled = (self.placer.is_none()
                    && desired.guests.iter().any(|g| g.spec.placed_by_selector()))
                .then(|| {
                    Arc::new(PlacementIndex::new(scheduler::schedule(
                        &desired,
                        &[],
                        &|_| true,
                        &BTreeMap::new(),
                    )))
                });
                self.enforcing = Some(Enforcing {
                    commit,
                    desired,
                    index,
                    scheduled,
                });
                true
            }
            Err(invalid) => {
                self.metrics.revision("invalid");
                let first = invalid
                    .diagnostics
                    .iter()
                    .find(|d| d.is_error())
                    .map_or_else(String::new, |d| format!(": {d}"));
                error!(
                    revision = %commit,
                    errors = invalid.error_count(),
                    "revision refused, the last good revision stays enforced{first}"
                );
                self.status.update(|s| {
                    s.last_error = Some(LastError {
                        revision: Some(commit.to_string()),
                        kind: "invalid".into(),
                        message: format!(
                            "revision {} refused: {} error{}{first}",
                            commit.short(),
                            invalid.error_count(),
                            if invalid.error_count() == 1 { "" } else { "s" }
                        ),
                        diagnostics: invalid.diagnostics.iter().map(Problem::from).collect(),
                        at: now_rfc3339(),
                    });
                });
                false
            }
        }
    }

    fn complete(&mut self, done: Completion) {
        self.in_flight.remove(&done.key);
        match done.outcome {
            Outcome::Done => {
                self.metrics.action(done.kind, true, done.took);
                info!(key = %done.key, action = done.kind, took = ?done.took, drift = done.drift, "action done");
                if done.drift {
                    self.metrics.drift_corrections.inc();
                }
                self.backoffs.succeeded(&done.key);
                self.failures.remove(&done.key);
                self.waiting.remove(&done.key);
                // Acted on at the revision enforced now (a newer one that came in
                // meanwhile is checked by the next pass, which records it if in sync).
                if let Some(enforcing) = &self.enforcing {
                    self.observed_revisions
                        .insert(done.key, enforcing.commit.clone());
                }
            }
            Outcome::Failed(e) => {
                self.metrics.action(done.kind, false, done.took);
                let retry = self.backoffs.failed(&done.key, Instant::now());
                let wait = retry.not_before.saturating_duration_since(Instant::now());
                warn!(
                    key = %done.key, action = done.kind, error = %e,
                    failures = retry.failures, retry_in = ?wait, "action failed"
                );
                self.waiting.remove(&done.key);
                self.failures.insert(done.key, (done.kind, e));
            }
            Outcome::Waiting(why) => {
                // Asked again with backoff: the peer answers cheaply, and a migration
                // usually ends within seconds.
                self.backoffs.failed(&done.key, Instant::now());
                info!(key = %done.key, reason = %why, "start deferred");
                self.failures.remove(&done.key);
                self.waiting.insert(done.key, why);
            }
        }
    }

    /// Observe, plan, dispatch, report.
    async fn pass(&mut self) {
        let started = Instant::now();
        let driver = Arc::clone(&self.driver);
        let observed = tokio::task::spawn_blocking(move || driver.observe())
            .await
            .expect("observe does not panic");
        let observed = match observed {
            Ok(o) => o,
            Err(e) => {
                error!(error = %e, "observe failed; nothing is done until it succeeds");
                self.status.update(|s| {
                    s.last_error = Some(LastError {
                        revision: None,
                        kind: "observe".into(),
                        message: e.to_string(),
                        diagnostics: Vec::new(),
                        at: now_rfc3339(),
                    });
                });
                // Retried on the next tick, or sooner through the observe backoff.
                self.backoffs.failed(OBSERVE_KEY, Instant::now());
                return;
            }
        };
        self.backoffs.succeeded(OBSERVE_KEY);
        if let Some(coordination) = &self.coordination {
            coordination.publish(&observed);
        }
        self.metrics.ready.set(1);
        let me = self.config.host.as_str();
        let observed_host = observed.hosts.iter().find(|h| h.name == me).cloned();
        // A guest that arrived (a migration to this host ended) waits no more.
        self.waiting.retain(|name, _| {
            !observed
                .guests
                .iter()
                .any(|g| &g.name == name && g.host == me && g.has_vmm())
        });
        self.status.update(|s| {
            s.ready = true;
            s.observed_host = observed_host;
            if s.last_error.as_ref().is_some_and(|e| e.kind == "observe") {
                s.last_error = None;
            }
        });
        let Some(enforcing) = self.enforcing.clone() else {
            let guests = self.guest_statuses(&Desired::default(), &observed, None, false);
            self.status.update(|s| s.guests = guests);
            return;
        };
        let revision = enforcing.commit.clone();
        let (desired, observed) = self.scoped(&enforcing, observed);
        let plan = plan(
            &desired,
            &observed,
            &self.driver.plan_capabilities(&desired),
        );
        let local: Vec<&Step> = plan.steps.iter().filter(|s| self.acts_on(s)).collect();
        let first_wave = local.iter().map(|s| s.wave).min();
        let drift = self.converged_on.as_ref() == Some(&revision);
        let now = Instant::now();
        for step in local.iter().filter(|s| Some(s.wave) == first_wave) {
            let key = step_key(&step.action);
            if self.in_flight.contains_key(&key) || !self.backoffs.ready(&key, now) {
                continue;
            }
            self.dispatch(key, step, &desired, &enforcing.desired, drift);
        }
        let blocked_here = plan
            .guests
            .iter()
            .any(|g| g.operation == Operation::Blocked && g.host == self.config.host)
            || plan
                .hosts
                .iter()
                .any(|h| h.name == self.config.host && h.blocked.is_some());
        let converged = local.is_empty() && self.in_flight.is_empty() && !blocked_here;
        if converged && self.converged_on.as_ref() != Some(&revision) {
            info!(revision = %revision, "converged");
            self.converged_on = Some(revision.clone());
            self.status.update(|s| {
                s.last_applied = Some(Applied {
                    revision: revision.to_string(),
                    at: now_rfc3339(),
                });
            });
        }
        let planned: HashSet<&str> = plan.guests.iter().map(|g| g.name.as_str()).collect();
        let here = self.config.host.as_str();
        let named: HashSet<&str> = desired
            .guests
            .iter()
            .map(|g| g.metadata.name.as_str())
            .collect();
        self.observed_revisions
            .retain(|name, _| named.contains(name.as_str()));
        for g in desired.guests.iter().filter(|g| g.spec.host == here) {
            let name = g.metadata.name.as_str();
            if !planned.contains(name) && !self.in_flight.contains_key(name) {
                self.observed_revisions
                    .insert(name.to_owned(), revision.clone());
            }
        }
        let guests = self.guest_statuses(&desired, &observed, Some(&plan), drift);
        self.status.update(|s| s.guests = guests);
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Whether a step is this host's to run.
    fn acts_on(&self, step: &Step) -> bool {
        let me = self.config.host.as_str();
        match &step.action {
            Action::ConfigureHost { host, .. }
            | Action::Start { host, .. }
            | Action::Stop { host, .. }
            | Action::Retune { host, .. }
            | Action::LocalMigrate { host, .. }
            | Action::Restart { host, .. } => host == me,
            Action::Migrate { from, .. } | Action::ColdMigrate { from, .. } => from == me,
        }
    }

    /// Runs `step`, with the guest as `desired` (this host's part) has it; the start
    /// guard sees the whole revision (`revision`).
    fn dispatch(
        &mut self,
        key: String,
        step: &Step,
        desired: &Desired,
        revision: &Arc<Desired>,
        drift: bool,
    ) {
        let kind = action_kind(&step.action);
        info!(key = %key, action = kind, step = ?step.action, drift, "dispatching");
        self.in_flight.insert(key.clone(), kind);
        let guest = step
            .action
            .guest()
            .and_then(|name| desired.guests.iter().find(|g| g.metadata.name == name))
            .cloned();
        let guard = match (&step.action, &self.coordination) {
            (Action::Start { guest, .. }, Some(coordination)) => Some((
                Arc::clone(coordination),
                guest.clone(),
                Arc::clone(revision),
                self.config.host.clone(),
            )),
            _ => None,
        };
        // A driver that sees this host only stops the guest here in a cold move away;
        // the destination's service starts it there once this host no longer runs it.
        let this_host_only = self.driver.scope().host().is_some();
        let step = match &step.action {
            Action::ColdMigrate { guest, from, to }
                if this_host_only && *to != self.config.host =>
            {
                Step {
                    action: Action::Stop {
                        guest: guest.clone(),
                        host: from.clone(),
                        reason: StopReason::Desired,
                    },
                    wave: step.wave,
                }
            }
            _ => step.clone(),
        };
        let driver = Arc::clone(&self.driver);
        let done = self.completions.0.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            if let Some((coordination, guest, desired, me)) = guard {
                if let Err(why) = coordination.may_start(&me, &guest, &desired).await {
                    let _ = done.send(Completion {
                        key,
                        kind,
                        outcome: Outcome::Waiting(why.to_string()),
                        took: started.elapsed(),
                        drift,
                    });
                    return;
                }
            }
            let result = tokio::task::spawn_blocking(move || {
                let guests: HashMap<&str, &berth_schema::Guest> = guest
                    .iter()
                    .map(|g| (g.metadata.name.as_str(), g))
                    .collect();
                execute_step(&step, &guests, driver.as_ref())
            })
            .await;
            let outcome = match result {
                Ok(Ok(())) => Outcome::Done,
                Ok(Err(e)) => Outcome::Failed(berth_hypervisor::report::one_line(&e)),
                Err(panic) => Outcome::Failed(format!("the driver panicked: {panic}")),
            };
            let _ = done.send(Completion {
                key,
                kind,
                outcome,
                took: started.elapsed(),
                drift,
            });
        });
    }

    /// Every guest placed on this host, running on it, or on its way to it, with its
    /// conditions ([`crate::conditions`]). `drift`: the host had converged to the
    /// enforced revision, so a change planned now was made outside berth.
    fn guest_statuses(
        &self,
        desired: &Desired,
        observed: &Observed,
        plan: Option<&Plan>,
        drift: bool,
    ) -> Vec<GuestStatus> {
        let me = self.config.host.as_str();
        let plans: HashMap<&str, &GuestPlan> = plan
            .map(|p| p.guests.iter().map(|g| (g.name.as_str(), g)).collect())
            .unwrap_or_default();
        let mut out: BTreeMap<String, GuestStatus> = BTreeMap::new();
        for g in &observed.guests {
            if g.host == me {
                let phase = match g.state {
                    GuestState::Running => "Running",
                    GuestState::Paused => "Paused",
                    GuestState::Stopped => "Stopped",
                };
                let mut status = guest_status(&g.name, &g.host, phase);
                status.runs_here = g.has_vmm();
                out.insert(g.name.clone(), status);
            }
        }
        // A selector-placed guest that fits nowhere is shown (blocked) on every host.
        for g in desired
            .guests
            .iter()
            .filter(|g| g.spec.host == me || g.spec.host.is_empty())
        {
            let name = &g.metadata.name;
            if !out.contains_key(name)
                && !observed
                    .guests
                    .iter()
                    .any(|o| &o.name == name && o.has_vmm())
            {
                let phase = if g.spec.state == GuestState::Stopped {
                    "Stopped"
                } else {
                    "Pending"
                };
                out.insert(name.clone(), guest_status(name, me, phase));
            }
        }
        for (name, status) in &mut out {
            let mut c = GuestConditions::default();
            if let Some(p) = plans.get(name.as_str()) {
                let message = p.reason.clone().unwrap_or_else(|| {
                    let fields: Vec<String> =
                        p.changes.iter().map(|c| c.diff.field.to_string()).collect();
                    if fields.is_empty() {
                        p.operation.describe().to_owned()
                    } else {
                        format!("{}: {}", p.operation.describe(), fields.join(", "))
                    }
                });
                let incoming = p.to.as_deref() == Some(me) && p.host != me;
                let reason = match p.operation {
                    Operation::Blocked => Reason::Blocked,
                    Operation::Suspended => Reason::Suspended,
                    Operation::Orphan => Reason::Orphan,
                    Operation::Migrating => Reason::Migrating,
                    _ if incoming => Reason::WaitingForMigration,
                    _ => Reason::ChangesPending,
                };
                match reason {
                    Reason::ChangesPending => {}
                    Reason::WaitingForMigration => {
                        status.phase = "WaitingForMigration".into();
                        status.host = p.host.clone();
                    }
                    _ => status.phase = format!("{reason:?}"),
                }
                c.not_ready(reason, &message);
                match reason {
                    Reason::Blocked => c.stalled = Some((Reason::Blocked, message.clone())),
                    Reason::Suspended => c.extra.push(Condition::new(
                        ConditionType::Suspended,
                        true,
                        Reason::Annotation,
                        "reconciling is suspended (berth.dev/suspend)",
                    )),
                    Reason::Orphan => {}
                    _ => c.reconciling = Some((reason, message.clone())),
                }
                let acts = !matches!(
                    p.operation,
                    Operation::Blocked
                        | Operation::Suspended
                        | Operation::Orphan
                        | Operation::Migrating
                );
                if drift && acts {
                    c.extra.push(Condition::new(
                        ConditionType::Drifted,
                        true,
                        Reason::ChangedOutsideBerth,
                        &message,
                    ));
                }
                let restart = match p.operation {
                    Operation::LocalMigrate => Some(Reason::LocalMigration),
                    Operation::Restart => Some(Reason::Restart),
                    _ => None,
                };
                if let Some(how) = restart {
                    c.extra.push(Condition::new(
                        ConditionType::RestartRequired,
                        true,
                        how,
                        &message,
                    ));
                }
            }
            if let Some(kind) = self.in_flight.get(name.as_str()) {
                if matches!(*kind, "migrate" | "local_migrate") {
                    status.phase = "Migrating".into();
                }
                c.reconciling = Some((Reason::ActionInFlight, (*kind).to_owned()));
            }
            if let Some(why) = self.waiting.get(name.as_str()) {
                status.phase = "WaitingForMigration".into();
                c.not_ready(Reason::WaitingForMigration, why);
                c.reconciling = Some((Reason::WaitingForMigration, why.clone()));
            }
            if let Some(note) = self
                .incoming_notes
                .as_ref()
                .and_then(|n| n.get(name.as_str()))
            {
                c.extra.push(Condition::new(
                    ConditionType::MigrationFailed,
                    true,
                    Reason::IncomingMigrationFailed,
                    note,
                ));
            }
            if let Some(unresolved) = self.switchovers.as_ref().and_then(|s| s.get(name.as_str())) {
                status.phase = "SwitchoverUnknown".into();
                let condition = unresolved.condition();
                c.not_ready(Reason::SwitchoverUnknown, &condition.message);
                c.reconciling = Some((Reason::SwitchoverUnknown, condition.message.clone()));
                c.extra.push(condition);
                // The migration's own failure says the same, less precisely.
            } else if let Some((kind, e)) = self.failures.get(name.as_str()) {
                status.phase = "Failed".into();
                let retry = self.backoffs.get(name).map_or(String::new(), |r| {
                    let wait = r.not_before.saturating_duration_since(Instant::now());
                    format!(
                        " (failure {}, retry in {:.1}s)",
                        r.failures,
                        wait.as_secs_f64()
                    )
                });
                let message = format!("{kind}: {e}{retry}");
                c.not_ready(Reason::ActionFailed, &message);
                c.reconciling = Some((Reason::RetryingAfterFailure, message.clone()));
                if matches!(*kind, "migrate" | "local_migrate" | "cold_migrate") {
                    c.extra.push(Condition::new(
                        ConditionType::MigrationFailed,
                        true,
                        Reason::OutgoingMigrationFailed,
                        message,
                    ));
                }
            }
            status.observed_revision = self.observed_revisions.get(name).map(ToString::to_string);
            status.conditions = c.into_conditions();
        }
        // Guests migrating to this host from elsewhere are shown as waiting for it.
        if let Some(plan) = plan {
            for p in &plan.guests {
                if p.to.as_deref() == Some(me) && p.host != me && !out.contains_key(&p.name) {
                    let mut status = guest_status(&p.name, &p.host, "WaitingForMigration");
                    let message = format!("{} from {}", p.operation.describe(), p.host);
                    let mut c = GuestConditions::default();
                    c.not_ready(Reason::WaitingForMigration, &message);
                    c.reconciling = Some((Reason::WaitingForMigration, message));
                    status.conditions = c.into_conditions();
                    out.insert(p.name.clone(), status);
                }
            }
        }
        out.into_values().collect()
    }
}

/// A guest's conditions while they are worked out: `Ready` (in sync until something
/// says otherwise), `Reconciling` and `Stalled` when set, and berth's own.
struct GuestConditions {
    ready: (bool, Reason, String),
    reconciling: Option<(Reason, String)>,
    stalled: Option<(Reason, String)>,
    extra: Vec<Condition>,
}

impl Default for GuestConditions {
    fn default() -> Self {
        GuestConditions {
            ready: (true, Reason::InSync, String::new()),
            reconciling: None,
            stalled: None,
            extra: Vec::new(),
        }
    }
}

impl GuestConditions {
    fn not_ready(&mut self, reason: Reason, message: &str) {
        self.ready = (false, reason, message.to_owned());
    }

    fn into_conditions(self) -> Vec<Condition> {
        let (ready, reason, message) = self.ready;
        let mut out = vec![Condition::new(ConditionType::Ready, ready, reason, message)];
        for (kind, state) in [
            (ConditionType::Reconciling, self.reconciling),
            (ConditionType::Stalled, self.stalled),
        ] {
            if let Some((reason, message)) = state {
                out.push(Condition::new(kind, true, reason, message));
            }
        }
        out.extend(self.extra);
        out
    }
}

fn guest_status(name: &str, host: &str, phase: &str) -> GuestStatus {
    GuestStatus {
        name: name.to_owned(),
        host: host.to_owned(),
        phase: phase.to_owned(),
        runs_here: false,
        observed_revision: None,
        conditions: Vec::new(),
    }
}

/// The work-queue key of an action: one action per guest (or per host's settings).
fn step_key(action: &Action) -> String {
    match action {
        Action::ConfigureHost { host, .. } => format!("host/{host}"),
        other => other.guest().unwrap_or_default().to_owned(),
    }
}

/// The metric label of an action.
fn action_kind(action: &Action) -> &'static str {
    match action {
        Action::ConfigureHost { .. } => "configure_host",
        Action::Start { .. } => "start",
        Action::Stop { .. } => "stop",
        Action::Retune { .. } => "retune",
        Action::LocalMigrate { .. } => "local_migrate",
        Action::Migrate { .. } => "migrate",
        Action::ColdMigrate { .. } => "cold_migrate",
        Action::Restart { .. } => "restart",
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
