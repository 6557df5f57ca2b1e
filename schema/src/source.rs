//! Where each document and each of its fields came from, so that errors found later (by
//! validation or by the reconciler) can name the file, line and column of a field.

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::Arc;

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

/// Field path to position, for one document: the document's tree, walked when a
/// position is asked for (most fields' positions are never asked for, so none is worked
/// out in advance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMap {
    root: Arc<Node>,
}

impl Default for SourceMap {
    fn default() -> Self {
        SourceMap {
            root: Arc::new(Node {
                value: Value::Null,
                at: Location::START,
            }),
        }
    }
}

/// One step of a field path: a key, or a list index.
enum Step<'a> {
    Key(Cow<'a, str>),
    Index(usize),
}

/// Splits the next step off a path as [`child_path`] and [`index_path`] write it; `None`
/// when the path does not have that form.
fn next_step(path: &str) -> Option<(Step<'_>, &str)> {
    let path = path.strip_prefix('.').unwrap_or(path);
    if let Some(rest) = path.strip_prefix("[\"") {
        // A quoted key, escaped as Rust's Debug writes it.
        let mut key = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    let rest = rest[i + 1..].strip_prefix(']')?;
                    return Some((Step::Key(Cow::Owned(key)), rest));
                }
                '\\' => match chars.next()?.1 {
                    'n' => key.push('\n'),
                    't' => key.push('\t'),
                    'r' => key.push('\r'),
                    '0' => key.push('\0'),
                    'u' => {
                        let (_, open) = chars.next()?;
                        if open != '{' {
                            return None;
                        }
                        let mut hex = String::new();
                        for (_, h) in chars.by_ref() {
                            if h == '}' {
                                break;
                            }
                            hex.push(h);
                        }
                        key.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    other => key.push(other),
                },
                c => key.push(c),
            }
        }
        return None;
    }
    if let Some(rest) = path.strip_prefix('[') {
        let (index, rest) = rest.split_once(']')?;
        return Some((Step::Index(index.parse().ok()?), rest));
    }
    let end = path.find(['.', '[']).unwrap_or(path.len());
    if end == 0 {
        return None;
    }
    Some((Step::Key(Cow::Borrowed(&path[..end])), &path[end..]))
}

impl SourceMap {
    pub(crate) fn of(node: Node) -> SourceMap {
        SourceMap {
            root: Arc::new(node),
        }
    }

    /// The deepest written field on the way to `path`: how much of the path it covers,
    /// and its span.
    fn walk<'p>(&self, path: &'p str) -> (&'p str, FieldSpan) {
        let mut node: &Node = &self.root;
        let mut span = FieldSpan {
            key: None,
            value: node.at,
        };
        let mut rest = path;
        let mut covered = 0;
        while let Some((step, after)) = next_step(rest) {
            let next = match (&node.value, step) {
                (Value::Map(entries), Step::Key(key)) => entries
                    .iter()
                    .find(|e| e.key == key)
                    .map(|e| (&e.value, Some(e.key_at))),
                (Value::Seq(items), Step::Index(i)) => items.get(i).map(|item| (item, None)),
                _ => None,
            };
            let Some((child, key)) = next else { break };
            node = child;
            span = FieldSpan {
                key,
                value: child.at,
            };
            covered = path.len() - after.len();
            rest = after;
        }
        (&path[..covered], span)
    }

    /// The span of the field at `path` (`spec.memory.tune.hardLimit`), if it is written.
    pub fn get(&self, path: &str) -> Option<FieldSpan> {
        let (found, span) = self.walk(path);
        (found.len() == path.len()).then_some(span)
    }

    /// The field at `path`, or the nearest enclosing field that is written (a field left
    /// to its default is reported where its parent is), with its path.
    pub fn nearest<'p>(&self, path: &'p str) -> Option<(&'p str, FieldSpan)> {
        Some(self.walk(path))
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
        let (docs, _) = parse_documents(
            "spec:\n  memory:\n    size: 1GiB\n  labels: {\"berth.dev/x\\n\": [a, b]}\n",
        );
        let doc = docs.into_iter().next().unwrap();
        let origin = Origin {
            file: "g.yaml".into(),
            at: doc.at,
            spans: SourceMap::of(doc),
        };
        let labels = child_path("spec.labels", "berth.dev/x\n");
        assert_eq!(
            origin.locate(&index_path(&labels, 1)),
            Location {
                line: 4,
                column: 33
            }
        );
        assert_eq!(origin.spans.get("spec.labels[2]"), None);
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
