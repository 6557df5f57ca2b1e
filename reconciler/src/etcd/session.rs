//! A host's lease: granted once, renewed in the background, granted anew (with the
//! host's records published again) when etcd says it has expired.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{encode, EtcdError, EtcdStore, LeaseTimeouts};
use crate::model::{ObservedGuest, ObservedHost};

/// What a host publishes about itself at `<prefix>hosts/<host>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// The host as observed: CPUs, memory, hugepage pools, CPU model.
    pub observed: ObservedHost,
    /// Where its API listens (the Host manifest's `address`), when it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its lease TTL, in seconds.
    pub lease_ttl_seconds: u64,
    /// When, after its last renewal, it must have stopped its HA guests, in
    /// milliseconds. The leader waits at least this (and the TTL) before restarting them
    /// elsewhere.
    pub self_fence_after_ms: u64,
}

/// Where a host's lease stands, as the host itself can know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed less than `self_fence_after` ago: the host may start, move and run guests.
    Held,
    /// Not renewed for `self_fence_after` or longer (etcd unreachable or silent): the
    /// lease may expire at any moment, so the host starts and moves nothing and must have
    /// stopped its HA guests.
    MustFence,
    /// etcd said the lease is gone (or the TTL has passed): the host's records are
    /// gone; a new lease is being granted. Ownership must be acquired again.
    Expired,
}

/// A snapshot of the host's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseHealth {
    /// The lease ID in use.
    pub lease: i64,
    /// How many leases this session has had before this one (0 for the first): a
    /// change means every record bound to the old lease is gone.
    pub generation: u64,
    /// Where the lease stands.
    pub state: LeaseState,
    /// Time since the host sent the last renewal etcd answered.
    pub since_renewal: Duration,
    /// The moment by which the host's HA guests must be stopped unless the lease is
    /// renewed before: the last answered renewal's send time plus `self_fence_after`.
    pub fence_deadline: Instant,
}

impl LeaseHealth {
    /// What to renew an HA guest VMM's self-fence deadline to (berth-vmm's
    /// `fenceDeadline`), from `now`: the time left until `fence_deadline` while the lease
    /// is held; `None` once it is not, when the service must stop renewing so that the
    /// VMMs stop their guests at the deadline they were last given.
    pub fn vmm_fence_in(&self, now: Instant) -> Option<Duration> {
        match self.state {
            LeaseState::Held => self
                .fence_deadline
                .checked_duration_since(now)
                .filter(|left| !left.is_zero()),
            LeaseState::MustFence | LeaseState::Expired => None,
        }
    }
}

struct Shared {
    lease: i64,
    generation: u64,
    /// When the last renewal etcd answered (or the grant) was sent.
    renewed_at: Instant,
    expired: bool,
    /// The host record, published again under each new lease.
    record: Option<Vec<u8>>,
    /// The generation (lease) under which `record` was last written by
    /// [`HostSession::publish_host`].
    record_generation: Option<u64>,
    /// The observed guests last published under the current lease, as written.
    observed: BTreeMap<String, Vec<u8>>,
}

