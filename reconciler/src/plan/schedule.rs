//! Pass 2 of the plan: placing actions in waves so that no host is ever over capacity,
//! host settings come before the guests that need them, migrations stay within their
//! concurrency caps, and a swap between full hosts is resolved or blocked with reasons.

use std::collections::{HashMap, HashSet};

use berth_schema::{PageSize, RestartPolicy};

use super::capacity::{page_holders, Footprint, HostState};
use super::{destination_check, Action, GuestPlan, HostPlan, Operation, Step, StopReason};
use crate::classify::{Destination, Policy};
use crate::diff::{diff_host, Field, HostSetting};
use crate::model::{Desired, Observed, ObservedGuest};

/// How an action may be rewritten when nothing else can move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    None,
    /// A live migration: may pass through a third host; may go cold if `may_stop`.
    LiveMove {
        may_stop: bool,
    },
    /// A cold migration: may be part of a simultaneous stop-then-start.
    ColdMove,
    /// A local migration: may become a restart if `may_stop`.
    LocalMove {
        may_stop: bool,
    },
}

#[derive(Debug, Clone)]
struct Task {
    action: Action,
    /// Index of the guest plan, or of the host plan for host settings.
    guest: Option<usize>,
    host_plan: Option<usize>,
    /// What the action holds on a host from the start of its wave.
    add: Option<(usize, Footprint)>,
    /// What the action releases at the end of its wave.
    remove: Option<(usize, Footprint)>,
    /// A restart releases before it adds, on the same host.
    credit_own: bool,
    /// Pool resizes; the task is then alone on its host in its wave.
    pools: Vec<(PageSize, u64)>,
    exclusive: Option<usize>,
    /// Hosts whose migration slots the action takes.
    migration: Vec<usize>,
    /// Tasks that must be done in an earlier wave.
    after: Vec<usize>,
    rank: u8,
    fallback: Fallback,
}

const RANK_HOST_GROW: u8 = 0;
const RANK_STOP: u8 = 1;
const RANK_RETUNE: u8 = 2;
const RANK_RESTART: u8 = 3;
const RANK_LOCAL: u8 = 4;
const RANK_MOVE: u8 = 5;
const RANK_START: u8 = 6;
const RANK_HOST_SHRINK: u8 = 7;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Pending,
    Placed(u32),
    Blocked,
    /// Replaced by other tasks when the plan was rewritten.
    Superseded,
}

/// The scheduler: host states, tasks, and their fates.
pub(super) struct Scheduler<'a> {
    hosts: Vec<HostState<'a>>,
    index: HashMap<&'a str, usize>,
    tasks: Vec<Task>,
    fate: Vec<Fate>,
    max_total: u32,
    max_per_host: u32,
    /// The host-settings task that guests arriving on a host wait for.
    host_grow: HashMap<usize, usize>,
}

impl<'a> Scheduler<'a> {
    pub(super) fn new(desired: &'a Desired, observed: &'a Observed) -> Self {
        let mut names: Vec<&'a str> = desired
            .hosts
            .iter()
            .map(|h| h.metadata.name.as_str())
            .chain(observed.hosts.iter().map(|h| h.name.as_str()))
            .chain(observed.guests.iter().map(|g| g.host.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        let desired_hosts: HashMap<&str, _> = desired
            .hosts
            .iter()
            .map(|h| (h.metadata.name.as_str(), h))
            .collect();
        let observed_hosts: HashMap<&str, _> = observed
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h))
            .collect();
        let mut hosts: Vec<HostState<'a>> = names
            .iter()
            .map(|&n| {
                HostState::new(
                    n,
                    desired_hosts.get(n).copied(),
                    observed_hosts.get(n).copied(),
                )
            })
            .collect();
        let index: HashMap<&'a str, usize> =
            names.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        for g in &observed.guests {
            hosts[index[g.host.as_str()]].hold(Footprint::of(g));
            if let Some(to) = g.migrating_to.as_deref().and_then(|to| index.get(to)) {
                // The incoming VMM of a migration under way holds its memory too.
                hosts[*to].hold(Footprint::of(g));
            }
        }
        Scheduler {
            hosts,
            index,
            tasks: Vec::new(),
            fate: Vec::new(),
            max_total: desired.fleet.max_concurrent_migrations.max(1),
            max_per_host: desired.fleet.max_concurrent_migrations_per_host.max(1),
            host_grow: HashMap::new(),
        }
    }

