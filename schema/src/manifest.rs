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
    /// The name of the `Host` the guest runs on. Exactly one of `host` and
    /// `hostSelector`; for a guest placed by selector, berth fills this in with the host
    /// the scheduler chose (never in git).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Place the guest on any schedulable Host whose labels include all of these; the
    /// fleet's elected leader chooses one with room (free pinned CPUs, hugepages,
    /// memory). `{}` matches every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_selector: Option<BTreeMap<String, String>>,
    /// With `hostSelector`: never place this guest on a host that runs another guest
    /// whose labels include all of these (for example `{app: db}` spreads the `app: db`
    /// replicas over hosts).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub anti_affinity: BTreeMap<String, String>,
    /// What happens to the guest when its host fails (with `hostSelector` only).
    #[serde(default, skip_serializing_if = "Availability::is_default")]
    pub availability: Availability,
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
    /// Disks, in order (libvirt driver only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network cards, in order (libvirt driver only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// How the guest moves between hosts, and how restart-class changes are applied.
    #[serde(default)]
    pub migration: MigrationPolicy,
    /// Whether berth may restart the guest when a change cannot be made live.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
}

impl GuestSpec {
    /// Whether the scheduler chooses the guest's host (`hostSelector`).
    pub fn placed_by_selector(&self) -> bool {
        self.host_selector.is_some()
    }

    /// Whether the guest is restarted elsewhere when its host fails.
    pub fn restarts_on_host_failure(&self) -> bool {
        self.availability.on_host_failure == OnHostFailure::Restart
    }
}

/// What happens to a guest when its host fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Availability {
    /// `none` (the default): the guest waits for its host to come back. `restart`: once
    /// the host's etcd lease has expired and the host must have fenced itself, the
    /// fleet's leader restarts the guest on another host that matches `hostSelector`.
    #[serde(default)]
    pub on_host_failure: OnHostFailure,
}

impl Availability {
    /// Whether this is the default (nothing happens on host failure).
    pub fn is_default(&self) -> bool {
        *self == Availability::default()
    }
}

/// What happens to a guest when its host fails.
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
pub enum OnHostFailure {
    /// Nothing: the guest runs again when its host does.
    #[default]
    None,
    /// Restart the guest on another host (HA), after its host fenced itself.
    Restart,
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
    /// `kernel` (the default) boots `kernel`, `initrd` and `cmdline` directly; `disk`
    /// lets the firmware boot from the disks, in their `bootOrder` (libvirt driver only).
    #[serde(default, skip_serializing_if = "BootFrom::is_kernel")]
    pub from: BootFrom,
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
            from: BootFrom::Kernel,
            kernel: Self::default_kernel(),
            initrd: None,
            cmdline: None,
            heartbeat: None,
        }
    }
}

/// Where a guest boots from.
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
pub enum BootFrom {
    /// The kernel named by `kernel` (a Linux image or `builtin:heartbeat`).
    #[default]
    Kernel,
    /// The firmware boots from the guest's disks.
    Disk,
}

impl BootFrom {
    /// Whether this is the default, a kernel boot.
    pub fn is_kernel(&self) -> bool {
        *self == BootFrom::Kernel
    }
}

/// A disk of a guest (libvirt `<disk type='file' device='disk'>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// Absolute path of the image file on the host.
    pub source: String,
    /// The bus the guest sees the disk on.
    #[serde(default)]
    pub bus: DiskBus,
    /// The image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Host page cache mode; `none` (O_DIRECT) is what live migration needs.
    #[serde(default)]
    pub cache: DiskCache,
    /// The guest cannot write to the disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Position in the firmware's boot order, from 1 (with `boot.from: disk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub boot_order: Option<u32>,
    /// The path is on storage every host sees (NFS, a cluster file system), so the
    /// guest can move live without copying the disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// The bus a disk is attached to.
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
pub enum DiskBus {
    /// virtio-blk (`vda`, `vdb`...).
    #[default]
    Virtio,
    /// AHCI (`sda`...).
    Sata,
    /// virtio-scsi (`sda`...).
    Scsi,
}

/// A disk image format.
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
pub enum DiskFormat {
    /// A plain image.
    #[default]
    Raw,
    /// QEMU copy-on-write.
    Qcow2,
}

/// Host page cache mode of a disk (QEMU's `cache=`).
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
pub enum DiskCache {
    /// O_DIRECT, no host cache; safe for live migration.
    #[default]
    None,
    /// Host cache, every write synced.
    Writethrough,
    /// Host cache, flushes on the guest's request.
    Writeback,
    /// O_DIRECT and every write synced.
    Directsync,
    /// Host cache, flushes ignored: loses data on a host crash.
    Unsafe,
}

