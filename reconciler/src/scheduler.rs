//! The scheduler: a host for every guest placed by `hostSelector`.
//!
//! [`schedule`] is a pure, deterministic function of the manifests, the hosts that may
//! take guests now, and where the guests were placed before. It fills no git file: in a
//! fleet, the elected leader runs it and records its answer in etcd
//! ([`crate::etcd::placements`]); `berth plan` runs it to show where each guest would
//! go, and CI mode schedules the base revision first so that the head keeps the base's
//! placements where they still fit.
//!
//! Rules, in order:
//! - A host is a candidate when a Host manifest declares it, it is `schedulable`, it is
//!   up (the caller says which are; a host whose lease expired is not), and its labels
//!   include every label of the guest's `hostSelector`.
//! - It must have room once every guest already on it is counted as its manifest asks
//!   (guests named to it by `host:` and guests the scheduler put there): the pinned CPUs
//!   exist there and are not given to a `dedicated` guest (nor, for a `dedicated`
//!   guest, to anyone), its hugepage pool of the right size has the pages, and its
//!   memory left for guests on normal pages holds the guest ([`crate::plan::Footprint`]).
//! - Anti-affinity: no guest on it carries every label of the guest's `antiAffinity`,
//!   and the guest carries not every label of another guest's `antiAffinity` there.
//! - A guest keeps the host it had when that host is still a candidate with room
//!   (guests that keep their host are counted first); the others go, by name, to the
//!   candidate with the most memory free for guests on normal pages, then by name.

use std::collections::{BTreeMap, HashMap};

use berth_schema::{CpuSet, Guest, GuestState, Host};
use serde::{Deserialize, Serialize};

use crate::model::{Desired, Observed, ObservedGuest, ObservedHost};
use crate::plan::capacity::HostState;
use crate::plan::Footprint;

mod index;
pub use index::{PlacementIndex, Placer};

/// Where the scheduler put one selector-placed guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Placement {
    /// On this host.
    Placed(String),
    /// Nowhere, and why.
    Unplaced(String),
}

impl Placement {
    /// The host, when placed.
    pub fn host(&self) -> Option<&str> {
        match self {
            Placement::Placed(host) => Some(host),
            Placement::Unplaced(_) => None,
        }
    }
}

type Labels = BTreeMap<String, String>;

/// A host as the scheduler fills it.
struct Slot<'a> {
    state: HostState<'a>,
    labels: &'a BTreeMap<String, String>,
    schedulable: bool,
    usable_cpus: CpuSet,
    pinned: CpuSet,
    dedicated: CpuSet,
    /// Labels and anti-affinity of the guests on the host that have either.
    guests: Vec<(&'a Labels, &'a Labels)>,
    /// Every label the guests here carry, with how many carry it: a guest whose
    /// anti-affinity names a label nobody here carries is not kept apart (most are not,
    /// and this spares a walk through every guest here for each of them).
    carried: HashMap<(&'a str, &'a str), usize>,
    /// The anti-affinity label sets of the guests here, by each of their labels.
    antis: HashMap<(&'a str, &'a str), Vec<&'a Labels>>,
    free_normal: u64,
}

impl<'a> Slot<'a> {
    fn new(host: &'a Host, observed: &'a ObservedHost) -> Self {
        let state = HostState::new(&host.metadata.name, Some(host), Some(observed));
        let free_normal = state.free_normal();
        Slot {
            state,
            labels: &host.metadata.labels,
            schedulable: host.spec.schedulable,
            usable_cpus: host.spec.cpus.difference(&host.spec.reserved_cpus),
            pinned: CpuSet::new(),
            dedicated: CpuSet::new(),
            guests: Vec::new(),
            carried: HashMap::new(),
            antis: HashMap::new(),
            free_normal,
        }
    }

