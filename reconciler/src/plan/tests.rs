//! The plan on plain values: every operation, every ordering rule. Plans that change
//! anything are also run through the simulated fleet with the releases of each wave
//! last, so an action ordered before the room it needs fails there; and a second plan
//! after the run must be empty.

use std::collections::HashMap;

use berth_schema::{
    Boot, Bytes, CpuMode, CpuSpec, FleetSpec, Guest, GuestSpec, GuestState, Host, HostDriver,
    HostSpec, HugepageSpec, KsmSpec, MemorySpec, Metadata, MigrationMode, MigrationPolicy,
    PageSize, Pinning, RestartPolicy, ThpMode, API_VERSION,
};

use super::*;
use crate::apply::execute_step;
use crate::driver::{Driver, FleetCapabilities, SimDriver};
use crate::model::{Desired, Observed, ObservedHost};

fn host(name: &str, cpus: &str, memory: Bytes) -> Host {
    Host {
        api_version: API_VERSION.into(),
        kind: "Host".into(),
        metadata: Metadata {
            name: name.into(),
            ..Metadata::default()
        },
        spec: HostSpec {
            address: "127.0.0.1:7410".into(),
            cpus: cpus.parse().unwrap(),
            reserved_cpus: Default::default(),
            memory,
            hugepages: Default::default(),
            ksm: KsmSpec::default(),
            transparent_hugepages: ThpMode::Madvise,
            schedulable: true,
            cpu_model: None,
            driver: HostDriver::BerthVmm,
            libvirt: None,
        },
    }
}

fn guest(name: &str, host: &str, memory: Bytes) -> Guest {
    Guest {
        api_version: API_VERSION.into(),
        kind: "Guest".into(),
        metadata: Metadata {
            name: name.into(),
            ..Metadata::default()
        },
        spec: GuestSpec {
            host: host.into(),
            host_selector: None,
            anti_affinity: Default::default(),
            availability: Default::default(),
            state: GuestState::Running,
            boot: Boot::default(),
            cpu: CpuSpec {
                vcpus: 1,
                max_vcpus: Some(2),
                mode: CpuMode::HostModel,
                model: None,
                pinning: None,
                dedicated: false,
            },
            memory: MemorySpec {
                size: memory,
                hugepages: None,
                locked: false,
                share_pages: false,
                tune: None,
                numa: None,
            },
            io: None,
            disks: Vec::new(),
            nics: Vec::new(),
            migration: MigrationPolicy::default(),
            restart_policy: RestartPolicy::Never,
        },
    }
}

const G: Bytes = Bytes::gib(1);

fn gib(n: u64) -> Bytes {
    Bytes::gib(n)
}

/// A fleet where `base` runs as written.
struct Case {
    base: Desired,
    head: Desired,
}

impl Case {
    fn new(hosts: Vec<Host>, guests: Vec<Guest>) -> Self {
        let base = Desired {
            guests,
            hosts,
            fleet: FleetSpec::default(),
            placements: Default::default(),
        };
        Case {
            head: base.clone(),
            base,
        }
    }

    fn edit(&mut self, name: &str, f: impl FnOnce(&mut Guest)) -> &mut Self {
        let g = self
            .head
            .guests
            .iter_mut()
            .find(|g| g.metadata.name == name)
            .unwrap();
        f(g);
        self
    }

    fn edit_host(&mut self, name: &str, f: impl FnOnce(&mut Host)) -> &mut Self {
        let h = self
            .head
            .hosts
            .iter_mut()
            .find(|h| h.metadata.name == name)
            .unwrap();
        f(h);
        self
    }

    fn observed(&self) -> Observed {
        Observed::as_written(&self.base)
    }

    fn plan(&self) -> Plan {
        plan(&self.head, &self.observed(), &FleetCapabilities::default())
    }

