//! Placements of selector-placed guests, chosen by the elected leader and recorded in
//! etcd (never in git), and the leader's loop that keeps them.
//!
//! `<prefix>placements/<guest>` holds a [`PlacementRecord`]: the host the scheduler
//! ([`crate::scheduler`]) chose, or why none fits. The records are bound to no lease: a
//! placement outlives the leader that wrote it, and the next leader starts from them.
//! Every write is a transaction guarded by the leader's term ([`Leadership::guard`]), so
//! a deposed leader writes nothing.
//!
//! What the leader does, each round ([`lead_round`]):
//! - hosts *up* are those that hold a lease (their record is under `hosts/`);
//! - a guest whose recorded host is down keeps it, unless it has
//!   `availability: {onHostFailure: restart}`: a host's record disappears when its lease
//!   expires, one TTL after its last renewal, and the host must have stopped its HA
//!   guests `ttl - selfFenceAfter` (at least 1 s) before that, so an HA guest of a host
//!   that is gone may run elsewhere at once: the scheduler places it among the hosts up;
//! - every other guest keeps its host while it fits there; new guests, and guests whose
//!   manifest changed so that they no longer fit, are placed afresh; a guest that fits
//!   nowhere gets the reason.
//!
//! Each host's `berth serve` reads the records and fills in `spec.host` of its
//! selector-placed guests from them ([`crate::scheduler::assign`]).

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{decode, encode, EtcdError, EtcdStore, FleetView, Leadership};
use crate::model::{Desired, ObservedHost};
use crate::scheduler::{self, Placement};

/// What `<prefix>placements/<guest>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementRecord {
    /// The host chosen; absent when none fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why no host fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The leader's term that wrote it (the creation revision of its election key).
    pub term: i64,
}

impl PlacementRecord {
    /// The scheduler's answer this record holds.
    pub fn placement(&self) -> Placement {
        match &self.host {
            Some(host) => Placement::Placed(host.clone()),
            None => Placement::Unplaced(self.reason.clone().unwrap_or_default()),
        }
    }

    fn of(placement: &Placement, term: i64) -> Self {
        match placement {
            Placement::Placed(host) => PlacementRecord {
                host: Some(host.clone()),
                reason: None,
                term,
            },
            Placement::Unplaced(why) => PlacementRecord {
                host: None,
                reason: Some(why.clone()),
                term,
            },
        }
    }
}

/// Reads every placement record.
pub async fn read_placements(
    store: &EtcdStore,
) -> Result<BTreeMap<String, PlacementRecord>, EtcdError> {
    let prefix = store.keys.placements();
    let mut kv = store.client.kv_client().max_decoding_message_size(64 << 20);
    let answer = store
        .call(
            || "reading the placements".to_owned(),
            kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut out = BTreeMap::new();
    for kv in answer.kvs() {
        let Some(guest) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| k.strip_prefix(&prefix))
        else {
            continue;
        };
        out.insert(guest.to_owned(), decode(kv.key(), kv.value())?);
    }
    Ok(out)
}

/// What one round of the leader changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Guests placed on a host they were not on before: (guest, from, to).
    pub moved: Vec<(String, Option<String>, String)>,
    /// Records written (placed or not) and deleted.
    pub written: usize,
    /// Records deleted (guests no longer placed by selector).
    pub deleted: usize,
}

/// The placements the leader wants, from the manifests, the live hosts and the records.
/// Pure: see the module documentation for the rules.
pub fn decide(
    desired: &Desired,
    up_hosts: &BTreeMap<String, ObservedHost>,
    records: &BTreeMap<String, PlacementRecord>,
) -> BTreeMap<String, Placement> {
    let previous: BTreeMap<String, String> = records
        .iter()
        .filter_map(|(g, r)| r.host.clone().map(|h| (g.clone(), h)))
        .collect();
    // Non-HA guests of a host that is down wait for it: they keep their record and hold
    // nothing the scheduler could give away (their host is no candidate anyway).
    let waiting: BTreeMap<String, String> = desired
        .guests
        .iter()
        .filter(|g| g.spec.placed_by_selector() && !g.spec.restarts_on_host_failure())
        .filter_map(|g| {
            let host = previous.get(&g.metadata.name)?;
            (!up_hosts.contains_key(host)).then(|| (g.metadata.name.clone(), host.clone()))
        })
        .collect();
    let scheduled = if waiting.is_empty() {
        std::borrow::Cow::Borrowed(desired)
    } else {
        let mut d = desired.clone();
        d.guests.retain(|g| !waiting.contains_key(&g.metadata.name));
        std::borrow::Cow::Owned(d)
    };
    let hosts: Vec<ObservedHost> = up_hosts.values().cloned().collect();
    let mut out = scheduler::schedule(&scheduled, &hosts, &|h| up_hosts.contains_key(h), &previous);
    out.extend(waiting.into_iter().map(|(g, h)| (g, Placement::Placed(h))));
    out
}

/// etcd's default limit of operations in one transaction.
const MAX_TXN_OPS: usize = 128;

