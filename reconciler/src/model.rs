//! The two sides the reconciler compares: the desired state (the manifests, as
//! `berth-schema` types) and the observed state (what really runs, as drivers report it).
//!
//! Observed values are read back from the guests and hosts themselves (thread affinity,
//! cgroup files, hugepage pools), never from a record of what berth last wrote; that is
//! what makes changes made by hand show up as drift.

use std::collections::{BTreeMap, BTreeSet};

use berth_schema::{
    Boot, Bytes, CpuMode, CpuSet, FleetSpec, Guest, GuestState, Host, KsmSpec, MemTune, NumaSpec,
    PageSize, Pinning, ThpMode, ANNOTATION_PRUNE, ANNOTATION_SUSPEND,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation berth puts on every guest it starts, so that a guest no manifest names
/// anymore can be told apart from one berth never managed.
pub const ANNOTATION_MANAGED: &str = "berth.dev/managed";

/// What the manifests ask for: every guest, every host and the fleet settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Guest manifests.
    pub guests: Vec<Guest>,
    /// Host manifests.
    pub hosts: Vec<Host>,
    /// Repository-wide settings (the defaults when the repository has no `Fleet`).
    pub fleet: FleetSpec,
    /// Where the scheduler placed each guest placed by `hostSelector` (their
    /// `spec.host` is filled in when placed): see [`crate::scheduler`].
    pub placements: BTreeMap<String, crate::scheduler::Placement>,
}

impl Desired {
    /// The documents of a validated manifest set.
    pub fn from_manifests(set: &berth_schema::ManifestSet) -> Self {
        Desired {
            guests: set.guests.values().map(|g| g.object.clone()).collect(),
            hosts: set.hosts.values().map(|h| h.object.clone()).collect(),
            fleet: set.fleet.as_ref().map(|f| f.spec).unwrap_or_default(),
            placements: BTreeMap::new(),
        }
    }
}

/// What runs: every guest and every host the driver can see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Observed {
    /// Guests with a VMM (running or paused), plus stopped guests a driver still knows.
    pub guests: Vec<ObservedGuest>,
    /// Hosts the driver reached.
    pub hosts: Vec<ObservedHost>,
}

/// A guest as it really runs, read back from the VMM and the kernel.
///
/// The shape follows the `Guest` manifest so that both sides serialize to comparable
/// YAML; values that the manifest may leave out are filled in (`maxVcpus` is always set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedGuest {
    /// Guest name.
    pub name: String,
    /// The host whose VMM runs the guest.
    pub host: String,
    /// Run state.
    pub state: GuestState,
    /// What the guest booted.
    pub boot: Boot,
    /// vCPUs, CPU model and the pinning in force.
    pub cpu: ObservedCpu,
    /// Memory size, backing and the limits in force.
    pub memory: ObservedMemory,
    /// Block I/O weight in force, when a weight is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u16>,
    /// Labels recorded when the guest was started or last retuned.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations recorded likewise; `berth.dev/managed` marks guests berth started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// A migration of this guest that is under way, to the named host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<String>,
    /// Set when the guest's VMM holds its lock (so it runs) but did not answer: why.
    /// The other fields are then those of the spec the VMM was built from, not read
    /// back; the plan leaves such a guest alone (it is never started a second time,
    /// retuned or stopped on guesses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresponsive: Option<String>,
}

/// vCPU facts of a running guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedCpu {
    /// vCPUs online.
    pub vcpus: u32,
    /// vCPUs the VMM was built for.
    pub max_vcpus: u32,
    /// The CPU model mode.
    pub mode: CpuMode,
    /// The named model, for `custom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Thread affinity in force; `None` when no thread is pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinning: Option<Pinning>,
}

/// Memory facts of a running guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedMemory {
    /// Guest RAM.
    pub size: Bytes,
    /// Hugepage size backing guest RAM; `None` for normal pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<PageSize>,
    /// Guest RAM is mlocked.
    pub locked: bool,
    /// Guest RAM is advised mergeable for KSM.
    pub share_pages: bool,
    /// cgroup memory limits as read back; `None` when no limit is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<MemTune>,
    /// NUMA policy in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<NumaSpec>,
}