    /// Plans, runs the plan on the simulated fleet (releases last in each wave), and
    /// checks that the fleet then matches the head: a second plan is empty.
    fn plan_and_run(&self) -> Plan {
        let p = self.plan();
        let sim = SimDriver::from_observed(self.observed());
        run_releases_last(&p, &self.head, &sim);
        let again = plan(
            &self.head,
            &sim.observe().unwrap(),
            &FleetCapabilities::default(),
        );
        let left: Vec<_> = again
            .guests
            .iter()
            .filter(|g| !matches!(g.operation, Operation::Blocked | Operation::Orphan))
            .collect();
        assert!(
            again.steps.is_empty() && left.is_empty(),
            "not converged after the run: {again:#?}"
        );
        p
    }
}

/// Runs each wave with every action that only releases (stops) after the others, so a
/// start that counted on a stop of its own wave fails on capacity.
fn run_releases_last(p: &Plan, desired: &Desired, sim: &SimDriver) {
    let guests: HashMap<&str, &Guest> = desired
        .guests
        .iter()
        .map(|g| (g.metadata.name.as_str(), g))
        .collect();
    for wave in 0..p.waves() {
        let mut steps: Vec<&Step> = p.steps.iter().filter(|s| s.wave == wave).collect();
        steps.sort_by_key(|s| matches!(s.action, Action::Stop { .. }));
        for step in steps {
            execute_step(step, &guests, sim)
                .unwrap_or_else(|e| panic!("wave {wave}: {:?} failed: {e}", step.action));
        }
    }
}

fn op(p: &Plan, name: &str) -> Operation {
    p.guests
        .iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("{name} not in the plan: {p:#?}"))
        .operation
}

fn guest_plan<'p>(p: &'p Plan, name: &str) -> &'p GuestPlan {
    p.guests.iter().find(|g| g.name == name).unwrap()
}

fn wave_of(p: &Plan, pred: impl Fn(&Action) -> bool) -> u32 {
    p.steps
        .iter()
        .find(|s| pred(&s.action))
        .unwrap_or_else(|| panic!("no such step in {:#?}", p.steps))
        .wave
}

fn is_start(name: &str) -> impl Fn(&Action) -> bool + '_ {
    move |a| matches!(a, Action::Start { guest, .. } if guest == name)
}

fn is_stop(name: &str) -> impl Fn(&Action) -> bool + '_ {
    move |a| matches!(a, Action::Stop { guest, .. } if guest == name)
}

fn is_migrate<'n>(name: &'n str, to_host: &'n str) -> impl Fn(&Action) -> bool + 'n {
    move |a| matches!(a, Action::Migrate { guest, to, .. } if guest == name && to == to_host)
}

fn two_hosts() -> Vec<Host> {
    vec![host("h1", "0-3", gib(8)), host("h2", "0-3", gib(8))]
}

// ---- operations ----------------------------------------------------------------

#[test]
fn nothing_changed_is_an_empty_plan() {
    let case = Case::new(two_hosts(), vec![guest("a", "h1", G), guest("b", "h2", G)]);
    let p = case.plan();
    assert!(!p.has_changes(), "{p:#?}");
    assert!(p.guests.is_empty() && p.hosts.is_empty());
    assert_eq!(p.summary, Summary::default());
}

#[test]
fn a_new_guest_starts() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.head.guests.push(guest("b", "h2", G));
    let p = case.plan_and_run();
    assert_eq!(op(&p, "b"), Operation::Start);
    assert_eq!(p.summary.start, 1);
    assert_eq!(p.steps.len(), 1);
}

#[test]
fn a_guest_set_to_stopped_stops() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| g.spec.state = GuestState::Stopped);
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::Stop);
    assert!(matches!(
        p.steps[0].action,
        Action::Stop {
            reason: StopReason::Desired,
            ..
        }
    ));
}

#[test]
fn pause_is_a_live_retune() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| g.spec.state = GuestState::Paused);
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::Retune);
}