/// One round as the leader: reads the live hosts and the records, decides, and writes
/// what changed, guarded by the leader's term. `Ok(None)` when this host no longer
/// leads (a guarded write failed).
pub async fn lead_round(
    store: &EtcdStore,
    leadership: &Leadership,
    desired: &Desired,
    fleet: &FleetView,
) -> Result<Option<Round>, EtcdError> {
    let records = &fleet.placements;
    let up: BTreeMap<String, ObservedHost> = fleet
        .hosts
        .iter()
        .map(|(name, h)| (name.clone(), h.record.observed.clone()))
        .collect();
    let wanted = decide(desired, &up, records);
    let term = leadership.term();
    let mut ops = Vec::new();
    let mut round = Round::default();
    for (guest, placement) in &wanted {
        let record = PlacementRecord::of(placement, term);
        let old = records.get(guest);
        let same = old.is_some_and(|o| o.host == record.host && o.reason == record.reason);
        if same {
            continue;
        }
        if let Placement::Placed(to) = placement {
            round
                .moved
                .push((guest.clone(), old.and_then(|o| o.host.clone()), to.clone()));
        }
        ops.push(TxnOp::put(
            store.keys.placement(guest),
            encode(&record),
            None,
        ));
        round.written += 1;
    }
    let selector: BTreeSet<&str> = desired
        .guests
        .iter()
        .filter(|g| g.spec.placed_by_selector())
        .map(|g| g.metadata.name.as_str())
        .collect();
    for guest in records.keys().filter(|g| !selector.contains(g.as_str())) {
        ops.push(TxnOp::delete(store.keys.placement(guest), None));
        round.deleted += 1;
    }
    for chunk in ops.chunks(MAX_TXN_OPS - 1) {
        if !guarded(store, leadership.guard(), chunk.to_vec()).await? {
            return Ok(None);
        }
    }
    Ok(Some(round))
}

async fn guarded(store: &EtcdStore, guard: Compare, ops: Vec<TxnOp>) -> Result<bool, EtcdError> {
    let mut kv = store.client.kv_client();
    let txn = Txn::new().when([guard]).and_then(ops);
    let answer = store
        .call(|| "writing placements".to_owned(), kv.txn(txn))
        .await?;
    Ok(answer.succeeded())
}

/// The placements as `berth serve` applies them to its revision: the records of guests
/// placed by selector (a guest without one is not placed yet).
pub fn placements_of(
    desired: &Desired,
    records: &BTreeMap<String, PlacementRecord>,
) -> BTreeMap<String, Placement> {
    desired
        .guests
        .iter()
        .filter(|g| g.spec.placed_by_selector())
        .filter_map(|g| {
            records
                .get(&g.metadata.name)
                .map(|r| (g.metadata.name.clone(), r.placement()))
        })
        .collect()
}

/// How the leader's loop is set up.
#[derive(Debug, Clone, Copy)]
pub struct LeaderSettings {
    /// A full round at least this often, even when no host came or went.
    pub resync_every: std::time::Duration,
}

impl Default for LeaderSettings {
    fn default() -> Self {
        LeaderSettings {
            resync_every: std::time::Duration::from_secs(10),
        }
    }
}

/// Campaigns for leadership and, while this host leads, keeps the placements of the
/// revision `desired` holds: a round when a host's record comes or goes, when the
/// revision changes, and every `resync_every`. Runs until an error; `on_round` sees
/// each round's outcome (for status and logs). When this host loses the lead it
/// campaigns again.
pub async fn lead(
    session: &super::HostSession,
    mut desired: tokio::sync::watch::Receiver<Option<std::sync::Arc<Desired>>>,
    settings: LeaderSettings,
    on_round: impl Fn(&Leadership, &Round),
) -> Result<(), EtcdError> {
    let store = session.store().clone();
    loop {
        let leadership = Leadership::campaign(session).await?;
        tracing::info!(
            host = session.host(),
            term = leadership.term(),
            "leading the fleet"
        );
        'term: loop {
            let fleet = super::read_fleet(&store).await?;
            let current = desired.borrow_and_update().clone();
            if let Some(d) = current {
                match lead_round(&store, &leadership, &d, &fleet).await? {
                    Some(round) => on_round(&leadership, &round),
                    None => break 'term,
                }
            }
            let mut watch = super::HostWatch::open(&store, fleet.revision).await?;
            let wake = tokio::time::sleep(settings.resync_every);
            tokio::pin!(wake);
            tokio::select! {
                event = watch.next() => { event?; }
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                () = &mut wake => {}
            }
            if !leadership.is_leader(&store).await? {
                break 'term;
            }
        }
        tracing::warn!(host = session.host(), "no longer leading the fleet");
    }
}

