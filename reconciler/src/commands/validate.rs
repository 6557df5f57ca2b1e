//! `berth validate [PATH]`: load the manifests, print every problem, exit 1 on errors.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use berth_schema::{Diagnostic, ManifestSet};
use serde::Serialize;

use berth_reconciler::output::{self, Output};

use crate::cli::{write_stdout, EXIT_INVALID};

/// Arguments of `berth validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A manifest directory (searched recursively for *.yaml, *.yml and *.json) or one file;
    /// `-` reads one manifest file from standard input.
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// How to print the problems: `text` (one line per problem,
    /// `file:line:col: error: field: message`, then a summary), or one object with
    /// every problem as `json` or `yaml`. `--format` is an alias.
    #[arg(short = 'o', long = "output", alias = "format", value_name = "FORMAT",
          value_parser = output::without_markdown(), default_value = "text")]
    pub output: Output,
}

/// The JSON output.
#[derive(Serialize)]
struct Report<'a> {
    valid: bool,
    errors: usize,
    warnings: usize,
    guests: usize,
    hosts: usize,
    diagnostics: &'a [Diagnostic],
}

/// Validates and prints; exit code 0 when valid (warnings allowed), 1 otherwise.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let (diagnostics, set) = match super::input::load(&args.path) {
        Ok(v) => (v.warnings, Some(v.manifests)),
        Err(invalid) => (invalid.diagnostics, None),
    };
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let report = Report {
        valid: set.is_some(),
        errors,
        warnings: diagnostics.len() - errors,
        guests: set.as_ref().map_or(0, |s| s.guests.len()),
        hosts: set.as_ref().map_or(0, |s| s.hosts.len()),
        diagnostics: &diagnostics,
    };
    let text = match args.output {
        Output::Json => output::json(&report)?,
        Output::Yaml => output::yaml(&report)?,
        Output::Text | Output::Markdown => text(&report, set.as_ref(), &args.path),
    };
    write_stdout(&text)?;
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn text(report: &Report<'_>, set: Option<&ManifestSet>, path: &std::path::Path) -> String {
    let mut out = String::new();
    for d in report.diagnostics {
        let _ = writeln!(out, "{d}");
    }
    let warnings = plural(report.warnings, "warning");
    match set {
        Some(set) => {
            let _ = writeln!(
                out,
                "{}: valid: {}, {}{} ({warnings})",
                path.display(),
                plural(set.guests.len(), "guest"),
                plural(set.hosts.len(), "host"),
                if set.fleet.is_some() {
                    ", fleet settings"
                } else {
                    ""
                },
            );
        }
        None => {
            let _ = writeln!(
                out,
                "{}: invalid: {}, {warnings}",
                path.display(),
                plural(report.errors, "error")
            );
        }
    }
    out
}