#[test]
fn pinning_and_memtune_are_retuned_live() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| {
        g.spec.cpu.pinning = Some(Pinning {
            vcpus: [(0, "2".parse().unwrap())].into(),
            emulator: Some("3".parse().unwrap()),
        });
        g.spec.memory.tune = Some(berth_schema::MemTune {
            hard_limit: Some(gib(2)),
            ..Default::default()
        });
    });
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::Retune);
    let Action::Retune { fields, .. } = &p.steps[0].action else {
        panic!("{:?}", p.steps)
    };
    assert_eq!(
        fields,
        &[Field::VcpuPinning, Field::EmulatorPinning, Field::HardLimit]
    );
    assert!(guest_plan(&p, "a")
        .changes
        .iter()
        .all(|c| c.class == ChangeClass::Live));
}

#[test]
fn pinning_to_cpus_the_host_lacks_is_blocked() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| {
        g.spec.cpu.pinning = Some(Pinning {
            vcpus: [(0, "7".parse().unwrap())].into(),
            emulator: None,
        })
    });
    let p = case.plan();
    assert_eq!(op(&p, "a"), Operation::Blocked);
    assert!(guest_plan(&p, "a")
        .reason
        .as_ref()
        .unwrap()
        .contains("no CPU 7"));
    assert!(p.steps.is_empty());
}

#[test]
fn hugepage_backing_is_a_local_migration() {
    let mut hosts = two_hosts();
    hosts[0].spec.hugepages.insert(PageSize::Huge2M, 1024);
    let mut case = Case::new(hosts, vec![guest("a", "h1", G)]);
    case.edit("a", |g| {
        g.spec.memory.hugepages = Some(HugepageSpec {
            page_size: PageSize::Huge2M,
        })
    });
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::LocalMigrate);
    assert!(matches!(p.steps[0].action, Action::LocalMigrate { .. }));
    assert_eq!(p.summary.migrate, 1);
}

#[test]
fn hugepage_backing_on_a_host_without_the_pool_is_blocked() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| {
        g.spec.memory.hugepages = Some(HugepageSpec {
            page_size: PageSize::Huge1G,
        })
    });
    let p = case.plan();
    assert_eq!(op(&p, "a"), Operation::Blocked);
    assert!(guest_plan(&p, "a")
        .reason
        .as_ref()
        .unwrap()
        .contains("keeps no 1GiB hugepage pool"));
}

#[test]
fn a_host_change_is_a_live_migration() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| g.spec.host = "h2".into());
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::Migrate);
    assert_eq!(guest_plan(&p, "a").to.as_deref(), Some("h2"));
    assert!(
        matches!(&p.steps[0].action, Action::Migrate { from, to, .. } if from == "h1" && to == "h2")
    );
}

#[test]
fn a_host_change_with_cold_mode_is_a_cold_migration() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| {
        g.spec.host = "h2".into();
        g.spec.migration.mode = MigrationMode::Cold;
    });
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::ColdMigrate);
    assert!(matches!(p.steps[0].action, Action::ColdMigrate { .. }));
}

#[test]
fn a_host_passthrough_guest_to_another_cpu_model_is_blocked() {
    let mut hosts = two_hosts();
    hosts[0].spec.cpu_model = Some("EPYC 7002".into());
    hosts[1].spec.cpu_model = Some("EPYC 9004".into());
    let mut g = guest("a", "h1", G);
    g.spec.cpu.mode = CpuMode::HostPassthrough;
    let mut case = Case::new(hosts, vec![g]);
    case.edit("a", |g| g.spec.host = "h2".into());
    let p = case.plan();
    assert_eq!(op(&p, "a"), Operation::Blocked);
    assert!(guest_plan(&p, "a")
        .reason
        .as_ref()
        .unwrap()
        .contains("CPU model differs for a host-passthrough guest (EPYC 7002 -> EPYC 9004)"));
    case.edit("a", |g| g.spec.restart_policy = RestartPolicy::IfRequired);
    assert_eq!(op(&case.plan_and_run(), "a"), Operation::ColdMigrate);
}