/// [`lead`] for as long as `desired` has senders: after an error (etcd slow or away: a
/// round's request timed out) it campaigns again a second later, so a fleet never stays
/// without a leader because one request failed.
pub async fn lead_on(
    session: &super::HostSession,
    desired: tokio::sync::watch::Receiver<Option<std::sync::Arc<Desired>>>,
    settings: LeaderSettings,
    on_round: impl Fn(&Leadership, &Round),
) {
    loop {
        match lead(session, desired.clone(), settings, &on_round).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                host = session.host(),
                error = %berth_hypervisor::report::one_line(&e),
                "leading the fleet failed; campaigning again"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The placement records as a host follows them: read once, then watched.
pub type SharedPlacements = std::sync::Arc<std::sync::Mutex<scheduler::PlacementIndex>>;

/// What a change of the placement records touched: a host runs a pass only for the
/// changes that concern it, not for every guest of the fleet placed anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementChange {
    /// Every record was read (at the start, and again after an error).
    pub everything: bool,
    /// The hosts a changed guest was placed on, before or after the change.
    pub hosts: BTreeSet<String>,
    /// A guest placed nowhere came or went (such guests are shown on every host).
    pub unplaced: bool,
}

impl PlacementChange {
    /// Whether `host` should look again: a guest was placed on it or moved away from
    /// it. (A host running a guest whose record moves between two other hosts sees it
    /// at its next pass.)
    pub fn concerns(&self, host: &str) -> bool {
        self.everything || self.unplaced || self.hosts.contains(host)
    }

    fn note(&mut self, placement: Option<&Placement>) {
        match placement {
            Some(Placement::Placed(host)) => {
                self.hosts.insert(host.clone());
            }
            Some(Placement::Unplaced(_)) => self.unplaced = true,
            None => {}
        }
    }
}

/// Follows the placement records for host `me` on a task of its own: the placements
/// it returns stay equal to the records, and `pokes` is notified for each change that
/// concerns `me` (what a host's reconcile loop waits on), until `stop` turns true.
pub fn follow_placements_for(
    store: EtcdStore,
    me: String,
    pokes: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> SharedPlacements {
    let shared = SharedPlacements::default();
    tokio::spawn(follow_placements(
        store,
        std::sync::Arc::clone(&shared),
        move |change| {
            if change.concerns(&me) {
                pokes.notify_one();
            }
        },
        stop,
    ));
    shared
}

/// Keeps `shared` equal to the placement records (one read, then a watch from its
/// revision; read again after any error), calling `changed` with what each change
/// touched, until `stop` turns true.
pub async fn follow_placements(
    store: EtcdStore,
    shared: SharedPlacements,
    changed: impl Fn(&PlacementChange),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let prefix = store.keys.placements();
    loop {
        let followed = async {
            let mut kv = store.client.kv_client();
            let answer = store
                .call(
                    || "reading the placements".to_owned(),
                    kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
                )
                .await?;
            let mut records = BTreeMap::new();
            for kv in answer.kvs() {
                if let Some(guest) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&prefix))
                {
                    let record: PlacementRecord = decode(kv.key(), kv.value())?;
                    records.insert(guest.to_owned(), record.placement());
                }
            }
            *shared.lock().expect("placements") = scheduler::PlacementIndex::new(records);
            changed(&PlacementChange {
                everything: true,
                ..PlacementChange::default()
            });
            let options = etcd_client::WatchOptions::new()
                .with_prefix()
                .with_start_revision(super::revision(answer.header()) + 1);
            let mut client = store.client.watch_client();
            let mut stream = store
                .call(
                    || "watching the placements".to_owned(),
                    client.watch(prefix.clone(), Some(options)),
                )
                .await?;
            loop {
                let message = stream
                    .message()
                    .await
                    .map_err(|source| EtcdError::Request {
                        what: "watching the placements".to_owned(),
                        source: source.into(),
                    })?;
                let Some(message) = message.filter(|m| !m.canceled()) else {
                    return Ok::<(), EtcdError>(());
                };
                let mut change = PlacementChange::default();
                {
                    let mut records = shared.lock().expect("placements");
                    for event in message.events() {
                        let Some(kv) = event.kv() else { continue };
                        let Some(guest) = std::str::from_utf8(kv.key())
                            .ok()
                            .and_then(|k| k.strip_prefix(&prefix))
                        else {
                            continue;
                        };
                        change.note(records.get(guest));
                        match event.event_type() {
                            etcd_client::EventType::Put => {
                                let record: PlacementRecord = decode(kv.key(), kv.value())?;
                                let placement = record.placement();
                                change.note(Some(&placement));
                                records.insert(guest.to_owned(), placement);
                            }
                            etcd_client::EventType::Delete => {
                                records.remove(guest);
                            }
                        }
                    }
                }
                changed(&change);
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            result = followed => {
                if let Err(e) = result {
                    tracing::warn!(error = %berth_hypervisor::report::one_line(&e), "following the placements failed; reading them again");
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_concerns_the_hosts_a_guest_left_or_reached_and_every_host_for_the_unplaced() {
        let mut moved = PlacementChange::default();
        moved.note(Some(&Placement::Placed("h1".into())));
        moved.note(Some(&Placement::Placed("h2".into())));
        moved.note(None);
        assert!(moved.concerns("h1") && moved.concerns("h2"));
        assert!(!moved.concerns("h3"));
        moved.note(Some(&Placement::Unplaced("no room".into())));
        assert!(moved.concerns("h3"));
        let read = PlacementChange {
            everything: true,
            ..PlacementChange::default()
        };
        assert!(read.concerns("h9"));
    }
}
