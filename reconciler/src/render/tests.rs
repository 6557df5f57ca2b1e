//! Snapshots of the three output forms over one plan that has every kind of operation
//! (the fixtures the CI-mode end-to-end test commits), and the plan's JSON Schema.
//! Update with `INSTA_UPDATE=always cargo test -p berth-reconciler render` and review
//! the diff of `src/render/snapshots/`.

use super::*;
use crate::driver::FleetCapabilities;
use crate::model::{desired_from_yaml, Observed};

fn fixture_plan() -> Plan {
    let base = desired_from_yaml([
        include_str!("../../../tests/fixtures/plan/base/hosts.yaml"),
        include_str!("../../../tests/fixtures/plan/base/guests.yaml"),
    ]);
    let head = desired_from_yaml([
        include_str!("../../../tests/fixtures/plan/head/hosts.yaml"),
        include_str!("../../../tests/fixtures/plan/head/guests.yaml"),
    ]);
    crate::plan(
        &head,
        &Observed::as_written(&base),
        &FleetCapabilities::default(),
    )
}

#[test]
fn the_fixture_plan_has_every_kind_of_operation() {
    let p = fixture_plan();
    let ops: std::collections::BTreeSet<Operation> = p.guests.iter().map(|g| g.operation).collect();
    for op in [
        Operation::Start,
        Operation::Retune,
        Operation::LocalMigrate,
        Operation::Migrate,
        Operation::Restart,
        Operation::Stop,
        Operation::Blocked,
        Operation::Orphan,
    ] {
        assert!(ops.contains(&op), "{op:?} missing from {ops:?}");
    }
    assert_eq!(
        summary_line(&p.summary),
        "Plan: 1 to start, 1 to retune live, 2 to migrate, 1 to restart, 1 to stop, 1 blocked. \
         1 host to configure. 1 orphan not pruned."
    );
}

#[test]
fn text_snapshot() {
    insta::assert_snapshot!(text(&fixture_plan(), false));
}

#[test]
fn text_is_coloured_only_when_asked() {
    let p = fixture_plan();
    assert!(!text(&p, false).contains('\x1b'));
    let coloured = text(&p, true);
    assert!(coloured.contains("\x1b[36m<->\x1b[0m"), "{coloured}");
    assert!(coloured.contains("\x1b[32m+"), "{coloured}");
}

#[test]
fn markdown_snapshot() {
    insta::assert_snapshot!(markdown(&fixture_plan()));
}

#[test]
fn json_snapshot() {
    insta::assert_snapshot!(json(&fixture_plan()));
}

#[test]
fn json_round_trips() {
    let p = fixture_plan();
    let back: Plan = serde_json::from_str(&json(&p)).unwrap();
    assert_eq!(back, p);
}

#[test]
fn json_schema_snapshot() {
    insta::assert_snapshot!(json_schema());
}

#[test]
fn no_changes_says_so() {
    let base = desired_from_yaml([include_str!("../../../tests/fixtures/plan/base/hosts.yaml")]);
    let p = crate::plan(
        &base,
        &Observed::as_written(&base),
        &FleetCapabilities::default(),
    );
    assert_eq!(
        text(&p, false),
        "No changes. The fleet matches the manifests.\n\n\
         Plan: 0 to start, 0 to retune live, 0 to migrate, 0 to restart, 0 to stop, 0 blocked.\n"
    );
}
