//! Field-by-field differences between what runs and what the manifests ask for.
//!
//! A diff only says *what* differs; [`crate::classify`] says *how* each difference can
//! be applied.

use std::collections::BTreeMap;
use std::fmt;

use berth_schema::{Host, PageSize, Pinning, ThpMode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::{ObservedGuest, ObservedHost, ANNOTATION_MANAGED};

/// A guest field berth compares, named by its path in the `Guest` manifest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Field {
    /// `spec.host`
    Host,
    /// `spec.state`
    State,
    /// `spec.boot`
    Boot,
    /// `spec.cpu.vcpus`
    Vcpus,
    /// `spec.cpu.maxVcpus`
    MaxVcpus,
    /// `spec.cpu.mode`
    CpuMode,
    /// `spec.cpu.model`
    CpuModel,
    /// `spec.cpu.pinning.vcpus`
    VcpuPinning,
    /// `spec.cpu.pinning.emulator`
    EmulatorPinning,
    /// `spec.memory.size`
    MemorySize,
    /// `spec.memory.hugepages`
    Hugepages,
    /// `spec.memory.locked`
    Locked,
    /// `spec.memory.sharePages`
    SharePages,
    /// `spec.memory.tune.hardLimit`
    HardLimit,
    /// `spec.memory.tune.softLimit`
    SoftLimit,
    /// `spec.memory.tune.swapHardLimit`
    SwapHardLimit,
    /// `spec.memory.tune.minGuarantee`
    MinGuarantee,
    /// `spec.memory.numa`
    Numa,
    /// `spec.io.weight`
    IoWeight,
    /// `metadata.labels`
    Labels,
    /// `metadata.annotations`
    Annotations,
}

impl Field {
    /// Every field, in the order diffs list them.
    pub const ALL: [Field; 21] = [
        Field::Host,
        Field::State,
        Field::Boot,
        Field::Vcpus,
        Field::MaxVcpus,
        Field::CpuMode,
        Field::CpuModel,
        Field::VcpuPinning,
        Field::EmulatorPinning,
        Field::MemorySize,
        Field::Hugepages,
        Field::Locked,
        Field::SharePages,
        Field::HardLimit,
        Field::SoftLimit,
        Field::SwapHardLimit,
        Field::MinGuarantee,
        Field::Numa,
        Field::IoWeight,
        Field::Labels,
        Field::Annotations,
    ];