impl ObservedGuest {
    /// The guest as it would be observed if it ran exactly as the manifest says: what
    /// CI mode takes the base revision to be, and what a diff compares against.
    pub fn as_written(guest: &Guest) -> Self {
        let spec = &guest.spec;
        let mut annotations = guest.metadata.annotations.clone();
        annotations.insert(ANNOTATION_MANAGED.to_owned(), "true".to_owned());
        ObservedGuest {
            name: guest.metadata.name.clone(),
            host: spec.host.clone(),
            state: spec.state,
            boot: spec.boot.clone(),
            cpu: ObservedCpu {
                vcpus: spec.cpu.vcpus,
                max_vcpus: spec.cpu.max(),
                mode: spec.cpu.mode,
                model: spec.cpu.model.clone(),
                pinning: spec
                    .cpu
                    .pinning
                    .clone()
                    .filter(|p| !p.vcpus.is_empty() || p.emulator.is_some()),
            },
            memory: ObservedMemory {
                size: spec.memory.size,
                hugepages: spec.memory.hugepages.map(|h| h.page_size),
                locked: spec.memory.locked,
                share_pages: spec.memory.share_pages,
                tune: spec
                    .memory
                    .tune
                    .clone()
                    .map(|t| MemTune {
                        allow_hard_limit_below_size: false,
                        ..t
                    })
                    .filter(|t| *t != MemTune::default()),
                numa: spec.memory.numa.clone(),
            },
            io_weight: spec.io.map(|io| io.weight),
            labels: guest.metadata.labels.clone(),
            annotations,
            migrating_to: None,
            unresponsive: None,
        }
    }

    /// Whether berth started this guest (and may therefore stop it).
    pub fn is_managed(&self) -> bool {
        self.annotations
            .get(ANNOTATION_MANAGED)
            .is_some_and(|v| v == "true")
    }

    /// Whether the guest asked to be pruned once no manifest names it.
    pub fn prune_requested(&self) -> bool {
        self.annotations
            .get(ANNOTATION_PRUNE)
            .is_some_and(|v| v == "true")
    }

    /// Whether a VMM exists for the guest (running or paused).
    pub fn has_vmm(&self) -> bool {
        self.state != GuestState::Stopped
    }

    /// The host CPUs the guest's threads are pinned to.
    pub fn pinned_cpus(&self) -> CpuSet {
        pinned_cpus(self.cpu.pinning.as_ref())
    }
}

/// Whether the manifest suspends reconciling of this guest.
pub fn is_suspended(guest: &Guest) -> bool {
    guest
        .metadata
        .annotations
        .get(ANNOTATION_SUSPEND)
        .is_some_and(|v| v == "true")
}

/// The union of all vCPU and emulator CPU sets of a pinning.
pub fn pinned_cpus(pinning: Option<&Pinning>) -> CpuSet {
    let mut all = CpuSet::new();
    if let Some(p) = pinning {
        for set in p.vcpus.values().chain(p.emulator.iter()) {
            all = all.union(set);
        }
    }
    all
}

/// A host as it really is: CPUs, memory, hugepage pools and the host-wide settings in
/// force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedHost {
    /// Host name.
    pub name: String,
    /// Online CPUs.
    pub cpus: CpuSet,
    /// Memory the host has.
    pub memory_total: Bytes,
    /// Memory free now.
    pub memory_free: Bytes,
    /// Hugepage pools per page size.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hugepages: BTreeMap<PageSize, HugepagePool>,
    /// KSM settings in force.
    pub ksm: KsmSpec,
    /// Transparent hugepage mode in force.
    pub transparent_hugepages: ThpMode,
    /// The CPU guests with `host-passthrough` see.
    pub cpu: CpuInfo,
}

/// One hugepage pool, in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HugepagePool {
    /// Pages reserved (`nr_hugepages`).
    pub total: u64,
    /// Pages not held by any process (`free_hugepages`).
    pub free: u64,
}

/// The host CPU as `/proc/cpuinfo` describes it. Empty values mean unknown (CI mode
/// knows only what the Host manifest says).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuInfo {
    /// `vendor_id`, e.g. `GenuineIntel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// `model name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `flags`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub flags: BTreeSet<String>,
}

