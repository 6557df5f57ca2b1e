//! How each field change is applied: DESIGN.md's "What can change live" table.
//!
//! The table lives in exactly two functions: [`rule`] says what kind of change a field
//! is (the left column), [`resolve`] turns that into how berth applies it given the
//! guest's policies, the destination and what the host's driver declares it can do
//! ([`Capabilities`]) (the right column). Everything else in the reconciler asks these
//! two.
//!
//! A change the table calls live but the driver does not make live is applied like a
//! restart-class change: a local migration when the driver can make one, else a restart
//! when the policy allows, else blocked, with the reason. So a change is never shown
//! live unless the driver will make it live.
//!
//! Decisions beyond the table, so that an operator can predict them:
//! - `migration.mode: cold` is the operator's consent to stop and start the guest
//!   whenever it would otherwise be live-migrated: a host change becomes a cold move and
//!   a restart-class change a cold restart, without `restartPolicy: ifRequired`.
//! - A decrease of vCPUs or of memory size cannot be done live or by migration (no
//!   hot-remove; migrating into a smaller VMM would take RAM away from a running kernel):
//!   it needs `restartPolicy: ifRequired`, else it is blocked.
//! - A host change to a host whose CPU differs, for a guest that sees the host CPU
//!   (`host-passthrough`, `host-model`), is done cold when `restartPolicy: ifRequired`,
//!   else blocked.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use berth_schema::{MigrationMode, MigrationPolicy, NumaSpec, RestartPolicy};

use crate::diff::Field;
use crate::driver::{Capabilities, CrossHost};
use crate::model::ObservedGuest;

/// What kind of change a field change is (the left column of DESIGN.md's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Rule {
    /// Applied to the running guest: re-pin threads, write cgroup files, hot-add vCPUs,
    /// pause or resume, record metadata.
    Live,
    /// Restart class: needs a new VMM, built by a local live migration.
    RestartClass,
    /// A decrease that no running guest survives (no vCPU or memory hot-remove).
    NeedsRestart,
    /// Host placement: a migration to another host.
    Placement,
}

/// The rule for one field change, from the observed and the desired guest.
pub fn rule(field: Field, observed: &ObservedGuest, wanted: &ObservedGuest) -> Rule {
    match field {
        // vcpupin / emulatorpin --live, memtune --live, blkiotune --live.
        Field::VcpuPinning
        | Field::EmulatorPinning
        | Field::HardLimit
        | Field::SoftLimit
        | Field::SwapHardLimit
        | Field::MinGuarantee
        | Field::IoWeight => Rule::Live,
        // madvise(MADV_MERGEABLE / MADV_UNMERGEABLE) on guest memory.
        Field::SharePages => Rule::Live,
        // Pause and resume are live; stop and start are planned separately.
        Field::State => Rule::Live,
        // Labels and annotations are only recorded.
        Field::Labels | Field::Annotations => Rule::Live,
        // Hot-add up to maxVcpus; there is no hot-remove.
        Field::Vcpus if wanted.cpu.vcpus > observed.cpu.vcpus => Rule::Live,
        Field::Vcpus => Rule::NeedsRestart,
        // numatune --live changes the nodeset of a strict policy; anything else rebuilds.
        Field::Numa if numa_nodeset_only(&observed.memory.numa, &wanted.memory.numa) => Rule::Live,
        Field::Numa => Rule::RestartClass,
        Field::MemorySize if wanted.memory.size < observed.memory.size => Rule::NeedsRestart,
        Field::MemorySize
        | Field::Hugepages
        | Field::Locked
        | Field::MaxVcpus
        | Field::CpuMode
        | Field::CpuModel
        | Field::Boot => Rule::RestartClass,
        Field::Host => Rule::Placement,
    }
}

fn numa_nodeset_only(from: &Option<NumaSpec>, to: &Option<NumaSpec>) -> bool {
    matches!((from, to), (Some(a), Some(b)) if a.mode == b.mode
        && a.mode == berth_schema::NumaMode::Strict)
}