    fn add(&mut self, guest: &'a Guest, footprint: Footprint) {
        self.state.hold(footprint);
        self.free_normal = self.state.free_normal();
        let pinned = pinned_of(guest);
        if guest.spec.cpu.dedicated {
            self.dedicated = self.dedicated.union(&pinned);
        }
        self.pinned = self.pinned.union(&pinned);
        if !guest.metadata.labels.is_empty() || !guest.spec.anti_affinity.is_empty() {
            self.guests
                .push((&guest.metadata.labels, &guest.spec.anti_affinity));
            for (k, v) in &guest.metadata.labels {
                *self.carried.entry((k, v)).or_default() += 1;
            }
            for (k, v) in &guest.spec.anti_affinity {
                self.antis
                    .entry((k, v))
                    .or_default()
                    .push(&guest.spec.anti_affinity);
            }
        }
    }

    /// Whether `guest` fits here on top of what the host holds; else which rule refuses
    /// it. Cheap: asked of every candidate host, it builds no message
    /// ([`Slot::explain`] does, for the few refusals shown).
    fn fits(
        &self,
        guest: &Guest,
        wanted: &ObservedGuest,
        footprint: Footprint,
    ) -> Result<(), Refusal> {
        if !self.schedulable {
            return Err(Refusal::NotSchedulable);
        }
        let pinned = pinned_of(guest);
        if !pinned.is_empty() {
            if !pinned.is_subset(&self.usable_cpus) {
                return Err(Refusal::NoCpu);
            }
            if !self.taken(guest, &pinned).is_empty() {
                return Err(Refusal::CpuTaken);
            }
        }
        if !self.state.is_usable_for(wanted, true) {
            return Err(Refusal::Unusable);
        }
        if !self.state.has_room(Footprint::default(), footprint) {
            return Err(Refusal::NoRoom);
        }
        match self.apart_from(guest) {
            Some(_) => Err(Refusal::AntiAffinity),
            None => Ok(()),
        }
    }

    /// The CPUs of `pinned` that a dedicated guest here holds (or, for a dedicated
    /// `guest`, that any guest here is pinned to).
    fn taken(&self, guest: &Guest, pinned: &CpuSet) -> CpuSet {
        if guest.spec.cpu.dedicated {
            pinned.intersection(&self.pinned)
        } else {
            pinned.intersection(&self.dedicated)
        }
    }

    /// The anti-affinity labels that keep `guest` apart from a guest here, if any:
    /// its own (a guest here carries them all), else theirs (it carries all of them).
    fn apart_from<'s>(&'s self, guest: &'s Guest) -> Option<&'s Labels> {
        let anti = &guest.spec.anti_affinity;
        let all_carried = || {
            anti.iter()
                .all(|(k, v)| self.carried.contains_key(&(k.as_str(), v.as_str())))
        };
        if !anti.is_empty()
            && all_carried()
            && self.guests.iter().any(|(labels, _)| carries(labels, anti))
        {
            return Some(anti);
        }
        guest.metadata.labels.iter().find_map(|(k, v)| {
            self.antis
                .get(&(k.as_str(), v.as_str()))?
                .iter()
                .find(|theirs| carries(&guest.metadata.labels, theirs))
                .copied()
        })
    }

    /// Why `refusal` refuses `guest` here, for people.
    fn explain(
        &self,
        refusal: Refusal,
        guest: &Guest,
        wanted: &ObservedGuest,
        footprint: Footprint,
    ) -> String {
        let name = self.state.name;
        match refusal {
            Refusal::Down => format!("{name} is down (no etcd lease)"),
            Refusal::NotSchedulable => format!("{name} is not schedulable"),
            Refusal::NoCpu => format!(
                "{name} has no CPU {} for the pinning",
                pinned_of(guest).difference(&self.usable_cpus)
            ),
            Refusal::CpuTaken => format!(
                "{name}'s CPU {} is taken by a dedicated guest",
                self.taken(guest, &pinned_of(guest))
            ),
            Refusal::Unusable => self
                .state
                .usable_for(wanted, true)
                .err()
                .unwrap_or_default(),
            Refusal::NoRoom => self
                .state
                .fits(Footprint::default(), footprint)
                .err()
                .unwrap_or_default(),
            Refusal::AntiAffinity => format!(
                "{name} runs a guest that anti-affinity keeps apart from it ({})",
                self.apart_from(guest).map(show_labels).unwrap_or_default()
            ),
        }
    }
}

