//! Problems found in manifests, each pointing at a file, a line, a column and a field.

use std::fmt;

use serde::Serialize;

/// How bad a problem is: errors fail validation, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The revision cannot be applied.
    Error,
    /// Worth a look; the revision can still be applied.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// A position in a file: line and column, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Location {
    /// The start of a file.
    pub const START: Location = Location { line: 1, column: 1 };
}

/// One problem in the manifests.
///
/// Displays as `file:line:col: error: spec.memory.tune.hardLimit: message`; the position
/// is left out for problems with a whole file or directory, the field path for problems
/// with a whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file (or directory) as the user named it.
    pub file: String,
    /// Line, from 1; `None` for a problem with a whole file or directory.
    pub line: Option<usize>,
    /// Column, from 1; `None` when `line` is.
    pub column: Option<usize>,
    /// The field, as `spec.memory.tune.hardLimit`; empty for a whole document or file.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Diagnostic {
    /// An error at `location` of `file`.
    pub fn error(
        file: impl Into<String>,
        location: Option<Location>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(Severity::Error, file, location, path, message)
    }

    /// A warning at `location` of `file`.
    pub fn warning(
        file: impl Into<String>,
        location: Option<Location>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(Severity::Warning, file, location, path, message)
    }

    /// A problem of the given severity.
    pub fn new(
        severity: Severity,
        file: impl Into<String>,
        location: Option<Location>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity,
            file: file.into(),
            line: location.map(|l| l.line),
            column: location.map(|l| l.column),
            path: path.into(),
            message: message.into(),
        }
    }

    /// Whether this fails validation.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The order diagnostics are printed in: by file, then position, then the rest, so
    /// output is the same from run to run.
    fn sort_key(&self) -> impl Ord + '_ {
        (
            &self.file,
            self.line,
            self.column,
            &self.path,
            self.severity,
            &self.message,
        )
    }
}

/// Sorts diagnostics by file and position and removes exact duplicates.
pub fn sort(diagnostics: &mut Vec<Diagnostic>) {
    diagnostics.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    diagnostics.dedup();
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}: ", self.severity)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_a_compiler() {
        let d = Diagnostic::error(
            "manifests/web.yaml",
            Some(Location {
                line: 12,
                column: 7,
            }),
            "spec.memory.tune.hardLimit",
            "must be at least softLimit (256MiB)",
        );
        assert_eq!(
            d.to_string(),
            "manifests/web.yaml:12:7: error: spec.memory.tune.hardLimit: must be at least softLimit (256MiB)"
        );
        let w = Diagnostic::warning("manifests", None, "", "no manifests");
        assert_eq!(w.to_string(), "manifests: warning: no manifests");
    }

    #[test]
    fn serializes_for_ci_tools() {
        let d = Diagnostic::error("a.yaml", Some(Location::START), "kind", "bad");
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["severity"], "error");
        assert_eq!(v["line"], 1);
        assert_eq!(v["path"], "kind");
    }

    #[test]
    fn sorted_by_file_then_position() {
        let at = |f: &str, line| Diagnostic::error(f, Some(Location { line, column: 1 }), "", "x");
        let mut v = vec![
            at("b.yaml", 1),
            at("a.yaml", 9),
            at("a.yaml", 2),
            at("a.yaml", 2),
        ];
        sort(&mut v);
        let order: Vec<_> = v.iter().map(|d| (d.file.as_str(), d.line)).collect();
        assert_eq!(
            order,
            [
                ("a.yaml", Some(2)),
                ("a.yaml", Some(9)),
                ("b.yaml", Some(1))
            ]
        );
    }
}