#[test]
fn vcpu_decrease_restarts_only_when_allowed() {
    let mut g = guest("a", "h1", G);
    g.spec.cpu.vcpus = 2;
    let mut case = Case::new(two_hosts(), vec![g]);
    case.edit("a", |g| g.spec.cpu.vcpus = 1);
    let p = case.plan();
    assert_eq!(op(&p, "a"), Operation::Blocked);
    assert_eq!(p.summary.blocked, 1);
    case.edit("a", |g| g.spec.restart_policy = RestartPolicy::IfRequired);
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::Restart);
    assert_eq!(p.summary.restart, 1);
}

#[test]
fn a_blocked_change_holds_back_the_guests_live_changes_too() {
    let mut g = guest("a", "h1", G);
    g.spec.cpu.vcpus = 2;
    let mut case = Case::new(two_hosts(), vec![g]);
    case.edit("a", |g| {
        g.spec.cpu.vcpus = 1;
        g.spec.io = Some(berth_schema::IoSpec { weight: 300 });
    });
    let p = case.plan();
    assert_eq!(op(&p, "a"), Operation::Blocked);
    assert!(p.steps.is_empty());
}

#[test]
fn unknown_and_unschedulable_hosts_are_blocked() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.head.guests.push(guest("new", "h9", G));
    case.edit_host("h2", |h| h.spec.schedulable = false);
    case.edit("a", |g| g.spec.host = "h2".into());
    let p = case.plan();
    assert!(guest_plan(&p, "new")
        .reason
        .as_ref()
        .unwrap()
        .contains("host h9 is not declared"));
    assert!(guest_plan(&p, "a")
        .reason
        .as_ref()
        .unwrap()
        .contains("host h2 is not schedulable"));
    assert_eq!(p.summary.blocked, 2);
}

#[test]
fn a_host_nobody_observed_blocks_its_guests() {
    let mut case = Case::new(two_hosts(), vec![]);
    case.head.hosts.push(host("h3", "0-3", gib(8)));
    case.head.guests.push(guest("a", "h3", G));
    let p = case.plan();
    assert!(guest_plan(&p, "a")
        .reason
        .as_ref()
        .unwrap()
        .contains("not observed"));
}

#[test]
fn suspended_and_migrating_guests_are_left_alone() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G), guest("b", "h1", G)]);
    case.edit("a", |g| {
        g.spec.io = Some(berth_schema::IoSpec { weight: 300 });
        g.metadata
            .annotations
            .insert(berth_schema::ANNOTATION_SUSPEND.into(), "true".into());
    });
    let mut observed = case.observed();
    observed.guests[1].migrating_to = Some("h2".into());
    case.edit("b", |g| {
        g.spec.io = Some(berth_schema::IoSpec { weight: 300 })
    });
    let p = plan(&case.head, &observed, &FleetCapabilities::default());
    assert_eq!(op(&p, "a"), Operation::Suspended);
    assert_eq!(op(&p, "b"), Operation::Migrating);
    assert!(p.steps.is_empty());
}

#[test]
fn a_guest_whose_vmm_does_not_answer_is_left_alone() {
    // a does not answer while its manifest changes and moves it; b is an unanswering
    // orphan in a fleet that prunes: neither is started, moved, retuned or stopped.
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G), guest("b", "h1", G)]);
    let mut observed = case.observed();
    for g in &mut observed.guests {
        g.unresponsive = Some("no status within 3s".into());
    }
    case.head.guests.retain(|g| g.metadata.name == "a");
    case.head.fleet.prune = true;
    case.edit("a", |g| {
        g.spec.io = Some(berth_schema::IoSpec { weight: 300 });
        g.spec.host = "h2".into();
    });
    let p = plan(&case.head, &observed, &FleetCapabilities::default());
    for name in ["a", "b"] {
        assert_eq!(op(&p, name), Operation::Blocked, "{name}");
        let reason = guest_plan(&p, name).reason.clone().unwrap();
        assert!(
            reason.contains("did not answer (no status within 3s)"),
            "{reason}"
        );
    }
    assert!(p.steps.is_empty(), "{:?}", p.steps);
}

