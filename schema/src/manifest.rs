//! The manifest documents: `Guest`, `Host` and `Fleet`, `apiVersion: berth.dev/v1`.
//!
//! Field names are camelCase in YAML, as in Kubernetes. Every field that has a sensible
//! default may be left out; unknown fields are errors.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cpuset::CpuSet;
use crate::units::{Bandwidth, Bytes, Duration, PageSize};

/// The only API version this release understands.
pub const API_VERSION: &str = "berth.dev/v1";

/// The most vCPUs a guest may have (the x86 xAPIC limit berth's payloads assume).
pub const MAX_VCPUS: u32 = 255;

/// Annotation that suspends reconciling of one guest (`"true"`), as Flux's
/// `reconcile: disabled` does.
pub const ANNOTATION_SUSPEND: &str = "berth.dev/suspend";

/// Annotation that lets berth stop a guest once no manifest names it (`"true"`).
pub const ANNOTATION_PRUNE: &str = "berth.dev/prune";

/// Name, labels and annotations, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique per kind; a DNS label: lowercase letters, digits and `-`, at most 63.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations; `berth.dev/suspend` and `berth.dev/prune` mean something.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A KVM guest and everything berth tunes about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Guest {
    /// Always `berth.dev/v1`.
    #[schemars(extend("const" = API_VERSION))]
    pub api_version: String,
    /// Always `Guest`.
    #[schemars(extend("const" = "Guest"))]
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The desired state.
    pub spec: GuestSpec,
}

/// The desired state of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuestSpec {
    /// The name of the `Host` the guest runs on.
    pub host: String,
    /// Whether the guest runs, is paused, or is stopped.
    #[serde(default)]
    pub state: GuestState,
    /// What the guest boots.
    #[serde(default)]
    pub boot: Boot,
    /// vCPUs, their pinning and the CPU model.
    pub cpu: CpuSpec,
    /// Memory size, backing and limits.
    pub memory: MemorySpec,
    /// Block I/O weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoSpec>,
    /// How the guest moves between hosts, and how restart-class changes are applied.
    #[serde(default)]
    pub migration: MigrationPolicy,
    /// Whether berth may restart the guest when a change cannot be made live.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
}

/// Run state of a guest.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum GuestState {
    /// vCPUs run.
    #[default]
    Running,
    /// The VMM exists, vCPUs are stopped.
    Paused,
    /// No VMM.
    Stopped,
}

/// Whether a change that cannot be applied live or by migration may restart the guest.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum RestartPolicy {
    /// Never restart: such a change is blocked and reported.
    #[default]
    Never,
    /// Restart the guest when nothing gentler applies the change.
    IfRequired,
}

/// The guest's boot source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Boot {
    /// `builtin:heartbeat`, or the path of a Linux bzImage or vmlinux.
    #[serde(default = "Boot::default_kernel")]
    pub kernel: String,
    /// Path of an initrd (Linux only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line (Linux only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Settings of the built-in heartbeat payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatSpec>,
}

impl Boot {
    /// The built-in heartbeat payload.
    pub const HEARTBEAT: &'static str = "builtin:heartbeat";

    fn default_kernel() -> String {
        Self::HEARTBEAT.to_owned()
    }

    /// Whether the guest runs the built-in heartbeat payload.
    pub fn is_heartbeat(&self) -> bool {
        self.kernel == Self::HEARTBEAT
    }
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            kernel: Self::default_kernel(),
            initrd: None,
            cmdline: None,
            heartbeat: None,
        }
    }
}

/// Settings of the built-in heartbeat payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeartbeatSpec {
    /// Timer ticks per second on each vCPU (LAPIC timer).
    #[serde(default = "HeartbeatSpec::default_tick_hz")]
    pub tick_hz: u32,
    /// A heartbeat line on the serial console every this many ticks.
    #[serde(default = "HeartbeatSpec::default_ticks_per_line")]
    pub ticks_per_line: u32,
    /// Pages each vCPU dirties per tick with a verifiable pattern.
    #[serde(default)]
    pub dirty_pages_per_tick: u32,
}

impl HeartbeatSpec {
    fn default_tick_hz() -> u32 {
        100
    }

    fn default_ticks_per_line() -> u32 {
        100
    }
}

impl Default for HeartbeatSpec {
    fn default() -> Self {
        HeartbeatSpec {
            tick_hz: Self::default_tick_hz(),
            ticks_per_line: Self::default_ticks_per_line(),
            dirty_pages_per_tick: 0,
        }
    }
}

