//! Where each document and each of its fields came from, so that errors found later (by
//! validation or by the reconciler) can name the file, line and column of a field.

use std::collections::HashMap;
use std::ops::Deref;

use crate::diagnostic::{Diagnostic, Location, Severity};
use crate::node::{Node, Value};

/// The path of a child field: `spec` + `cpu` = `spec.cpu`; keys that are not plain
/// identifiers are quoted: `metadata.labels["berth.dev/x"]`.
pub fn child_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{key:?}]"),
    }
}

/// The path of an item of a list: `items[3]`.
pub fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Where a field's key and value are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpan {
    /// The key, for fields of a mapping; `None` for list items and the document itself.
    pub key: Option<Location>,
    /// The start of the value.
    pub value: Location,
}

/// Field path to position, for one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMap {
    fields: HashMap<String, FieldSpan>,
}

impl SourceMap {
    pub(crate) fn of(node: &Node) -> SourceMap {
        let mut map = SourceMap::default();
        map.record(String::new(), None, node);
        map
    }

    fn record(&mut self, path: String, key: Option<Location>, node: &Node) {
        match &node.value {
            Value::Map(entries) => {
                for e in entries {
                    self.record(child_path(&path, &e.key), Some(e.key_at), &e.value);
                }
            }
            Value::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.record(index_path(&path, i), None, item);
                }
            }
            _ => {}
        }
        self.fields.insert(
            path,
            FieldSpan {
                key,
                value: node.at,
            },
        );
    }

    /// The span of the field at `path` (`spec.memory.tune.hardLimit`), if it is written.
    pub fn get(&self, path: &str) -> Option<FieldSpan> {
        self.fields.get(path).copied()
    }

    /// The field at `path`, or the nearest enclosing field that is written (a field left
    /// to its default is reported where its parent is).
    pub fn nearest(&self, path: &str) -> Option<(&str, FieldSpan)> {
        let mut p = path;
        loop {
            if let Some((k, span)) = self.fields.get_key_value(p) {
                return Some((k.as_str(), *span));
            }
            if p.is_empty() {
                return None;
            }
            let cut = p.rfind(['.', '[']).unwrap_or(0);
            p = &p[..cut];
        }
    }
}

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file, as the user named it (or its path in the repository revision).
    pub file: String,
    /// Where the document starts.
    pub at: Location,
    /// Its fields' positions.
    pub spans: SourceMap,
}

impl Origin {
    /// Where the value of the field at `path` is, or the nearest written parent's key.
    pub fn locate(&self, path: &str) -> Location {
        match self.spans.nearest(path) {
            Some((p, span)) if p == path => span.value,
            Some((_, span)) => span.key.unwrap_or(span.value),
            None => self.at,
        }
    }

    /// Where the key of the field at `path` is (its value for a list item), or the
    /// nearest written parent's key.
    pub fn locate_key(&self, path: &str) -> Location {
        match self.spans.nearest(path) {
            Some((_, span)) => span.key.unwrap_or(span.value),
            None => self.at,
        }
    }

    /// A diagnostic about the field at `path` of this document.
    pub fn diagnostic(
        &self,
        severity: Severity,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let path = path.into();
        let at = self.locate(&path);
        Diagnostic::new(severity, self.file.clone(), Some(at), path, message)
    }

    /// An error about the field at `path` of this document.
    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, path, message)
    }

    /// A warning about the field at `path` of this document.
    pub fn warning(&self, path: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Warning, path, message)
    }

    /// `file:line` of the document, for messages that point at another document.
    pub fn short(&self) -> String {
        format!("{}:{}", self.file, self.at.line)
    }
}

/// A manifest document together with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest<T> {
    /// The document.
    pub object: T,
    /// Its file and field positions.
    pub origin: Origin,
}

impl<T> Deref for Manifest<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.object
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::parse_documents;

    #[test]
    fn paths() {
        assert_eq!(child_path("", "spec"), "spec");
        assert_eq!(child_path("spec", "cpu"), "spec.cpu");
        assert_eq!(
            child_path("metadata.labels", "berth.dev/x"),
            "metadata.labels[\"berth.dev/x\"]"
        );
        assert_eq!(index_path("a", 2), "a[2]");
    }

    #[test]
    fn locates_fields_and_falls_back_to_parents() {
        let (docs, _) = parse_documents("spec:\n  memory:\n    size: 1GiB\n");
        let origin = Origin {
            file: "g.yaml".into(),
            at: docs[0].at,
            spans: SourceMap::of(&docs[0]),
        };
        assert_eq!(
            origin.locate("spec.memory.size"),
            Location {
                line: 3,
                column: 11
            }
        );
        assert_eq!(
            origin.locate_key("spec.memory.size"),
            Location { line: 3, column: 5 }
        );
        // Not written: reported at the key of the nearest parent.
        assert_eq!(
            origin.locate("spec.memory.tune.hardLimit"),
            Location { line: 2, column: 3 }
        );
        let d = origin.error("spec.memory.size", "too small");
        assert_eq!(
            d.to_string(),
            "g.yaml:3:11: error: spec.memory.size: too small"
        );
    }
}