// ---- orphans and pruning -------------------------------------------------------

#[test]
fn orphans_are_reported_and_pruned_only_when_asked() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G), guest("b", "h1", G)]);
    case.head.guests.clear();
    let mut observed = case.observed();
    // A guest berth never started: neither orphan nor pruned.
    let mut foreign = observed.guests[0].clone();
    foreign.name = "foreign".into();
    foreign.annotations.clear();
    observed.guests.push(foreign);
    // b asks to be pruned.
    observed.guests[1]
        .annotations
        .insert(berth_schema::ANNOTATION_PRUNE.into(), "true".into());

    let p = plan(&case.head, &observed, &FleetCapabilities::default());
    assert_eq!(op(&p, "a"), Operation::Orphan);
    assert_eq!(op(&p, "b"), Operation::Stop);
    assert!(p.guests.iter().all(|g| g.name != "foreign"));
    assert_eq!((p.summary.orphans, p.summary.stop), (1, 1));
    assert!(matches!(
        &p.steps[..],
        [Step { action: Action::Stop { guest, reason: StopReason::Prune, .. }, .. }] if guest == "b"
    ));

    case.head.fleet.prune = true;
    let p = plan(&case.head, &observed, &FleetCapabilities::default());
    assert_eq!(
        (op(&p, "a"), op(&p, "b")),
        (Operation::Stop, Operation::Stop)
    );
}

// ---- ordering ------------------------------------------------------------------

#[test]
fn a_stop_comes_before_a_start_that_needs_its_room() {
    let hosts = vec![host("h1", "0-3", gib(2))];
    let mut case = Case::new(hosts, vec![guest("a", "h1", G), guest("b", "h1", G)]);
    case.edit("a", |g| g.spec.state = GuestState::Stopped);
    case.head.guests.push(guest("c", "h1", G));
    let p = case.plan_and_run();
    assert!(wave_of(&p, is_stop("a")) < wave_of(&p, is_start("c")));
}

#[test]
fn independent_actions_share_a_wave() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| g.spec.state = GuestState::Stopped);
    case.head.guests.push(guest("c", "h2", G));
    let p = case.plan_and_run();
    assert_eq!(p.waves(), 1);
}

#[test]
fn a_shrinking_restart_comes_before_a_growing_one() {
    let hosts = vec![host("h1", "0-3", gib(6))];
    let mut a = guest("a", "h1", gib(2));
    let mut b = guest("b", "h1", gib(4));
    for g in [&mut a, &mut b] {
        g.spec.cpu.vcpus = 2;
        g.spec.restart_policy = RestartPolicy::IfRequired;
    }
    let mut case = Case::new(hosts, vec![a, b]);
    // a grows to 4 GiB (needs b's shrink first), b shrinks to 2 GiB; both drop a vCPU.
    case.edit("a", |g| {
        g.spec.cpu.vcpus = 1;
        g.spec.memory.size = gib(4);
    });
    case.edit("b", |g| {
        g.spec.cpu.vcpus = 1;
        g.spec.memory.size = gib(2);
    });
    let p = case.plan_and_run();
    let restart = |n: &'static str| move |a: &Action| matches!(a, Action::Restart { guest, .. } if guest == n);
    assert!(wave_of(&p, restart("b")) < wave_of(&p, restart("a")));
}

#[test]
fn migrations_wait_until_their_destination_has_room() {
    let hosts = vec![
        host("h1", "0-3", gib(4)),
        host("h2", "0-3", gib(4)),
        host("h3", "0-3", gib(4)),
    ];
    // h2 is full with b; b leaves for h3, then a can come from h1.
    let mut case = Case::new(
        hosts,
        vec![guest("a", "h1", gib(4)), guest("b", "h2", gib(4))],
    );
    case.edit("a", |g| g.spec.host = "h2".into());
    case.edit("b", |g| g.spec.host = "h3".into());
    let p = case.plan_and_run();
    assert!(wave_of(&p, is_migrate("b", "h3")) < wave_of(&p, is_migrate("a", "h2")));
    assert_eq!(op(&p, "a"), Operation::Migrate);
}

