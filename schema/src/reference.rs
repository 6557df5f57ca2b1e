//! The manifest reference (`schema/REFERENCE.md`), generated from the JSON Schema and so
//! from the types and their doc comments.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::json_schema::{json_schema, KINDS};

/// The reference as Markdown: every document kind and every field with its type,
/// default and description.
pub fn markdown() -> String {
    let schema = json_schema();
    let empty = Map::new();
    let defs = schema["definitions"].as_object().unwrap_or(&empty);
    let mut out = String::new();
    out.push_str(
        "# berth manifest reference\n\n\
         <!-- Generated from the types in schema/src/manifest.rs; do not edit. Regenerate with\n     \
         cargo run --bin berth -- schema --reference > schema/REFERENCE.md -->\n\n\
         A manifest repository holds YAML documents (several per file, separated by `---`) of\n\
         three kinds: `Guest`, `Host` and at most one `Fleet`. Every document has\n\
         `apiVersion: berth.dev/v1`, a `kind`, `metadata` and a `spec`. Unknown fields are\n\
         errors. The JSON Schema is `schema/berth.schema.json`.\n",
    );

    // Object definitions in the order they are first reached from the kinds.
    let mut queue: VecDeque<String> = KINDS.iter().map(|k| (*k).to_owned()).collect();
    let mut seen: BTreeSet<String> = queue.iter().cloned().collect();
    let mut units = Vec::new();
    while let Some(name) = queue.pop_front() {
        let Some(def) = defs.get(&name) else { continue };
        if def.get("properties").is_none() {
            units.push(name);
            continue;
        }
        let _ = write!(out, "\n## {name}\n\n");
        if let Some(d) = def["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        out.push_str("| field | type | default | description |\n|---|---|---|---|\n");
        let required: BTreeSet<&str> = def["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (field, prop) in def["properties"].as_object().unwrap_or(&empty) {
            let mut refs = Vec::new();
            let ty = type_of(prop, defs, &mut refs);
            for r in refs {
                if seen.insert(r.clone()) {
                    queue.push_back(r);
                }
            }
            let default = if required.contains(field.as_str()) {
                "required".to_owned()
            } else {
                match prop.get("default") {
                    Some(v) => format!("`{}`", compact(v)),
                    None => "—".to_owned(),
                }
            };
            let description = prop["description"]
                .as_str()
                .map(one_line)
                .unwrap_or_default();
            let _ = writeln!(out, "| `{field}` | {ty} | {default} | {description} |");
        }
    }
    if !units.is_empty() {
        out.push_str("\n## Units\n\n| type | written as |\n|---|---|\n");
        for name in units {
            let d = defs[&name]["description"]
                .as_str()
                .map(one_line)
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| <a id=\"{}\"></a>{name} | {d} |",
                name.to_lowercase()
            );
        }
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// A default value as YAML-ish flow text: `{kernel: builtin:heartbeat}`.
fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}: {}", compact(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(compact).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// The field type for the table, collecting the definitions it refers to.
fn type_of(prop: &Value, defs: &Map<String, Value>, refs: &mut Vec<String>) -> String {
    if let Some(r) = prop["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r).to_owned();
        refs.push(name.clone());
        let def = &defs[&name];
        if let Some(values) = enum_values(def) {
            return values;
        }
        return format!("[{name}](#{})", name.to_lowercase());
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = prop[key].as_array() {
            if let Some(values) = enum_values(prop) {
                return values;
            }
            let types: Vec<String> = branches
                .iter()
                .filter(|b| b["type"] != "null")
                .map(|b| type_of(b, defs, refs))
                .collect();
            return types.join(" or ");
        }
    }
    if let Some(c) = prop.get("const") {
        return format!("`{}`", compact(c));
    }
    let ty = match &prop["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => String::new(),
    };
    match ty.as_str() {
        "object" => {
            let key = if prop.get("patternProperties").is_some() {
                "integer".to_owned()
            } else {
                match prop.get("propertyNames") {
                    Some(names) => type_of(names, defs, refs),
                    None => "string".to_owned(),
                }
            };
            let value = prop
                .get("additionalProperties")
                .filter(|v| v.is_object())
                .or_else(|| {
                    prop["patternProperties"]
                        .as_object()
                        .and_then(|p| p.values().next())
                })
                .map_or_else(|| "value".to_owned(), |v| type_of(v, defs, refs));
            format!("map of {key} to {value}")
        }
        "array" => match prop.get("items") {
            Some(items) => format!("list of {}", type_of(items, defs, refs)),
            None => "list".to_owned(),
        },
        "integer" => {
            let range = match (prop["minimum"].as_i64(), prop["maximum"].as_i64()) {
                (Some(min), Some(max)) => format!(" ({min}–{max})"),
                _ => String::new(),
            };
            format!("integer{range}")
        }
        "string" => match prop["pattern"].as_str() {
            Some(p) => format!("string matching `{p}`"),
            None => "string".to_owned(),
        },
        other => other.to_owned(),
    }
}

/// `` `a` \| `b` `` for an enum definition.
fn enum_values(def: &Value) -> Option<String> {
    let branches = def["oneOf"].as_array()?;
    let values: Option<Vec<String>> = branches
        .iter()
        .map(|b| b["const"].as_str().map(|c| format!("`{c}`")))
        .collect();
    values.map(|v| v.join(" \\| "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_every_object_is_documented() {
        let text = markdown();
        let schema = json_schema();
        for (name, def) in schema["definitions"].as_object().unwrap() {
            for (field, prop) in def["properties"].as_object().into_iter().flatten() {
                assert!(
                    text.contains(&format!("| `{field}` |")),
                    "{name}.{field} missing"
                );
                assert!(
                    prop["description"].is_string(),
                    "{name}.{field} has no doc comment"
                );
            }
        }
        assert!(text.contains("`running` \\| `paused` \\| `stopped`"));
        assert!(text.contains("| `hardLimit` | [Bytes](#bytes) |"), "{text}");
    }

    /// `schema/REFERENCE.md` is what the types generate today.
    #[test]
    fn checked_in_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/REFERENCE.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == markdown(),
            "schema/REFERENCE.md is stale; regenerate it with\n    \
             cargo run --bin berth -- schema --reference > schema/REFERENCE.md"
        );
    }
}
