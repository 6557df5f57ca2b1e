//! A YAML tree that remembers where each node came from.
//!
//! yaml-rust2's event parser gives every event a position; this module builds the
//! documents of a file from those events, so that validation can point at a field. It
//! also bounds what an adversarial file can cost: nesting depth, and the number of nodes
//! a document may expand to through aliases (the "billion laughs").

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

use crate::diagnostic::Location;

/// The deepest nesting accepted; manifests need about 6 levels.
pub(crate) const MAX_DEPTH: usize = 64;

/// The most nodes one document may hold once its aliases are expanded.
pub(crate) const MAX_NODES: usize = 200_000;

/// A node of a YAML document and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub value: Value,
    pub at: Location,
}

/// The value of a node, with plain scalars resolved as YAML 1.2's core schema does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// A float, kept as written.
    Float(String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// A mapping entry; keys are scalars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The key as written.
    pub key: String,
    /// The key, resolved like any scalar (`0:` is an integer key).
    pub key_value: Value,
    pub key_at: Location,
    pub value: Node,
}

impl Node {
    /// The entry `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    /// The string value of the entry `key` of a mapping.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match &self.get(key)?.value.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// How many nodes this tree holds (keys not counted).
    fn count(&self) -> usize {
        1 + match &self.value {
            Value::Seq(items) => items.iter().map(Node::count).sum(),
            Value::Map(entries) => entries.iter().map(|e| e.value.count()).sum(),
            _ => 0,
        }
    }

    /// The tree as a JSON value, for deserializing into the manifest types. Mapping keys
    /// become strings as written, so an integer key reads the same whether it was
    /// written `0:` or `"0":` (serde_json parses a string key into an integer type).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::Number((*i).into()),
            Value::Float(s) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or_else(|| J::String(s.clone()), J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }
}

impl Value {
    /// How the value reads in a message: `the string "two"`, `a mapping`.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "nothing (null)".to_owned(),
            Value::Bool(b) => format!("the boolean {b}"),
            Value::Int(i) => format!("the integer {i}"),
            Value::Float(f) => format!("the number {f}"),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Seq(_) => "a list".to_owned(),
            Value::Map(_) => "a mapping".to_owned(),
        }
    }
}

/// A syntax error, or a document past the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub at: Location,
    pub message: String,
}

/// The documents of a YAML stream. Documents that are empty (a stray `---`) are dropped.
/// On an error, the documents completed before it are returned with it.
pub(crate) fn parse_documents(text: &str) -> (Vec<Node>, Option<SyntaxError>) {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => return (builder.documents, None),
            Ok((event, mark)) => {
                if let Err(e) = builder.on_event(event, mark) {
                    return (builder.documents, Some(e));
                }
            }
            Err(e) => {
                let error = SyntaxError {
                    at: location(*e.marker()),
                    message: format!("invalid YAML: {}", e.info()),
                };
                return (builder.documents, Some(error));
            }
        }
    }
}

fn location(mark: Marker) -> Location {
    Location {
        line: mark.line().max(1),
        column: mark.col() + 1,
    }
}

enum Frame {
    Seq {
        at: Location,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        at: Location,
        anchor: usize,
        entries: Vec<Entry>,
        key: Option<(Value, String, Location)>,
    },
}

#[derive(Default)]
struct Builder {
    documents: Vec<Node>,
    stack: Vec<Frame>,
    /// Anchored nodes of the current document and their expanded node counts.
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
}

