//! Guest ownership: one record per guest naming the host that may run it, bound to that
//! host's lease, created only if absent and changed only by compare-and-swap.

use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::{decode, encode, revision, EtcdError, EtcdStore, HostSession};

/// The value at `<prefix>owners/<guest>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRecord {
    /// The host that may run the guest.
    pub host: String,
    /// The destination of a migration under way: the guest still belongs to `host`
    /// until the destination swaps the record to itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
}

/// The revision at which an ownership record was last written: whoever holds the
/// record at this revision may act on the guest; any later write makes it stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(pub i64);

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An ownership record as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ownership {
    /// The guest.
    pub guest: String,
    /// Who owns it, and where it is moving.
    #[serde(flatten)]
    pub record: OwnerRecord,
    /// The record's `ModRevision`.
    pub token: FencingToken,
    /// The lease the record is bound to.
    pub lease: i64,
}

impl Ownership {
    pub(super) fn from_kv(guest: &str, kv: &KeyValue) -> Result<Ownership, EtcdError> {
        Ok(Ownership {
            guest: guest.to_owned(),
            record: decode(kv.key(), kv.value())?,
            token: FencingToken(kv.mod_revision()),
            lease: kv.lease(),
        })
    }
}

/// The answer to [`HostSession::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This host owns the guest under its current lease, with this token (and, when
    /// `record.moving_to` is set, a migration it began is still open).
    Owned(Ownership),
    /// Another host owns it: this host must not run it.
    HeldElsewhere(Ownership),
}

/// A compare-and-swap that lost: the record is no longer what the caller's token says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the ownership record of guest {guest} changed (token {stale} is stale){}",
    describe(current)
)]
pub struct Fenced {
    /// The guest.
    pub guest: String,
    /// The token the caller held.
    pub stale: FencingToken,
    /// The record now, if any.
    pub current: Option<Ownership>,
}

fn describe(current: &Option<Ownership>) -> String {
    match current {
        None => ": it has no owner now".to_owned(),
        Some(o) => match &o.record.moving_to {
            None => format!(": host {} owns it at {}", o.record.host, o.token),
            Some(to) => format!(
                ": host {} owns it, moving to {}, at {}",
                o.record.host, to, o.token
            ),
        },
    }
}

/// Where the guest of a switchover whose end is unknown runs, according to its record.
///
/// The record at each step of a migration from A to B: `A` before it (and again once
/// the migration is abandoned before `Commit`), `A, moving to B` from just before B is
/// asked to prepare until B's incoming VMM has read `Commit` (then B writes `B`) or the
/// migration is abandoned (A or B puts `A` back). So `A, moving to B` says nothing yet
/// about the outcome: only the destination's ownership write decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switchover {
    /// The destination swapped the record to itself: the switchover happened, the
    /// destination runs the guest and the source must not resume it.
    Destination(Ownership),
    /// The record names the source and no move: the switchover did not happen (the
    /// handover was taken back); the destination must discard its incoming copy.
    Source(Ownership),
    /// The record still says `source, moving to destination`: the outcome is unknown
    /// until the destination writes its ownership or the source's is put back. Neither
    /// side may resume or discard the guest yet; ask again.
    Moving(Ownership),
    /// The record is gone (its owner's lease expired), names a third host, or a move
    /// elsewhere: neither side may resume the guest on its own.
    Neither(Option<Ownership>),
}

/// The ownership record of `guest`, read linearizably.
pub async fn read_owner(store: &EtcdStore, guest: &str) -> Result<Option<Ownership>, EtcdError> {
    let key = store.keys.owner(guest);
    let mut kv = store.client.kv_client();
    let answer = store
        .call(
            || format!("reading the owner of guest {guest}"),
            kv.get(key, None),
        )
        .await?;
    answer
        .kvs()
        .first()
        .map(|kv| Ownership::from_kv(guest, kv))
        .transpose()
}

