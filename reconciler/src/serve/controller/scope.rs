//! What one host's pass plans: the guests that concern it, not the fleet's.
//!
//! A host acts only on its own steps (its guests, its settings, moves away from it), so
//! its pass plans only:
//! - the guests placed on it (by `host:` or by the placement records), the guests it
//!   runs, and the hosts these move from or to;
//! - on each such other host, every guest placed or running there, so that the
//!   capacity a move needs is counted as the whole plan counts it;
//! - the guests that fit nowhere (shown as blocked on every host).
//!
//! The revision is indexed once when it comes in ([`RevisionIndex`]); a pass then
//! costs what this host's guests cost, whatever the fleet's size. A selector-placed
//! guest with no placement yet concerns no host until the leader places it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};

use crate::model::{Desired, Observed};
use crate::scheduler::{Placement, Placer};

/// A revision's guests by name and by the host their manifest names (`host:`).
#[derive(Debug, Default)]
pub struct RevisionIndex {
    by_name: HashMap<String, usize>,
    named_to: HashMap<String, Vec<usize>>,
    hosts: HashMap<String, usize>,
}

impl RevisionIndex {
    /// The index of `desired`, shared with the other loops of this process that
    /// enforce the same revision (simulated hosts in one process are handed one parsed
    /// revision: each would otherwise build the same index).
    pub fn shared(desired: &Arc<Desired>) -> Arc<Self> {
        type Last = Option<(Weak<Desired>, Arc<RevisionIndex>)>;
        static LAST: Mutex<Last> = Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((of, index)) = &*last {
            if of.upgrade().is_some_and(|d| Arc::ptr_eq(&d, desired)) {
                return Arc::clone(index);
            }
        }
        let index = Arc::new(RevisionIndex::new(desired));
        *last = Some((Arc::downgrade(desired), Arc::clone(&index)));
        index
    }

    /// The index of `desired`.
    pub fn new(desired: &Desired) -> Self {
        let mut index = RevisionIndex::default();
        for (i, g) in desired.guests.iter().enumerate() {
            index.by_name.insert(g.metadata.name.clone(), i);
            if !g.spec.placed_by_selector() && !g.spec.host.is_empty() {
                index
                    .named_to
                    .entry(g.spec.host.clone())
                    .or_default()
                    .push(i);
            }
        }
        for (i, h) in desired.hosts.iter().enumerate() {
            index.hosts.insert(h.metadata.name.clone(), i);
        }
        index
    }
}

