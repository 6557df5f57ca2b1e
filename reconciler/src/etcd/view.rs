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
}

/// Reads everything under the prefix at once.
pub async fn read_fleet(store: &EtcdStore) -> Result<FleetView, EtcdError> {
    let keys = &store.keys;
    let mut kv = store.client.kv_client();
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
        } else if key.starts_with(&election_prefix) {
            candidates.push(kv);
        }
    }
    view.leader = leader_among(candidates.into_iter());
    Ok(view)
}