/// Resolves a switchover of `guest` from `source` to `destination` whose outcome is
/// unknown (a side restarted, or the last frame was lost), from the record alone.
pub async fn resolve_switchover(
    store: &EtcdStore,
    guest: &str,
    source: &str,
    destination: &str,
) -> Result<Switchover, EtcdError> {
    Ok(match read_owner(store, guest).await? {
        Some(o) if o.record.host == destination && o.record.moving_to.is_none() => {
            Switchover::Destination(o)
        }
        Some(o) if o.record.host == source && o.record.moving_to.is_none() => Switchover::Source(o),
        Some(o)
            if o.record.host == source && o.record.moving_to.as_deref() == Some(destination) =>
        {
            Switchover::Moving(o)
        }
        other => Switchover::Neither(other),
    })
}

impl HostSession {
    /// Takes ownership of `guest` if nobody has it (one transaction: create if
    /// `CreateRevision == 0`). A record of this host under an older lease of its own
    /// (before a restart, or before its lease expired) is rebound to the current lease.
    pub async fn acquire(&self, guest: &str) -> Result<Acquire, EtcdError> {
        let key = self.store.keys.owner(guest);
        let lease = self.lease();
        let mine = OwnerRecord {
            host: self.host().to_owned(),
            moving_to: None,
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                encode(&mine),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut kv = self.store.client.kv_client();
        let answer = self
            .store
            .call(|| format!("acquiring guest {guest}"), kv.txn(txn))
            .await?;
        if answer.succeeded() {
            return Ok(Acquire::Owned(Ownership {
                guest: guest.to_owned(),
                record: mine,
                token: FencingToken(revision(answer.header())),
                lease,
            }));
        }
        let current = match first_kv(guest, &answer.op_responses())? {
            Some(current) => current,
            // Deleted between the compare and the read cannot happen inside one
            // transaction; an empty read means the record vanished right after: retry.
            None => return Box::pin(self.acquire(guest)).await,
        };
        if current.record.host != self.host() {
            return Ok(Acquire::HeldElsewhere(current));
        }
        if current.lease == lease {
            return Ok(Acquire::Owned(current));
        }
        // Our own record under an old lease: rebind it, unless it changed meanwhile.
        match self
            .swap(guest, current.token, &current.record, "rebinding")
            .await?
        {
            Ok(owned) => Ok(Acquire::Owned(owned)),
            Err(fenced) => match fenced.current {
                Some(o) if o.record.host != self.host() => Ok(Acquire::HeldElsewhere(o)),
                _ => Box::pin(self.acquire(guest)).await,
            },
        }
    }

    /// First step of a migration's handover, by the source: `A` -> `A, moving to B`.
    /// Fails with [`Fenced`] unless the record is still at `token` and names this host.
    pub async fn begin_handover(
        &self,
        guest: &str,
        token: FencingToken,
        destination: &str,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let record = OwnerRecord {
            host: self.host().to_owned(),
            moving_to: Some(destination.to_owned()),
        };
        self.swap_if(guest, token, &record, "handing over", |o| {
            o.record.host == self.host()
        })
        .await
    }

    /// Last step of a migration's handover, by the destination: `A, moving to B` -> `B`,
    /// bound to the destination's lease, made once the destination's VMM read `Commit`
    /// (its durable committed marker is the switchover's commit point; the record
    /// follows it, also after a restart of the destination's service).
    pub async fn complete_handover(
        &self,
        guest: &str,
        token: FencingToken,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let record = OwnerRecord {
            host: self.host().to_owned(),
            moving_to: None,
        };
        self.swap_if(guest, token, &record, "taking over", |o| {
            o.record.moving_to.as_deref() == Some(self.host())
        })
        .await
    }

    /// Takes back a handover the source began (`A, moving to B` -> `A`), when the
    /// migration is abandoned before its switchover.
    pub async fn abort_handover(
        &self,
        guest: &str,
        token: FencingToken,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let record = OwnerRecord {
            host: self.host().to_owned(),
            moving_to: None,
        };
        self.swap_if(guest, token, &record, "taking back", |o| {
            o.record.host == self.host()
        })
        .await
    }

    /// Refuses a handover begun towards this host (`A, moving to B` -> `A`, still bound
    /// to `A`'s lease), when the incoming migration ended before `Commit`: the guest
    /// never ran here and runs on `A`. Fails with [`Fenced`] unless the record is at
    /// `token` and moving to this host.
    pub async fn refuse_handover(
        &self,
        guest: &str,
        token: FencingToken,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let current = read_owner(&self.store, guest).await?;
        let Some(o) = current
            .filter(|o| o.token == token && o.record.moving_to.as_deref() == Some(self.host()))
        else {
            return Ok(Err(Fenced {
                guest: guest.to_owned(),
                stale: token,
                current: read_owner(&self.store, guest).await?,
            }));
        };
        let key = self.store.keys.owner(guest);
        let record = OwnerRecord {
            host: o.record.host.clone(),
            moving_to: None,
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                token.0,
            )])
            .and_then([TxnOp::put(
                key.clone(),
                encode(&record),
                Some(PutOptions::new().with_lease(o.lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.store.client.kv_client();
        let answer = self
            .store
            .call(|| format!("giving back guest {guest}"), kv.txn(txn))
            .await?;
        if answer.succeeded() {
            return Ok(Ok(Ownership {
                guest: guest.to_owned(),
                record,
                token: FencingToken(revision(answer.header())),
                lease: o.lease,
            }));
        }
        Ok(Err(Fenced {
            guest: guest.to_owned(),
            stale: token,
            current: first_kv(guest, &answer.op_responses())?,
        }))
    }

    /// Gives up ownership (the guest was stopped or removed): deletes the record if it
    /// is still at `token`.
    pub async fn release(
        &self,
        guest: &str,
        token: FencingToken,
    ) -> Result<Result<(), Fenced>, EtcdError> {
        let key = self.store.keys.owner(guest);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                token.0,
            )])
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.store.client.kv_client();
        let answer = self
            .store
            .call(|| format!("releasing guest {guest}"), kv.txn(txn))
            .await?;
        if answer.succeeded() {
            return Ok(Ok(()));
        }
        Ok(Err(Fenced {
            guest: guest.to_owned(),
            stale: token,
            current: first_kv(guest, &answer.op_responses())?,
        }))
    }

    /// Checks, before acting on `guest`, that this host still holds its record at
    /// `token` (a linearizable read: a partitioned etcd member cannot answer it).
    pub async fn verify(
        &self,
        guest: &str,
        token: FencingToken,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let current = read_owner(&self.store, guest).await?;
        Ok(match current {
            Some(o) if o.token == token && o.record.host == self.host() => Ok(o),
            current => Err(Fenced {
                guest: guest.to_owned(),
                stale: token,
                current,
            }),
        })
    }

    /// Reads the record, checks it is at `token` and passes `allowed`, then swaps it.
    async fn swap_if(
        &self,
        guest: &str,
        token: FencingToken,
        record: &OwnerRecord,
        what: &str,
        allowed: impl Fn(&Ownership) -> bool,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let current = read_owner(&self.store, guest).await?;
        match current {
            Some(o) if o.token == token && allowed(&o) => {
                // The swap compares the revision read, so the check above still holds
                // when it succeeds.
                self.swap(guest, token, record, what).await
            }
            current => Ok(Err(Fenced {
                guest: guest.to_owned(),
                stale: token,
                current,
            })),
        }
    }

    /// Writes `record` bound to this host's lease if the record is still at `token`.
    async fn swap(
        &self,
        guest: &str,
        token: FencingToken,
        record: &OwnerRecord,
        what: &str,
    ) -> Result<Result<Ownership, Fenced>, EtcdError> {
        let key = self.store.keys.owner(guest);
        let lease = self.lease();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                token.0,
            )])
            .and_then([TxnOp::put(
                key.clone(),
                encode(record),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.store.client.kv_client();
        let answer = self
            .store
            .call(|| format!("{what} guest {guest}"), kv.txn(txn))
            .await?;
        if answer.succeeded() {
            return Ok(Ok(Ownership {
                guest: guest.to_owned(),
                record: record.clone(),
                token: FencingToken(revision(answer.header())),
                lease,
            }));
        }
        Ok(Err(Fenced {
            guest: guest.to_owned(),
            stale: token,
            current: first_kv(guest, &answer.op_responses())?,
        }))
    }
}

/// The record a transaction's `or_else` read returned.
fn first_kv(guest: &str, responses: &[TxnOpResponse]) -> Result<Option<Ownership>, EtcdError> {
    for response in responses {
        if let TxnOpResponse::Get(get) = response {
            if let Some(kv) = get.kvs().first() {
                return Ownership::from_kv(guest, kv).map(Some);
            }
        }
    }
    Ok(None)
}
