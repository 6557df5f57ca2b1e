//! The text form, like `terraform plan`.

use std::fmt::Write as _;

use super::{class_words, describe_action, headline, summary_line, yaml_diff};
use crate::plan::{Operation, Plan};

/// ANSI styles, or nothing when colour is off.
struct Style {
    on: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn op(&self, op: Operation) -> String {
        let code = match op {
            Operation::Start => "32",
            Operation::Retune => "33",
            Operation::LocalMigrate | Operation::Migrate | Operation::ColdMigrate => "36",
            Operation::Restart => "35",
            Operation::Stop => "31",
            Operation::Blocked => "1;31",
            Operation::Orphan | Operation::Suspended | Operation::Migrating => "2",
        };
        self.paint(code, &format!("{:>3}", op.symbol()))
    }

    fn diff_line(&self, line: &str) -> String {
        match line.as_bytes().first() {
            Some(b'+') => self.paint("32", line),
            Some(b'-') => self.paint("31", line),
            Some(b'@') => self.paint("36", line),
            _ => line.to_owned(),
        }
    }
}

/// The plan as text; `color` adds ANSI colours.
pub fn text(plan: &Plan, color: bool) -> String {
    let style = Style { on: color };
    let mut out = String::new();
    if !plan.has_changes() {
        out.push_str("No changes. The fleet matches the manifests.\n");
    } else {
        let _ = writeln!(
            out,
            "berth will perform the following actions, in {} wave{}:",
            plan.waves(),
            if plan.waves() == 1 { "" } else { "s" }
        );
        out.push('\n');
        out.push_str(
            "Symbols: + start, ~ retune live, <-> migrate, -/+ restart, - stop, ! blocked\n",
        );
    }

    for h in &plan.hosts {
        out.push('\n');
        let op = if h.blocked.is_some() {
            Operation::Blocked
        } else {
            Operation::Retune
        };
        let _ = writeln!(out, "{} host {}: configure", style.op(op), h.name);
        for c in &h.changes {
            let _ = writeln!(out, "        {}: {} -> {}", c.field, c.from, c.to);
        }
        if let Some(why) = &h.blocked {
            let _ = writeln!(
                out,
                "      {}",
                style.paint("31", &format!("blocked: {why}"))
            );
        }
    }

    for g in &plan.guests {
        out.push('\n');
        let _ = writeln!(
            out,
            "{} guest {}: {}",
            style.op(g.operation),
            g.name,
            headline(g)
        );
        if let Some(placement) = &g.placement {
            let _ = writeln!(out, "      {placement}");
        }
        if let Some(reason) = &g.reason {
            let text = if g.operation == Operation::Blocked {
                style.paint("31", &format!("blocked: {reason}"))
            } else {
                reason.clone()
            };
            let _ = writeln!(out, "      {text}");
        }
        for c in &g.changes {
            let _ = writeln!(
                out,
                "        {}: {} -> {}  ({})",
                c.diff.field,
                c.diff.from.as_deref().unwrap_or("unset"),
                c.diff.to.as_deref().unwrap_or("unset"),
                class_words(&c.class)
            );
        }
        if matches!(g.operation, Operation::Orphan) {
            continue;
        }
        let diff = yaml_diff(g.observed.as_ref(), g.desired.as_ref());
        if !diff.is_empty() {
            out.push('\n');
            for line in diff.lines() {
                let _ = writeln!(out, "      {}", style.diff_line(line));
            }
        }
    }

    if !plan.steps.is_empty() {
        out.push_str("\nOrder (actions of one wave run together):\n");
        for step in &plan.steps {
            let _ = writeln!(
                out,
                "  wave {}: {}",
                step.wave,
                describe_action(&step.action)
            );
        }
    }

    out.push('\n');
    out.push_str(&summary_line(&plan.summary));
    out.push('\n');
    out
}
