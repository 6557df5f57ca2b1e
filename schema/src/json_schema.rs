//! The JSON Schema of a manifest document (`Guest`, `Host` or `Fleet`), generated from
//! the types with schemars.
//!
//! The same schema serves editors (through the yaml-language-server modeline) and
//! berth's own structural validation, so the two cannot disagree. It is written in
//! draft-07, which every editor plugin understands.

use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

use crate::manifest::{Fleet, Guest, Host, API_VERSION};

/// The document kinds, in the order the schema lists them.
pub const KINDS: [&str; 3] = ["Guest", "Host", "Fleet"];

/// The JSON Schema of one manifest document: a `Guest`, a `Host` or a `Fleet`, told
/// apart by `kind`.
pub fn json_schema() -> Value {
    let mut generator = SchemaSettings::draft07().into_generator();
    generator.subschema_for::<Guest>();
    generator.subschema_for::<Host>();
    generator.subschema_for::<Fleet>();
    let mut definitions = generator.take_definitions(true);

    // A map keyed by page size: schemars writes the keys as a pattern; naming the
    // PageSize type instead lets validation explain a bad key with the unit's parser.
    if let Some(hugepages) = definitions
        .get_mut("HostSpec")
        .and_then(|h| h.pointer_mut("/properties/hugepages"))
        .and_then(Value::as_object_mut)
    {
        if let Some(Value::Object(patterns)) = hugepages.remove("patternProperties") {
            if let Some((_, value)) = patterns.into_iter().next() {
                hugepages.insert("additionalProperties".into(), value);
                hugepages.insert(
                    "propertyNames".into(),
                    json!({"$ref": "#/definitions/PageSize"}),
                );
            }
        }
    }

    // A document may name its schema with `$schema`, as JSON editors expect; berth
    // ignores it.
    for kind in KINDS {
        if let Some(Value::Object(properties)) = definitions
            .get_mut(kind)
            .and_then(|d| d.get_mut("properties"))
        {
            properties.insert(
                crate::load::SCHEMA_KEY.into(),
                json!({
                    "type": "string",
                    "description": "The JSON Schema of this document, for editors (such as this file's URL or path); berth ignores it."
                }),
            );
        }
    }

    let branches: Vec<Value> = KINDS
        .iter()
        .map(|kind| {
            json!({
                "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                "then": {"$ref": format!("#/definitions/{kind}")}
            })
        })
        .collect();
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "berth manifest",
        "description": "A berth manifest document: a Guest, a Host or a Fleet.",
        "type": "object",
        "required": ["apiVersion", "kind"],
        "properties": {
            "apiVersion": {"const": API_VERSION},
            "kind": {"enum": KINDS}
        },
        "allOf": branches,
        "definitions": definitions,
    })
}

/// The schema as `berth schema` prints it and `schema/berth.schema.json` holds it.
pub fn json_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// The schema, generated once per process.
pub(crate) fn cached() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(json_schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_definition_with_its_kind_fixed() {
        let schema = json_schema();
        for kind in KINDS {
            let def = &schema["definitions"][kind];
            assert_eq!(def["properties"]["kind"]["const"], kind);
            assert_eq!(def["properties"]["apiVersion"]["const"], API_VERSION);
            assert_eq!(def["additionalProperties"], false);
        }
    }

    #[test]
    fn hugepage_pool_keys_are_page_sizes() {
        let schema = json_schema();
        let pool = &schema["definitions"]["HostSpec"]["properties"]["hugepages"];
        assert_eq!(pool["propertyNames"]["$ref"], "#/definitions/PageSize");
        assert_eq!(pool["additionalProperties"]["type"], "integer");
    }

    /// `schema/berth.schema.json` is what the types generate today.
    #[test]
    fn checked_in_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/berth.schema.json");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == json_schema_text(),
            "schema/berth.schema.json is stale; regenerate it with\n    \
             cargo run --bin berth -- schema > schema/berth.schema.json"
        );
    }
}
