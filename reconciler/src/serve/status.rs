//! What `GET /status` reports, and how `berth status` prints it.
//!
//! The controller is the only writer; the HTTP handlers read a snapshot.

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};

use berth_schema::Diagnostic;

use crate::conditions::Transitions;
use serde::{Deserialize, Serialize};

/// The service's state as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The host this service acts for.
    pub host: String,
    /// The driver: `local`, or `sim` (a simulated fleet).
    pub driver: String,
    /// Whether the first full observe has succeeded; nothing is done before it.
    pub ready: bool,
    /// The service's conditions ([`crate::conditions`]): `Ready` always, `Reconciling`
    /// and `Stalled` while `True`. Derived from the rest of the status on each update.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The last revision this host fully converged to (Flux's `lastAppliedRevision`;
    /// the same as `lastApplied.revision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_revision: Option<String>,
    /// The last revision read and tried, valid or not (Flux's
    /// `lastAttemptedRevision`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_revision: Option<String>,
    /// The repository followed.
    pub source: SourceStatus,
    /// The last revision that passed validation: what is enforced now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcing: Option<String>,
    /// The last revision this host fully converged to, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<Applied>,
    /// The last revision that failed validation or could not be read, or the last
    /// observe that failed. Cleared by the next good revision or observe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// Guests placed on this host or running on it.
    pub guests: Vec<GuestStatus>,
    /// This host as last observed (CPU, memory, hugepage pools): what a migration
    /// source plans against when its driver sees only its own host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_host: Option<crate::model::ObservedHost>,
    /// Set while this host cannot coordinate with its fleet (etcd unreachable, lease
    /// expired): it keeps running its guests and starts, moves, stops and retunes
    /// nothing. Shown as the `CoordinationLost` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordination_lost: Option<CoordinationLost>,
}

/// Why this host cannot coordinate with its fleet now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CoordinationLost {
    /// `EtcdUnreachable` or `LeaseExpired`.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// The repository followed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The repository path.
    pub repo: String,
    /// The branch (or revision expression) followed.
    pub branch: String,
    /// The newest head seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When that head was first seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<String>,
}

/// A revision the host converged to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    /// Commit id.
    pub revision: String,
    /// When the host converged to it (RFC 3339).
    pub at: String,
}

/// The last failure of the source or the observer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// The commit id it concerns, when it concerns a revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `invalid` (validation failed), `source` (git), or `observe` (the driver).
    pub kind: String,
    /// A one-line summary.
    pub message: String,
    /// Each validation problem with its file and line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Problem>,
    /// When (RFC 3339).
    pub at: String,
}

/// A validation problem, as `/status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// `error` or `warning`.
    pub severity: String,
    /// Path of the file in the repository.
    pub file: String,
    /// Line, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Column, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// `file:line:col: error: field: message`, as `berth validate` prints it.
    pub text: String,
}

impl From<&Diagnostic> for Problem {
    fn from(d: &Diagnostic) -> Self {
        Problem {
            severity: d.severity.to_string(),
            file: d.file.clone(),
            line: d.line,
            column: d.column,
            path: d.path.clone(),
            message: d.message.clone(),
            text: d.to_string(),
        }
    }
}

/// One guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestStatus {
    /// Guest name.
    pub name: String,
    /// Where it runs, or where the manifest places it when it does not run.
    pub host: String,
    /// `Running`, `Paused`, `Stopped`, `Pending`, `Blocked`, `Suspended`, `Migrating`,
    /// `WaitingForMigration` (another host still runs it), `Orphan`, `Failed` (an
    /// action failed; retried with backoff), or `SwitchoverUnknown` (a migration away
    /// sent its commit but the destination has not said whether it runs the guest;
    /// held paused here, asked again with backoff).
    pub phase: String,
    /// Whether a VMM of the guest runs on the reporting host (peers ask this before
    /// starting a guest, so that it never runs twice).
    #[serde(default)]
    pub runs_here: bool,
    /// The enforced revision this guest was last reconciled at: found in sync with it,
    /// or an action for it done (like Kubernetes' `observedGeneration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_revision: Option<String>,
    /// Conditions, Kubernetes-style ([`crate::conditions`]): `Ready` always,
    /// `Reconciling`, `Stalled` and berth's own while `True`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

pub use crate::conditions::{
    now_rfc3339, rfc3339, Condition, ConditionStatus, ConditionType, Reason,
};