/// Which rule keeps a guest off a host (its message is built only when shown).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Down,
    NotSchedulable,
    NoCpu,
    CpuTaken,
    Unusable,
    NoRoom,
    AntiAffinity,
}

fn pinned_of(guest: &Guest) -> CpuSet {
    crate::model::pinned_cpus(guest.spec.cpu.pinning.as_ref())
}

/// Whether `labels` include every one of `wanted`.
fn carries(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `{rack: a, zone: 1}`.
pub fn show_labels(labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", inner.join(", "))
}

fn holds_resources(guest: &Guest) -> bool {
    guest.spec.state != GuestState::Stopped
}

/// Chooses a host for every guest of `desired` placed by `hostSelector`.
///
/// `hosts` is how each host was last observed (capacity from the Host manifest when a
/// host is missing there); `up` says which hosts may take guests now; `previous` is
/// where guests were placed before (guest -> host). Guests named to a host by `host:`
/// hold their footprint there whether or not the host is up.
pub fn schedule(
    desired: &Desired,
    hosts: &[ObservedHost],
    up: &dyn Fn(&str) -> bool,
    previous: &BTreeMap<String, String>,
) -> BTreeMap<String, Placement> {
    let written: Vec<ObservedHost> = desired
        .hosts
        .iter()
        .map(|h| ObservedHost::as_written(h, []))
        .collect();
    let observed: BTreeMap<&str, &ObservedHost> = written
        .iter()
        .chain(hosts)
        .map(|h| (h.name.as_str(), h))
        .collect();
    let mut slots: BTreeMap<&str, Slot<'_>> = desired
        .hosts
        .iter()
        .map(|h| {
            let name = h.metadata.name.as_str();
            (name, Slot::new(h, observed[name]))
        })
        .collect();
    for g in desired
        .guests
        .iter()
        .filter(|g| !g.spec.placed_by_selector() && holds_resources(g))
    {
        if let Some(slot) = slots.get_mut(g.spec.host.as_str()) {
            slot.add(g, Footprint::of(&ObservedGuest::as_written(g)));
        }
    }

    let mut selected: Vec<&Guest> = desired
        .guests
        .iter()
        .filter(|g| g.spec.placed_by_selector())
        .collect();
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    // Host names by label, each list in name order (as `slots` is).
    let mut by_label: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for h in slots.values() {
        for (k, v) in h.labels {
            by_label.entry((k, v)).or_default().push(h.state.name);
        }
    }
    let mut out = BTreeMap::new();
    let mut rest = Vec::new();
    // Guests that keep their host first, so that a newcomer never pushes one away.
    for g in selected {
        let name = &g.metadata.name;
        let wanted = wanted_of(g);
        let footprint = footprint_of(g, &wanted);
        let kept = previous.get(name).filter(|host| {
            up(host)
                && slots.get(host.as_str()).is_some_and(|slot| {
                    matches(g, slot) && slot.fits(g, &wanted, footprint).is_ok()
                })
        });
        match kept {
            Some(host) => {
                slots
                    .get_mut(host.as_str())
                    .expect("a kept host has a slot")
                    .add(g, footprint);
                out.insert(name.clone(), Placement::Placed(host.clone()));
            }
            None => rest.push((g, wanted, footprint)),
        }
    }
    for (g, wanted, footprint) in rest {
        let placement = choose(g, &wanted, footprint, &slots, &by_label, up);
        if let Placement::Placed(host) = &placement {
            slots
                .get_mut(host.as_str())
                .expect("a chosen host has a slot")
                .add(g, footprint);
        }
        out.insert(g.metadata.name.clone(), placement);
    }
    out
}

fn wanted_of(guest: &Guest) -> ObservedGuest {
    ObservedGuest::as_written(guest)
}

fn footprint_of(guest: &Guest, wanted: &ObservedGuest) -> Footprint {
    if holds_resources(guest) {
        Footprint::of(wanted)
    } else {
        Footprint::default()
    }
}

fn matches(guest: &Guest, slot: &Slot<'_>) -> bool {
    guest
        .spec
        .host_selector
        .as_ref()
        .is_some_and(|selector| carries(slot.labels, selector))
}

/// The best candidate for one guest, or why there is none.
fn choose(
    guest: &Guest,
    wanted: &ObservedGuest,
    footprint: Footprint,
    slots: &BTreeMap<&str, Slot<'_>>,
    by_label: &HashMap<(&str, &str), Vec<&str>>,
    up: &dyn Fn(&str) -> bool,
) -> Placement {
    const SHOWN: usize = 3;
    // The hosts carrying the selector's rarest label, by name (then checked whole).
    let rarest = guest.spec.host_selector.as_ref().and_then(|sel| {
        sel.iter()
            .map(|(k, v)| {
                by_label
                    .get(&(k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|hosts| hosts.len())
    });
    let candidates: Box<dyn Iterator<Item = &Slot<'_>>> = match rarest {
        Some(hosts) => Box::new(hosts.iter().filter_map(|h| slots.get(h))),
        None => Box::new(slots.values()),
    };
    let mut best: Option<&Slot<'_>> = None;
    let mut shown: Vec<String> = Vec::new();
    let mut refused = 0usize;
    let mut matching = 0usize;
    for slot in candidates.filter(|s| matches(guest, s)) {
        matching += 1;
        let fits = if up(slot.state.name) {
            slot.fits(guest, wanted, footprint)
        } else {
            Err(Refusal::Down)
        };
        match fits {
            Ok(()) => {
                if best.is_none_or(|b| slot.free_normal > b.free_normal) {
                    best = Some(slot);
                }
            }
            Err(refusal) => {
                refused += 1;
                if shown.len() < SHOWN {
                    shown.push(slot.explain(refusal, guest, wanted, footprint));
                }
            }
        }
    }
    if let Some(slot) = best {
        return Placement::Placed(slot.state.name.to_owned());
    }
    let selector = guest.spec.host_selector.clone().unwrap_or_default();
    if matching == 0 {
        return Placement::Unplaced(format!(
            "no Host matches hostSelector {}",
            show_labels(&selector)
        ));
    }
    let more = refused - shown.len();
    let mut why = shown.join("; ");
    if more > 0 {
        why.push_str(&format!("; and {more} more"));
    }
    Placement::Unplaced(format!(
        "no host fits: {matching} match{} hostSelector {}, none has room: {why}",
        if matching == 1 { "es" } else { "" },
        show_labels(&selector)
    ))
}

/// Places the selector-placed guests of `desired` without a fleet leader: every host
/// counts as up, and a guest keeps the host `observed` sees it run on (when it still
/// fits there). `berth plan` and `berth apply` use this; in CI mode `observed` is the
/// base revision as written, so the head keeps the base's placements.
pub fn place(desired: &mut Desired, observed: &Observed) {
    let previous: BTreeMap<String, String> = observed
        .guests
        .iter()
        .filter(|g| g.has_vmm())
        .map(|g| (g.name.clone(), g.host.clone()))
        .collect();
    let placements = schedule(desired, &observed.hosts, &|_| true, &previous);
    assign(desired, placements);
}

/// Fills in `spec.host` of every placed guest and records every answer in
/// `desired.placements`, for the planner.
pub fn assign(desired: &mut Desired, placements: BTreeMap<String, Placement>) {
    for g in desired
        .guests
        .iter_mut()
        .filter(|g| g.spec.placed_by_selector())
    {
        if let Some(Placement::Placed(host)) = placements.get(&g.metadata.name) {
            g.spec.host = host.clone();
        }
    }
    desired.placements = placements;
}

/// The hosts selector-placed guests of `desired` are on (guest -> host).
pub fn placed(desired: &Desired) -> BTreeMap<String, String> {
    desired
        .placements
        .iter()
        .filter_map(|(g, p)| p.host().map(|h| (g.clone(), h.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests;
