//! The plan for people and for programs: text like `terraform plan`, JSON with a stable
//! schema, and markdown for a pull-request comment.
//!
//! All three are pure functions of the [`Plan`]; colour is an option of the text form,
//! decided by the caller (a terminal, and `NO_COLOR` unset).

mod markdown;
mod text;

use std::fmt::Write as _;

use similar::TextDiff;

use crate::model::ObservedGuest;
use crate::plan::{Action, GuestPlan, Operation, Plan, Summary};

pub use markdown::markdown;
pub use text::text;

/// The plan as pretty-printed JSON (see [`json_schema`]), with a final newline.
pub fn json(plan: &Plan) -> String {
    let mut s = serde_json::to_string_pretty(plan).expect("a plan serializes");
    s.push('\n');
    s
}

/// The JSON Schema of [`json`]'s output (`formatVersion` 1), with a final newline.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Plan);
    let mut s = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    s.push('\n');
    s
}

/// `Plan: 1 to start, 2 to retune live, 1 to migrate, 0 to restart, 1 to stop, 1 blocked.`
/// followed by host and orphan counts when there are any.
pub fn summary_line(s: &Summary) -> String {
    let mut line = format!(
        "Plan: {} to start, {} to retune live, {} to migrate, {} to restart, {} to stop, {} blocked.",
        s.start, s.retune, s.migrate, s.restart, s.stop, s.blocked
    );
    if s.hosts > 0 {
        let _ = write!(line, " {} host{} to configure.", s.hosts, plural(s.hosts));
    }
    if s.orphans > 0 {
        let _ = write!(
            line,
            " {} orphan{} not pruned.",
            s.orphans,
            plural(s.orphans)
        );
    }
    if s.suspended > 0 {
        let _ = write!(line, " {} suspended.", s.suspended);
    }
    line
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The YAML of a guest as observed and as desired, as a unified diff. A side that does
/// not exist is empty.
pub fn yaml_diff(observed: Option<&ObservedGuest>, desired: Option<&ObservedGuest>) -> String {
    let yaml = |g: Option<&ObservedGuest>| {
        g.map(|g| serde_yaml::to_string(g).expect("a guest serializes"))
            .unwrap_or_default()
    };
    let (old, new) = (yaml(observed), yaml(desired));
    TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(3)
        .header("observed", "desired")
        .to_string()
}

/// One line on what happens to a guest: `migrate live h1 -> h2 (via h3)`.
fn headline(g: &GuestPlan) -> String {
    let mut s = String::from(g.operation.describe());
    match (g.operation, &g.to) {
        (Operation::Migrate | Operation::ColdMigrate | Operation::Migrating, Some(to)) => {
            let _ = write!(s, " {} -> {to}", g.host);
        }
        _ => {
            let _ = write!(s, " on {}", g.host);
        }
    }
    if let Some(via) = &g.via {
        let _ = write!(s, " (via {via})");
    }
    s
}

/// One line per action: `start web-1 on kvm01`.
pub fn describe_action(a: &Action) -> String {
    match a {
        Action::ConfigureHost { host, changes } => {
            let what: Vec<String> = changes
                .iter()
                .map(|c| format!("{} {} -> {}", c.field, c.from, c.to))
                .collect();
            format!("configure host {host}: {}", what.join(", "))
        }
        Action::Start { guest, host } => format!("start {guest} on {host}"),
        Action::Stop {
            guest,
            host,
            reason,
        } => format!("stop {guest} on {host} ({})", stop_reason(*reason)),
        Action::Retune {
            guest,
            host,
            fields,
        } => {
            let fields: Vec<&str> = fields.iter().map(|f| f.path()).collect();
            format!("retune {guest} on {host}: {}", fields.join(", "))
        }
        Action::LocalMigrate { guest, host } => {
            format!("migrate {guest} into a new VMM on {host}")
        }
        Action::Migrate { guest, from, to } => format!("migrate {guest} live {from} -> {to}"),
        Action::ColdMigrate { guest, from, to } => {
            format!("migrate {guest} cold {from} -> {to} (stop, then start)")
        }
        Action::Restart { guest, host } => format!("restart {guest} on {host}"),
    }
}

fn stop_reason(r: crate::plan::StopReason) -> &'static str {
    match r {
        crate::plan::StopReason::Desired => "state: stopped",
        crate::plan::StopReason::Prune => "pruned",
        crate::plan::StopReason::ColdMove => "cold move, started again on its destination",
    }
}

/// How a change is applied, in a few words.
fn class_words(c: &crate::classify::ChangeClass) -> &'static str {
    use crate::classify::ChangeClass;
    match c {
        ChangeClass::Live => "live",
        ChangeClass::LocalMigration => "local migration",
        ChangeClass::Migration => "live migration",
        ChangeClass::Cold => "cold",
        ChangeClass::Restart => "restart",
        ChangeClass::Blocked(_) => "blocked",
    }
}

#[cfg(test)]
mod tests;