impl ObservedHost {
    /// The host as it would be observed if it ran exactly as its manifest says, with
    /// `guests` (already as observed) holding their memory and hugepages.
    pub fn as_written<'a>(
        host: &Host,
        guests: impl IntoIterator<Item = &'a ObservedGuest>,
    ) -> Self {
        let spec = &host.spec;
        let mut held: BTreeMap<PageSize, u64> = BTreeMap::new();
        let mut normal = 0u64;
        for g in guests
            .into_iter()
            .filter(|g| g.host == host.metadata.name && g.has_vmm())
        {
            match g.memory.hugepages {
                Some(size) => *held.entry(size).or_default() += pages_for(g.memory.size, size),
                None => normal += g.memory.size.get(),
            }
        }
        let pool_bytes: u64 = spec.hugepages.iter().map(|(s, n)| s.bytes() * n).sum();
        ObservedHost {
            name: host.metadata.name.clone(),
            cpus: spec.cpus.clone(),
            memory_total: spec.memory,
            memory_free: Bytes(spec.memory.get().saturating_sub(pool_bytes + normal)),
            hugepages: spec
                .hugepages
                .iter()
                .map(|(&size, &total)| {
                    let used = held.get(&size).copied().unwrap_or(0);
                    (
                        size,
                        HugepagePool {
                            total,
                            free: total.saturating_sub(used),
                        },
                    )
                })
                .collect(),
            ksm: spec.ksm,
            transparent_hugepages: spec.transparent_hugepages,
            cpu: CpuInfo {
                vendor: None,
                model: spec.cpu_model.clone(),
                flags: BTreeSet::new(),
            },
        }
    }
}

/// Hugepages of `size` needed to back `memory` (rounded up).
pub fn pages_for(memory: Bytes, size: PageSize) -> u64 {
    memory.get().div_ceil(size.bytes())
}

impl Observed {
    /// CI mode's baseline: `base` running exactly as written; hosts that only `head`
    /// declares are there too, as fresh machines (no hugepage pools, KSM off, THP
    /// `madvise`), so their settings show up as changes and guests can be placed there.
    pub fn baseline(base: &Desired, head: &Desired) -> Self {
        let mut observed = Self::as_written(base);
        let known: BTreeSet<&str> = base
            .hosts
            .iter()
            .map(|h| h.metadata.name.as_str())
            .collect();
        for host in head
            .hosts
            .iter()
            .filter(|h| !known.contains(h.metadata.name.as_str()))
        {
            let mut fresh = host.clone();
            fresh.spec.hugepages.clear();
            fresh.spec.ksm = KsmSpec::default();
            fresh.spec.transparent_hugepages = ThpMode::default();
            observed.hosts.push(ObservedHost::as_written(&fresh, []));
        }
        observed
    }

    /// The fleet as it would be observed if every manifest ran exactly as written: what
    /// CI mode compares the head revision against.
    pub fn as_written(desired: &Desired) -> Self {
        let guests: Vec<ObservedGuest> = desired
            .guests
            .iter()
            .filter(|g| g.spec.state != GuestState::Stopped && !g.spec.host.is_empty())
            .map(ObservedGuest::as_written)
            .collect();
        let mut by_host: BTreeMap<&str, Vec<&ObservedGuest>> = BTreeMap::new();
        for g in &guests {
            by_host.entry(g.host.as_str()).or_default().push(g);
        }
        let hosts = desired
            .hosts
            .iter()
            .map(|h| {
                let on_host = by_host.get(h.metadata.name.as_str());
                ObservedHost::as_written(h, on_host.into_iter().flatten().copied())
            })
            .collect();
        Observed { guests, hosts }
    }
}

/// Test support: the `Guest`, `Host` and `Fleet` documents of YAML texts, without the
/// schema crate's validation.
#[cfg(test)]
pub(crate) fn desired_from_yaml<'t>(texts: impl IntoIterator<Item = &'t str>) -> Desired {
    use serde::Deserialize as _;
    let mut desired = Desired::default();
    for text in texts {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = serde_yaml::Value::deserialize(doc).expect("YAML");
            match value["kind"].as_str() {
                Some("Guest") => desired
                    .guests
                    .push(serde_yaml::from_value(value).expect("Guest")),
                Some("Host") => desired
                    .hosts
                    .push(serde_yaml::from_value(value).expect("Host")),
                Some("Fleet") => {
                    let fleet: berth_schema::Fleet = serde_yaml::from_value(value).expect("Fleet");
                    desired.fleet = fleet.spec;
                }
                other => panic!("unknown kind {other:?}"),
            }
        }
    }
    desired
}