impl Builder {
    fn on_event(&mut self, event: Event, mark: Marker) -> Result<(), SyntaxError> {
        let at = location(mark);
        let fail = |message: String| Err(SyntaxError { at, message });
        match event {
            Event::DocumentStart => {
                self.anchors.clear();
                self.nodes = 0;
                Ok(())
            }
            Event::StreamStart | Event::DocumentEnd | Event::Nothing | Event::StreamEnd => Ok(()),
            Event::Scalar(text, style, anchor, tag) => {
                let value = match resolve(text, style, tag.as_ref()) {
                    Ok(v) => v,
                    Err(message) => return fail(message),
                };
                self.complete(Node { value, at }, anchor, 1)
            }
            Event::SequenceStart(anchor, tag) => self.open(at, anchor, tag, true),
            Event::MappingStart(anchor, tag) => self.open(at, anchor, tag, false),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { at, anchor, items }) => (
                        Node {
                            value: Value::Seq(items),
                            at,
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        at,
                        anchor,
                        entries,
                        ..
                    }) => {
                        // yaml-rust2 marks a block mapping's start after its first key;
                        // the mapping starts where that key does.
                        let at = entries.first().map_or(at, |e| e.key_at.min(at));
                        (
                            Node {
                                value: Value::Map(entries),
                                at,
                            },
                            anchor,
                        )
                    }
                    None => return fail("unbalanced YAML collection".to_owned()),
                };
                // Collection nodes were counted as their children arrived; count the
                // collection itself now.
                self.complete(node, anchor, 1)
            }
            Event::Alias(id) => {
                let Some((node, count)) = self.anchors.get(&id) else {
                    return fail("alias to an unknown anchor".to_owned());
                };
                let (node, count) = (node.clone(), *count);
                self.complete(Node { at, ..node }, 0, count)
            }
        }
    }

    /// Starts a sequence or mapping.
    fn open(
        &mut self,
        at: Location,
        anchor: usize,
        tag: Option<Tag>,
        seq: bool,
    ) -> Result<(), SyntaxError> {
        if let Some(tag) = tag {
            return Err(SyntaxError {
                at,
                message: format!(
                    "unsupported YAML tag {}{} on a collection",
                    tag.handle, tag.suffix
                ),
            });
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError {
                at,
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
            });
        }
        self.stack.push(if seq {
            Frame::Seq {
                at,
                anchor,
                items: Vec::new(),
            }
        } else {
            Frame::Map {
                at,
                anchor,
                entries: Vec::new(),
                key: None,
            }
        });
        Ok(())
    }

    /// Places a finished node into its parent, or makes it a document.
    fn complete(&mut self, node: Node, anchor: usize, count: usize) -> Result<(), SyntaxError> {
        self.nodes += count;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                at: node.at,
                message: format!(
                    "the document expands to more than {MAX_NODES} nodes (aliases of aliases?)"
                ),
            });
        }
        if anchor != 0 {
            let size = node.count();
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => {
                if node.value != Value::Null {
                    self.documents.push(node);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => {
                    let text = match &node.value {
                        Value::Str(s) | Value::Float(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => String::new(),
                        Value::Seq(_) | Value::Map(_) => {
                            return Err(SyntaxError {
                                at: node.at,
                                message:
                                    "a mapping key must be a plain value, not a list or mapping"
                                        .to_owned(),
                            })
                        }
                    };
                    if let Some(first) = entries.iter().find(|e| e.key == text) {
                        return Err(SyntaxError {
                            at: node.at,
                            message: format!(
                                "duplicate key {text} (first at line {})",
                                first.key_at.line
                            ),
                        });
                    }
                    *key = Some((node.value, text, node.at));
                }
                Some((key_value, key, key_at)) => entries.push(Entry {
                    key,
                    key_value,
                    key_at,
                    value: node,
                }),
            },
        }
        Ok(())
    }
}

/// Resolves a scalar: quoted and block scalars are strings, plain ones follow the core
/// schema; the standard `!!str`, `!!int`, ... tags are honoured.
fn resolve(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    if let Some(tag) = tag {
        let standard = tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:";
        return match (standard, tag.suffix.as_str()) {
            (true, "str") => Ok(Value::Str(text)),
            (true, "int" | "float" | "bool" | "null") => Ok(plain(text)),
            _ => Err(format!("unsupported YAML tag {}{}", tag.handle, tag.suffix)),
        };
    }
    Ok(match style {
        TScalarStyle::Plain => plain(text),
        _ => Value::Str(text),
    })
}

