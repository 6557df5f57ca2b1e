//! The whole fleet as published in etcd, read in one range read (one revision), asking
//! no host.

use std::collections::BTreeMap;

use etcd_client::GetOptions;
use serde::Serialize;

use super::election::leader_among;
use super::{decode, revision, EtcdError, EtcdStore, HostRecord, Ownership};
use crate::model::ObservedGuest;

/// A host that holds a lease, with what it published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedHost {
    /// Host name.
    pub name: String,
    /// Its lease, as etcd numbers it.
    pub lease: i64,
    /// What it published.
    #[serde(flatten)]
    pub record: HostRecord,
}

/// The fleet at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetView {
    /// The revision read.
    pub revision: i64,
    /// Hosts alive (holding a lease), by name.
    pub hosts: BTreeMap<String, PublishedHost>,
    /// Guests as their hosts observe them (`host` says which host).
    pub observed: Vec<ObservedGuest>,
    /// Ownership records, by guest.
    pub owners: BTreeMap<String, Ownership>,
    /// The elected leader.
    pub leader: Option<String>,
    /// Placement records of selector-placed guests, by guest.
    pub placements: BTreeMap<String, super::PlacementRecord>,
}

/// The record host `host` publishes, while its lease lives.
pub async fn read_host(store: &EtcdStore, host: &str) -> Result<Option<HostRecord>, EtcdError> {
    let mut kv = store.client.kv_client();
    let answer = store
        .call(
            || format!("reading host {host}"),
            kv.get(store.keys.host(host), None),
        )
        .await?;
    answer
        .kvs()
        .first()
        .map(|kv| decode(kv.key(), kv.value()))
        .transpose()
}

/// The largest fleet read accepted, in bytes (some 600,000 guests of 400 bytes).
const MAX_FLEET_READ: usize = 256 << 20;

/// Reads everything under the prefix at once.
pub async fn read_fleet(store: &EtcdStore) -> Result<FleetView, EtcdError> {
    let keys = &store.keys;
    // 1,000 hosts with 10 guests each are about 5 MB, over gRPC's default 4 MiB.
    let mut kv = store
        .client
        .kv_client()
        .max_decoding_message_size(MAX_FLEET_READ);
    let answer = store
        .call(
            || "reading the fleet".to_owned(),
            kv.get(keys.prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let hosts_prefix = keys.hosts();
    let observed_prefix = keys.observed_all();
    let owners_prefix = keys.owners();
    let election_prefix = format!("{}/", keys.election());
    let placements_prefix = keys.placements();
    let mut view = FleetView {
        revision: revision(answer.header()),
        ..FleetView::default()
    };
    let mut candidates = Vec::new();
    for kv in answer.kvs() {
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            continue;
        };
        if let Some(name) = key.strip_prefix(&hosts_prefix) {
            view.hosts.insert(
                name.to_owned(),
                PublishedHost {
                    name: name.to_owned(),
                    lease: kv.lease(),
                    record: decode(kv.key(), kv.value())?,
                },
            );
        } else if key.starts_with(&observed_prefix) {
            view.observed.push(decode(kv.key(), kv.value())?);
        } else if let Some(guest) = key.strip_prefix(&owners_prefix) {
            view.owners
                .insert(guest.to_owned(), Ownership::from_kv(guest, kv)?);
        } else if let Some(guest) = key.strip_prefix(&placements_prefix) {
            view.placements
                .insert(guest.to_owned(), decode(kv.key(), kv.value())?);
        } else if key.starts_with(&election_prefix) {
            candidates.push(kv);
        }
    }
    view.leader = leader_among(candidates.into_iter());
    Ok(view)
}

/// A change to the set of live hosts, as the leader follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// A host published its record: it joined, came back, or updated it.
    Published(PublishedHost),
    /// A host's record is gone: its lease expired (it died or was cut off, and has
    /// fenced itself by now) or was revoked (a clean shutdown).
    Gone {
        /// The host.
        name: String,
        /// The record it had.
        last: Option<HostRecord>,
        /// The revision of the deletion.
        revision: i64,
    },
}

/// The host records' changes after a [`FleetView`]'s revision, with none missed.
pub struct HostWatch {
    stream: etcd_client::WatchStream,
    hosts_prefix: String,
    pending: std::collections::VecDeque<HostEvent>,
}

impl HostWatch {
    /// Follows the host records from just after `revision` (a [`FleetView::revision`]:
    /// reading the fleet, then watching from there, misses nothing).
    pub async fn open(store: &EtcdStore, revision: i64) -> Result<HostWatch, EtcdError> {
        let hosts_prefix = store.keys.hosts();
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(revision + 1);
        let mut client = store.client.watch_client();
        let stream = store
            .call(
                || "watching the hosts".to_owned(),
                client.watch(hosts_prefix.clone(), Some(options)),
            )
            .await?;
        Ok(HostWatch {
            stream,
            hosts_prefix,
            pending: Default::default(),
        })
    }

    /// The next change; waits for one. `None` when etcd ended the watch: read the fleet
    /// again and open a new watch.
    pub async fn next(&mut self) -> Result<Option<HostEvent>, EtcdError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            let answer = self
                .stream
                .message()
                .await
                .map_err(|source| EtcdError::Request {
                    what: "watching the hosts".to_owned(),
                    source: source.into(),
                })?;
            let Some(answer) = answer else {
                return Ok(None);
            };
            if answer.canceled() {
                return Ok(None);
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(name) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&self.hosts_prefix))
                else {
                    continue;
                };
                self.pending.push_back(match event.event_type() {
                    etcd_client::EventType::Put => HostEvent::Published(PublishedHost {
                        name: name.to_owned(),
                        lease: kv.lease(),
                        record: decode(kv.key(), kv.value())?,
                    }),
                    etcd_client::EventType::Delete => HostEvent::Gone {
                        name: name.to_owned(),
                        last: event
                            .prev_kv()
                            .map(|prev| decode(prev.key(), prev.value()))
                            .transpose()?,
                        revision: kv.mod_revision(),
                    },
                });
            }
        }
    }
}
