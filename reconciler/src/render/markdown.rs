//! The markdown form, for a pull-request comment: a table, then each guest's YAML diff
//! in a collapsible block.

use std::fmt::Write as _;

use super::{class_words, describe_action, headline, summary_line, yaml_diff};
use crate::plan::{Operation, Plan};

/// Characters that would break a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The plan as GitHub-flavoured markdown.
pub fn markdown(plan: &Plan) -> String {
    let mut out = String::from("### berth plan\n\n");
    let _ = writeln!(out, "**{}**\n", summary_line(&plan.summary));
    if !plan.has_changes() {
        out.push_str("No changes. The fleet matches the manifests.\n");
    }

    if !plan.hosts.is_empty() {
        out.push_str("| | host | setting | from | to |\n|---|---|---|---|---|\n");
        for h in &plan.hosts {
            let symbol = if h.blocked.is_some() { "!" } else { "~" };
            for c in &h.changes {
                let _ = writeln!(
                    out,
                    "| `{symbol}` | {} | `{}` | {} | {} |",
                    h.name,
                    c.field,
                    cell(&c.from),
                    cell(&c.to)
                );
            }
        }
        for h in plan.hosts.iter().filter(|h| h.blocked.is_some()) {
            let _ = writeln!(
                out,
                "\n> **{} blocked:** {}",
                h.name,
                cell(h.blocked.as_deref().unwrap_or_default())
            );
        }
        out.push('\n');
    }

    if !plan.guests.is_empty() {
        out.push_str("| | guest | what | changes |\n|---|---|---|---|\n");
        for g in &plan.guests {
            let mut what = headline(g);
            if let Some(placement) = &g.placement {
                let _ = write!(what, " ({placement})");
            }
            if let Some(reason) = &g.reason {
                let _ = write!(what, ": {reason}");
            }
            let changes: Vec<String> = g
                .changes
                .iter()
                .map(|c| format!("`{}` ({})", c.diff.field, class_words(&c.class)))
                .collect();
            let _ = writeln!(
                out,
                "| `{}` | **{}** | {} | {} |",
                g.operation.symbol(),
                g.name,
                cell(&what),
                changes.join(", ")
            );
        }
        out.push('\n');
    }

    for g in plan
        .guests
        .iter()
        .filter(|g| g.operation != Operation::Orphan)
    {
        let diff = yaml_diff(g.observed.as_ref(), g.desired.as_ref());
        if diff.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "<details><summary><code>{}</code> {}: YAML diff</summary>\n\n```diff\n{}```\n\n</details>\n",
            g.operation.symbol(),
            g.name,
            diff
        );
    }

    if !plan.steps.is_empty() {
        let _ = writeln!(
            out,
            "<details><summary>Order: {} action{} in {} wave{}</summary>\n",
            plan.steps.len(),
            if plan.steps.len() == 1 { "" } else { "s" },
            plan.waves(),
            if plan.waves() == 1 { "" } else { "s" }
        );
        for step in &plan.steps {
            let _ = writeln!(
                out,
                "1. wave {}: {}",
                step.wave,
                describe_action(&step.action)
            );
        }
        out.push_str("\n</details>\n");
    }
    out
}
