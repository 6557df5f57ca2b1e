//! Conditions of the guests and of the service, as Kubernetes objects carry them
//! (the kstatus and Flux conventions), beside berth's own.
//!
//! - `Ready` is always there: `True` when the object is what the enforced revision
//!   says, `False` with the reason otherwise.
//! - `Reconciling` (work under way, or retried) and `Stalled` (no progress without a
//!   change: a blocked change, an invalid revision) are there only while `True`.
//! - berth's own, there only while `True`: `Drifted` (a change made outside berth on a
//!   revision already converged to), `RestartRequired` (a restart-class change, done by
//!   a local live migration or a restart), `MigrationFailed`, `SwitchoverUnknown`,
//!   `Suspended`, and the service's `CoordinationLost` (etcd unreachable).
//!
//! Each has `lastTransitionTime`, which changes only when its status flips (or it
//! appears): [`Transitions`] carries it over from the previous status.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What a condition is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConditionType {
    /// The object is what the enforced revision says.
    Ready,
    /// berth is working on it (an action in flight or due, a retry, a wait).
    Reconciling,
    /// berth cannot make progress without a change (blocked, invalid revision).
    Stalled,
    /// It changed outside berth after the host had converged to the revision.
    Drifted,
    /// A restart-class change is pending (done by a local live migration or a restart).
    RestartRequired,
    /// A migration of the guest failed (here, or into this host).
    MigrationFailed,
    /// A switchover away from this host is unknown; the guest is held paused.
    SwitchoverUnknown,
    /// Reconciling is suspended by the `berth.dev/suspend` annotation.
    Suspended,
    /// This host cannot coordinate with its fleet (etcd): it keeps running its guests
    /// and starts, moves, stops and retunes nothing.
    CoordinationLost,
    /// A type this version does not know: a peer running another version of berth
    /// (`Synced`, `Progressing` and `Failed` before these conditions) still parses.
    #[serde(other)]
    Other,
}

/// `True`, `False` or `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known (also what this version does not know).
    #[serde(other)]
    Unknown,
}

/// Why a condition has its status: a CamelCase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The guest matches the enforced revision.
    InSync,
    /// Changes are planned and not done yet.
    ChangesPending,
    /// An action on the guest is running.
    ActionInFlight,
    /// The last action failed; it is retried with backoff.
    ActionFailed,
    /// Retried after a failure.
    RetryingAfterFailure,
    /// A change cannot be made (the message says why).
    Blocked,
    /// The `berth.dev/suspend` annotation.
    Suspended,
    /// Runs here, named by no manifest, not pruned.
    Orphan,
    /// Another host still runs the guest placed here.
    WaitingForMigration,
    /// A migration of the guest is under way.
    Migrating,
    /// The switchover of a migration away is unknown.
    SwitchoverUnknown,
    /// A change on a revision already converged to: made outside berth.
    ChangedOutsideBerth,
    /// The restart-class change is done by a local live migration.
    LocalMigration,
    /// The restart-class change is done by a restart.
    Restart,
    /// A migration into this host failed.
    IncomingMigrationFailed,
    /// A migration away from this host failed; the guest stays here.
    OutgoingMigrationFailed,
    /// The destination has not said whether it runs the guest.
    DestinationUnanswered,
    /// No record says where the guest went.
    DestinationNotRecorded,
    /// Set by the annotation.
    Annotation,
    /// The service converged to the enforced revision.
    Converged,
    /// Guests are being brought to the enforced revision.
    Progressing,
    /// Some guests cannot make progress.
    GuestsStalled,
    /// The newest revision failed validation; the last good one stays enforced.
    RevisionInvalid,
    /// The repository could not be read.
    SourceUnreadable,
    /// Observing the guests failed; retried.
    ObserveFailed,
    /// The first full observe has not succeeded yet.
    NotObservedYet,
    /// No revision has passed validation yet.
    NoValidRevision,
    /// The fleet's etcd does not answer.
    EtcdUnreachable,
    /// This host's etcd lease expired.
    LeaseExpired,
    /// A reason this version does not know (from a peer running another version).
    #[serde(other)]
    Other,
}