/// How one change is applied (the right column of DESIGN.md's table).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "class", content = "reason")]
pub enum ChangeClass {
    /// Applied to the running guest.
    Live,
    /// A live migration into a new VMM on the same host.
    LocalMigration,
    /// A live migration to another host.
    Migration,
    /// Stop, then start (on the same or another host), as `migration.mode: cold` allows.
    Cold,
    /// Stop, then start, as `restartPolicy: ifRequired` allows.
    Restart,
    /// Cannot be applied; the reason says why and what would unblock it.
    Blocked(String),
}

impl ChangeClass {
    /// Whether the change stops the guest for a while.
    pub fn stops_guest(&self) -> bool {
        matches!(self, ChangeClass::Cold | ChangeClass::Restart)
    }
}

/// The outcome of the migration pre-checks against a destination host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The guest can run there and be live-migrated there.
    Compatible,
    /// The guest can run there but not be live-migrated (its CPU differs).
    CpuDiffers(String),
    /// The guest cannot run there at all.
    Unusable(String),
}

/// The policies of a guest that decide between the gentler and the harder ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// `spec.migration`.
    pub migration: MigrationPolicy,
    /// `spec.restartPolicy`.
    pub restart: RestartPolicy,
}

/// How a change of kind `rule` is applied under `policy` by a driver that declares
/// `capabilities` (the source host's, for a move); `destination` is the outcome of the
/// migration pre-checks, needed for [`Rule::Placement`] only.
pub fn resolve(
    field: Field,
    rule: Rule,
    policy: Policy,
    destination: Option<&Destination>,
    capabilities: &Capabilities,
) -> ChangeClass {
    let cold = policy.migration.mode == MigrationMode::Cold;
    let may_restart = policy.restart == RestartPolicy::IfRequired && capabilities.restart;
    let driver = capabilities.driver;
    match rule {
        Rule::Live if capabilities.changes_live(field) => ChangeClass::Live,
        Rule::Live | Rule::RestartClass => {
            let why = if rule == Rule::Live {
                format!("the {driver} driver cannot change {field} in a running guest")
            } else {
                format!("{field} needs a new VMM")
            };
            if cold && capabilities.restart {
                ChangeClass::Cold
            } else if capabilities.local_migration {
                ChangeClass::LocalMigration
            } else if may_restart {
                ChangeClass::Restart
            } else {
                ChangeClass::Blocked(format!(
                    "{why} and the {driver} driver cannot migrate it locally into one; \
                     set restartPolicy: ifRequired to allow a restart"
                ))
            }
        }
        Rule::NeedsRestart if may_restart => ChangeClass::Restart,
        Rule::NeedsRestart => ChangeClass::Blocked(format!(
            "{field} cannot decrease in a running guest (no hot-remove) and restartPolicy is never; \
             set restartPolicy: ifRequired to allow a restart"
        )),
        Rule::Placement => {
            let cpu_differs = match destination.unwrap_or(&Destination::Compatible) {
                Destination::Unusable(reason) => return ChangeClass::Blocked(reason.clone()),
                Destination::Compatible => None,
                Destination::CpuDiffers(reason) => Some(reason.clone()),
            };
            let why_not_live = match (capabilities.cross_host, cpu_differs) {
                (CrossHost::No, _) => {
                    return ChangeClass::Blocked(format!(
                        "the {driver} driver does not move guests to other hosts"
                    ))
                }
                (CrossHost::Live, None) if cold => return ChangeClass::Cold,
                (CrossHost::Live, None) => return ChangeClass::Migration,
                (CrossHost::Live, Some(reason)) => reason,
                (CrossHost::Cold, _) => {
                    format!("the {driver} driver moves guests to other hosts only cold")
                }
            };
            if cold || may_restart {
                ChangeClass::Cold
            } else {
                ChangeClass::Blocked(format!(
                    "{why_not_live}: no live migration; set restartPolicy: ifRequired or \
                     migration.mode: cold to move it cold"
                ))
            }
        }
    }
}

