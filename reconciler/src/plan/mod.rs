//! `plan(desired, observed, capabilities) -> Plan`: what to do, in which order, and why.
//!
//! The plan is a pure, deterministic function of its inputs (no clock, no I/O, no hash
//! order). The capabilities are what each host's driver declares it can do
//! ([`FleetCapabilities`]): the plan never promises what a driver refuses. It proceeds
//! in two passes:
//!
//! 1. **Intent**: for every guest and host, the field changes, each classified by
//!    [`crate::classify`] from the capabilities of the guest's host, folded into one operation per guest (start, retune,
//!    local migration, migration, cold migration, restart, stop, or blocked).
//!    A guest with any blocked change gets no action at all: berth does not apply half
//!    of a manifest to a guest.
//! 2. **Order** ([`schedule`]): the actions are placed in *waves*. Actions of one wave
//!    may run concurrently; a wave starts when the previous one is done. An action
//!    enters a wave only if what it adds fits on its host *before* anything of the same
//!    wave is released, so capacity is never exceeded whatever the order inside a wave.
//!    That puts stops and shrinks before the starts and moves that need their room,
//!    host settings before the guests on that host, and bounds migrations per wave
//!    (`maxConcurrentMigrations`, `maxConcurrentMigrationsPerHost`).
//!
//! When nothing can move (two guests swapping full hosts), the planner first stages one
//! guest through a third host with room (live, no downtime); failing that, guests that
//! may be stopped (`migration.mode: cold`, `restartPolicy: ifRequired`) are stopped
//! together and started on their destinations in the next wave; failing that, the
//! stuck actions are blocked, each with the numbers that block it.

pub(crate) mod capacity;
mod schedule;

use std::collections::{HashMap, HashSet};

use berth_schema::{Guest, GuestState};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::classify::{self, ChangeClass, Destination, Policy};
use crate::diff::{diff_guest, Field, FieldDiff, HostChange};
use crate::driver::FleetCapabilities;
use crate::model::{is_suspended, Desired, Observed, ObservedGuest};
use crate::scheduler::Placement;

pub use capacity::Footprint;

/// Version of the plan's JSON shape; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// The ordered, classified plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Counts per kind of operation.
    pub summary: Summary,
    /// Hosts whose settings change, by name.
    pub hosts: Vec<HostPlan>,
    /// Guests with something to do or to report, by name.
    pub guests: Vec<GuestPlan>,
    /// The actions in execution order; actions of one wave may run concurrently.
    pub steps: Vec<Step>,
}

impl Plan {
    /// Whether applying the plan would change anything, or something is blocked.
    pub fn has_changes(&self) -> bool {
        !self.steps.is_empty() || self.summary.blocked > 0
    }

    /// The number of waves.
    pub fn waves(&self) -> u32 {
        self.steps.last().map_or(0, |s| s.wave + 1)
    }
}

/// Counts per kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Guests to start.
    pub start: u32,
    /// Guests retuned live (including pause and resume).
    pub retune: u32,
    /// Guests migrated: to another host (live or cold) or locally into a new VMM.
    pub migrate: u32,
    /// Guests restarted.
    pub restart: u32,
    /// Guests stopped (including pruned orphans).
    pub stop: u32,
    /// Guests and hosts with a blocked change.
    pub blocked: u32,
    /// Hosts whose settings change.
    pub hosts: u32,
    /// Guests berth manages that no manifest names and that are not pruned.
    pub orphans: u32,
    /// Guests whose reconciling is suspended while they differ from the manifest.
    pub suspended: u32,
}

/// What happens to one host's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPlan {
    /// Host name.
    pub name: String,
    /// Settings that change.
    pub changes: Vec<HostChange>,
    /// Why some of the changes cannot be applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// What happens to one guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestPlan {
    /// Guest name.
    pub name: String,
    /// The operation.
    pub operation: Operation,
    /// The host the guest runs on now, or starts on.
    pub host: String,
    /// The destination of a migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A host the migration passes through because the destination had no room yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The field changes, each with how it is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Why the guest is blocked, or how the planner chose a harder way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a guest placed by `hostSelector`: `placed by selector {rack: a} on kvm02`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// The guest as observed; `null` when it does not run.
    pub observed: Option<ObservedGuest>,
    /// The guest as the manifest asks for it; `null` when no manifest names it.
    pub desired: Option<ObservedGuest>,
}