/// A condition of a guest or of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What it is about.
    #[serde(rename = "type")]
    pub kind: ConditionType,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// Why.
    pub reason: Reason,
    /// Details for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the status last changed (RFC 3339); set by [`Transitions::stamp`].
    #[serde(default)]
    pub last_transition_time: String,
}

impl Condition {
    /// A condition; its transition time is stamped when the status is stored.
    pub fn new(
        kind: ConditionType,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
    ) -> Self {
        Condition {
            kind,
            status: if status {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason,
            message: message.into(),
            last_transition_time: String::new(),
        }
    }

    /// Whether it is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// The condition of type `kind` in `conditions`, if any.
pub fn find(conditions: &[Condition], kind: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.kind == kind)
}

/// Whose condition: the service's (`None`) or a guest's.
type Owner = Option<String>;

/// The status and transition time of each condition before an update, to carry the
/// times over to the conditions that did not flip.
#[derive(Debug, Default)]
pub struct Transitions(HashMap<(Owner, ConditionType), (ConditionStatus, String)>);

impl Transitions {
    /// Remembers `conditions` of `owner`.
    pub fn remember(&mut self, owner: Owner, conditions: &[Condition]) {
        for c in conditions {
            self.0.insert(
                (owner.clone(), c.kind),
                (c.status, c.last_transition_time.clone()),
            );
        }
    }

    /// Sets the transition time of each of `conditions` of `owner`: the remembered one
    /// when the same condition had the same status, else `now`.
    pub fn stamp(&self, owner: &Owner, conditions: &mut [Condition], now: &str) {
        for c in conditions {
            c.last_transition_time = match self.0.get(&(owner.clone(), c.kind)) {
                Some((status, at)) if *status == c.status && !at.is_empty() => at.clone(),
                _ => now.to_owned(),
            };
        }
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `time` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_123 + 86_399_000);
        assert_eq!(rfc3339(t), "2000-02-29T23:59:59.123Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600);
        assert_eq!(rfc3339(t), "2025-01-01T00:00:00.000Z");
    }

    #[test]
    fn transition_times_change_only_when_the_status_flips() {
        let ready = |ok: bool, reason| Condition::new(ConditionType::Ready, ok, reason, "");
        let web = Some("web-1".to_owned());
        let mut first = vec![ready(true, Reason::InSync)];
        Transitions::default().stamp(&web, &mut first, "t1");
        assert_eq!(first[0].last_transition_time, "t1");

        // Same status, another reason: the time stays.
        let mut seen = Transitions::default();
        seen.remember(web.clone(), &first);
        let mut second = vec![ready(true, Reason::InSync)];
        seen.stamp(&web, &mut second, "t2");
        assert_eq!(second[0].last_transition_time, "t1");

        // Flipped: the time moves; another owner's condition is its own.
        let mut third = vec![
            ready(false, Reason::ChangesPending),
            Condition::new(ConditionType::Reconciling, true, Reason::ActionInFlight, ""),
        ];
        seen.stamp(&web, &mut third, "t3");
        assert_eq!(third[0].last_transition_time, "t3");
        assert_eq!(third[1].last_transition_time, "t3");
        let mut other = vec![ready(true, Reason::InSync)];
        seen.stamp(&Some("db-1".to_owned()), &mut other, "t4");
        assert_eq!(other[0].last_transition_time, "t4");
    }

    #[test]
    fn a_peer_of_an_older_version_still_parses() {
        let old: Condition = serde_json::from_value(serde_json::json!({
            "type": "Synced", "status": "False", "reason": "Changes", "message": "retune"
        }))
        .expect("parses");
        assert_eq!(
            (old.kind, old.status, old.reason),
            (ConditionType::Other, ConditionStatus::False, Reason::Other)
        );
        assert_eq!(old.last_transition_time, "");
    }

    #[test]
    fn serialized_as_kubernetes_conditions() {
        let mut c = Condition::new(
            ConditionType::Stalled,
            true,
            Reason::Blocked,
            "memory 8GiB does not fit",
        );
        c.last_transition_time = "2026-01-01T00:00:00.000Z".into();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({
                "type": "Stalled",
                "status": "True",
                "reason": "Blocked",
                "message": "memory 8GiB does not fit",
                "lastTransitionTime": "2026-01-01T00:00:00.000Z",
            })
        );
    }
}