/// A host's membership in the fleet: its lease and what it publishes under it.
///
/// Dropping the session stops renewing without revoking, as a crash would: the host's
/// records stay until the TTL passes. [`HostSession::close`] revokes the lease.
pub struct HostSession {
    pub(super) store: EtcdStore,
    host: String,
    shared: Arc<Mutex<Shared>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for HostSession {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl HostSession {
    /// Grants the host a lease and starts renewing it. With `resume`, the lease of a
    /// previous run of this host is kept if it is still alive, so that a restarted
    /// `berth serve` keeps its guests' ownership records.
    pub async fn open(
        store: &EtcdStore,
        host: &str,
        resume: Option<i64>,
    ) -> Result<HostSession, EtcdError> {
        let mut resumed = None;
        if let Some(id) = resume {
            let sent = Instant::now();
            let mut lease = store.client.lease_client();
            let answer = store
                .call(
                    || format!("reading lease {id:x}"),
                    lease.time_to_live(id, None),
                )
                .await?;
            if answer.ttl() > 0 {
                resumed = Some((id, sent));
            }
        }
        let (lease, renewed_at) = match resumed {
            Some(found) => found,
            None => grant(store, store.lease).await?,
        };
        let shared = Arc::new(Mutex::new(Shared {
            lease,
            generation: 0,
            renewed_at,
            expired: false,
            record: None,
            record_generation: None,
            observed: BTreeMap::new(),
        }));
        let keeper = tokio::spawn(keep_alive(store.clone(), host.to_owned(), shared.clone()));
        Ok(HostSession {
            store: store.clone(),
            host: host.to_owned(),
            shared,
            keeper,
        })
    }

    /// The host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The store this session talks to.
    pub fn store(&self) -> &EtcdStore {
        &self.store
    }

    /// The lease in use now.
    pub fn lease(&self) -> i64 {
        self.shared.lock().expect("lease state").lease
    }

    /// Where the lease stands now.
    pub fn health(&self) -> LeaseHealth {
        let shared = self.shared.lock().expect("lease state");
        let timeouts = self.store.lease;
        let since_renewal = shared.renewed_at.elapsed();
        let state = if shared.expired || since_renewal >= timeouts.ttl {
            LeaseState::Expired
        } else if since_renewal >= timeouts.self_fence_after {
            LeaseState::MustFence
        } else {
            LeaseState::Held
        };
        LeaseHealth {
            lease: shared.lease,
            generation: shared.generation,
            state,
            since_renewal,
            fence_deadline: shared.renewed_at + timeouts.self_fence_after,
        }
    }

    /// Publishes (or replaces) the host's record, bound to its lease; it is published
    /// again under every new lease. A record equal to the one written under the current
    /// lease is not written again (the fleet's leader runs a round for every write).
    pub async fn publish_host(
        &self,
        observed: &ObservedHost,
        address: Option<&str>,
    ) -> Result<(), EtcdError> {
        let timeouts = self.store.lease;
        let record = encode(&HostRecord {
            observed: observed.clone(),
            address: address.map(str::to_owned),
            lease_ttl_seconds: timeouts.ttl.as_secs(),
            self_fence_after_ms: timeouts.self_fence_after.as_millis() as u64,
        });
        let (lease, generation) = {
            let shared = self.shared.lock().expect("lease state");
            // Written already under this lease: nothing changed, nothing is written.
            if shared.record.as_ref() == Some(&record)
                && shared.record_generation == Some(shared.generation)
            {
                return Ok(());
            }
            (shared.lease, shared.generation)
        };
        let key = self.store.keys.host(&self.host);
        let mut kv = self.store.client.kv_client();
        self.store
            .call(
                || format!("publishing host {}", self.host),
                kv.put(
                    key,
                    record.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
        let mut shared = self.shared.lock().expect("lease state");
        shared.record = Some(record);
        shared.record_generation = Some(generation);
        Ok(())
    }

    /// Publishes the guests this host observes: writes those that changed since the
    /// last call and deletes those no longer there, bound to the lease, in transactions
    /// of at most 64 operations (etcd allows 128 by default). Returns how many keys
    /// were written or deleted.
    pub async fn publish_observed(&self, guests: &[ObservedGuest]) -> Result<usize, EtcdError> {
        let wanted: BTreeMap<String, Vec<u8>> =
            guests.iter().map(|g| (g.name.clone(), encode(g))).collect();
        let (lease, generation, published) = {
            let shared = self.shared.lock().expect("lease state");
            (shared.lease, shared.generation, shared.observed.clone())
        };
        let keys = &self.store.keys;
        let mut ops = Vec::new();
        for (name, value) in &wanted {
            if published.get(name) != Some(value) {
                ops.push(TxnOp::put(
                    keys.observed(&self.host, name),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
        }
        for name in published.keys().filter(|n| !wanted.contains_key(*n)) {
            ops.push(TxnOp::delete(keys.observed(&self.host, name), None));
        }
        let changed = ops.len();
        let mut kv = self.store.client.kv_client();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(64));
            let batch = std::mem::replace(&mut ops, rest);
            self.store
                .call(
                    || format!("publishing the guests of host {}", self.host),
                    kv.txn(Txn::new().and_then(batch)),
                )
                .await?;
        }
        let mut shared = self.shared.lock().expect("lease state");
        // Under a lease granted meanwhile the keys were written to the old lease: publish
        // everything again next time.
        if shared.generation == generation {
            shared.observed = wanted;
        }
        Ok(changed)
    }

    /// Revokes the lease: every record bound to it (host, observed guests, ownership,
    /// candidacy) is deleted at once. For a clean shutdown that hands the guests back.
    pub async fn close(self) -> Result<(), EtcdError> {
        self.keeper.abort();
        let lease = self.lease();
        let mut client = self.store.client.lease_client();
        self.store
            .call(|| format!("revoking lease {lease:x}"), client.revoke(lease))
            .await?;
        Ok(())
    }
}

/// Grants a lease; returns it with the moment the request was sent.
async fn grant(store: &EtcdStore, timeouts: LeaseTimeouts) -> Result<(i64, Instant), EtcdError> {
    let sent = Instant::now();
    let mut lease = store.client.lease_client();
    let answer = store
        .call(
            || "granting a lease".to_owned(),
            lease.grant(timeouts.ttl_seconds(), None),
        )
        .await?;
    Ok((answer.id(), sent))
}

/// Renews the session's lease every `renew_every`, one request at a time so that each
/// answer is matched with the moment its request was sent. When etcd says the lease has
/// expired (TTL 0), grants a new one and publishes the host record again.
async fn keep_alive(store: EtcdStore, host: String, shared: Arc<Mutex<Shared>>) {
    let timeouts = store.lease;
    let mut stream = None;
    loop {
        tokio::time::sleep(timeouts.renew_every).await;
        let (lease, expired) = {
            let shared = shared.lock().expect("lease state");
            (shared.lease, shared.expired)
        };
        if expired {
            if let Ok((lease, sent)) = grant(&store, timeouts).await {
                let record = {
                    let mut shared = shared.lock().expect("lease state");
                    shared.lease = lease;
                    shared.generation += 1;
                    shared.renewed_at = sent;
                    shared.expired = false;
                    shared.observed.clear();
                    shared.record.clone()
                };
                tracing::warn!(
                    host,
                    lease = format!("{lease:x}"),
                    "etcd lease expired; granted a new one"
                );
                if let Some(record) = record {
                    let mut kv = store.client.kv_client();
                    let _ = store
                        .call(
                            || format!("publishing host {host}"),
                            kv.put(
                                store.keys.host(&host),
                                record,
                                Some(PutOptions::new().with_lease(lease)),
                            ),
                        )
                        .await;
                }
            }
            stream = None;
            continue;
        }
        let Some((keeper, answers)) = stream.as_mut() else {
            // Opening the stream sends the first renewal and waits for its answer.
            let mut client = store.client.lease_client();
            let sent = Instant::now();
            match store
                .call(
                    || format!("renewing lease {lease:x}"),
                    client.keep_alive(lease),
                )
                .await
            {
                Ok(pair) => {
                    stream = Some(pair);
                    shared.lock().expect("lease state").renewed_at = sent;
                }
                Err(error) => {
                    tracing::warn!(host, %error, "cannot renew the etcd lease");
                    // The client reports a lease etcd no longer has as an error: ask etcd
                    // whether that is what happened.
                    let answer = store
                        .call(
                            || format!("reading lease {lease:x}"),
                            client.time_to_live(lease, None),
                        )
                        .await;
                    if answer.is_ok_and(|a| a.ttl() <= 0) {
                        tracing::warn!(
                            host,
                            lease = format!("{lease:x}"),
                            "etcd says the lease has expired"
                        );
                        shared.lock().expect("lease state").expired = true;
                    }
                }
            }
            continue;
        };
        let sent = Instant::now();
        let renewed = store
            .call(|| format!("renewing lease {lease:x}"), async {
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
        match renewed {
            Ok(Some(answer)) if answer.ttl() > 0 => {
                shared.lock().expect("lease state").renewed_at = sent;
            }
            Ok(Some(_)) => {
                tracing::warn!(
                    host,
                    lease = format!("{lease:x}"),
                    "etcd says the lease has expired"
                );
                shared.lock().expect("lease state").expired = true;
            }
            Ok(None) => stream = None,
            Err(error) => {
                tracing::warn!(host, %error, "cannot renew the etcd lease");
                stream = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_fence_deadlines_are_renewed_only_while_the_lease_is_held() {
        let now = Instant::now();
        let health = |state, left_ms| LeaseHealth {
            lease: 1,
            generation: 0,
            state,
            since_renewal: Duration::ZERO,
            fence_deadline: now + Duration::from_millis(left_ms),
        };
        assert_eq!(
            health(LeaseState::Held, 900).vmm_fence_in(now),
            Some(Duration::from_millis(900))
        );
        assert_eq!(health(LeaseState::Held, 0).vmm_fence_in(now), None);
        assert_eq!(health(LeaseState::MustFence, 900).vmm_fence_in(now), None);
        assert_eq!(health(LeaseState::Expired, 900).vmm_fence_in(now), None);
    }
}
