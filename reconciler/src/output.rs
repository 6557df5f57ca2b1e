//! The one output flag of every command that prints data: `-o/--output` with `text`
//! (the default), `json`, `yaml`, and `markdown` where a command has it.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::ValueEnum;
use serde::Serialize;

/// How a command prints what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// For people: a table, a summary or terraform-like text (`table` is an alias).
    #[default]
    #[value(alias = "table")]
    Text,
    /// JSON, for programs.
    Json,
    /// The same data as the JSON output, as YAML.
    Yaml,
    /// Markdown, for a pull-request comment (`plan`, `schema`).
    Markdown,
}

/// The value parser of `-o` for commands without a Markdown output: `markdown` is
/// refused by clap with the list of the values that work.
pub fn without_markdown() -> impl TypedValueParser<Value = Output> {
    let values = Output::value_variants()
        .iter()
        .filter(|v| **v != Output::Markdown)
        .filter_map(ValueEnum::to_possible_value);
    PossibleValuesParser::new(values)
        .map(|name| Output::from_str(&name, false).expect("a name clap accepted"))
}

/// `value` as pretty JSON with a final newline.
///
/// # Errors
/// When `value` cannot be serialized (a map with non-string keys).
pub fn json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

/// `value` as YAML, the same data as [`json`] gives.
///
/// # Errors
/// When `value` cannot be serialized.
pub fn yaml<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(value)
}

/// A JSON text (as `berth plan -o json` renders it) as YAML.
///
/// # Errors
/// When `json` is not JSON.
pub fn json_text_to_yaml(json: &str) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    Ok(serde_yaml::to_string(&value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[arg(short, long, value_parser = without_markdown(), default_value = "text")]
        output: Output,
    }

    #[test]
    fn markdown_is_refused_where_it_does_not_apply() {
        use clap::Parser;
        assert_eq!(Cli::parse_from(["x", "-o", "yaml"]).output, Output::Yaml);
        assert_eq!(Cli::parse_from(["x", "-o", "table"]).output, Output::Text);
        assert_eq!(Cli::parse_from(["x"]).output, Output::Text);
        let error = Cli::try_parse_from(["x", "-o", "markdown"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("[possible values: text, json, yaml]"),
            "{error}"
        );
    }

    #[test]
    fn yaml_carries_the_json_data() {
        let yaml = json_text_to_yaml(r#"{"formatVersion": 1, "steps": [{"a": "b"}]}"#).unwrap();
        assert_eq!(yaml, "formatVersion: 1\nsteps:\n- a: b\n");
    }
}
