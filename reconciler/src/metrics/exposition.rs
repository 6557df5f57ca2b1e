//! Which text format `/metrics` answers in, and the Prometheus text format 0.0.4
//! derived from the OpenMetrics text that `prometheus-client` encodes.
//!
//! Prometheus (2.x up to 2.48) sends
//! `Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`,
//! so it gets OpenMetrics; a scraper (or `promtool check metrics`, through curl) that
//! asks for `text/plain;version=0.0.4` gets that format. Anything else, and no
//! `Accept` at all, gets OpenMetrics.

use std::collections::HashMap;

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text004,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The format an `Accept` header asks for: the acceptable media range with the highest
/// `q` that names a format; on a tie an exact type beats a wildcard, and OpenMetrics
/// beats the text format. `text/plain` with no version, or version 0.0.4, is the text
/// format; `*/*` is OpenMetrics.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::OpenMetrics;
    };
    let mut best: Option<(u16, u8, Format)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let (mut q, mut version) = (1000u16, None);
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => q = parse_q(value),
                "version" => version = Some(value.to_owned()),
                _ => {}
            }
        }
        // Specificity: 2 an exact type, 1 a wildcard.
        let candidate = match (media.as_str(), version.as_deref()) {
            ("application/openmetrics-text", _) => (2, Format::OpenMetrics),
            ("text/plain", None | Some("0.0.4")) => (2, Format::Text004),
            ("text/*", _) => (1, Format::Text004),
            ("*/*", _) => (1, Format::OpenMetrics),
            _ => continue,
        };
        if q == 0 {
            continue;
        }
        let rank = |(q, specific, format): (u16, u8, Format)| {
            (q, specific, u8::from(format == Format::OpenMetrics))
        };
        let this = (q, candidate.0, candidate.1);
        if best.is_none_or(|b| rank(this) > rank(b)) {
            best = Some(this);
        }
    }
    best.map_or(Format::OpenMetrics, |(_, _, format)| format)
}

/// A `q` value in thousandths; a malformed one counts as 1.
fn parse_q(value: &str) -> u16 {
    value
        .parse::<f32>()
        .ok()
        .filter(|q| (0.0..=1.0).contains(q))
        .map_or(1000, |q| (q * 1000.0).round() as u16)
}

/// The Prometheus text format 0.0.4 of an OpenMetrics text: no `# EOF`, no `# UNIT`;
/// a counter family takes its samples' name (`berth_actions` -> `berth_actions_total`);
/// `info` and `stateset` families become gauges (`info` named `<name>_info`, as its
/// samples are), `gaugehistogram` and `unknown` untyped; `_created` samples and
/// exemplars are dropped; `\"` in HELP becomes `"` (0.0.4 escapes only `\\` and `\n`
/// there).
pub fn openmetrics_to_text004(openmetrics: &str) -> String {
    let mut families: HashMap<&str, (String, &str)> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            let renamed = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "counter" => (name.to_owned(), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_owned(), "gauge"),
                _ => (name.to_owned(), "untyped"),
            };
            families.insert(name, renamed);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = families.get(name).map_or(name, |(n, _)| n.as_str());
            out.push_str(&format!("# HELP {name} {}\n", help.replace("\\\"", "\"")));
        } else if let Some((name, _)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' '))
        {
            let (renamed, kind) = &families[name];
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
        } else if line.starts_with('#') || line.is_empty() {
            // `# EOF`, `# UNIT` and other comments have no place in 0.0.4.
        } else if !is_created(line, &families) {
            out.push_str(without_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// Whether `sample` is the `_created` sample of a counter, histogram or summary.
fn is_created(sample: &str, families: &HashMap<&str, (String, &str)>) -> bool {
    let name = sample.split(['{', ' ']).next().unwrap_or_default();
    name.strip_suffix("_created")
        .and_then(|family| families.get(family))
        .is_some_and(|(_, kind)| matches!(*kind, "counter" | "histogram" | "summary"))
}

/// `sample` without its exemplar (` # {labels} value [timestamp]`), which 0.0.4 lacks.
fn without_exemplar(sample: &str) -> &str {
    // The exemplar starts after the labels, whose quoted values may hold " # ".
    let mut after_labels = 0;
    if let Some(open) = sample.find('{') {
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in sample[open..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    after_labels = open + i + 1;
                    break;
                }
                _ => {}
            }
        }
    }
    match sample[after_labels..].find(" # ") {
        Some(at) => &sample[..after_labels + at],
        None => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.42 sends (scrape/scrape.go, `acceptHeader`).
    const PROMETHEUS_2_42: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(Some(PROMETHEUS_2_42)), Format::OpenMetrics);
        assert_eq!(negotiate(None), Format::OpenMetrics);
        assert_eq!(negotiate(Some("*/*")), Format::OpenMetrics);
        assert_eq!(negotiate(Some("application/json")), Format::OpenMetrics);
        for text in [
            "text/plain;version=0.0.4",
            "text/plain; version=0.0.4; charset=utf-8",
            "text/plain",
            // Prometheus before 2.5, and with OpenMetrics turned down.
            "text/plain;version=0.0.4;q=1,*/*;q=0.1",
            "application/openmetrics-text;q=0.2,text/plain;version=0.0.4;q=0.9",
            "text/plain;version=0.0.4, */*",
            "text/html,text/*;q=0.9",
        ] {
            assert_eq!(negotiate(Some(text)), Format::Text004, "{text}");
        }
        assert_eq!(
            negotiate(Some("text/plain;version=0.0.4;q=0,*/*")),
            Format::OpenMetrics,
            "q=0 refuses"
        );
        assert_eq!(
            negotiate(Some("text/plain;version=1.0.0")),
            Format::OpenMetrics,
            "an unknown text version is not 0.0.4"
        );
    }

    #[test]
    fn text_004_from_openmetrics() {
        let openmetrics = "\
# HELP berth_actions Actions run, by \\\"kind\\\" and result.
# TYPE berth_actions counter
berth_actions_total{kind=\"retune\",result=\"ok\"} 1
berth_actions_created{kind=\"retune\",result=\"ok\"} 1700000000.0
# HELP berth_reconcile_duration_seconds Time of one pass.
# TYPE berth_reconcile_duration_seconds histogram
# UNIT berth_reconcile_duration_seconds seconds
berth_reconcile_duration_seconds_sum 0.002
berth_reconcile_duration_seconds_count 1
berth_reconcile_duration_seconds_bucket{le=\"0.001\"} 0 # {trace_id=\"a # b\"} 0.0005
berth_reconcile_duration_seconds_bucket{le=\"+Inf\"} 1
# HELP berth_build Build.
# TYPE berth_build info
berth_build_info{version=\"0.1.0\"} 1
# EOF
";
        assert_eq!(
            openmetrics_to_text004(openmetrics),
            "\
# HELP berth_actions_total Actions run, by \"kind\" and result.
# TYPE berth_actions_total counter
berth_actions_total{kind=\"retune\",result=\"ok\"} 1
# HELP berth_reconcile_duration_seconds Time of one pass.
# TYPE berth_reconcile_duration_seconds histogram
berth_reconcile_duration_seconds_sum 0.002
berth_reconcile_duration_seconds_count 1
berth_reconcile_duration_seconds_bucket{le=\"0.001\"} 0
berth_reconcile_duration_seconds_bucket{le=\"+Inf\"} 1
# HELP berth_build_info Build.
# TYPE berth_build_info gauge
berth_build_info{version=\"0.1.0\"} 1
"
        );
    }
}