    fn host(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Capacity-independent checks of `guest` on `host`.
    pub(super) fn usable(
        &self,
        host: &str,
        guest: &ObservedGuest,
        arriving: bool,
    ) -> Result<(), String> {
        match self.host(host) {
            Some(h) => self.hosts[h].usable_for(guest, arriving),
            None => Err(format!("host {host} is not declared by any Host manifest")),
        }
    }

    /// Migration pre-checks of `observed` moving to `wanted.host`.
    pub(super) fn destination(
        &self,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
    ) -> Destination {
        let from = self
            .host(&observed.host)
            .map(|h| self.hosts[h].cpu())
            .unwrap_or_default();
        let to = self
            .host(&wanted.host)
            .map(|h| self.hosts[h].cpu())
            .unwrap_or_default();
        destination_check(
            self.usable(&wanted.host, wanted, true),
            wanted.cpu.mode,
            &from,
            &to,
        )
    }

    fn push(&mut self, task: Task) -> usize {
        self.tasks.push(task);
        self.fate.push(Fate::Pending);
        self.tasks.len() - 1
    }

    fn guest_task(guest: usize, action: Action, rank: u8) -> Task {
        Task {
            action,
            guest: Some(guest),
            host_plan: None,
            add: None,
            remove: None,
            credit_own: false,
            pools: Vec::new(),
            exclusive: None,
            migration: Vec::new(),
            after: Vec::new(),
            rank,
            fallback: Fallback::None,
        }
    }

    pub(super) fn start(&mut self, guest: usize, wanted: &ObservedGuest) {
        let h = self.host(&wanted.host).expect("checked by usable()");
        let mut t = Self::guest_task(
            guest,
            Action::Start {
                guest: wanted.name.clone(),
                host: wanted.host.clone(),
            },
            RANK_START,
        );
        t.add = Some((h, Footprint::of(wanted)));
        self.push(t);
    }

    pub(super) fn stop(&mut self, guest: usize, observed: &ObservedGuest, reason: StopReason) {
        let h = self
            .host(&observed.host)
            .expect("observed hosts are indexed");
        let mut t = Self::guest_task(
            guest,
            Action::Stop {
                guest: observed.name.clone(),
                host: observed.host.clone(),
                reason,
            },
            RANK_STOP,
        );
        t.remove = Some((h, Footprint::of(observed)));
        self.push(t);
    }

    pub(super) fn retune(&mut self, guest: usize, observed: &ObservedGuest, fields: Vec<Field>) {
        self.push(Self::guest_task(
            guest,
            Action::Retune {
                guest: observed.name.clone(),
                host: observed.host.clone(),
                fields,
            },
            RANK_RETUNE,
        ));
    }

    pub(super) fn restart(
        &mut self,
        guest: usize,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
    ) {
        let action = Action::Restart {
            guest: observed.name.clone(),
            host: observed.host.clone(),
        };
        let mut t = self.in_place_task(guest, observed, wanted, action, RANK_RESTART);
        t.credit_own = true;
        self.push(t);
    }

    pub(super) fn local_migrate(
        &mut self,
        guest: usize,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
        policy: Policy,
        state_change: bool,
    ) {
        let action = Action::LocalMigrate {
            guest: observed.name.clone(),
            host: observed.host.clone(),
        };
        let mut t = self.in_place_task(guest, observed, wanted, action, RANK_LOCAL);
        t.migration = t.add.iter().map(|&(h, _)| h).collect();
        t.fallback = Fallback::LocalMove {
            may_stop: policy.restart == RestartPolicy::IfRequired,
        };
        let id = self.push(t);
        if state_change {
            self.state_after(guest, id, observed);
        }
    }

    /// A task that replaces `guest` on its own host (restart, local migration): it
    /// takes the wanted footprint there and gives back the observed one.
    fn in_place_task(
        &self,
        guest: usize,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
        action: Action,
        rank: u8,
    ) -> Task {
        let h = self
            .host(&observed.host)
            .expect("observed hosts are indexed");
        let mut t = Self::guest_task(guest, action, rank);
        t.add = Some((h, Footprint::of(wanted)));
        t.remove = Some((h, Footprint::of(observed)));
        t
    }

    /// A task moving `guest` from its observed host to its wanted one: it takes room on
    /// the destination before it gives back room on the source.
    fn move_task(
        &self,
        guest: usize,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
        action: Action,
    ) -> (Task, usize, usize) {
        let from = self
            .host(&observed.host)
            .expect("observed hosts are indexed");
        let to = self.host(&wanted.host).expect("checked by destination()");
        let mut t = Self::guest_task(guest, action, RANK_MOVE);
        t.add = Some((to, Footprint::of(wanted)));
        t.remove = Some((from, Footprint::of(observed)));
        (t, from, to)
    }

    pub(super) fn migrate(
        &mut self,
        guest: usize,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
        policy: Policy,
        state_change: bool,
    ) {
        let action = Action::Migrate {
            guest: observed.name.clone(),
            from: observed.host.clone(),
            to: wanted.host.clone(),
        };
        let (mut t, from, to) = self.move_task(guest, observed, wanted, action);
        t.migration = vec![from, to];
        t.fallback = Fallback::LiveMove {
            may_stop: policy.restart == RestartPolicy::IfRequired,
        };
        let id = self.push(t);
        if state_change {
            let mut at_destination = observed.clone();
            at_destination.host = wanted.host.clone();
            self.state_after(guest, id, &at_destination);
        }
    }

    pub(super) fn cold_migrate(
        &mut self,
        guest: usize,
        observed: &ObservedGuest,
        wanted: &ObservedGuest,
    ) {
        let action = Action::ColdMigrate {
            guest: observed.name.clone(),
            from: observed.host.clone(),
            to: wanted.host.clone(),
        };
        let (mut t, _, _) = self.move_task(guest, observed, wanted, action);
        t.fallback = Fallback::ColdMove;
        self.push(t);
    }

    /// Pause or resume after a migration (which keeps the run state it found).
    fn state_after(&mut self, guest: usize, after: usize, at: &ObservedGuest) {
        let mut t = Self::guest_task(
            guest,
            Action::Retune {
                guest: at.name.clone(),
                host: at.host.clone(),
                fields: vec![Field::State],
            },
            RANK_RETUNE,
        );
        t.after.push(after);
        self.push(t);
    }

    /// Host settings that differ: growing pools, KSM and THP first; shrinking pools
    /// once the guests that hold the pages are gone.
    pub(super) fn host_intents(&mut self, desired: &Desired, observed: &Observed) -> Vec<HostPlan> {
        let observed_hosts: HashMap<&str, _> = observed
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h))
            .collect();
        let mut hosts: Vec<_> = desired.hosts.iter().collect();
        hosts.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut plans = Vec::new();
        for host in hosts {
            let Some(obs) = observed_hosts.get(host.metadata.name.as_str()) else {
                continue;
            };
            let changes = diff_host(obs, host);
            if changes.is_empty() {
                continue;
            }
            let h = self.index[host.metadata.name.as_str()];
            let (shrink, grow): (Vec<_>, Vec<_>) = changes
                .iter()
                .cloned()
                .partition(|c| c.pool_resize().is_some_and(|(_, from, to)| to < from));
            let plan_index = plans.len();
            for (part, rank) in [(grow, RANK_HOST_GROW), (shrink, RANK_HOST_SHRINK)] {
                if part.is_empty() {
                    continue;
                }
                let pools: Vec<(PageSize, u64)> = part
                    .iter()
                    .filter_map(|c| match c.target {
                        HostSetting::HugepagePool(size, pages) => Some((size, pages)),
                        _ => None,
                    })
                    .collect();
                // Resizing a pool is alone on its host in its wave, so that no guest
                // counts on pages the resize takes or has not given yet.
                let exclusive = (!pools.is_empty()).then_some(h);
                let id = self.push(Task {
                    action: Action::ConfigureHost {
                        host: host.metadata.name.clone(),
                        changes: part,
                    },
                    guest: None,
                    host_plan: Some(plan_index),
                    add: None,
                    remove: None,
                    credit_own: false,
                    pools,
                    exclusive,
                    migration: Vec::new(),
                    after: Vec::new(),
                    rank,
                    fallback: Fallback::None,
                });
                if rank == RANK_HOST_GROW {
                    self.host_grow.insert(h, id);
                }
            }
            plans.push(HostPlan {
                name: host.metadata.name.clone(),
                changes,
                blocked: None,
            });
        }
        plans
    }

    /// Places every task in a wave, rewriting or blocking what cannot move, and returns
    /// the steps in order.
    pub(super) fn run(
        &mut self,
        guests: &mut [GuestPlan],
        hosts: &mut [HostPlan],
        observed: &Observed,
    ) -> Vec<Step> {
        for t in 0..self.tasks.len() {
            if let Some((h, _)) = self.tasks[t].add {
                if let Some(&grow) = self.host_grow.get(&h) {
                    self.tasks[t].after.push(grow);
                }
            }
        }
        let mut pending: Vec<usize> = (0..self.tasks.len()).collect();
        let mut wave = 0;
        while !pending.is_empty() {
            pending.sort_by_key(|&t| (self.tasks[t].rank, t));
            let placed = self.fill_wave(wave, &pending);
            if placed.is_empty() {
                match self.unstick(wave, &pending, guests) {
                    Unstuck::Rewritten => {}
                    Unstuck::Committed(next) => wave = next,
                    Unstuck::No => self.block_stuck(wave, &pending, guests, hosts, observed),
                }
                // Rewriting adds tasks.
                pending = (0..self.tasks.len()).collect();
            } else {
                for &t in &placed {
                    self.commit(t);
                }
                wave += 1;
            }
            pending.retain(|&t| self.fate[t] == Fate::Pending);
        }

        let mut order: Vec<(u32, u8, usize)> = (0..self.tasks.len())
            .filter_map(|t| match self.fate[t] {
                Fate::Placed(w) => Some((w, self.tasks[t].rank, t)),
                _ => None,
            })
            .collect();
        order.sort_unstable();
        order
            .into_iter()
            .map(|(wave, _, t)| Step {
                wave,
                action: self.tasks[t].action.clone(),
            })
            .collect()
    }

    fn ready(&self, t: usize, wave: u32) -> bool {
        self.tasks[t]
            .after
            .iter()
            .all(|&a| matches!(self.fate[a], Fate::Placed(w) if w < wave))
    }

    /// The extra a task adds on its host at the start of its wave.
    fn extra(&self, task: &Task) -> Option<(usize, Footprint)> {
        let (h, add) = task.add?;
        let extra = match task.remove {
            Some((rh, old)) if task.credit_own && rh == h => add.beyond(old),
            _ => add,
        };
        Some((h, extra))
    }

    fn fill_wave(&mut self, wave: u32, pending: &[usize]) -> Vec<usize> {
        let mut reserved: HashMap<usize, Footprint> = HashMap::new();
        let mut touched: HashSet<usize> = HashSet::new();
        let mut exclusive: HashSet<usize> = HashSet::new();
        let mut migrations = 0u32;
        let mut per_host: HashMap<usize, u32> = HashMap::new();
        let mut placed = Vec::new();
        for &t in pending {
            if !self.ready(t, wave) {
                continue;
            }
            let task = &self.tasks[t];
            let task_hosts: Vec<usize> = task
                .add
                .iter()
                .chain(task.remove.iter())
                .map(|(h, _)| *h)
                .chain(task.exclusive)
                .collect();
            if task_hosts.iter().any(|h| exclusive.contains(h)) {
                continue;
            }
            if let Some(h) = task.exclusive {
                if touched.contains(&h) {
                    continue;
                }
            }
            if !task.migration.is_empty()
                && (migrations >= self.max_total
                    || task
                        .migration
                        .iter()
                        .any(|h| per_host.get(h).copied().unwrap_or(0) >= self.max_per_host))
            {
                continue;
            }
            let extra = self.extra(task);
            if let Some((h, extra)) = extra {
                let r = reserved.get(&h).copied().unwrap_or_default();
                if self.hosts[h].fits(r, extra).is_err() {
                    continue;
                }
            }
            if let Some(h) = task.exclusive {
                if task
                    .pools
                    .iter()
                    .any(|&(size, pages)| self.hosts[h].pool_resize_fits(size, pages).is_err())
                {
                    continue;
                }
                exclusive.insert(h);
            }
            if let Some((h, extra)) = extra {
                let r = reserved.entry(h).or_default();
                *r = Footprint::sum(*r, extra);
            }
            if !task.migration.is_empty() {
                migrations += 1;
                for &h in &task.migration {
                    *per_host.entry(h).or_default() += 1;
                }
            }
            touched.extend(task_hosts);
            self.fate[t] = Fate::Placed(wave);
            placed.push(t);
        }
        placed
    }

    fn commit(&mut self, t: usize) {
        let task = &self.tasks[t];
        if let Some((h, add)) = task.add {
            self.hosts[h].hold(add);
        }
        if let Some((h, old)) = task.remove {
            self.hosts[h].release(old);
        }
        if let Some(h) = task.exclusive {
            for &(size, pages) in &task.pools {
                self.hosts[h].resize_pool(size, pages);
            }
        }
    }

    /// Tasks after `old` follow `new` instead.
    fn redirect(&mut self, old: usize, new: usize) {
        for task in &mut self.tasks {
            for a in &mut task.after {
                if *a == old {
                    *a = new;
                }
            }
        }
    }

    /// Supersede the tasks that wait for `t` (a pause or resume after a move: a fresh
    /// start already enters the desired state).
    fn drop_followers(&mut self, t: usize) {
        for f in 0..self.tasks.len() {
            if self.fate[f] == Fate::Pending && self.tasks[f].after.contains(&t) {
                self.fate[f] = Fate::Superseded;
            }
        }
    }

    fn unstick(&mut self, wave: u32, pending: &[usize], guests: &mut [GuestPlan]) -> Unstuck {
        let ready: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|&t| self.ready(t, wave))
            .collect();

        // 1. A live migration passes through a third host with room.
        for &t in &ready {
            let Fallback::LiveMove { .. } = self.tasks[t].fallback else {
                continue;
            };
            let g = self.tasks[t].guest.expect("moves belong to guests");
            if guests[g].via.is_some() {
                continue;
            }
            if let Some(s) = self.staging_host(t, &guests[g]) {
                let (to, fp) = self.tasks[t].add.expect("moves add");
                let mut second = self.tasks[t].clone();
                let name = guests[g].name.clone();
                let (from_name, to_name, via) = (
                    self.hosts[self.tasks[t].remove.expect("moves remove").0]
                        .name
                        .to_owned(),
                    self.hosts[to].name.to_owned(),
                    self.hosts[s].name.to_owned(),
                );
                self.tasks[t].add = Some((s, fp));
                self.tasks[t].migration = vec![self.tasks[t].migration[0], s];
                self.tasks[t].action = Action::Migrate {
                    guest: name.clone(),
                    from: from_name,
                    to: via.clone(),
                };
                second.remove = Some((s, fp));
                second.migration = vec![s, to];
                second.after = vec![t];
                second.action = Action::Migrate {
                    guest: name,
                    from: via.clone(),
                    to: to_name.clone(),
                };
                let id = self.push(second);
                self.redirect_except(t, id);
                guests[g].via = Some(via.clone());
                guests[g].reason = Some(format!(
                    "no room on {to_name} until other guests leave it; passes through {via}"
                ));
                return Unstuck::Rewritten;
            }
        }

        // 2. Guests that may be stopped are stopped together and started where they go.
        let group = self.cold_group(&ready);
        if !group.is_empty() {
            for &t in &group {
                let g = self.tasks[t].guest.expect("moves belong to guests");
                let (from, old) = self.tasks[t].remove.expect("moves remove");
                let (to, new) = self.tasks[t].add.expect("moves add");
                let name = guests[g].name.clone();
                let mut stop = Self::guest_task(
                    g,
                    Action::Stop {
                        guest: name.clone(),
                        host: self.hosts[from].name.to_owned(),
                        reason: StopReason::ColdMove,
                    },
                    RANK_STOP,
                );
                stop.remove = Some((from, old));
                let stop = self.push(stop);
                let mut start = Self::guest_task(
                    g,
                    Action::Start {
                        guest: name,
                        host: self.hosts[to].name.to_owned(),
                    },
                    RANK_START,
                );
                start.add = Some((to, new));
                start.after = vec![stop];
                let start = self.push(start);
                self.fate[stop] = Fate::Placed(wave);
                self.fate[start] = Fate::Placed(wave + 1);
                self.fate[t] = Fate::Superseded;
                self.drop_followers(t);
                guests[g].operation = Operation::ColdMigrate;
                guests[g].reason = Some(
                    "hosts too full to move these guests live one at a time: stopped together, \
                     then started on their destinations"
                        .into(),
                );
            }
            for &t in &group {
                let (from, old) = self.tasks[t].remove.expect("moves remove");
                self.hosts[from].release(old);
            }
            for &t in &group {
                let (to, new) = self.tasks[t].add.expect("moves add");
                self.hosts[to].hold(new);
            }
            return Unstuck::Committed(wave + 2);
        }

        // 3. A local migration without room for both VMMs becomes a restart.
        for &t in &ready {
            if self.tasks[t].fallback != (Fallback::LocalMove { may_stop: true }) {
                continue;
            }
            let g = self.tasks[t]
                .guest
                .expect("local migrations belong to guests");
            let task = &mut self.tasks[t];
            task.action = Action::Restart {
                guest: guests[g].name.clone(),
                host: guests[g].host.clone(),
            };
            task.credit_own = true;
            task.migration.clear();
            task.rank = RANK_RESTART;
            task.fallback = Fallback::None;
            self.drop_followers(t);
            guests[g].operation = Operation::Restart;
            guests[g].reason = Some(
                "no room for both VMMs of a local migration; restarted, as restartPolicy: ifRequired allows"
                    .into(),
            );
            return Unstuck::Rewritten;
        }
        Unstuck::No
    }

    /// Like [`Self::redirect`], but the new task itself keeps waiting for `old`.
    fn redirect_except(&mut self, old: usize, new: usize) {
        self.redirect(old, new);
        self.tasks[new].after = vec![old];
    }

    /// A host, other than the source and destination, where the guest of move `t` can
    /// wait: usable, CPU-compatible both ways, with room now.
    fn staging_host(&self, t: usize, guest: &GuestPlan) -> Option<usize> {
        let task = &self.tasks[t];
        let (from, _) = task.remove?;
        let (to, fp) = task.add?;
        let wanted = guest.desired.as_ref()?;
        let (from_cpu, to_cpu) = (self.hosts[from].cpu(), self.hosts[to].cpu());
        (0..self.hosts.len()).find(|&s| {
            let host = &self.hosts[s];
            s != from
                && s != to
                && host.usable_for(wanted, true).is_ok()
                && crate::classify::cpu_compatible(wanted.cpu.mode, &from_cpu, &host.cpu()).is_ok()
                && crate::classify::cpu_compatible(wanted.cpu.mode, &host.cpu(), &to_cpu).is_ok()
                && host.fits(Footprint::default(), fp).is_ok()
        })
    }

    /// The largest set of stuck moves whose guests may be stopped and that all fit on
    /// their destinations once all of them are stopped: moves to a host that stays too
    /// full are dropped until the rest fits.
    fn cold_group(&self, ready: &[usize]) -> Vec<usize> {
        let mut group: Vec<usize> = ready
            .iter()
            .copied()
            .filter(|&t| {
                matches!(
                    self.tasks[t].fallback,
                    Fallback::ColdMove | Fallback::LiveMove { may_stop: true }
                )
            })
            .collect();
        loop {
            let mut freed: HashMap<usize, Footprint> = HashMap::new();
            let mut added: HashMap<usize, Footprint> = HashMap::new();
            for &t in &group {
                let (from, old) = self.tasks[t].remove.expect("moves remove");
                let (to, new) = self.tasks[t].add.expect("moves add");
                let f = freed.entry(from).or_default();
                *f = Footprint::sum(*f, old);
                let a = added.entry(to).or_default();
                *a = Footprint::sum(*a, new);
            }
            let full: HashSet<usize> = added
                .iter()
                .filter(|&(&h, &a)| {
                    let credit = freed.get(&h).copied().unwrap_or_default();
                    self.hosts[h]
                        .fits(Footprint::default(), a.beyond(credit))
                        .is_err()
                })
                .map(|(&h, _)| h)
                .collect();
            if full.is_empty() {
                return group;
            }
            group.retain(|&t| !full.contains(&self.tasks[t].add.expect("moves add").0));
        }
    }

    /// Nothing can move and nothing can be rewritten: block every task that is ready,
    /// with the numbers that stop it, and every task that waits for a blocked one.
    fn block_stuck(
        &mut self,
        wave: u32,
        pending: &[usize],
        guests: &mut [GuestPlan],
        hosts: &mut [HostPlan],
        observed: &Observed,
    ) {
        let ready: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|&t| self.ready(t, wave))
            .collect();
        let mut reasons: Vec<(usize, String)> = Vec::new();
        for &t in &ready {
            reasons.push((t, self.why_stuck(t, &ready, guests, observed)));
        }
        for (t, reason) in reasons {
            self.block(t, reason, guests, hosts);
        }
        // Cascade: what waits for a blocked task is blocked too.
        loop {
            let mut changed = false;
            for t in 0..self.tasks.len() {
                if self.fate[t] != Fate::Pending {
                    continue;
                }
                if let Some(&b) = self.tasks[t]
                    .after
                    .iter()
                    .find(|&&a| self.fate[a] == Fate::Blocked)
                {
                    let reason = match (&self.tasks[b].action, self.tasks[b].guest) {
                        (Action::ConfigureHost { host, .. }, _) => {
                            format!("waits for the settings of host {host}, which are blocked")
                        }
                        (_, Some(g)) => guests[g]
                            .reason
                            .clone()
                            .unwrap_or_else(|| "waits for a blocked action".into()),
                        _ => "waits for a blocked action".into(),
                    };
                    self.block(t, reason, guests, hosts);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    fn block(
        &mut self,
        t: usize,
        reason: String,
        guests: &mut [GuestPlan],
        hosts: &mut [HostPlan],
    ) {
        self.fate[t] = Fate::Blocked;
        if let Some(p) = self.tasks[t].host_plan {
            let blocked = &mut hosts[p].blocked;
            *blocked = Some(match blocked.take() {
                Some(earlier) => format!("{earlier}; {reason}"),
                None => reason,
            });
            return;
        }
        let Some(g) = self.tasks[t].guest else { return };
        let done = self
            .tasks
            .iter()
            .enumerate()
            .any(|(i, task)| task.guest == Some(g) && matches!(self.fate[i], Fate::Placed(_)));
        let plan = &mut guests[g];
        if plan.operation != Operation::Blocked {
            plan.reason = Some(match &plan.via {
                Some(via) if done => format!("stays on {via} for now: {reason}"),
                _ => reason,
            });
            plan.operation = Operation::Blocked;
        }
        for i in 0..self.tasks.len() {
            if self.tasks[i].guest == Some(g) && self.fate[i] == Fate::Pending {
                self.fate[i] = Fate::Blocked;
            }
        }
    }

    fn why_stuck(
        &self,
        t: usize,
        ready: &[usize],
        guests: &[GuestPlan],
        observed: &Observed,
    ) -> String {
        let task = &self.tasks[t];
        if let Some(h) = task.exclusive {
            for &(size, pages) in &task.pools {
                if let Err(why) = self.hosts[h].pool_resize_fits(size, pages) {
                    let holders = page_holders(&observed.guests, self.hosts[h].name, size);
                    return if holders.is_empty() {
                        why
                    } else {
                        format!("{why} ({holders})")
                    };
                }
            }
        }
        let Some((h, extra)) = self.extra(task) else {
            return "waits for an action that cannot be done".into();
        };
        let why = self.hosts[h]
            .fits(Footprint::default(), extra)
            .err()
            .unwrap_or_else(|| "no room".into());
        match task.fallback {
            Fallback::LiveMove { .. } | Fallback::ColdMove => {
                let (from, _) = task.remove.expect("moves remove");
                let partner = ready.iter().find(|&&o| {
                    o != t
                        && self.tasks[o].remove.map(|r| r.0) == Some(h)
                        && self.tasks[o].add.map(|a| a.0) == Some(from)
                });
                let swap = partner
                    .and_then(|&o| self.tasks[o].guest)
                    .map(|o| format!("; it swaps hosts with {}, which waits for its room", guests[o].name))
                    .unwrap_or_default();
                format!(
                    "{why}{swap}; no third host has room to pass through, and the guests may not be \
                     stopped (restartPolicy: ifRequired or migration.mode: cold would allow a cold swap)"
                )
            }
            Fallback::LocalMove { .. } => format!(
                "a local migration runs two VMMs at once: {why} (restartPolicy: ifRequired would allow a restart)"
            ),
            Fallback::None => why,
        }
    }
}

enum Unstuck {
    /// Tasks were rewritten; try the same wave again.
    Rewritten,
    /// Waves up to the given one were filled directly.
    Committed(u32),
    /// Nothing helps.
    No,
}