#[test]
fn a_swap_passes_through_a_third_host_with_room() {
    let hosts = vec![
        host("h1", "0-3", gib(4)),
        host("h2", "0-3", gib(4)),
        host("h3", "0-3", gib(4)),
    ];
    let mut case = Case::new(
        hosts,
        vec![guest("a", "h1", gib(4)), guest("b", "h2", gib(4))],
    );
    case.edit("a", |g| g.spec.host = "h2".into());
    case.edit("b", |g| g.spec.host = "h1".into());
    let p = case.plan_and_run();
    let a = guest_plan(&p, "a");
    assert_eq!(
        (a.operation, a.via.as_deref()),
        (Operation::Migrate, Some("h3"))
    );
    let hop1 = wave_of(&p, is_migrate("a", "h3"));
    let b = wave_of(&p, is_migrate("b", "h1"));
    let hop2 = wave_of(&p, is_migrate("a", "h2"));
    assert!(hop1 < b && b < hop2, "{:#?}", p.steps);
}

#[test]
fn a_swap_without_room_anywhere_is_blocked_with_reasons() {
    let mut case = Case::new(
        vec![host("h1", "0-3", gib(4)), host("h2", "0-3", gib(4))],
        vec![guest("a", "h1", gib(4)), guest("b", "h2", gib(4))],
    );
    case.edit("a", |g| g.spec.host = "h2".into());
    case.edit("b", |g| g.spec.host = "h1".into());
    let p = case.plan();
    assert!(p.steps.is_empty());
    let reason = guest_plan(&p, "a").reason.clone().unwrap();
    assert!(reason.contains("h2 has 0B free"), "{reason}");
    assert!(reason.contains("swaps hosts with b"), "{reason}");
    assert_eq!(p.summary.blocked, 2);
}

#[test]
fn a_swap_of_guests_that_may_stop_is_done_cold_together() {
    let mut case = Case::new(
        vec![host("h1", "0-3", gib(4)), host("h2", "0-3", gib(4))],
        vec![guest("a", "h1", gib(4)), guest("b", "h2", gib(4))],
    );
    case.edit("a", |g| {
        g.spec.host = "h2".into();
        g.spec.migration.mode = MigrationMode::Cold;
    });
    case.edit("b", |g| {
        g.spec.host = "h1".into();
        g.spec.restart_policy = RestartPolicy::IfRequired;
    });
    let p = case.plan_and_run();
    assert_eq!(
        (op(&p, "a"), op(&p, "b")),
        (Operation::ColdMigrate, Operation::ColdMigrate)
    );
    let stops = wave_of(&p, is_stop("a"));
    assert_eq!(stops, wave_of(&p, is_stop("b")));
    assert_eq!(wave_of(&p, is_start("a")), stops + 1);
    assert_eq!(wave_of(&p, is_start("b")), stops + 1);
}

#[test]
fn migrations_respect_the_fleet_and_per_host_caps() {
    let hosts: Vec<Host> = (0..12)
        .map(|i| host(&format!("h{i:02}"), "0-3", gib(8)))
        .collect();
    let guests: Vec<Guest> = (0..6)
        .map(|i| guest(&format!("g{i}"), &format!("h{i:02}"), G))
        .collect();
    let mut case = Case::new(hosts, guests);
    for i in 0..6 {
        case.edit(&format!("g{i}"), |g| g.spec.host = format!("h{:02}", i + 6));
    }
    let p = case.plan_and_run();
    let per_wave = |w| p.steps.iter().filter(|s| s.wave == w).count();
    assert_eq!(
        (per_wave(0), per_wave(1)),
        (4, 2),
        "default cap of 4 in all"
    );

    case.head.fleet.max_concurrent_migrations = 2;
    let p = case.plan_and_run();
    assert_eq!(p.waves(), 3);

    // Three guests leaving one host, per-host cap 1: one at a time.
    let mut case = Case::new(
        two_hosts(),
        vec![
            guest("a", "h1", G),
            guest("b", "h1", G),
            guest("c", "h1", G),
        ],
    );
    for n in ["a", "b", "c"] {
        case.edit(n, |g| g.spec.host = "h2".into());
    }
    let p = case.plan_and_run();
    assert_eq!(p.waves(), 3);
    case.head.fleet.max_concurrent_migrations_per_host = 3;
    assert_eq!(case.plan_and_run().waves(), 1);
}