    /// The field's path in the manifest.
    pub fn path(self) -> &'static str {
        match self {
            Field::Host => "spec.host",
            Field::State => "spec.state",
            Field::Boot => "spec.boot",
            Field::Vcpus => "spec.cpu.vcpus",
            Field::MaxVcpus => "spec.cpu.maxVcpus",
            Field::CpuMode => "spec.cpu.mode",
            Field::CpuModel => "spec.cpu.model",
            Field::VcpuPinning => "spec.cpu.pinning.vcpus",
            Field::EmulatorPinning => "spec.cpu.pinning.emulator",
            Field::MemorySize => "spec.memory.size",
            Field::Hugepages => "spec.memory.hugepages",
            Field::Locked => "spec.memory.locked",
            Field::SharePages => "spec.memory.sharePages",
            Field::HardLimit => "spec.memory.tune.hardLimit",
            Field::SoftLimit => "spec.memory.tune.softLimit",
            Field::SwapHardLimit => "spec.memory.tune.swapHardLimit",
            Field::MinGuarantee => "spec.memory.tune.minGuarantee",
            Field::Numa => "spec.memory.numa",
            Field::IoWeight => "spec.io.weight",
            Field::Labels => "metadata.labels",
            Field::Annotations => "metadata.annotations",
        }
    }

    /// The field's value in a guest, as text (`None` when the field is unset).
    pub fn value(self, g: &ObservedGuest) -> Option<String> {
        fn show<T: fmt::Display>(v: &Option<T>) -> Option<String> {
            v.as_ref().map(ToString::to_string)
        }
        let tune = g.memory.tune.as_ref();
        match self {
            Field::Host => Some(g.host.clone()),
            Field::State => Some(yaml_scalar(&g.state)),
            Field::Boot => Some(flow_yaml(&g.boot)),
            Field::Vcpus => Some(g.cpu.vcpus.to_string()),
            Field::MaxVcpus => Some(g.cpu.max_vcpus.to_string()),
            Field::CpuMode => Some(yaml_scalar(&g.cpu.mode)),
            Field::CpuModel => g.cpu.model.clone(),
            Field::VcpuPinning => vcpu_pinning(g.cpu.pinning.as_ref()),
            Field::EmulatorPinning => {
                show(&g.cpu.pinning.as_ref().and_then(|p| p.emulator.clone()))
            }
            Field::MemorySize => Some(g.memory.size.to_string()),
            Field::Hugepages => show(&g.memory.hugepages),
            Field::Locked => Some(g.memory.locked.to_string()),
            Field::SharePages => Some(g.memory.share_pages.to_string()),
            Field::HardLimit => show(&tune.and_then(|t| t.hard_limit)),
            Field::SoftLimit => show(&tune.and_then(|t| t.soft_limit)),
            Field::SwapHardLimit => show(&tune.and_then(|t| t.swap_hard_limit)),
            Field::MinGuarantee => show(&tune.and_then(|t| t.min_guarantee)),
            Field::Numa => g.memory.numa.as_ref().map(flow_yaml),
            Field::IoWeight => show(&g.io_weight),
            Field::Labels => map_text(&g.labels, |_| true),
            Field::Annotations => map_text(&g.annotations, |k| k != ANNOTATION_MANAGED),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

fn yaml_scalar<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One-line rendering of a small structure, `{kernel: builtin:heartbeat}` style.
fn flow_yaml<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(value) => flow(&value),
        Err(_) => String::new(),
    }
}

fn flow(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let inner: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", flow(v))).collect();
            format!("{{{}}}", inner.join(", "))
        }
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(flow).collect::<Vec<_>>().join(", "))
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn vcpu_pinning(p: Option<&Pinning>) -> Option<String> {
    let p = p.filter(|p| !p.vcpus.is_empty())?;
    let inner: Vec<String> = p
        .vcpus
        .iter()
        .map(|(v, set)| format!("{v}: {set}"))
        .collect();
    Some(format!("{{{}}}", inner.join(", ")))
}

fn map_text(m: &BTreeMap<String, String>, keep: impl Fn(&str) -> bool) -> Option<String> {
    let inner: Vec<String> = m
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    (!inner.is_empty()).then(|| format!("{{{}}}", inner.join(", ")))
}

/// One field that differs: its value as observed and as desired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldDiff {
    /// Which field.
    pub field: Field,
    /// The value in force; `null` when unset.
    pub from: Option<String>,
    /// The value the manifest asks for; `null` when unset.
    pub to: Option<String>,
}

/// Every field in which `observed` differs from `wanted` (the desired guest as it would
/// be observed, see [`ObservedGuest::as_written`]), in [`Field::ALL`] order.
pub fn diff_guest(observed: &ObservedGuest, wanted: &ObservedGuest) -> Vec<FieldDiff> {
    if same_config(observed, wanted) {
        return Vec::new();
    }
    Field::ALL
        .iter()
        .filter_map(|&field| {
            let from = field.value(observed);
            let to = field.value(wanted);
            (from != to).then_some(FieldDiff { field, from, to })
        })
        .collect()
}

/// A cheap structural comparison that skips the text rendering for the common case.
fn same_config(a: &ObservedGuest, b: &ObservedGuest) -> bool {
    a.host == b.host
        && a.state == b.state
        && a.boot == b.boot
        && a.cpu == b.cpu
        && a.memory == b.memory
        && a.io_weight == b.io_weight
        && a.labels == b.labels
        && a.annotations == b.annotations
}