fn plain(text: String) -> Value {
    match Yaml::from_str(&text) {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(i) => Value::Int(i),
        Yaml::Real(r) => Value::Float(r),
        _ => Value::Str(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Node {
        let (mut docs, err) = parse_documents(text);
        assert_eq!(err, None);
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    #[test]
    fn positions_are_one_based() {
        let doc = one("a: 1\nb:\n  c: \"x\"\n");
        let b = doc.get("b").unwrap();
        assert_eq!(b.key_at, Location { line: 2, column: 1 });
        assert_eq!(doc.at, Location { line: 1, column: 1 });
        assert_eq!(b.value.at, Location { line: 3, column: 3 });
        let c = b.value.get("c").unwrap();
        assert_eq!(c.key_at, Location { line: 3, column: 3 });
        assert_eq!(c.value.at, Location { line: 3, column: 6 });
        assert_eq!(c.value.value, Value::Str("x".into()));
    }

    #[test]
    fn scalars_resolve_like_yaml_1_2() {
        let doc = one("i: 12\nf: 1.5\nb: true\nn: ~\ns: '12'\ny: yes\nk: 0x10\n");
        let v = |k: &str| doc.get(k).unwrap().value.value.clone();
        assert_eq!(v("i"), Value::Int(12));
        assert_eq!(v("f"), Value::Float("1.5".into()));
        assert_eq!(v("b"), Value::Bool(true));
        assert_eq!(v("n"), Value::Null);
        assert_eq!(v("s"), Value::Str("12".into()));
        assert_eq!(v("y"), Value::Str("yes".into()));
        assert_eq!(v("k"), Value::Int(16));
    }

    #[test]
    fn several_documents_and_stray_separators() {
        let (docs, err) = parse_documents("---\na: 1\n---\n---\nb: 2\n...\n");
        assert_eq!(err, None);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].at.line, 5);
    }

    #[test]
    fn syntax_errors_keep_earlier_documents() {
        let (docs, err) = parse_documents("a: 1\n---\nb: [1, 2\n");
        assert_eq!(docs.len(), 1);
        let err = err.unwrap();
        assert!(err.message.starts_with("invalid YAML"), "{err:?}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let (_, err) = parse_documents("a: 1\nb: 2\na: 3\n");
        let err = err.unwrap();
        assert_eq!(err.at.line, 3);
        assert!(err.message.contains("duplicate key a (first at line 1)"));
    }

    #[test]
    fn aliases_expand() {
        let doc = one("x: &a {k: 1}\ny: *a\n");
        assert_eq!(
            doc.get("y").unwrap().value.get("k").unwrap().value.value,
            Value::Int(1)
        );
    }

    #[test]
    fn alias_bombs_are_bounded() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = (b'a' + i - 1) as char;
            let c = (b'a' + i) as char;
            text.push_str(&format!(
                "{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            ));
        }
        let (_, err) = parse_documents(&text);
        assert!(err.unwrap().message.contains("more than"));
    }

    #[test]
    fn deep_nesting_is_bounded() {
        // yaml-rust2 stops at 256 levels by itself; berth stops sooner.
        let (_, err) = parse_documents(&"[".repeat(10_000));
        assert!(err.unwrap().message.contains("recursion limit"));
        let (_, err) = parse_documents(&format!("{}{}", "[".repeat(100), "]".repeat(100)));
        let err = err.unwrap();
        assert!(err.message.contains("nesting deeper than 64"), "{err:?}");
    }

    #[test]
    fn custom_tags_are_refused() {
        let (_, err) = parse_documents("a: !secret x\n");
        assert!(err.unwrap().message.contains("unsupported YAML tag"));
        assert_eq!(
            one("a: !!str 5\n").get("a").unwrap().value.value,
            Value::Str("5".into())
        );
    }
}