/// Whether a guest with this CPU mode may live-migrate between two CPUs, per the seeds:
/// the same vendor and the same feature flags unless the guest sees a common named model;
/// the same model for `host-passthrough`; a 64-bit guest only to a 64-bit host.
/// Unknown values (empty in CI mode) are not held against the move.
pub fn cpu_compatible(
    mode: berth_schema::CpuMode,
    from: &crate::model::CpuInfo,
    to: &crate::model::CpuInfo,
) -> Result<(), String> {
    use berth_schema::CpuMode;
    fn known_and_differ<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
        matches!((a, b), (Some(a), Some(b)) if a != b)
    }
    if from.flags.contains("lm") && !to.flags.is_empty() && !to.flags.contains("lm") {
        return Err("the destination CPU is not 64-bit (no lm flag)".into());
    }
    if mode == CpuMode::Custom {
        return Ok(());
    }
    if known_and_differ(&from.vendor, &to.vendor) {
        return Err(format!(
            "CPU vendor differs ({} -> {})",
            from.vendor.as_deref().unwrap_or_default(),
            to.vendor.as_deref().unwrap_or_default()
        ));
    }
    if mode == CpuMode::HostPassthrough && known_and_differ(&from.model, &to.model) {
        return Err(format!(
            "CPU model differs for a host-passthrough guest ({} -> {})",
            from.model.as_deref().unwrap_or_default(),
            to.model.as_deref().unwrap_or_default()
        ));
    }
    if !from.flags.is_empty() && !to.flags.is_empty() && from.flags != to.flags {
        let missing: Vec<&str> = from
            .flags
            .difference(&to.flags)
            .map(String::as_str)
            .collect();
        let extra: Vec<&str> = to
            .flags
            .difference(&from.flags)
            .map(String::as_str)
            .collect();
        return Err(format!(
            "CPU flags differ (destination lacks [{}], adds [{}])",
            missing.join(" "),
            extra.join(" ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! One test per row of DESIGN.md's table, plus the decisions in the module docs.

    use berth_schema::{Bytes, CpuMode, CpuSet, MemTune, NumaMode, PageSize, Pinning};

    use super::*;
    use crate::driver::DriverKind;
    use crate::model::{CpuInfo, ObservedCpu, ObservedMemory};

    fn guest() -> ObservedGuest {
        ObservedGuest {
            name: "web-1".into(),
            host: "kvm01".into(),
            state: berth_schema::GuestState::Running,
            boot: berth_schema::Boot::default(),
            cpu: ObservedCpu {
                vcpus: 2,
                max_vcpus: 4,
                mode: CpuMode::HostModel,
                model: None,
                pinning: None,
            },
            memory: ObservedMemory {
                size: Bytes::mib(256),
                hugepages: None,
                locked: false,
                share_pages: false,
                tune: None,
                numa: None,
            },
            io_weight: None,
            labels: Default::default(),
            annotations: Default::default(),
            migrating_to: None,
            unresponsive: None,
        }
    }

    type TuneEdit = fn(&mut MemTune);
    type GuestEdit = fn(&mut ObservedGuest);

    fn live_policy() -> Policy {
        Policy::default()
    }

    fn cold_policy() -> Policy {
        let mut p = Policy::default();
        p.migration.mode = MigrationMode::Cold;
        p
    }

    fn restart_policy() -> Policy {
        Policy {
            restart: RestartPolicy::IfRequired,
            ..Policy::default()
        }
    }

    /// Classifies the single change `edit` makes to the observed guest.
    fn classify(edit: impl FnOnce(&mut ObservedGuest), policy: Policy) -> (Field, ChangeClass) {
        classify_to(edit, policy, Destination::Compatible)
    }

    fn classify_to(
        edit: impl FnOnce(&mut ObservedGuest),
        policy: Policy,
        dest: Destination,
    ) -> (Field, ChangeClass) {
        let observed = guest();
        let mut wanted = guest();
        edit(&mut wanted);
        let diffs = crate::diff::diff_guest(&observed, &wanted);
        assert_eq!(diffs.len(), 1, "the edit changes one field: {diffs:?}");
        let field = diffs[0].field;
        let r = rule(field, &observed, &wanted);
        let caps = DriverKind::Local.capabilities();
        (field, resolve(field, r, policy, Some(&dest), &caps))
    }

    fn pin(g: &mut ObservedGuest) {
        g.cpu.pinning = Some(Pinning {
            vcpus: [(0, "0".parse().unwrap()), (1, "1".parse().unwrap())].into(),
            emulator: None,
        });
    }

    #[test]
    fn row_vcpu_pinning_is_live() {
        assert_eq!(
            classify(pin, live_policy()),
            (Field::VcpuPinning, ChangeClass::Live)
        );
    }

    #[test]
    fn row_emulator_pinning_is_live() {
        let (field, class) = classify(
            |g| {
                g.cpu.pinning = Some(Pinning {
                    vcpus: Default::default(),
                    emulator: Some(CpuSet::from_iter([0, 1])),
                })
            },
            live_policy(),
        );
        assert_eq!((field, class), (Field::EmulatorPinning, ChangeClass::Live));
    }

    #[test]
    fn row_memtune_limits_are_live() {
        let edits: [(Field, TuneEdit); 4] = [
            (Field::HardLimit, |t| t.hard_limit = Some(Bytes::mib(320))),
            (Field::SoftLimit, |t| t.soft_limit = Some(Bytes::mib(200))),
            (Field::SwapHardLimit, |t| {
                t.swap_hard_limit = Some(Bytes::mib(512))
            }),
            (Field::MinGuarantee, |t| {
                t.min_guarantee = Some(Bytes::mib(64))
            }),
        ];
        for (expected, edit) in edits {
            let got = classify(
                |g| {
                    let mut tune = MemTune::default();
                    edit(&mut tune);
                    g.memory.tune = Some(tune);
                },
                cold_policy(),
            );
            assert_eq!(got, (expected, ChangeClass::Live), "{expected}");
        }
    }

    #[test]
    fn row_io_weight_is_live() {
        assert_eq!(
            classify(|g| g.io_weight = Some(700), live_policy()),
            (Field::IoWeight, ChangeClass::Live)
        );
    }

    #[test]
    fn row_vcpus_up_to_max_is_live_hot_add() {
        assert_eq!(
            classify(|g| g.cpu.vcpus = 4, live_policy()),
            (Field::Vcpus, ChangeClass::Live)
        );
    }

    #[test]
    fn row_vcpu_decrease_is_blocked_without_restart_policy() {
        let (field, class) = classify(|g| g.cpu.vcpus = 1, live_policy());
        assert_eq!(field, Field::Vcpus);
        let ChangeClass::Blocked(reason) = class else {
            panic!("expected blocked, got {class:?}")
        };
        assert!(reason.contains("no hot-remove"), "{reason}");
        assert!(reason.contains("restartPolicy: ifRequired"), "{reason}");
    }

    #[test]
    fn row_vcpu_decrease_restarts_with_restart_policy() {
        assert_eq!(
            classify(|g| g.cpu.vcpus = 1, restart_policy()),
            (Field::Vcpus, ChangeClass::Restart)
        );
    }

    #[test]
    fn row_state_change_is_live() {
        assert_eq!(
            classify(
                |g| g.state = berth_schema::GuestState::Paused,
                live_policy()
            ),
            (Field::State, ChangeClass::Live)
        );
    }

    #[test]
    fn row_host_placement_is_a_live_migration_when_compatible() {
        assert_eq!(
            classify(|g| g.host = "kvm02".into(), live_policy()),
            (Field::Host, ChangeClass::Migration)
        );
    }

    #[test]
    fn row_host_placement_is_cold_with_cold_mode() {
        assert_eq!(
            classify(|g| g.host = "kvm02".into(), cold_policy()),
            (Field::Host, ChangeClass::Cold)
        );
    }

    #[test]
    fn row_host_placement_to_a_different_cpu_is_blocked_or_cold() {
        let differs = || Destination::CpuDiffers("CPU model differs".into());
        let (_, class) = classify_to(|g| g.host = "kvm02".into(), live_policy(), differs());
        assert!(matches!(class, ChangeClass::Blocked(ref r) if r.contains("CPU model differs")));
        let (_, class) = classify_to(|g| g.host = "kvm02".into(), restart_policy(), differs());
        assert_eq!(class, ChangeClass::Cold);
    }

    #[test]
    fn row_host_placement_to_an_unusable_host_is_blocked() {
        let dest = Destination::Unusable("kvm02 has no 1GiB hugepage pool".into());
        let (_, class) = classify_to(|g| g.host = "kvm02".into(), cold_policy(), dest);
        assert_eq!(
            class,
            ChangeClass::Blocked("kvm02 has no 1GiB hugepage pool".into())
        );
    }

    #[test]
    fn row_restart_class_fields_are_local_migrations() {
        let edits: [(Field, GuestEdit); 7] = [
            (Field::Hugepages, |g| {
                g.memory.hugepages = Some(PageSize::Huge2M)
            }),
            (Field::MemorySize, |g| g.memory.size = Bytes::mib(512)),
            (Field::MaxVcpus, |g| g.cpu.max_vcpus = 8),
            (Field::CpuMode, |g| g.cpu.mode = CpuMode::HostPassthrough),
            (Field::CpuModel, |g| g.cpu.model = Some("kvm64".into())),
            (Field::Boot, |g| g.boot.kernel = "/boot/vmlinuz".into()),
            (Field::Locked, |g| g.memory.locked = true),
        ];
        for (expected, edit) in edits {
            assert_eq!(
                classify(edit, live_policy()),
                (expected, ChangeClass::LocalMigration),
                "{expected}"
            );
            assert_eq!(
                classify(edit, cold_policy()),
                (expected, ChangeClass::Cold),
                "{expected} with migration.mode cold"
            );
        }
    }

    #[test]
    fn memory_decrease_needs_a_restart() {
        let (_, class) = classify(|g| g.memory.size = Bytes::mib(128), live_policy());
        assert!(matches!(class, ChangeClass::Blocked(_)), "{class:?}");
        assert_eq!(
            classify(|g| g.memory.size = Bytes::mib(128), restart_policy()).1,
            ChangeClass::Restart
        );
    }

    #[test]
    fn numa_nodeset_is_live_in_strict_mode_and_restart_class_otherwise() {
        let numa = |mode, nodes: &str| {
            Some(NumaSpec {
                mode,
                nodeset: nodes.parse().unwrap(),
            })
        };
        let observed = {
            let mut g = guest();
            g.memory.numa = numa(NumaMode::Strict, "0");
            g
        };
        let mut wanted = observed.clone();
        wanted.memory.numa = numa(NumaMode::Strict, "1");
        assert_eq!(rule(Field::Numa, &observed, &wanted), Rule::Live);
        wanted.memory.numa = numa(NumaMode::Interleave, "0-1");
        assert_eq!(rule(Field::Numa, &observed, &wanted), Rule::RestartClass);
    }

    #[test]
    fn metadata_is_live_and_share_pages_follows_the_local_driver() {
        assert_eq!(
            classify(
                |g| {
                    g.labels.insert("tier".into(), "web".into());
                },
                live_policy()
            ),
            (Field::Labels, ChangeClass::Live)
        );
        // berth-vmm gives KSM advice when it maps guest memory: a new VMM.
        assert_eq!(
            classify(|g| g.memory.share_pages = true, live_policy()),
            (Field::SharePages, ChangeClass::LocalMigration)
        );
    }

    fn with_caps(
        field: Field,
        rule: Rule,
        policy: Policy,
        edit: impl FnOnce(&mut Capabilities),
    ) -> ChangeClass {
        let mut caps = DriverKind::Local.capabilities();
        edit(&mut caps);
        resolve(field, rule, policy, Some(&Destination::Compatible), &caps)
    }

    #[test]
    fn a_change_the_driver_cannot_make_live_is_never_live() {
        let no_share = |c: &mut Capabilities| {
            c.live.remove(&Field::IoWeight);
        };
        assert_eq!(
            with_caps(Field::IoWeight, Rule::Live, live_policy(), no_share),
            ChangeClass::LocalMigration
        );
        let nothing_local = |c: &mut Capabilities| {
            c.live.remove(&Field::IoWeight);
            c.local_migration = false;
        };
        let class = with_caps(Field::IoWeight, Rule::Live, live_policy(), nothing_local);
        let ChangeClass::Blocked(reason) = class else {
            panic!("expected blocked, got {class:?}")
        };
        assert!(
            reason.contains("the local driver cannot change spec.io.weight in a running guest"),
            "{reason}"
        );
        assert_eq!(
            with_caps(Field::IoWeight, Rule::Live, restart_policy(), nothing_local),
            ChangeClass::Restart
        );
        assert_eq!(
            with_caps(
                Field::Hugepages,
                Rule::RestartClass,
                restart_policy(),
                nothing_local
            ),
            ChangeClass::Restart
        );
    }

    #[test]
    fn placement_follows_how_the_driver_moves_guests() {
        let cold_only = |c: &mut Capabilities| c.cross_host = CrossHost::Cold;
        let class = with_caps(Field::Host, Rule::Placement, live_policy(), cold_only);
        assert!(
            matches!(class, ChangeClass::Blocked(ref r) if r.contains("only cold")),
            "{class:?}"
        );
        assert_eq!(
            with_caps(Field::Host, Rule::Placement, cold_policy(), cold_only),
            ChangeClass::Cold
        );
        let class = with_caps(Field::Host, Rule::Placement, cold_policy(), |c| {
            c.cross_host = CrossHost::No
        });
        assert!(matches!(class, ChangeClass::Blocked(_)), "{class:?}");
    }

    #[test]
    fn cpu_compatibility_follows_the_seeds() {
        let cpu = |vendor: &str, model: &str, flags: &[&str]| CpuInfo {
            vendor: Some(vendor.into()),
            model: Some(model.into()),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        let a = cpu("GenuineIntel", "Xeon E5", &["lm", "nx", "vmx"]);
        let b = cpu("GenuineIntel", "Xeon Gold", &["lm", "nx", "vmx"]);
        let c = cpu("GenuineIntel", "Xeon E5", &["lm", "vmx"]);
        let amd = cpu("AuthenticAMD", "EPYC", &["lm", "nx", "svm"]);
        let no_lm = cpu("GenuineIntel", "Atom", &["nx"]);
        assert!(cpu_compatible(CpuMode::HostPassthrough, &a, &a).is_ok());
        assert!(cpu_compatible(CpuMode::HostPassthrough, &a, &b)
            .unwrap_err()
            .contains("model differs"));
        assert!(cpu_compatible(CpuMode::HostModel, &a, &b).is_ok());
        assert!(cpu_compatible(CpuMode::HostModel, &a, &c)
            .unwrap_err()
            .contains("lacks [nx]"));
        assert!(cpu_compatible(CpuMode::HostModel, &a, &amd)
            .unwrap_err()
            .contains("vendor"));
        assert!(cpu_compatible(CpuMode::Custom, &a, &amd).is_ok());
        assert!(cpu_compatible(CpuMode::Custom, &a, &no_lm)
            .unwrap_err()
            .contains("64-bit"));
        assert!(cpu_compatible(CpuMode::HostPassthrough, &CpuInfo::default(), &a).is_ok());
    }
}