/// A host-wide setting with the value berth sets it to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", tag = "setting", content = "value")]
pub enum HostSetting {
    /// Pages in the pool of one size (`nr_hugepages`); `value` is `[pageSize, pages]`.
    HugepagePool(PageSize, u64),
    /// `/sys/kernel/mm/ksm/run`.
    KsmEnabled(bool),
    /// `/sys/kernel/mm/ksm/pages_to_scan`.
    KsmPagesToScan(u32),
    /// `/sys/kernel/mm/ksm/sleep_millisecs`.
    KsmSleepMillisecs(u32),
    /// `/sys/kernel/mm/transparent_hugepage/enabled`.
    TransparentHugepages(ThpMode),
}

impl HostSetting {
    /// The setting's path in the `Host` manifest.
    pub fn path(&self) -> String {
        match self {
            HostSetting::HugepagePool(size, _) => format!("spec.hugepages.{size}"),
            HostSetting::KsmEnabled(_) => "spec.ksm.enabled".into(),
            HostSetting::KsmPagesToScan(_) => "spec.ksm.pagesToScan".into(),
            HostSetting::KsmSleepMillisecs(_) => "spec.ksm.sleepMillisecs".into(),
            HostSetting::TransparentHugepages(_) => "spec.transparentHugepages".into(),
        }
    }
}

/// One host setting that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostChange {
    /// The manifest path of the setting.
    pub field: String,
    /// The value in force.
    pub from: String,
    /// The value to set.
    pub to: String,
    /// The setting with its new value, as a driver applies it.
    pub target: HostSetting,
}

impl HostChange {
    fn new(target: HostSetting, from: impl fmt::Display, to: impl fmt::Display) -> Self {
        HostChange {
            field: target.path(),
            from: from.to_string(),
            to: to.to_string(),
            target,
        }
    }

    /// For a hugepage pool change: the page size and the page counts before and after.
    pub fn pool_resize(&self) -> Option<(PageSize, u64, u64)> {
        match self.target {
            HostSetting::HugepagePool(size, to) => Some((size, self.from.parse().ok()?, to)),
            _ => None,
        }
    }
}

/// Host settings that differ from the manifest. Hugepage pools the manifest does not
/// list, and KSM tunables it leaves unset, are not berth's to change.
pub fn diff_host(observed: &ObservedHost, desired: &Host) -> Vec<HostChange> {
    let spec = &desired.spec;
    let mut changes = Vec::new();
    for (&size, &pages) in &spec.hugepages {
        let have = observed.hugepages.get(&size).map_or(0, |p| p.total);
        if have != pages {
            changes.push(HostChange::new(
                HostSetting::HugepagePool(size, pages),
                have,
                pages,
            ));
        }
    }
    if observed.ksm.enabled != spec.ksm.enabled {
        changes.push(HostChange::new(
            HostSetting::KsmEnabled(spec.ksm.enabled),
            observed.ksm.enabled,
            spec.ksm.enabled,
        ));
    }
    if let Some(want) = spec.ksm.pages_to_scan {
        if observed.ksm.pages_to_scan != Some(want) {
            changes.push(HostChange::new(
                HostSetting::KsmPagesToScan(want),
                show_opt(observed.ksm.pages_to_scan),
                want,
            ));
        }
    }
    if let Some(want) = spec.ksm.sleep_millisecs {
        if observed.ksm.sleep_millisecs != Some(want) {
            changes.push(HostChange::new(
                HostSetting::KsmSleepMillisecs(want),
                show_opt(observed.ksm.sleep_millisecs),
                want,
            ));
        }
    }
    if observed.transparent_hugepages != spec.transparent_hugepages {
        changes.push(HostChange::new(
            HostSetting::TransparentHugepages(spec.transparent_hugepages),
            yaml_scalar(&observed.transparent_hugepages),
            yaml_scalar(&spec.transparent_hugepages),
        ));
    }
    changes
}