#[test]
fn a_local_migration_needs_room_for_both_vmms() {
    let hosts = vec![host("h1", "0-3", gib(3))];
    let mut case = Case::new(hosts, vec![guest("a", "h1", gib(2))]);
    case.edit("a", |g| g.spec.memory.locked = true);
    let p = case.plan();
    assert_eq!(op(&p, "a"), Operation::Blocked);
    let reason = guest_plan(&p, "a").reason.clone().unwrap();
    assert!(
        reason.contains("two VMMs") && reason.contains("1GiB free"),
        "{reason}"
    );
    case.edit("a", |g| g.spec.restart_policy = RestartPolicy::IfRequired);
    let p = case.plan_and_run();
    assert_eq!(op(&p, "a"), Operation::Restart);
}

#[test]
fn a_paused_guest_moved_is_migrated_then_paused() {
    let mut case = Case::new(two_hosts(), vec![guest("a", "h1", G)]);
    case.edit("a", |g| {
        g.spec.host = "h2".into();
        g.spec.state = GuestState::Paused;
    });
    let p = case.plan_and_run();
    let retune = wave_of(
        &p,
        |a| matches!(a, Action::Retune { host, .. } if host == "h2"),
    );
    assert!(wave_of(&p, is_migrate("a", "h2")) < retune);
}

// ---- host settings -------------------------------------------------------------

#[test]
fn host_settings_come_before_the_guests_that_need_them() {
    let mut case = Case::new(two_hosts(), vec![]);
    case.edit_host("h1", |h| {
        h.spec.hugepages.insert(PageSize::Huge2M, 512);
        h.spec.ksm.enabled = true;
        h.spec.transparent_hugepages = ThpMode::Never;
    });
    let mut g = guest("a", "h1", G);
    g.spec.memory.hugepages = Some(HugepageSpec {
        page_size: PageSize::Huge2M,
    });
    case.head.guests.push(g);
    let p = case.plan_and_run();
    let configure = wave_of(&p, |a| matches!(a, Action::ConfigureHost { .. }));
    assert!(configure < wave_of(&p, is_start("a")));
    assert_eq!(p.hosts[0].changes.len(), 3);
    assert_eq!(p.summary.hosts, 1);
}

#[test]
fn shrinking_a_pool_below_what_guests_hold_is_blocked_with_numbers() {
    let mut hosts = two_hosts();
    hosts[0].spec.hugepages.insert(PageSize::Huge2M, 1024);
    let mut g = guest("a", "h1", G);
    g.spec.memory.hugepages = Some(HugepageSpec {
        page_size: PageSize::Huge2M,
    });
    let mut case = Case::new(hosts, vec![g]);
    case.edit_host("h1", |h| {
        h.spec.hugepages.insert(PageSize::Huge2M, 256);
    });
    let p = case.plan();
    let blocked = p.hosts[0].blocked.clone().unwrap();
    assert_eq!(
        blocked,
        "h1's 2MiB pool cannot shrink from 1024 to 256 pages: running guests hold 512 pages (a: 512)"
    );
    assert!(p.steps.is_empty());
    assert_eq!(p.summary.blocked, 1);
}

