//! Structural validation: a document's tree checked against the JSON Schema generated
//! from the types, reporting every problem with its position.
//!
//! This walks the subset of JSON Schema that schemars emits for berth's types (`$ref`,
//! `allOf`/`anyOf`/`oneOf`, `type`, `const`/`enum`, `properties`, `required`,
//! `additionalProperties`, `patternProperties`, `propertyNames`, `items`, integer
//! ranges and formats, string lengths and patterns). The unit and cpuset types are
//! checked with their own parsers, whose messages say more than a pattern can.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex_lite::Regex;
use serde_json::{Map, Value as Json};

use crate::cpuset::CpuSet;
use crate::diagnostic::{Diagnostic, Location};
use crate::json_schema::{cached, KINDS};
use crate::node::{Node, Value};
use crate::source::{child_path, index_path};
use crate::units::{Bandwidth, Bytes, Duration, PageSize};

/// The closest of `candidates` to `word`, if one is close enough to be a likely typo.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            let score = strsim::normalized_damerau_levenshtein(&lower, &c.to_lowercase());
            (c, score)
        })
        .filter(|(_, score)| *score >= 0.6)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
}

/// The `patternProperties` key schemars writes for a map keyed by an unsigned integer.
const INTEGER_KEY: &str = r"^\d+$";

/// Parses a unit or cpuset string with its own parser; `None` for other types.
fn parse_unit(name: &str, text: &str) -> Option<Result<(), String>> {
    fn run<T: std::str::FromStr>(text: &str) -> Result<(), String>
    where
        T::Err: std::fmt::Display,
    {
        text.parse::<T>().map(drop).map_err(|e| e.to_string())
    }
    Some(match name {
        "Bytes" => run::<Bytes>(text),
        "Duration" => run::<Duration>(text),
        "Bandwidth" => run::<Bandwidth>(text),
        "PageSize" => run::<PageSize>(text),
        "CpuSet" => run::<CpuSet>(text),
        _ => return None,
    })
}

/// Every `pattern` and `patternProperties` regex of the schema, compiled once.
fn regexes() -> &'static HashMap<String, Regex> {
    static REGEXES: OnceLock<HashMap<String, Regex>> = OnceLock::new();
    REGEXES.get_or_init(|| {
        let mut found = Vec::new();
        collect_patterns(cached(), &mut found);
        found
            .into_iter()
            .filter_map(|p| Regex::new(&p).ok().map(|r| (p, r)))
            .collect()
    })
}

fn collect_patterns(schema: &Json, out: &mut Vec<String>) {
    match schema {
        Json::Object(map) => {
            if let Some(Json::String(p)) = map.get("pattern") {
                out.push(p.clone());
            }
            if let Some(Json::Object(pp)) = map.get("patternProperties") {
                out.extend(pp.keys().cloned());
            }
            map.values().for_each(|v| collect_patterns(v, out));
        }
        Json::Array(items) => items.iter().for_each(|v| collect_patterns(v, out)),
        _ => {}
    }
}

/// Checks one document against the schema of its `kind`. Returns the kind when the
/// document names one, whatever else is wrong.
pub(crate) fn check_document(
    file: &str,
    doc: &Node,
    out: &mut Vec<Diagnostic>,
) -> Option<&'static str> {
    let mut checker = Checker {
        file,
        definitions: cached()["definitions"].as_object()?,
        out,
    };
    if !matches!(doc.value, Value::Map(_)) {
        checker.error(
            doc.at,
            "",
            format!(
                "expected a manifest (a mapping with apiVersion, kind, metadata and spec), found {}",
                doc.value.describe()
            ),
        );
        return None;
    }
    let kinds = KINDS.join(", ");
    let kind = match doc.get("kind") {
        None => {
            checker.error(
                doc.at,
                "kind",
                format!("missing field kind (expected one of {kinds})"),
            );
            return None;
        }
        Some(entry) => match &entry.value.value {
            Value::Str(s) if KINDS.contains(&s.as_str()) => KINDS.iter().find(|k| *k == s)?,
            other => {
                let hint = match other {
                    Value::Str(s) => did_you_mean(suggest(s, KINDS)),
                    _ => String::new(),
                };
                checker.error(
                    entry.value.at,
                    "kind",
                    format!("expected one of {kinds}, found {}{hint}", other.describe()),
                );
                return None;
            }
        },
    };
    let schema = checker.definitions.get(*kind)?;
    checker.check(doc, schema, "", doc.at);
    Some(kind)
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |s| format!(" (did you mean {s}?)"))
}