fn show_opt(v: Option<u32>) -> String {
    v.map_or_else(|| "unset".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired_from_yaml;

    fn guest(spec: &str) -> ObservedGuest {
        let desired = desired_from_yaml([format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: g}}\nspec: {spec}\n"
        )
        .as_str()]);
        ObservedGuest::as_written(&desired.guests[0])
    }

    fn host(spec: &str) -> Host {
        let desired = desired_from_yaml([format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: h}}\n\
             spec: {{address: '127.0.0.1:1', cpus: '0-1', memory: 1GiB, {spec}}}\n"
        )
        .as_str()]);
        desired.hosts[0].clone()
    }

    const BASE: &str = "{host: h, cpu: {vcpus: 1, maxVcpus: 4}, memory: {size: 64MiB}}";

    #[test]
    fn the_same_guest_has_no_differences() {
        assert_eq!(diff_guest(&guest(BASE), &guest(BASE)), Vec::new());
    }

    #[test]
    fn differences_come_in_field_order_with_both_values_as_text() {
        let wanted = guest(
            "{host: h, cpu: {vcpus: 2, maxVcpus: 4, pinning: {vcpus: {0: '1'}}}, \
             memory: {size: 64MiB, tune: {hardLimit: 128MiB}}, io: {weight: 300}}",
        );
        let diffs = diff_guest(&guest(BASE), &wanted);
        let fields: Vec<Field> = diffs.iter().map(|d| d.field).collect();
        assert_eq!(
            fields,
            [
                Field::Vcpus,
                Field::VcpuPinning,
                Field::HardLimit,
                Field::IoWeight
            ]
        );
        assert_eq!(
            (diffs[0].from.as_deref(), diffs[0].to.as_deref()),
            (Some("1"), Some("2"))
        );
        // Unset on one side is `None`, not an empty text.
        assert_eq!(diffs[1].from, None);
        assert_eq!(diffs[1].to.as_deref(), Some("{0: 1}"));
        assert_eq!(diffs[2].from, None);
        assert_eq!(diffs[3].to.as_deref(), Some("300"));
    }

    #[test]
    fn the_managed_annotation_is_not_a_difference() {
        let mut observed = guest(BASE);
        observed.annotations.remove(ANNOTATION_MANAGED);
        let wanted = guest(BASE);
        assert!(
            diff_guest(&observed, &wanted)
                .iter()
                .all(|d| d.field != Field::Annotations),
            "{:?}",
            diff_guest(&observed, &wanted)
        );
    }

    #[test]
    fn host_settings_berth_manages_are_diffed_and_others_left_alone() {
        let observed = ObservedHost::as_written(&host("hugepages: {2MiB: 8}"), []);
        // The same pool, KSM tunables left unset: nothing to change.
        assert_eq!(
            diff_host(&observed, &host("hugepages: {2MiB: 8}")),
            Vec::new()
        );
        // A pool the manifest does not list is not berth's to shrink.
        assert_eq!(
            diff_host(&observed, &host("ksm: {enabled: false}")),
            Vec::new()
        );
        let changes = diff_host(
            &observed,
            &host("hugepages: {2MiB: 16}, ksm: {enabled: true, pagesToScan: 200}, transparentHugepages: never"),
        );
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.hugepages.2MiB",
                "spec.ksm.enabled",
                "spec.ksm.pagesToScan",
                "spec.transparentHugepages"
            ]
        );
        assert_eq!(changes[0].pool_resize(), Some((PageSize::Huge2M, 8, 16)));
        assert_eq!(changes[1].pool_resize(), None);
        assert_eq!(
            (changes[3].from.as_str(), changes[3].to.as_str()),
            ("madvise", "never")
        );
    }
}