/// vCPUs and their placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuSpec {
    /// vCPUs online now; raising it up to `maxVcpus` is a live hot-add.
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub vcpus: u32,
    /// The most vCPUs the guest can have without a restart; defaults to `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub max_vcpus: Option<u32>,
    /// The CPU model the guest sees.
    #[serde(default)]
    pub mode: CpuMode,
    /// The named model when `mode` is `custom` (for example `kvm64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// vCPU and emulator thread pinning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinning: Option<Pinning>,
    /// The guest wants its pinned CPUs to itself: sharing them is an error, not a warning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dedicated: bool,
}

impl CpuSpec {
    /// `maxVcpus`, or `vcpus` when it is not set.
    pub fn max(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus)
    }
}

/// The CPU model the guest sees (libvirt's `<cpu mode=...>`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// The host CPU as it is: fastest, migrates only to an identical CPU.
    HostPassthrough,
    /// A model close to the host's, with the host's features.
    #[default]
    HostModel,
    /// A named, common model (`model`), migratable across CPU generations.
    Custom,
}

/// Where vCPU threads and emulator threads may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pinning {
    /// Per vCPU index, the host CPUs its thread may run on (libvirt `vcpupin`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vcpus: BTreeMap<u32, CpuSet>,
    /// Host CPUs for the VMM's other threads (libvirt `emulatorpin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator: Option<CpuSet>,
}

/// Memory size, backing and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemorySpec {
    /// Guest RAM.
    pub size: Bytes,
    /// Back guest memory with hugepages of this size; absent means normal pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<HugepageSpec>,
    /// Lock guest memory (mlock): never swapped.
    #[serde(default)]
    pub locked: bool,
    /// Allow KSM to merge the guest's pages.
    #[serde(default)]
    pub share_pages: bool,
    /// cgroup memory limits (libvirt `memtune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<MemTune>,
    /// NUMA memory policy (libvirt `numatune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<NumaSpec>,
}

/// Hugepage backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HugepageSpec {
    /// 2MiB or 1GiB.
    pub page_size: PageSize,
}

/// Memory limits, as libvirt's `memtune` sets them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemTune {
    /// The most memory the guest's processes may use (`hard_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<Bytes>,
    /// What the guest is pushed back to under host memory pressure (`soft_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<Bytes>,
    /// Memory plus swap (`swap_hard_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_hard_limit: Option<Bytes>,
    /// Memory the guest keeps under pressure (`min_guarantee`; cgroup v2 `memory.min`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_guarantee: Option<Bytes>,
    /// Allow a `hardLimit` below the guest's memory size (the guest may be OOM-killed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_hard_limit_below_size: bool,
}

/// NUMA memory policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NumaSpec {
    /// How the nodeset binds memory.
    pub mode: NumaMode,
    /// Host NUMA nodes, in cpuset syntax.
    pub nodeset: CpuSet,
}

/// NUMA policy modes (mbind).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum NumaMode {
    /// Only these nodes (MPOL_BIND).
    Strict,
    /// These nodes first, others when they are full (MPOL_PREFERRED).
    Preferred,
    /// Spread across these nodes (MPOL_INTERLEAVE).
    Interleave,
}

/// Block I/O tuning (libvirt `blkiotune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IoSpec {
    /// Relative I/O weight, 100 to 1000.
    #[schemars(range(min = 100, max = 1000))]
    pub weight: u16,
}

/// Migration policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationPolicy {
    /// `live` moves the running guest; `cold` stops it and starts it on the destination.
    #[serde(default)]
    pub mode: MigrationMode,
    /// Longest pause allowed at switchover.
    #[serde(default = "MigrationPolicy::default_max_downtime")]
    pub max_downtime: Duration,
    /// Transfer cap; 0 is unlimited.
    #[serde(default)]
    pub bandwidth: Bandwidth,
    /// Throttle the guest's vCPUs when it dirties memory faster than the link.
    #[serde(default = "MigrationPolicy::default_auto_converge")]
    pub auto_converge: bool,
    /// Give up (or switch over) after this long per GiB of guest memory.
    #[serde(
        rename = "completionTimeoutPerGiB",
        default = "MigrationPolicy::default_completion_timeout"
    )]
    pub completion_timeout_per_gib: Duration,
    /// What to do past the completion timeout.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

