//! Executes a plan through a driver, wave by wave. The only place with effects.
//!
//! A failed action stops the plan at the end of its wave: the other actions of that
//! wave do not depend on it and run to completion, the waves after it may, and are not
//! run. Every driver leaves a guest running exactly once when one of its actions fails
//! (a failed migration keeps the guest on its source).

use std::collections::HashMap;

use berth_schema::Guest;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::driver::{Driver, DriverError};
use crate::model::Desired;
use crate::plan::{Action, Plan, Step};

/// What happened to one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "outcome", content = "error")]
pub enum Outcome {
    /// Done.
    Done,
    /// The driver failed.
    Failed(String),
    /// Not run: an earlier wave failed.
    Skipped,
}

/// Per step, what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    /// The steps of the plan with their outcomes, in order.
    pub steps: Vec<(Step, Outcome)>,
}

impl ApplyReport {
    /// Whether every step was done.
    pub fn succeeded(&self) -> bool {
        self.steps.iter().all(|(_, o)| *o == Outcome::Done)
    }
}

/// Runs `plan` (made from `desired`) through `driver`.
pub fn execute(plan: &Plan, desired: &Desired, driver: &dyn Driver) -> ApplyReport {
    let guests: HashMap<&str, &Guest> = desired
        .guests
        .iter()
        .map(|g| (g.metadata.name.as_str(), g))
        .collect();
    let mut failed_wave: Option<u32> = None;
    let mut steps = Vec::with_capacity(plan.steps.len());
    for step in &plan.steps {
        let outcome = match failed_wave {
            Some(w) if step.wave > w => Outcome::Skipped,
            _ => match execute_step(step, &guests, driver) {
                Ok(()) => Outcome::Done,
                Err(e) => {
                    failed_wave.get_or_insert(step.wave);
                    Outcome::Failed(e.to_string())
                }
            },
        };
        steps.push((step.clone(), outcome));
    }
    ApplyReport { steps }
}

/// Runs one step.
///
/// # Errors
/// The driver's error, or [`DriverError::NotFound`] when the step names a guest that
/// no manifest describes.
pub fn execute_step(
    step: &Step,
    guests: &HashMap<&str, &Guest>,
    driver: &dyn Driver,
) -> Result<(), DriverError> {
    let manifest = |name: &str| {
        guests
            .get(name)
            .copied()
            .ok_or_else(|| DriverError::NotFound(format!("no manifest for guest {name}")))
    };
    match &step.action {
        Action::ConfigureHost { host, changes } => {
            let settings: Vec<_> = changes.iter().map(|c| c.target).collect();
            driver.configure_host(host, &settings)
        }
        Action::Start { guest, host } => driver.start(manifest(guest)?, host),
        Action::Stop { guest, host, .. } => driver.stop(guest, host),
        Action::Retune {
            guest,
            host,
            fields,
        } => driver.retune(manifest(guest)?, host, fields),
        Action::LocalMigrate { guest, host } => driver.migrate(manifest(guest)?, host, host),
        Action::Migrate { guest, from, to } => driver.migrate(manifest(guest)?, from, to),
        Action::ColdMigrate { guest, from, to } => {
            let g = manifest(guest)?;
            driver.stop(guest, from)?;
            driver.start(g, to)
        }
        Action::Restart { guest, host } => {
            let g = manifest(guest)?;
            driver.stop(guest, host)?;
            driver.start(g, host)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sim::SimOp;
    use crate::driver::{FleetCapabilities, SimDriver};
    use crate::model::Observed;

    fn desired(yaml: &str) -> Desired {
        crate::model::desired_from_yaml([yaml])
    }

    const HOSTS: &str = "
apiVersion: berth.dev/v1
kind: Host
metadata: {name: h1}
spec: {address: '127.0.0.1:1', cpus: '0-3', memory: 2GiB}
---
apiVersion: berth.dev/v1
kind: Host
metadata: {name: h2}
spec: {address: '127.0.0.1:2', cpus: '0-3', memory: 2GiB}
";

    #[test]
    fn a_failure_stops_the_waves_after_it() {
        let base = desired(&format!(
            "{HOSTS}---
apiVersion: berth.dev/v1
kind: Guest
metadata: {{name: a}}
spec: {{host: h1, cpu: {{vcpus: 1}}, memory: {{size: 2GiB}}}}
"
        ));
        let head = desired(&format!(
            "{HOSTS}---
apiVersion: berth.dev/v1
kind: Guest
metadata: {{name: a}}
spec: {{host: h1, state: stopped, cpu: {{vcpus: 1}}, memory: {{size: 2GiB}}}}
---
apiVersion: berth.dev/v1
kind: Guest
metadata: {{name: b}}
spec: {{host: h1, cpu: {{vcpus: 1}}, memory: {{size: 2GiB}}}}
"
        ));
        let sim = SimDriver::from_manifests(&base);
        let plan = crate::plan(
            &head,
            &Observed::as_written(&base),
            &FleetCapabilities::default(),
        );
        assert_eq!(plan.waves(), 2, "{plan:#?}");
        sim.inject_fault(SimOp::Stop, "a");
        let report = execute(&plan, &head, &sim);
        let outcomes: Vec<&Outcome> = report.steps.iter().map(|(_, o)| o).collect();
        assert!(matches!(
            outcomes[..],
            [Outcome::Failed(_), Outcome::Skipped]
        ));
        assert!(!report.succeeded());
        // Nothing was started on a host that had no room.
        assert_eq!(sim.log(), Vec::<String>::new());

        let report = execute(&plan, &head, &sim);
        assert!(report.succeeded(), "{report:?}");
        assert_eq!(sim.log(), ["stop a on h1", "start b on h1"]);
    }
}
