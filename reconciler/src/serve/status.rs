//! What `GET /status` reports, and how `berth status` prints it.
//!
//! The controller is the only writer; the HTTP handlers read a snapshot.

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use berth_schema::Diagnostic;
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
    /// Conditions, Kubernetes-style.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Synced` (the guest matches the enforced revision), `Suspended`, `Failed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// Details for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Condition {
    /// A condition.
    pub fn new(kind: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            kind: kind.to_owned(),
            status: if status { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

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

    /// Changes the status.
    pub fn update<R>(&self, edit: impl FnOnce(&mut Status) -> R) -> R {
        edit(&mut self.0.write().unwrap_or_else(|e| e.into_inner()))
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

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
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
    let rows: Vec<[String; 5]> = status
        .guests
        .iter()
        .map(|g| {
            let synced = g.conditions.iter().find(|c| c.kind == "Synced");
            let message = g
                .conditions
                .iter()
                .filter(|c| !c.message.is_empty())
                .map(|c| c.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            [
                g.name.clone(),
                g.host.clone(),
                g.phase.clone(),
                synced.map_or("-".to_owned(), |c| format!("{} ({})", c.status, c.reason)),
                message,
            ]
        })
        .collect();
    let header = ["GUEST", "HOST", "PHASE", "SYNCED", "MESSAGE"].map(str::to_owned);
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

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_123 + 86_399_000);
        assert_eq!(rfc3339(t), "2000-02-29T23:59:59.123Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600);
        assert_eq!(rfc3339(t), "2025-01-01T00:00:00.000Z");
    }

    #[test]
    fn table() {
        let status = Status {
            host: "kvm01".into(),
            driver: "sim".into(),
            ready: true,
            source: SourceStatus {
                repo: "/srv/fleet".into(),
                branch: "main".into(),
                revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
                seen_at: None,
            },
            enforcing: Some("0123456789abcdef0123456789abcdef01234567".into()),
            last_applied: Some(Applied {
                revision: "0123456789abcdef0123456789abcdef01234567".into(),
                at: "2025-01-01T00:00:00.000Z".into(),
            }),
            last_error: None,
            observed_host: None,
            guests: vec![
                GuestStatus {
                    name: "web-1".into(),
                    host: "kvm01".into(),
                    phase: "Running".into(),
                    runs_here: true,
                    conditions: vec![Condition::new("Synced", true, "InSync", "")],
                },
                GuestStatus {
                    name: "batch-1".into(),
                    host: "kvm01".into(),
                    phase: "Suspended".into(),
                    runs_here: true,
                    conditions: vec![Condition::new(
                        "Synced",
                        false,
                        "Suspended",
                        "reconciling is suspended (berth.dev/suspend)",
                    )],
                },
            ],
        };
        insta::assert_snapshot!(render_table(&status), @r"
        host kvm01  driver sim
        source /srv/fleet @ main  head 0123456789ab
        enforcing 0123456789ab  applied 0123456789ab at 2025-01-01T00:00:00.000Z

        GUEST    HOST   PHASE      SYNCED             MESSAGE
        web-1    kvm01  Running    True (InSync)
        batch-1  kvm01  Suspended  False (Suspended)  reconciling is suspended (berth.dev/suspend)
        ");
    }
}