/// A network card of a guest (libvirt `<interface>`); exactly one of `bridge` and
/// `network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Nic {
    /// A host bridge to attach to (`<interface type='bridge'>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// A libvirt network to attach to (`<interface type='network'>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The card the guest sees.
    #[serde(default)]
    pub model: NicModel,
    /// The MAC address, `52:54:00:xx:xx:xx` style; libvirt picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"))]
    pub mac: Option<String>,
}

/// The network card model.
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
pub enum NicModel {
    /// virtio-net.
    #[default]
    Virtio,
    /// Intel e1000, for guests without virtio drivers.
    E1000,
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
    /// What runs the host's guests: `berth-vmm` (the default) or `libvirt`.
    #[serde(default, skip_serializing_if = "HostDriver::is_berth_vmm")]
    pub driver: HostDriver,
    /// The libvirt connection, with `driver: libvirt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtSpec>,
}

impl HostSpec {
    /// The libvirt settings in force: the given ones, or the defaults.
    pub fn libvirt_or_default(&self) -> LibvirtSpec {
        self.libvirt.clone().unwrap_or_default()
    }
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
#[serde(rename_all = "kebab-case")]
pub enum HostDriver {
    /// berth's own VMM, one process per guest.
    #[default]
    BerthVmm,
    /// libvirtd and QEMU: disks, network cards, any OS.
    Libvirt,
}

impl HostDriver {
    /// Whether this is the default, berth-vmm.
    pub fn is_berth_vmm(&self) -> bool {
        *self == HostDriver::BerthVmm
    }

    /// The name as manifests spell it.
    pub fn as_str(&self) -> &'static str {
        match self {
            HostDriver::BerthVmm => "berth-vmm",
            HostDriver::Libvirt => "libvirt",
        }
    }
}

impl std::fmt::Display for HostDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How berth reaches libvirt on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LibvirtSpec {
    /// The connection URI.
    #[serde(default = "LibvirtSpec::default_uri")]
    pub uri: String,
    /// `kvm`, or `qemu` (TCG emulation) where KVM is missing or unusable.
    #[serde(default)]
    pub domain_type: DomainType,
    /// How the other hosts' libvirtd reach this host's libvirtd, for live migrations
    /// to this host (`qemu+tcp://10.0.0.2/system`, `qemu+tls://kvm02/system`). Without
    /// it, guests cannot be live-migrated to this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_uri: Option<String>,
    /// Where QEMU on this host receives a migration stream (`tcp://10.0.0.2`, a port
    /// is optional); default: `tcp://` and the host part of `remoteUri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uri: Option<String>,
}

impl LibvirtSpec {
    /// libvirt's system connection.
    pub const DEFAULT_URI: &'static str = "qemu:///system";

    fn default_uri() -> String {
        Self::DEFAULT_URI.to_owned()
    }

    /// Where the other hosts migrate guests to this host: (the URI their libvirtd
    /// opens, the URI QEMU streams to); `None` without `remoteUri`, or when its host
    /// part is missing and no `migrationUri` is given.
    pub fn migration_target(&self) -> Option<(String, String)> {
        let remote = self.remote_uri.clone()?;
        let stream = match &self.migration_uri {
            Some(uri) => uri.clone(),
            None => format!("tcp://{}", uri_host(&remote)?),
        };
        Some((remote, stream))
    }

    /// Whether the URI names no host (`qemu:///system`): libvirtd runs on the machine
    /// berth runs on.
    pub fn is_local(&self) -> bool {
        uri_host(&self.uri).is_none()
    }
}

/// The host part of a libvirt URI (`qemu+tcp://user@10.0.0.2:16509/system` ->
/// `10.0.0.2`), if it has one.
pub fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => host_port.split(':').next()?,
    };
    (!host.is_empty()).then_some(host)
}

impl Default for LibvirtSpec {
    fn default() -> Self {
        LibvirtSpec {
            uri: Self::default_uri(),
            domain_type: DomainType::default(),
            remote_uri: None,
            migration_uri: None,
        }
    }
}

/// libvirt's `<domain type=...>`.
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
pub enum DomainType {
    /// Hardware virtualization.
    #[default]
    Kvm,
    /// QEMU's TCG software emulation: slow, but needs no KVM.
    Qemu,
}

impl DomainType {
    /// The name libvirt uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
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