/// One field change and how it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// The field, its value in force and the value asked for.
    #[serde(flatten)]
    pub diff: FieldDiff,
    /// How the change is applied.
    #[serde(flatten)]
    pub class: ChangeClass,
}

/// The one operation per guest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Operation {
    /// Start a guest that does not run.
    Start,
    /// Apply live changes to the running guest.
    Retune,
    /// Live-migrate into a new VMM on the same host (restart-class changes).
    LocalMigrate,
    /// Live-migrate to another host.
    Migrate,
    /// Stop, and start on another host.
    ColdMigrate,
    /// Stop, and start again on the same host.
    Restart,
    /// Stop the guest (state `stopped`, or a pruned orphan).
    Stop,
    /// Nothing is done: a change is blocked.
    Blocked,
    /// Managed by berth, named by no manifest, not pruned: reported only.
    Orphan,
    /// Reconciling is suspended by the `berth.dev/suspend` annotation.
    Suspended,
    /// A migration is under way; the guest is left alone until it ends.
    Migrating,
}

impl Operation {
    /// The terraform-style symbol of the operation.
    pub fn symbol(self) -> &'static str {
        match self {
            Operation::Start => "+",
            Operation::Retune => "~",
            Operation::LocalMigrate | Operation::Migrate | Operation::ColdMigrate => "<->",
            Operation::Restart => "-/+",
            Operation::Stop => "-",
            Operation::Blocked => "!",
            Operation::Orphan => "?",
            Operation::Suspended | Operation::Migrating => "=",
        }
    }

    /// A few words for humans.
    pub fn describe(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Retune => "retune live",
            Operation::LocalMigrate => "migrate locally into a new VMM",
            Operation::Migrate => "migrate live",
            Operation::ColdMigrate => "migrate cold (stop, start on the destination)",
            Operation::Restart => "restart",
            Operation::Stop => "stop",
            Operation::Blocked => "blocked",
            Operation::Orphan => "orphan (not pruned)",
            Operation::Suspended => "suspended",
            Operation::Migrating => "migration in progress",
        }
    }
}

/// One action in its wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Actions of one wave may run concurrently; wave `n + 1` starts when wave `n` is done.
    pub wave: u32,
    /// What to do.
    #[serde(flatten)]
    pub action: Action,
}

/// What a driver is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum Action {
    /// Change host settings (hugepage pools, KSM, transparent hugepages).
    #[serde(rename_all = "camelCase")]
    ConfigureHost {
        /// Host name.
        host: String,
        /// The settings and their new values.
        changes: Vec<HostChange>,
    },
    /// Start a guest as its manifest says (running or paused).
    #[serde(rename_all = "camelCase")]
    Start {
        /// Guest name.
        guest: String,
        /// Where.
        host: String,
    },
    /// Stop a guest.
    #[serde(rename_all = "camelCase")]
    Stop {
        /// Guest name.
        guest: String,
        /// Where it runs.
        host: String,
        /// Why.
        reason: StopReason,
    },
    /// Apply live changes.
    #[serde(rename_all = "camelCase")]
    Retune {
        /// Guest name.
        guest: String,
        /// Where it runs.
        host: String,
        /// The fields to bring to the manifest's values.
        fields: Vec<Field>,
    },
    /// Live-migrate into a new VMM built from the manifest, on the same host.
    #[serde(rename_all = "camelCase")]
    LocalMigrate {
        /// Guest name.
        guest: String,
        /// Where it runs.
        host: String,
    },
    /// Live-migrate to another host, into a VMM built from the manifest.
    #[serde(rename_all = "camelCase")]
    Migrate {
        /// Guest name.
        guest: String,
        /// Source host.
        from: String,
        /// Destination host.
        to: String,
    },
    /// Stop the guest, then start it from the manifest on another host.
    #[serde(rename_all = "camelCase")]
    ColdMigrate {
        /// Guest name.
        guest: String,
        /// Source host.
        from: String,
        /// Destination host.
        to: String,
    },
    /// Stop the guest, then start it from the manifest on the same host.
    #[serde(rename_all = "camelCase")]
    Restart {
        /// Guest name.
        guest: String,
        /// Where it runs.
        host: String,
    },
}