struct Checker<'a> {
    file: &'a str,
    definitions: &'a Map<String, Json>,
    out: &'a mut Vec<Diagnostic>,
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Int(_) => "integer",
        Value::Float(_) => "number",
        Value::Str(_) => "string",
        Value::Seq(_) => "array",
        Value::Map(_) => "object",
    }
}

fn type_phrase(name: &str) -> &'static str {
    match name {
        "null" => "nothing (null)",
        "boolean" => "true or false",
        "integer" => "an integer",
        "number" => "a number",
        "string" => "a string",
        "array" => "a list",
        "object" => "a mapping",
        _ => "a value of another type",
    }
}

/// The range of an integer `format` as schemars writes it.
fn format_range(format: &str) -> Option<(i128, i128)> {
    Some(match format {
        "uint8" => (0, u8::MAX.into()),
        "uint16" => (0, u16::MAX.into()),
        "uint32" | "uint" => (0, u32::MAX.into()),
        "uint64" => (0, u64::MAX.into()),
        "int8" => (i8::MIN.into(), i8::MAX.into()),
        "int16" => (i16::MIN.into(), i16::MAX.into()),
        "int32" | "int" => (i32::MIN.into(), i32::MAX.into()),
        "int64" => (i64::MIN.into(), i64::MAX.into()),
        _ => return None,
    })
}

impl<'a> Checker<'a> {
    fn error(&mut self, at: Location, path: &str, message: String) {
        self.out
            .push(Diagnostic::error(self.file, Some(at), path, message));
    }