impl MigrationPolicy {
    fn default_max_downtime() -> Duration {
        Duration::from_millis(30)
    }

    fn default_auto_converge() -> bool {
        true
    }

    fn default_completion_timeout() -> Duration {
        Duration::from_secs(60)
    }
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        MigrationPolicy {
            mode: MigrationMode::default(),
            max_downtime: Self::default_max_downtime(),
            bandwidth: Bandwidth::UNLIMITED,
            auto_converge: Self::default_auto_converge(),
            completion_timeout_per_gib: Self::default_completion_timeout(),
            on_timeout: OnTimeout::default(),
        }
    }
}

/// How a guest moves between hosts.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MigrationMode {
    /// Pre-copy live migration.
    #[default]
    Live,
    /// Stop, then start on the destination.
    Cold,
}

/// What a migration does past its completion timeout.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum OnTimeout {
    /// Give up; the guest keeps running on the source.
    #[default]
    Abort,
    /// Pause the guest and copy the rest, however long it takes.
    Switchover,
}

/// A KVM host and the host-wide settings berth keeps on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Host {
    /// Always `berth.dev/v1`.
    #[schemars(extend("const" = API_VERSION))]
    pub api_version: String,
    /// Always `Host`.
    #[schemars(extend("const" = "Host"))]
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The desired state.
    pub spec: HostSpec,
}

/// The desired state of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    /// `ip:port` of the host's `berth serve` API.
    pub address: String,
    /// The CPUs guests may be pinned to.
    pub cpus: CpuSet,
    /// CPUs kept for the host itself; never given to guests.
    #[serde(default, skip_serializing_if = "CpuSet::is_empty")]
    pub reserved_cpus: CpuSet,
    /// Memory available to guests.
    pub memory: Bytes,
    /// Hugepage pool per page size that berth keeps reserved, in pages.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hugepages: BTreeMap<PageSize, u64>,
    /// Kernel samepage merging.
    #[serde(default)]
    pub ksm: KsmSpec,
    /// Transparent hugepage mode (`/sys/kernel/mm/transparent_hugepage/enabled`).
    #[serde(default)]
    pub transparent_hugepages: ThpMode,
    /// Whether new guests may be placed here.
    #[serde(default = "default_true")]
    pub schedulable: bool,
    /// The host's CPU model as guests with `host-passthrough` see it (for example
    /// `AMD EPYC`); used to flag live migrations between unlike CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// What runs this host's guests. The planner classifies each change by what this
    /// driver can do, also in CI mode with no host access.
    #[serde(default)]
    pub driver: HostDriver,
}

/// What runs a host's guests.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum HostDriver {
    /// berth-vmm processes, one per guest (`berth serve --driver local`).
    #[default]
    Local,
}

fn default_true() -> bool {
    true
}

/// KSM settings (`/sys/kernel/mm/ksm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KsmSpec {
    /// `run` = 1.
    #[serde(default)]
    pub enabled: bool,
    /// `pages_to_scan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_to_scan: Option<u32>,
    /// `sleep_millisecs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_millisecs: Option<u32>,
}

/// Transparent hugepage modes.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ThpMode {
    /// THP for every anonymous mapping.
    Always,
    /// THP only where asked (berth asks for guest memory).
    #[default]
    Madvise,
    /// No THP.
    Never,
}

/// Repository-wide settings; at most one per repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fleet {
    /// Always `berth.dev/v1`.
    #[schemars(extend("const" = API_VERSION))]
    pub api_version: String,
    /// Always `Fleet`.
    #[schemars(extend("const" = "Fleet"))]
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The settings.
    #[serde(default)]
    pub spec: FleetSpec,
}

/// Repository-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FleetSpec {
    /// Stop guests that berth manages but no manifest names anymore.
    #[serde(default)]
    pub prune: bool,
    /// Migrations running at once across the fleet.
    #[serde(default = "FleetSpec::default_max_migrations")]
    pub max_concurrent_migrations: u32,
    /// Migrations running at once into or out of one host.
    #[serde(default = "FleetSpec::default_max_migrations_per_host")]
    pub max_concurrent_migrations_per_host: u32,
}

impl FleetSpec {
    fn default_max_migrations() -> u32 {
        4
    }

    fn default_max_migrations_per_host() -> u32 {
        1
    }
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            prune: false,
            max_concurrent_migrations: Self::default_max_migrations(),
            max_concurrent_migrations_per_host: Self::default_max_migrations_per_host(),
        }
    }
}