impl Action {
    /// The guest the action is about, if any.
    pub fn guest(&self) -> Option<&str> {
        match self {
            Action::ConfigureHost { .. } => None,
            Action::Start { guest, .. }
            | Action::Stop { guest, .. }
            | Action::Retune { guest, .. }
            | Action::LocalMigrate { guest, .. }
            | Action::Migrate { guest, .. }
            | Action::ColdMigrate { guest, .. }
            | Action::Restart { guest, .. } => Some(guest),
        }
    }
}

/// Why a guest is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StopReason {
    /// The manifest says `state: stopped`.
    Desired,
    /// No manifest names the guest and pruning is on.
    Prune,
    /// First half of a cold move that breaks a swap between full hosts.
    ColdMove,
}

/// Builds the plan that brings `observed` to `desired` with drivers that can do what
/// `capabilities` says. Pure and deterministic.
pub fn plan(desired: &Desired, observed: &Observed, capabilities: &FleetCapabilities) -> Plan {
    let mut sched = schedule::Scheduler::new(desired, observed);
    let mut guests = intents(desired, observed, capabilities, &mut sched);
    let mut hosts = sched.host_intents(desired, observed);
    let steps = sched.run(&mut guests, &mut hosts, observed);
    // Desired guests come first in the list, orphans after; show them all by name.
    guests.sort_by(|a, b| a.name.cmp(&b.name));
    let summary = summarize(&guests, &hosts);
    Plan {
        format_version: FORMAT_VERSION,
        summary,
        hosts,
        guests,
        steps,
    }
}

fn summarize(guests: &[GuestPlan], hosts: &[HostPlan]) -> Summary {
    let mut s = Summary::default();
    for g in guests {
        match g.operation {
            Operation::Start => s.start += 1,
            Operation::Retune => s.retune += 1,
            Operation::LocalMigrate | Operation::Migrate | Operation::ColdMigrate => s.migrate += 1,
            Operation::Restart => s.restart += 1,
            Operation::Stop => s.stop += 1,
            Operation::Blocked => s.blocked += 1,
            Operation::Orphan => s.orphans += 1,
            Operation::Suspended => s.suspended += 1,
            Operation::Migrating => {}
        }
    }
    for h in hosts {
        if h.blocked.is_some() {
            s.blocked += 1;
        }
        if h.changes.len() > usize::from(h.blocked.is_some()) {
            s.hosts += 1;
        }
    }
    s
}

fn policy(guest: &Guest) -> Policy {
    Policy {
        migration: guest.spec.migration,
        restart: guest.spec.restart_policy,
    }
}