/// The part of `desired` and `observed` that host `me` plans (see the module
/// documentation), selector-placed guests placed by `placer`.
pub fn scope(
    desired: &Desired,
    index: &RevisionIndex,
    placer: &dyn Placer,
    observed: Observed,
    me: &str,
) -> (Desired, Observed) {
    let host_of = |name: &str| -> Option<String> {
        let g = &desired.guests[*index.by_name.get(name)?];
        if g.spec.placed_by_selector() {
            placer.placement(name)?.host().map(str::to_owned)
        } else {
            Some(g.spec.host.clone()).filter(|h| !h.is_empty())
        }
    };
    let placed_on = |host: &str, names: &mut BTreeSet<String>| {
        if let Some(guests) = index.named_to.get(host) {
            names.extend(
                guests
                    .iter()
                    .map(|i| desired.guests[*i].metadata.name.clone()),
            );
        }
        names.extend(placer.placed_on(host));
    };
    let observed_at: HashMap<&str, &str> = observed
        .guests
        .iter()
        .map(|g| (g.name.as_str(), g.host.as_str()))
        .collect();

    // This host's guests, and the hosts of the moves they are in.
    let mut mine = BTreeSet::new();
    placed_on(me, &mut mine);
    let mut hosts = BTreeSet::from([me.to_owned()]);
    for g in observed.guests.iter().filter(|g| g.host == me) {
        mine.insert(g.name.clone());
        hosts.extend(g.migrating_to.clone());
    }
    for name in &mine {
        hosts.extend(host_of(name));
        if let Some(at) = observed_at.get(name.as_str()) {
            hosts.insert((*at).to_owned());
        }
    }
    // Everything on those hosts, and what fits nowhere.
    let mut names = mine;
    for host in hosts.iter().filter(|h| *h != me) {
        placed_on(host, &mut names);
    }
    for g in &observed.guests {
        if hosts.contains(&g.host) {
            names.insert(g.name.clone());
        }
    }
    let unplaced = placer.unplaced();
    names.extend(unplaced.iter().map(|(g, _)| g.clone()));

    let mut guests = Vec::new();
    let mut placements = BTreeMap::new();
    for name in &names {
        let Some(i) = index.by_name.get(name.as_str()) else {
            continue;
        };
        let mut g = desired.guests[*i].clone();
        if g.spec.placed_by_selector() {
            if let Some(placement) = placer.placement(name) {
                if let Placement::Placed(host) = &placement {
                    g.spec.host = host.clone();
                }
                placements.insert(name.clone(), placement);
            }
        }
        guests.push(g);
    }
    let mut named_hosts = hosts.clone();
    named_hosts.extend(guests.iter().map(|g| g.spec.host.clone()));
    let observed = Observed {
        guests: observed
            .guests
            .into_iter()
            .filter(|g| names.contains(&g.name) || hosts.contains(&g.host))
            .collect(),
        hosts: observed.hosts,
    };
    named_hosts.extend(observed.guests.iter().map(|g| g.host.clone()));
    let observed = Observed {
        hosts: observed
            .hosts
            .into_iter()
            .filter(|h| named_hosts.contains(&h.name))
            .collect(),
        ..observed
    };
    let scoped = Desired {
        guests,
        hosts: named_hosts
            .iter()
            .filter_map(|h| index.hosts.get(h))
            .map(|i| desired.hosts[*i].clone())
            .collect(),
        fleet: desired.fleet,
        placements,
    };
    (scoped, observed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObservedGuest, ObservedHost};
    use crate::scheduler::PlacementIndex;

    fn fleet() -> Desired {
        let mut text = String::new();
        for h in 1..=4 {
            text.push_str(&format!(
                "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: h{h}, labels: {{rack: r}}}}\n\
                 spec: {{address: '127.0.0.{h}:7410', cpus: 0-3, memory: 8GiB}}\n---\n"
            ));
        }
        // Named to a host, placed by selector, and one that fits nowhere.
        for (name, place) in [
            ("a1", "host: h1"),
            ("a2", "host: h2"),
            ("a3", "host: h3"),
            ("s1", "hostSelector: {rack: r}"),
            ("s3", "hostSelector: {rack: r}"),
            ("s4", "hostSelector: {rack: r}"),
            ("none", "hostSelector: {rack: r}"),
            ("later", "hostSelector: {rack: r}"),
        ] {
            text.push_str(&format!(
                "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\n\
                 spec: {{{place}, cpu: {{vcpus: 1}}, memory: {{size: 64MiB}}}}\n---\n"
            ));
        }
        let set = berth_schema::load_files([("fleet.yaml", text)]).expect("valid");
        Desired::from_manifests(&set.manifests)
    }

    fn placements() -> PlacementIndex {
        PlacementIndex::new(BTreeMap::from([
            ("s1".to_owned(), Placement::Placed("h1".into())),
            ("s3".to_owned(), Placement::Placed("h3".into())),
            ("s4".to_owned(), Placement::Placed("h4".into())),
            ("none".to_owned(), Placement::Unplaced("no room".into())),
        ]))
    }

    fn running(desired: &Desired, name: &str, host: &str) -> ObservedGuest {
        let g = desired
            .guests
            .iter()
            .find(|g| g.metadata.name == name)
            .expect("a guest");
        ObservedGuest {
            host: host.to_owned(),
            ..ObservedGuest::as_written(g)
        }
    }

    fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<&str> {
        items.iter().map(name).collect()
    }

    #[test]
    fn a_host_plans_its_own_guests_and_what_fits_nowhere() {
        let desired = fleet();
        let index = RevisionIndex::new(&desired);
        let hosts: Vec<ObservedHost> = desired
            .hosts
            .iter()
            .map(|h| ObservedHost::as_written(h, []))
            .collect();
        // A driver that sees the whole fleet (the simulated one): h1 runs a1 and an
        // orphan, h3 runs a3.
        let observed = Observed {
            guests: vec![
                running(&desired, "a1", "h1"),
                ObservedGuest {
                    name: "orphan".into(),
                    ..running(&desired, "a1", "h1")
                },
                running(&desired, "a3", "h3"),
            ],
            hosts,
        };
        let (scoped, seen) = scope(&desired, &index, &placements(), observed, "h1");
        assert_eq!(
            names(&scoped.guests, |g| g.metadata.name.as_str()),
            ["a1", "none", "s1"]
        );
        assert_eq!(scoped.guests[2].spec.host, "h1", "placed by its record");
        assert_eq!(scoped.placements.keys().collect::<Vec<_>>(), ["none", "s1"]);
        assert_eq!(names(&scoped.hosts, |h| h.metadata.name.as_str()), ["h1"]);
        assert_eq!(names(&seen.guests, |g| g.name.as_str()), ["a1", "orphan"]);
        assert_eq!(names(&seen.hosts, |h| h.name.as_str()), ["h1"]);
    }

    #[test]
    fn a_move_brings_in_the_other_hosts_guests_for_its_capacity() {
        let desired = fleet();
        let index = RevisionIndex::new(&desired);
        // h3 runs s1, which its record places on h1 (a move to h1), and a3; h2 runs a2.
        let observed = Observed {
            guests: vec![
                running(&desired, "s1", "h3"),
                running(&desired, "a3", "h3"),
                running(&desired, "a2", "h2"),
            ],
            hosts: desired
                .hosts
                .iter()
                .map(|h| ObservedHost::as_written(h, []))
                .collect(),
        };
        let (scoped, seen) = scope(&desired, &index, &placements(), observed, "h1");
        assert_eq!(
            names(&scoped.guests, |g| g.metadata.name.as_str()),
            ["a1", "a3", "none", "s1", "s3"]
        );
        assert_eq!(
            names(&scoped.hosts, |h| h.metadata.name.as_str()),
            ["h1", "h3"]
        );
        assert_eq!(names(&seen.guests, |g| g.name.as_str()), ["s1", "a3"]);
        assert_eq!(names(&seen.hosts, |h| h.name.as_str()), ["h1", "h3"]);
        // h4 plans neither: only its own guest and what fits nowhere.
        let (scoped, _) = scope(&desired, &index, &placements(), Observed::default(), "h4");
        assert_eq!(
            names(&scoped.guests, |g| g.metadata.name.as_str()),
            ["none", "s4"]
        );
    }
}