#[test]
fn a_pool_shrinks_after_the_guests_holding_it_leave() {
    let mut hosts = two_hosts();
    for h in &mut hosts {
        h.spec.hugepages.insert(PageSize::Huge2M, 1024);
    }
    let mut g = guest("a", "h1", G);
    g.spec.memory.hugepages = Some(HugepageSpec {
        page_size: PageSize::Huge2M,
    });
    let mut case = Case::new(hosts, vec![g]);
    case.edit_host("h1", |h| {
        h.spec.hugepages.insert(PageSize::Huge2M, 0);
    });
    case.edit("a", |g| g.spec.host = "h2".into());
    let p = case.plan_and_run();
    let configure = wave_of(&p, |a| matches!(a, Action::ConfigureHost { .. }));
    assert!(wave_of(&p, is_migrate("a", "h2")) < configure);
}

#[test]
fn growing_a_pool_waits_for_memory_to_be_freed() {
    let hosts = vec![host("h1", "0-3", gib(4))];
    let mut case = Case::new(hosts, vec![guest("a", "h1", gib(3))]);
    case.edit("a", |g| g.spec.state = GuestState::Stopped);
    case.edit_host("h1", |h| {
        h.spec.hugepages.insert(PageSize::Huge2M, 1024);
    });
    let p = case.plan_and_run();
    let configure = wave_of(&p, |a| matches!(a, Action::ConfigureHost { .. }));
    assert!(wave_of(&p, is_stop("a")) < configure);
}

// ---- determinism ---------------------------------------------------------------

#[test]
fn the_plan_does_not_depend_on_input_order() {
    let hosts: Vec<Host> = (0..5)
        .map(|i| host(&format!("h{i}"), "0-3", gib(4)))
        .collect();
    let guests: Vec<Guest> = (0..20)
        .map(|i| guest(&format!("g{i:02}"), &format!("h{}", i % 5), G))
        .collect();
    let mut case = Case::new(hosts, guests);
    for i in (0..20).step_by(3) {
        case.edit(&format!("g{i:02}"), |g| {
            g.spec.host = format!("h{}", (i + 1) % 5)
        });
    }
    let p = case.plan();
    let mut shuffled = case.head.clone();
    shuffled.guests.reverse();
    shuffled.hosts.reverse();
    let mut observed = case.observed();
    observed.guests.reverse();
    observed.hosts.reverse();
    assert_eq!(plan(&shuffled, &observed, &FleetCapabilities::default()), p);
    assert!(p.has_changes());
}

#[test]
fn drift_made_by_hand_is_planned_back() {
    let mut g = guest("a", "h1", G);
    g.spec.cpu.pinning = Some(Pinning {
        vcpus: [(0, "1".parse().unwrap())].into(),
        emulator: None,
    });
    let case = Case::new(two_hosts(), vec![g]);
    let sim = SimDriver::from_observed(case.observed());
    sim.tamper("a", |g| {
        g.cpu
            .pinning
            .as_mut()
            .unwrap()
            .vcpus
            .insert(0, "3".parse().unwrap());
    });
    let p = plan(
        &case.head,
        &sim.observe().unwrap(),
        &FleetCapabilities::default(),
    );
    assert_eq!(op(&p, "a"), Operation::Retune);
    let change = &guest_plan(&p, "a").changes[0];
    assert_eq!(
        (change.diff.from.as_deref(), change.diff.to.as_deref()),
        (Some("{0: 3}"), Some("{0: 1}"))
    );
    crate::apply::execute(&p, &case.head, &sim);
    assert!(!plan(
        &case.head,
        &sim.observe().unwrap(),
        &FleetCapabilities::default()
    )
    .has_changes());
}

#[test]
fn observed_hosts_the_manifests_name_keep_their_observed_pools() {
    let case = Case::new(two_hosts(), vec![]);
    let mut observed = case.observed();
    observed.hosts[0].hugepages.insert(
        PageSize::Huge2M,
        crate::model::HugepagePool { total: 8, free: 8 },
    );
    // The Host manifest lists no 2MiB pool: berth leaves the pool alone.
    assert!(!plan(&case.head, &observed, &FleetCapabilities::default()).has_changes());
    let _: &ObservedHost = &observed.hosts[0];
}