/// Pass 1: one [`GuestPlan`] per guest with something to do, its tasks handed to the
/// scheduler.
fn intents(
    desired: &Desired,
    observed: &Observed,
    capabilities: &FleetCapabilities,
    sched: &mut schedule::Scheduler<'_>,
) -> Vec<GuestPlan> {
    let by_name: HashMap<&str, &ObservedGuest> = observed
        .guests
        .iter()
        .map(|g| (g.name.as_str(), g))
        .collect();
    let mut desired_guests: Vec<&Guest> = desired.guests.iter().collect();
    desired_guests.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let mut plans: Vec<GuestPlan> = Vec::new();
    for guest in &desired_guests {
        let name = guest.metadata.name.as_str();
        let obs = by_name.get(name).copied().filter(|o| o.has_vmm());
        let placement = desired.placements.get(name);
        if let Some(plan) = guest_intent(guest, obs, placement, capabilities, sched, plans.len()) {
            plans.push(plan);
        }
    }

    let named: HashSet<&str> = desired
        .guests
        .iter()
        .map(|g| g.metadata.name.as_str())
        .collect();
    let mut orphans: Vec<&ObservedGuest> = observed
        .guests
        .iter()
        .filter(|g| g.has_vmm() && g.is_managed() && !named.contains(g.name.as_str()))
        .collect();
    orphans.sort_by(|a, b| a.name.cmp(&b.name));
    for o in orphans {
        if let Some(why) = &o.unresponsive {
            plans.push(GuestPlan {
                name: o.name.clone(),
                operation: Operation::Blocked,
                host: o.host.clone(),
                to: None,
                via: None,
                changes: Vec::new(),
                reason: Some(unresponsive_reason(&o.host, why)),
                placement: None,
                observed: Some(o.clone()),
                desired: None,
            });
            continue;
        }
        let prune = desired.fleet.prune || o.prune_requested();
        if prune {
            sched.stop(plans.len(), o, StopReason::Prune);
        }
        plans.push(GuestPlan {
            name: o.name.clone(),
            operation: if prune {
                Operation::Stop
            } else {
                Operation::Orphan
            },
            host: o.host.clone(),
            to: None,
            via: None,
            changes: Vec::new(),
            placement: None,
            reason: Some(
                if prune {
                    "no manifest names it; pruned"
                } else {
                    "no manifest names it; set Fleet spec.prune or the berth.dev/prune annotation to stop it"
                }
                .into(),
            ),
            observed: Some(o.clone()),
            desired: None,
        });
    }
    plans
}

/// Why nothing is done to a guest whose VMM did not answer.
fn unresponsive_reason(host: &str, why: &str) -> String {
    format!("its VMM on {host} runs but did not answer ({why}); left alone until it does")
}