    fn definition(&self, reference: &str) -> Option<(&'a str, &'a Json)> {
        let name = reference.rsplit('/').next()?;
        let definitions: &'a Map<String, Json> = self.definitions;
        definitions
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Checks `node` (at `path`, whose key is at `here`) against `schema`.
    fn check(&mut self, node: &Node, schema: &Json, path: &str, here: Location) {
        let Some(s) = schema.as_object() else {
            if schema == &Json::Bool(false) {
                self.error(node.at, path, "no value is allowed here".to_owned());
            }
            return;
        };
        if let Some(Json::String(reference)) = s.get("$ref") {
            if let Some((name, def)) = self.definition(reference) {
                if self.check_unit(node, name, def, path) {
                    return;
                }
                self.check(node, def, path, here);
            }
        }
        if let Some(Json::Array(all)) = s.get("allOf") {
            for sub in all {
                self.check(node, sub, path, here);
            }
        }
        for keyword in ["anyOf", "oneOf"] {
            if let Some(Json::Array(branches)) = s.get(keyword) {
                self.check_alternatives(node, branches, path, here);
            }
        }
        if !self.check_type(node, s, path) {
            return;
        }
        if let Some(expected) = s.get("const") {
            self.check_enum(node, std::slice::from_ref(expected), path);
        }
        if let Some(Json::Array(values)) = s.get("enum") {
            self.check_enum(node, values, path);
        }
        match &node.value {
            Value::Int(i) => self.check_range(node, i128::from(*i), s, path),
            Value::Str(text) => self.check_string(node, text, s, path),
            Value::Map(_) => self.check_object(node, s, path, here),
            Value::Seq(items) => {
                if let Some(item_schema) = s.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item, item_schema, &index_path(path, i), item.at);
                    }
                }
            }
            Value::Null | Value::Bool(_) | Value::Float(_) => {}
        }
    }

    /// Units and cpusets: checked by their parsers. Returns whether `name` is one.
    fn check_unit(&mut self, node: &Node, name: &str, def: &Json, path: &str) -> bool {
        let description = def["description"].as_str().unwrap_or(name);
        let integer_ok = def["anyOf"]
            .as_array()
            .is_some_and(|b| b.iter().any(|s| s["type"] == "integer"));
        let text = match &node.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) if integer_ok => i.to_string(),
            Value::Float(f) if integer_ok => f.clone(),
            other => {
                if parse_unit(name, "").is_none() {
                    return false;
                }
                let message = format!("expected {description}, found {}", other.describe());
                self.error(node.at, path, message);
                return true;
            }
        };
        match parse_unit(name, &text) {
            None => false,
            Some(Ok(())) => true,
            Some(Err(message)) => {
                self.error(node.at, path, message);
                true
            }
        }
    }

    fn check_alternatives(&mut self, node: &Node, branches: &[Json], path: &str, here: Location) {
        let is_null_schema = |b: &Json| b.get("type") == Some(&Json::String("null".into()));
        if node.value == Value::Null && branches.iter().any(is_null_schema) {
            return;
        }
        let branches: Vec<&Json> = branches.iter().filter(|b| !is_null_schema(b)).collect();
        if !branches.is_empty() && branches.iter().all(|b| b.get("const").is_some()) {
            let values: Vec<Json> = branches.iter().map(|b| b["const"].clone()).collect();
            self.check_enum(node, &values, path);
            return;
        }
        if let [only] = branches.as_slice() {
            self.check(node, only, path, here);
            return;
        }
        let mut best: Option<Vec<Diagnostic>> = None;
        for branch in branches {
            let mut trial = Vec::new();
            Checker {
                file: self.file,
                definitions: self.definitions,
                out: &mut trial,
            }
            .check(node, branch, path, here);
            if trial.is_empty() {
                return;
            }
            if best.as_ref().is_none_or(|b| trial.len() < b.len()) {
                best = Some(trial);
            }
        }
        self.out.extend(best.unwrap_or_default());
    }

    /// Returns whether the type fits (or the schema names none).
    fn check_type(&mut self, node: &Node, s: &Map<String, Json>, path: &str) -> bool {
        let allowed: Vec<&str> = match s.get("type") {
            Some(Json::String(t)) => vec![t.as_str()],
            Some(Json::Array(ts)) => ts.iter().filter_map(Json::as_str).collect(),
            _ => return true,
        };
        let actual = type_name(&node.value);
        if allowed.contains(&actual) || (actual == "integer" && allowed.contains(&"number")) {
            return true;
        }
        let wanted: Vec<&str> = allowed
            .iter()
            .filter(|t| **t != "null" || allowed.len() == 1)
            .map(|t| type_phrase(t))
            .collect();
        let message = format!(
            "expected {}, found {}",
            wanted.join(" or "),
            node.value.describe()
        );
        self.error(node.at, path, message);
        false
    }

    fn check_enum(&mut self, node: &Node, values: &[Json], path: &str) {
        let matches = |v: &Json| match (&node.value, v) {
            (Value::Str(s), Json::String(e)) => s == e,
            (Value::Bool(b), Json::Bool(e)) => b == e,
            (Value::Int(i), Json::Number(n)) => n.as_i64() == Some(*i),
            (Value::Null, Json::Null) => true,
            _ => false,
        };
        if values.iter().any(matches) {
            return;
        }
        let names: Vec<String> = values
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect();
        let hint = match &node.value {
            Value::Str(s) if names.len() > 1 => {
                did_you_mean(suggest(s, names.iter().map(String::as_str)))
            }
            _ => String::new(),
        };
        let expected = match names.as_slice() {
            [one] => one.clone(),
            _ => format!("one of {}", names.join(", ")),
        };
        let message = format!("expected {expected}, found {}{hint}", node.value.describe());
        self.error(node.at, path, message);
    }

    fn check_range(&mut self, node: &Node, value: i128, s: &Map<String, Json>, path: &str) {
        let (mut min, mut max) = s
            .get("format")
            .and_then(Json::as_str)
            .and_then(format_range)
            .unwrap_or((i128::MIN, i128::MAX));
        if let Some(m) = s.get("minimum").and_then(Json::as_i64) {
            min = min.max(m.into());
        }
        if let Some(m) = s.get("maximum").and_then(Json::as_u64) {
            max = max.min(m.into());
        }
        if value < min || value > max {
            let expected = match (min, max) {
                (i128::MIN, max) => format!("at most {max}"),
                (min, i128::MAX) => format!("at least {min}"),
                (min, max) if max == u64::MAX.into() => format!("at least {min}"),
                (min, max) => format!("{min} to {max}"),
            };
            let message = format!("{value} is out of range (expected {expected})");
            self.error(node.at, path, message);
        }
    }

    fn check_string(&mut self, node: &Node, text: &str, s: &Map<String, Json>, path: &str) {
        let chars = text.chars().count() as u64;
        if let Some(min) = s.get("minLength").and_then(Json::as_u64) {
            if chars < min {
                let what = if min == 1 {
                    "must not be empty".to_owned()
                } else {
                    format!("must be at least {min} characters")
                };
                self.error(node.at, path, what);
                return;
            }
        }
        if let Some(max) = s.get("maxLength").and_then(Json::as_u64) {
            if chars > max {
                self.error(
                    node.at,
                    path,
                    format!("{text:?} is longer than {max} characters"),
                );
                return;
            }
        }
        if let Some(Json::String(pattern)) = s.get("pattern") {
            if let Some(re) = regexes().get(pattern) {
                if !re.is_match(text) {
                    let what = s
                        .get("description")
                        .and_then(Json::as_str)
                        .map_or_else(|| format!("a string matching {pattern}"), str::to_owned);
                    self.error(
                        node.at,
                        path,
                        format!("{text:?} does not have the expected form: {what}"),
                    );
                }
            }
        }
    }

    fn check_object(&mut self, node: &Node, s: &Map<String, Json>, path: &str, here: Location) {
        let Value::Map(entries) = &node.value else {
            return;
        };
        let empty = Map::new();
        let properties = s
            .get("properties")
            .and_then(Json::as_object)
            .unwrap_or(&empty);
        let patterns = s.get("patternProperties").and_then(Json::as_object);
        for entry in entries {
            let child = child_path(path, &entry.key);
            if let Some(names) = s.get("propertyNames") {
                let key_node = Node {
                    value: Value::Str(entry.key.clone()),
                    at: entry.key_at,
                };
                self.check(&key_node, names, &child, entry.key_at);
            }
            if let Some(sub) = properties.get(&entry.key) {
                self.check(&entry.value, sub, &child, entry.key_at);
                continue;
            }
            let by_pattern = patterns.and_then(|pp| {
                pp.iter()
                    .find(|(p, _)| regexes().get(*p).is_some_and(|re| re.is_match(&entry.key)))
            });
            if let Some((pattern, sub)) = by_pattern {
                // Integer keys (vCPU numbers) are u32 in the types; the pattern alone
                // would let a number too large for them through.
                if pattern == INTEGER_KEY && entry.key.parse::<u32>().is_err() {
                    self.error(
                        entry.key_at,
                        &child,
                        format!(
                            "key {} is out of range (expected at most {})",
                            entry.key,
                            u32::MAX
                        ),
                    );
                }
                self.check(&entry.value, sub, &child, entry.key_at);
                continue;
            }
            match s.get("additionalProperties") {
                Some(Json::Bool(false)) => {
                    let message = if properties.is_empty() {
                        let expected = patterns
                            .map(|pp| pp.keys().cloned().collect::<Vec<_>>().join(" or "))
                            .unwrap_or_default();
                        format!(
                            "unexpected key {} (expected a key matching {expected})",
                            entry.key
                        )
                    } else {
                        match suggest(&entry.key, properties.keys().map(String::as_str)) {
                            Some(near) => {
                                format!("unknown field {}, did you mean {near}?", entry.key)
                            }
                            None => format!(
                                "unknown field {} (expected one of {})",
                                entry.key,
                                properties.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        }
                    };
                    self.error(entry.key_at, &child, message);
                }
                Some(sub @ Json::Object(_)) => self.check(&entry.value, sub, &child, entry.key_at),
                _ => {}
            }
        }
        if let Some(Json::Array(required)) = s.get("required") {
            for name in required.iter().filter_map(Json::as_str) {
                if !entries.iter().any(|e| e.key == name) {
                    self.error(
                        here,
                        &child_path(path, name),
                        format!("missing field {name}"),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::parse_documents;

    fn check(text: &str) -> Vec<String> {
        let (docs, err) = parse_documents(text);
        assert_eq!(err, None);
        let mut out = Vec::new();
        for doc in &docs {
            check_document("t.yaml", doc, &mut out);
        }
        out.iter().map(ToString::to_string).collect()
    }

    const GUEST: &str = "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: g}\nspec:\n  host: h\n  cpu: {vcpus: 1}\n  memory: {size: 64MiB}\n";

    #[test]
    fn a_minimal_guest_is_clean() {
        assert_eq!(check(GUEST), Vec::<String>::new());
    }

    #[test]
    fn every_regex_in_the_schema_compiles() {
        let mut found = Vec::new();
        collect_patterns(cached(), &mut found);
        assert!(!found.is_empty());
        for p in found {
            assert!(regexes().contains_key(&p), "{p} does not compile");
        }
    }

    #[test]
    fn unknown_fields_get_the_near_spelling() {
        let text = GUEST.replace("size: 64MiB", "size: 64MiB, tune: {hardlimit: 1GiB}");
        assert_eq!(
            check(&text),
            ["t.yaml:7:32: error: spec.memory.tune.hardlimit: unknown field hardlimit, did you mean hardLimit?"]
        );
    }

    #[test]
    fn wrong_types_and_ranges_and_enums() {
        let text = GUEST
            .replace("vcpus: 1", "vcpus: two, mode: host-passthru")
            .replace("size: 64MiB", "size: -1GiB")
            .replace("host: h", "host: h\n  io: {weight: 5000}\n  state: runing");
        let out = check(&text);
        assert!(
            out.iter().any(
                |e| e.contains("spec.cpu.vcpus: expected an integer, found the string \"two\"")
            ),
            "{out:?}"
        );
        assert!(out.iter().any(|e| e.contains("spec.cpu.mode: expected one of host-passthrough, host-model, custom, found the string \"host-passthru\" (did you mean host-passthrough?)")), "{out:?}");
        assert!(
            out.iter()
                .any(|e| e.contains("spec.memory.size: \"-1GiB\": a size cannot be negative")),
            "{out:?}"
        );
        assert!(
            out.iter()
                .any(|e| e.contains("spec.io.weight: 5000 is out of range (expected 100 to 1000)")),
            "{out:?}"
        );
        assert!(out.iter().any(|e| e.contains("spec.state: expected one of running, paused, stopped, found the string \"runing\" (did you mean running?)")), "{out:?}");
        assert_eq!(out.len(), 5, "{out:?}");
    }

    #[test]
    fn missing_fields_point_at_the_parent() {
        let text = GUEST.replace("  memory: {size: 64MiB}\n", "  memory: {}\n");
        assert_eq!(
            check(&text),
            ["t.yaml:7:3: error: spec.memory.size: missing field size"]
        );
    }

    #[test]
    fn kind_and_api_version() {
        let out = check(&GUEST.replace("kind: Guest", "kind: Gust"));
        assert_eq!(out, ["t.yaml:2:7: error: kind: expected one of Guest, Host, Fleet, found the string \"Gust\" (did you mean Guest?)"]);
        let out = check(&GUEST.replace("berth.dev/v1", "berth.dev/v2"));
        assert_eq!(out, ["t.yaml:1:13: error: apiVersion: expected berth.dev/v1, found the string \"berth.dev/v2\""]);
        let out = check("just a string\n");
        assert!(out[0].contains("expected a manifest"), "{out:?}");
    }

    #[test]
    fn hugepage_pool_keys_use_the_page_size_parser() {
        let text = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: h}\nspec:\n  address: a\n  cpus: 0-1\n  memory: 1GiB\n  hugepages: {4MiB: 1, 2MiB: x}\n";
        let out = check(text);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].contains("spec.hugepages.4MiB: \"4MiB\" is not a hugepage size"),
            "{out:?}"
        );
        assert!(
            out[1].contains("spec.hugepages.2MiB: expected an integer"),
            "{out:?}"
        );
    }

    #[test]
    fn names_must_be_dns_labels() {
        let out = check(&GUEST.replace("name: g", "name: Web_1"));
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].contains("metadata.name: \"Web_1\" does not have the expected form: Unique per kind; a DNS label"), "{out:?}");
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("hardlimit", ["hardLimit", "softLimit"]),
            Some("hardLimit")
        );
        assert_eq!(suggest("memroy", ["memory", "cpu"]), Some("memory"));
        assert_eq!(suggest("zzz", ["memory", "cpu"]), None);
    }
}
