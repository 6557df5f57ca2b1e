//! Leader election among hosts, on etcd's election API (served by etcd 3.4 as by later
//! versions): each candidate's key is bound to its host lease; the candidate with the
//! oldest key leads.

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, LeaderKey, ResignOptions, SortOrder, SortTarget,
};

use super::{EtcdError, EtcdStore, HostSession};

/// This host leads the fleet, as long as its election key lives.
#[derive(Debug, Clone)]
pub struct Leadership {
    key: LeaderKey,
    host: String,
}

impl Leadership {
    /// Waits until this host is elected (a campaign blocks in etcd while another host
    /// leads), then checks that its key still exists: a campaign can return after the
    /// candidate's own lease expired.
    ///
    /// Cancelling the returned future withdraws the candidacy (etcd resigns it).
    pub async fn campaign(session: &HostSession) -> Result<Leadership, EtcdError> {
        let store = session.store();
        let name = store.keys.election();
        loop {
            let lease = session.lease();
            let mut election = store.client.election_client();
            let answer = election
                .campaign(name.clone(), session.host(), lease)
                .await
                .map_err(|source| EtcdError::Request {
                    what: format!("campaign of host {} for leader", session.host()),
                    source: source.into(),
                })?;
            let Some(key) = answer.leader().cloned() else {
                continue;
            };
            let leadership = Leadership {
                key,
                host: session.host().to_owned(),
            };
            if leadership.is_leader(store).await? {
                return Ok(leadership);
            }
        }
    }

    /// The host that leads.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The creation revision of the election key: the leader's term.
    pub fn term(&self) -> i64 {
        self.key.rev()
    }

    /// Whether this host still leads: its key exists with the same creation revision
    /// and no older candidate key exists (a linearizable read).
    pub async fn is_leader(&self, store: &EtcdStore) -> Result<bool, EtcdError> {
        Ok(leader_kv(store)
            .await?
            .is_some_and(|kv| kv.key() == self.key.key() && kv.create_revision() == self.term()))
    }

    /// A comparison to put in the leader's transactions so that they apply only while it
    /// still leads in this term.
    pub fn guard(&self) -> Compare {
        Compare::create_revision(self.key.key().to_vec(), CompareOp::Equal, self.term())
    }

    /// Steps down: the next candidate is elected at once.
    pub async fn resign(self, store: &EtcdStore) -> Result<(), EtcdError> {
        let mut election = store.client.election_client();
        let host = self.host.clone();
        store
            .call(
                || format!("resignation of leader {host}"),
                election.resign(Some(ResignOptions::new().with_leader(self.key))),
            )
            .await?;
        Ok(())
    }
}

/// The oldest candidate key: the leader's.
async fn leader_kv(store: &EtcdStore) -> Result<Option<KeyValue>, EtcdError> {
    let prefix = format!("{}/", store.keys.election());
    let mut kv = store.client.kv_client();
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let answer = store
        .call(
            || "reading the leader".to_owned(),
            kv.get(prefix, Some(options)),
        )
        .await?;
    Ok(answer.kvs().first().cloned())
}

/// The host that leads the fleet now, if any.
pub async fn current_leader(store: &EtcdStore) -> Result<Option<String>, EtcdError> {
    Ok(leader_kv(store)
        .await?
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// The leader among candidate keys read in a range read: the oldest.
pub(super) fn leader_among<'a>(kvs: impl Iterator<Item = &'a KeyValue>) -> Option<String> {
    kvs.min_by_key(|kv| kv.create_revision())
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}