fn guest_intent(
    guest: &Guest,
    obs: Option<&ObservedGuest>,
    placement: Option<&Placement>,
    capabilities: &FleetCapabilities,
    sched: &mut schedule::Scheduler<'_>,
    index: usize,
) -> Option<GuestPlan> {
    let wanted = ObservedGuest::as_written(guest);
    let selector = guest
        .spec
        .host_selector
        .as_ref()
        .map(crate::scheduler::show_labels);
    let mut plan = GuestPlan {
        name: wanted.name.clone(),
        operation: Operation::Retune,
        host: obs.map_or_else(|| wanted.host.clone(), |o| o.host.clone()),
        to: None,
        via: None,
        changes: Vec::new(),
        reason: None,
        placement: selector
            .as_ref()
            .map(|s| format!("placed by selector {s} on {}", wanted.host)),
        observed: obs.cloned(),
        desired: None,
    };
    if let Some(selector) = &selector {
        // Placed by selector but nowhere: blocked, whatever else differs; a guest that
        // runs keeps running where it is.
        let unplaced = match placement {
            Some(Placement::Unplaced(why)) => Some(why.clone()),
            None => Some("not placed yet (the fleet's leader places it)".to_owned()),
            Some(Placement::Placed(_)) => None,
        };
        if let Some(why) = unplaced {
            if obs.is_none() && wanted.state == GuestState::Stopped {
                return None;
            }
            plan.placement = Some(format!("placed by selector {selector}: nowhere"));
            block(&mut plan, why);
            let mut wanted = wanted;
            if let Some(obs) = obs {
                wanted.host = obs.host.clone();
            }
            plan.desired = Some(wanted);
            return Some(plan);
        }
    }

    let Some(obs) = obs else {
        if wanted.state == GuestState::Stopped {
            return None;
        }
        if is_suspended(guest) {
            plan.operation = Operation::Suspended;
        } else {
            plan.operation = Operation::Start;
            match sched.usable(&wanted.host, &wanted, true) {
                Ok(()) => sched.start(index, &wanted),
                Err(reason) => block(&mut plan, reason),
            }
        }
        plan.desired = Some(wanted);
        return Some(plan);
    };

    if let Some(why) = &obs.unresponsive {
        plan.operation = Operation::Blocked;
        plan.reason = Some(unresponsive_reason(&obs.host, why));
        plan.desired = Some(wanted);
        return Some(plan);
    }

    if let Some(to) = &obs.migrating_to {
        plan.operation = Operation::Migrating;
        plan.to = Some(to.clone());
        plan.desired = Some(wanted);
        return Some(plan);
    }

    let diffs = diff_guest(obs, &wanted);
    if diffs.is_empty() {
        return None;
    }
    if wanted.state == GuestState::Stopped && !is_suspended(guest) {
        plan.operation = Operation::Stop;
        sched.stop(index, obs, StopReason::Desired);
        plan.changes = diffs
            .into_iter()
            .filter(|d| d.field == Field::State)
            .map(|diff| Change {
                diff,
                class: ChangeClass::Live,
            })
            .collect();
        plan.desired = Some(wanted);
        return Some(plan);
    }

    let policy = policy(guest);
    let host_change = obs.host != wanted.host;
    let destination = host_change.then(|| {
        let check = sched.destination(obs, &wanted);
        match capabilities.why_not_live(&obs.host, &wanted.host) {
            Some(reason) if check == Destination::Compatible => Destination::CpuDiffers(reason),
            _ => check,
        }
    });
    // The host it runs on makes the change (the source drives a move).
    let driver = capabilities.of(&obs.host);
    plan.changes = diffs
        .into_iter()
        .map(|diff| {
            let rule = classify::rule(diff.field, obs, &wanted);
            let class = classify::resolve(diff.field, rule, policy, destination.as_ref(), driver);
            Change { diff, class }
        })
        .collect();
    if is_suspended(guest) {
        plan.operation = Operation::Suspended;
        plan.reason = Some("reconciling is suspended (berth.dev/suspend)".into());
        plan.desired = Some(wanted);
        return Some(plan);
    }

    let blocked: Vec<String> = plan
        .changes
        .iter()
        .filter_map(|c| match &c.class {
            ChangeClass::Blocked(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let stops = plan.changes.iter().any(|c| c.class.stops_guest());
    let state_change = plan.changes.iter().any(|c| c.diff.field == Field::State);
    if !blocked.is_empty() {
        block(&mut plan, blocked.join("; "));
    } else if host_change {
        plan.to = Some(wanted.host.clone());
        if stops {
            plan.operation = Operation::ColdMigrate;
            sched.cold_migrate(index, obs, &wanted);
        } else {
            plan.operation = Operation::Migrate;
            sched.migrate(index, obs, &wanted, policy, state_change);
        }
    } else if stops {
        plan.operation = Operation::Restart;
        match sched.usable(&wanted.host, &wanted, false) {
            Ok(()) => sched.restart(index, obs, &wanted),
            Err(reason) => block(&mut plan, reason),
        }
    } else if plan
        .changes
        .iter()
        .any(|c| c.class == ChangeClass::LocalMigration)
    {
        plan.operation = Operation::LocalMigrate;
        match sched.usable(&wanted.host, &wanted, false) {
            Ok(()) => sched.local_migrate(index, obs, &wanted, policy, state_change),
            Err(reason) => block(&mut plan, reason),
        }
    } else {
        plan.operation = Operation::Retune;
        let pinning_changes = plan
            .changes
            .iter()
            .any(|c| matches!(c.diff.field, Field::VcpuPinning | Field::EmulatorPinning));
        let check = if pinning_changes {
            sched.usable(&wanted.host, &wanted, false)
        } else {
            Ok(())
        };
        match check {
            Ok(()) => {
                let fields = plan.changes.iter().map(|c| c.diff.field).collect();
                sched.retune(index, obs, fields);
            }
            Err(reason) => block(&mut plan, reason),
        }
    }
    plan.desired = Some(wanted);
    Some(plan)
}

fn block(plan: &mut GuestPlan, reason: String) {
    plan.operation = Operation::Blocked;
    plan.reason = Some(reason);
}

/// Migration pre-checks of `guest` (as observed) moving to `wanted.host`.
fn destination_check(
    usable: Result<(), String>,
    mode: berth_schema::CpuMode,
    from: &crate::model::CpuInfo,
    to: &crate::model::CpuInfo,
) -> Destination {
    if let Err(reason) = usable {
        return Destination::Unusable(reason);
    }
    match classify::cpu_compatible(mode, from, to) {
        Ok(()) => Destination::Compatible,
        Err(reason) => Destination::CpuDiffers(reason),
    }
}

#[cfg(test)]
mod tests;