/// The status, shared between the controller (writer) and the HTTP handlers.
#[derive(Debug, Clone, Default)]
pub struct StatusStore(Arc<RwLock<Status>>);

impl StatusStore {
    /// A store holding `status`.
    pub fn new(status: Status) -> Self {
        StatusStore(Arc::new(RwLock::new(status)))
    }

    /// A copy of the status now.
    pub fn snapshot(&self) -> Status {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the status; then derives the service's conditions and
    /// `lastAppliedRevision`, and stamps each condition's transition time (kept from
    /// before when its status did not flip).
    pub fn update<R>(&self, edit: impl FnOnce(&mut Status) -> R) -> R {
        let mut status = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut before = Transitions::default();
        before.remember(None, &status.conditions);
        for g in &status.guests {
            before.remember(Some(g.name.clone()), &g.conditions);
        }
        let result = edit(&mut status);
        status.last_applied_revision = status.last_applied.as_ref().map(|a| a.revision.clone());
        status.conditions = service_conditions(&status);
        let now = now_rfc3339();
        before.stamp(&None, &mut status.conditions, &now);
        for g in &mut status.guests {
            before.stamp(&Some(g.name.clone()), &mut g.conditions, &now);
        }
        result
    }
}

/// The service's conditions, from the rest of its status (first match wins):
///
/// | state | `Ready` | also |
/// |---|---|---|
/// | first observe pending | `False` `NotObservedYet` | `Reconciling` |
/// | etcd unreachable, lease expired | `False` `EtcdUnreachable`, `LeaseExpired` | `CoordinationLost` |
/// | newest revision invalid | `False` `RevisionInvalid` | `Stalled` (until a new commit) |
/// | repository unreadable | `False` `SourceUnreadable` | `Reconciling` (read again on the next trigger) |
/// | observe failed | `False` `ObserveFailed` | `Reconciling` (retried) |
/// | no valid revision yet | `False` `NoValidRevision` | |
/// | a guest stalled | `False` `GuestsStalled` | `Stalled` |
/// | guests not ready, or not converged | `False` `Progressing` | `Reconciling` |
/// | converged, every guest ready | `True` `Converged` | |
pub fn service_conditions(status: &Status) -> Vec<Condition> {
    use ConditionType::{Ready, Reconciling, Stalled};
    let guests_with = |kind: ConditionType, holds: bool| -> Vec<&str> {
        status
            .guests
            .iter()
            .filter(|g| {
                crate::conditions::find(&g.conditions, kind).is_some_and(|c| c.is_true() == holds)
            })
            .map(|g| g.name.as_str())
            .collect()
    };
    let not_ready = guests_with(Ready, false);
    let stalled = guests_with(Stalled, true);
    let converged = status.enforcing.is_some()
        && status.last_applied_revision.as_deref() == status.enforcing.as_deref();
    let error = status.last_error.as_ref();
    let error_kind = error.map(|e| e.kind.as_str());
    let error_message = || error.map_or(String::new(), |e| e.message.clone());
    let (reason, message, also) = if !status.ready {
        (
            Reason::NotObservedYet,
            "the first full observe is pending".to_owned(),
            Some(Reconciling),
        )
    } else if let Some(lost) = &status.coordination_lost {
        let reason = if lost.reason == "LeaseExpired" {
            Reason::LeaseExpired
        } else {
            Reason::EtcdUnreachable
        };
        let message = lost.message.clone();
        return vec![
            Condition::new(Ready, false, reason, message.clone()),
            Condition::new(ConditionType::CoordinationLost, true, reason, message),
        ];
    } else if error_kind == Some("invalid") {
        (Reason::RevisionInvalid, error_message(), Some(Stalled))
    } else if error_kind == Some("source") {
        (Reason::SourceUnreadable, error_message(), Some(Reconciling))
    } else if error_kind == Some("observe") {
        (Reason::ObserveFailed, error_message(), Some(Reconciling))
    } else if status.enforcing.is_none() {
        (
            Reason::NoValidRevision,
            "no revision has passed validation yet".to_owned(),
            None,
        )
    } else if !stalled.is_empty() {
        (
            Reason::GuestsStalled,
            format!("cannot make progress: {}", stalled.join(", ")),
            Some(Stalled),
        )
    } else if !not_ready.is_empty() || !converged {
        let message = if not_ready.is_empty() {
            "actions in flight".to_owned()
        } else {
            format!("guests not ready: {}", not_ready.join(", "))
        };
        (Reason::Progressing, message, Some(Reconciling))
    } else {
        let at = status.last_applied_revision.as_deref().map_or("-", short);
        let ready = Condition::new(Ready, true, Reason::Converged, format!("converged to {at}"));
        return vec![ready];
    };
    let mut out = vec![Condition::new(Ready, false, reason, message.clone())];
    if let Some(kind) = also {
        out.push(Condition::new(kind, true, reason, message));
    }
    out
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

/// `Ready=True (Converged), Reconciling=True (Progressing)`.
fn conditions_text(conditions: &[Condition]) -> String {
    if conditions.is_empty() {
        return "-".to_owned();
    }
    conditions
        .iter()
        .map(|c| format!("{:?}={:?} ({:?})", c.kind, c.status, c.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status as `berth status` prints it: a header and a table of guests.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "host {}  driver {}{}",
        status.host,
        status.driver,
        if status.ready {
            ""
        } else {
            "  (not ready: first observe pending)"
        }
    );
    let _ = writeln!(
        out,
        "source {} @ {}  head {}",
        status.source.repo,
        status.source.branch,
        status.source.revision.as_deref().map_or("-", short)
    );
    let _ = writeln!(
        out,
        "enforcing {}  applied {}",
        status.enforcing.as_deref().map_or("-", short),
        status
            .last_applied
            .as_ref()
            .map_or("-".to_owned(), |a| format!(
                "{} at {}",
                short(&a.revision),
                a.at
            ))
    );
    let _ = writeln!(
        out,
        "attempted {}  conditions {}",
        status.last_attempted_revision.as_deref().map_or("-", short),
        conditions_text(&status.conditions)
    );
    if let Some(e) = &status.last_error {
        let rev = e
            .revision
            .as_deref()
            .map_or(String::new(), |r| format!(" in {}", short(r)));
        let _ = writeln!(out, "last error ({}{rev}, {}): {}", e.kind, e.at, e.message);
        for d in &e.diagnostics {
            let _ = writeln!(out, "  {}", d.text);
        }
    }
    let _ = writeln!(out);
    let rows: Vec<[String; 7]> = status
        .guests
        .iter()
        .map(|g| {
            let ready = crate::conditions::find(&g.conditions, ConditionType::Ready);
            let others: Vec<&Condition> = g
                .conditions
                .iter()
                .filter(|c| c.kind != ConditionType::Ready && c.is_true())
                .collect();
            let mut messages: Vec<&str> = Vec::new();
            for c in &g.conditions {
                if !c.message.is_empty() && !messages.contains(&c.message.as_str()) {
                    messages.push(&c.message);
                }
            }
            [
                g.name.clone(),
                g.host.clone(),
                g.phase.clone(),
                ready.map_or("-".to_owned(), |c| {
                    format!("{:?} ({:?})", c.status, c.reason)
                }),
                g.observed_revision.as_deref().map_or("-", short).to_owned(),
                if others.is_empty() {
                    "-".to_owned()
                } else {
                    others
                        .iter()
                        .map(|c| format!("{:?}", c.kind))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                messages.join("; "),
            ]
        })
        .collect();
    let header = [
        "GUEST",
        "HOST",
        "PHASE",
        "READY",
        "REVISION",
        "CONDITIONS",
        "MESSAGE",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no guests on this host)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const REV: &str = "0123456789abcdef0123456789abcdef01234567";

    fn guest(name: &str, phase: &str, conditions: Vec<Condition>) -> GuestStatus {
        GuestStatus {
            name: name.into(),
            host: "kvm01".into(),
            phase: phase.into(),
            runs_here: true,
            observed_revision: Some(REV.into()),
            conditions,
        }
    }

    fn converged() -> Status {
        Status {
            host: "kvm01".into(),
            driver: "sim".into(),
            ready: true,
            source: SourceStatus {
                repo: "/srv/fleet".into(),
                branch: "main".into(),
                revision: Some(REV.into()),
                seen_at: None,
            },
            enforcing: Some(REV.into()),
            last_applied: Some(Applied {
                revision: REV.into(),
                at: "2025-01-01T00:00:00.000Z".into(),
            }),
            last_attempted_revision: Some(REV.into()),
            guests: vec![guest(
                "web-1",
                "Running",
                vec![Condition::new(
                    ConditionType::Ready,
                    true,
                    Reason::InSync,
                    "",
                )],
            )],
            ..Status::default()
        }
    }

    #[test]
    fn table() {
        let store = StatusStore::new(Status::default());
        store.update(|s| {
            *s = converged();
            s.guests.push(guest(
                "batch-1",
                "Suspended",
                vec![
                    Condition::new(
                        ConditionType::Ready,
                        false,
                        Reason::Suspended,
                        "retune live: spec.io.weight",
                    ),
                    Condition::new(
                        ConditionType::Suspended,
                        true,
                        Reason::Annotation,
                        "reconciling is suspended (berth.dev/suspend)",
                    ),
                ],
            ));
        });
        insta::assert_snapshot!(render_table(&store.snapshot()), @r"
        host kvm01  driver sim
        source /srv/fleet @ main  head 0123456789ab
        enforcing 0123456789ab  applied 0123456789ab at 2025-01-01T00:00:00.000Z
        attempted 0123456789ab  conditions Ready=False (Progressing), Reconciling=True (Progressing)

        GUEST    HOST   PHASE      READY              REVISION      CONDITIONS  MESSAGE
        web-1    kvm01  Running    True (InSync)      0123456789ab  -
        batch-1  kvm01  Suspended  False (Suspended)  0123456789ab  Suspended   retune live: spec.io.weight; reconciling is suspended (berth.dev/suspend)
        ");
    }

    #[test]
    fn service_conditions_follow_the_status() {
        let kinds = |s: &Status| -> Vec<(ConditionType, ConditionStatus, Reason)> {
            service_conditions(s)
                .iter()
                .map(|c| (c.kind, c.status, c.reason))
                .collect()
        };
        use ConditionStatus::{False, True};
        use ConditionType::{Ready, Reconciling, Stalled};
        let mut s = converged();
        s.last_applied_revision = Some(REV.into());
        assert_eq!(kinds(&s), [(Ready, True, Reason::Converged)]);
        s.ready = false;
        assert_eq!(
            kinds(&s),
            [
                (Ready, False, Reason::NotObservedYet),
                (Reconciling, True, Reason::NotObservedYet)
            ]
        );
        s.ready = true;
        s.last_error = Some(LastError {
            revision: Some("f".repeat(40)),
            kind: "invalid".into(),
            message: "revision ffffffffffff refused: 1 error".into(),
            diagnostics: Vec::new(),
            at: "2025-01-01T00:00:00.000Z".into(),
        });
        assert_eq!(
            kinds(&s),
            [
                (Ready, False, Reason::RevisionInvalid),
                (Stalled, True, Reason::RevisionInvalid)
            ]
        );
        s.last_error = None;
        s.guests[0].conditions = vec![
            Condition::new(Ready, false, Reason::Blocked, "does not fit"),
            Condition::new(Stalled, true, Reason::Blocked, "does not fit"),
        ];
        assert_eq!(
            kinds(&s),
            [
                (Ready, False, Reason::GuestsStalled),
                (Stalled, True, Reason::GuestsStalled)
            ]
        );
    }

    #[test]
    fn transition_times_are_kept_while_the_status_holds() {
        let store = StatusStore::new(Status::default());
        store.update(|s| *s = converged());
        let first = store.snapshot();
        let at = first.guests[0].conditions[0].last_transition_time.clone();
        let service_at = first.conditions[0].last_transition_time.clone();
        assert!(
            at.ends_with('Z') && service_at.ends_with('Z'),
            "{at} {service_at}"
        );
        assert_eq!(first.last_applied_revision.as_deref(), Some(REV));
        std::thread::sleep(Duration::from_millis(5));
        // The same conditions, built again by the next pass: the times stay.
        store.update(|s| *s = converged());
        let second = store.snapshot();
        assert_eq!(second.guests[0].conditions[0].last_transition_time, at);
        assert_eq!(second.conditions[0].last_transition_time, service_at);
        // The guest's Ready flips: its time moves, and so does the service's.
        store.update(|s| {
            s.guests[0].conditions = vec![Condition::new(
                ConditionType::Ready,
                false,
                Reason::ChangesPending,
                "retune live",
            )];
        });
        let third = store.snapshot();
        assert!(third.guests[0].conditions[0].last_transition_time > at);
        assert!(third.conditions[0].last_transition_time > service_at);
    }
}
