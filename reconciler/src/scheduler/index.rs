//! Placements of selector-placed guests indexed by host, so that one host's reconcile
//! pass finds its own guests without walking the fleet's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use super::Placement;

/// Where the selector-placed guests go, as a host's reconcile loop asks: per guest, and
/// per host. The fleet leader's records in etcd ([`crate::etcd::follow_placements`]),
/// or the scheduler's answer on the revision alone.
pub trait Placer: Send + Sync {
    /// The placement of `guest`, when it has one.
    fn placement(&self, guest: &str) -> Option<Placement>;
    /// The guests placed on `host`.
    fn placed_on(&self, host: &str) -> Vec<String>;
    /// The guests placed nowhere, with why.
    fn unplaced(&self) -> Vec<(String, String)>;
}

/// Placements (guest -> placement) with the guests of each host at hand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementIndex {
    all: BTreeMap<String, Placement>,
    by_host: HashMap<String, BTreeSet<String>>,
    unplaced: BTreeSet<String>,
}

impl PlacementIndex {
    /// An index of `placements`.
    pub fn new(placements: BTreeMap<String, Placement>) -> Self {
        let mut index = PlacementIndex::default();
        for (guest, placement) in placements {
            index.insert(guest, placement);
        }
        index
    }

    /// Sets where `guest` goes.
    pub fn insert(&mut self, guest: String, placement: Placement) {
        self.remove(&guest);
        match &placement {
            Placement::Placed(host) => {
                self.by_host
                    .entry(host.clone())
                    .or_default()
                    .insert(guest.clone());
            }
            Placement::Unplaced(_) => {
                self.unplaced.insert(guest.clone());
            }
        }
        self.all.insert(guest, placement);
    }

    /// Forgets `guest`.
    pub fn remove(&mut self, guest: &str) {
        match self.all.remove(guest) {
            Some(Placement::Placed(host)) => {
                if let Some(guests) = self.by_host.get_mut(&host) {
                    guests.remove(guest);
                    if guests.is_empty() {
                        self.by_host.remove(&host);
                    }
                }
            }
            Some(Placement::Unplaced(_)) => {
                self.unplaced.remove(guest);
            }
            None => {}
        }
    }

    /// Where `guest` goes.
    pub fn get(&self, guest: &str) -> Option<&Placement> {
        self.all.get(guest)
    }

    /// How many guests have a placement.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether no guest has one.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

impl Placer for PlacementIndex {
    fn placement(&self, guest: &str) -> Option<Placement> {
        self.get(guest).cloned()
    }

    fn placed_on(&self, host: &str) -> Vec<String> {
        self.by_host
            .get(host)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn unplaced(&self) -> Vec<(String, String)> {
        self.unplaced
            .iter()
            .filter_map(|g| match self.all.get(g) {
                Some(Placement::Unplaced(why)) => Some((g.clone(), why.clone())),
                _ => None,
            })
            .collect()
    }
}

impl Placer for Mutex<PlacementIndex> {
    fn placement(&self, guest: &str) -> Option<Placement> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .placement(guest)
    }

    fn placed_on(&self, host: &str) -> Vec<String> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .placed_on(host)
    }

    fn unplaced(&self) -> Vec<(String, String)> {
        self.lock().unwrap_or_else(|e| e.into_inner()).unplaced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_follows_moves_and_removals() {
        let mut index = PlacementIndex::new(BTreeMap::from([
            ("a".to_owned(), Placement::Placed("h1".into())),
            ("b".to_owned(), Placement::Placed("h1".into())),
            ("c".to_owned(), Placement::Unplaced("no room".into())),
        ]));
        assert_eq!(index.placed_on("h1"), ["a", "b"]);
        index.insert("a".into(), Placement::Placed("h2".into()));
        index.insert("c".into(), Placement::Placed("h2".into()));
        assert_eq!(index.placed_on("h1"), ["b"]);
        assert_eq!(index.placed_on("h2"), ["a", "c"]);
        assert!(index.unplaced().is_empty());
        index.insert("b".into(), Placement::Unplaced("gone".into()));
        index.remove("a");
        assert!(index.placed_on("h1").is_empty());
        assert_eq!(index.placed_on("h2"), ["c"]);
        assert_eq!(index.unplaced(), [("b".to_owned(), "gone".to_owned())]);
        assert_eq!(index.placement("c"), Some(Placement::Placed("h2".into())));
        assert_eq!(index.len(), 2);
    }
}
