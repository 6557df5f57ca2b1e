//! The simulated fleet for `berth serve --driver sim`: a `SimDriver` (no real guests)
//! whose state survives a restart of the service, so that restart behaviour can be
//! exercised without KVM. The state is a JSON file (`sim-fleet.json` in the state
//! directory), rewritten atomically after every change.
//!
//! Hosts come from the manifests: a host named by a revision and not yet simulated is
//! added empty, as its manifest describes it.

use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use berth_schema::Guest;

use crate::diff::{Field, HostSetting};
use crate::driver::{Driver, DriverError, DriverKind, Scope, SimDriver};
use crate::model::{Desired, Observed, ObservedHost};

/// Why the simulated fleet could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SimFleetError {
    /// The state file could not be read.
    #[error("cannot read the simulated fleet {path}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a simulated fleet.
    #[error("cannot parse the simulated fleet {path}")]
    Parse {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

/// A simulated fleet (no real guests), saved to a file after every change.
#[derive(Debug)]
pub struct SimulatedFleet {
    sim: RwLock<SimDriver>,
    file: Option<PathBuf>,
    /// One writer of the file at a time.
    saving: Mutex<()>,
}

impl SimulatedFleet {
    /// Loads the fleet from `file` when it exists; starts empty otherwise. With no
    /// file, the fleet lives in memory only.
    ///
    /// # Errors
    /// When the file exists and cannot be read or parsed.
    pub fn open(file: Option<PathBuf>) -> Result<Self, SimFleetError> {
        let observed = match &file {
            Some(path) if path.exists() => {
                let text = std::fs::read(path).map_err(|source| SimFleetError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                serde_json::from_slice(&text).map_err(|source| SimFleetError::Parse {
                    path: path.display().to_string(),
                    source,
                })?
            }
            _ => Observed::default(),
        };
        Ok(SimulatedFleet {
            sim: RwLock::new(SimDriver::from_observed(observed)),
            file,
            saving: Mutex::new(()),
        })
    }

    /// Adds the hosts `desired` names that the fleet lacks, empty.
    pub fn add_hosts(&self, desired: &Desired) {
        let mut sim = self.sim.write().unwrap_or_else(|e| e.into_inner());
        let Ok(mut observed) = sim.observe() else {
            return;
        };
        let missing: Vec<ObservedHost> = desired
            .hosts
            .iter()
            .filter(|h| !observed.hosts.iter().any(|o| o.name == h.metadata.name))
            .map(|h| ObservedHost::as_written(h, []))
            .collect();
        if missing.is_empty() {
            return;
        }
        observed.hosts.extend(missing);
        *sim = SimDriver::from_observed(observed);
        drop(sim);
        self.save();
    }

    fn with<T>(
        &self,
        act: impl FnOnce(&SimDriver) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let result = act(&self.sim.read().unwrap_or_else(|e| e.into_inner()));
        if result.is_ok() {
            self.save();
        }
        result
    }

    fn save(&self) {
        let Some(path) = &self.file else { return };
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let observed = self.sim.read().unwrap_or_else(|e| e.into_inner()).observe();
        let Ok(observed) = observed else { return };
        let text = serde_json::to_vec_pretty(&observed).expect("the fleet serializes");
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::error!(error = %e, path = %path.display(), "cannot save the simulated fleet");
        }
    }
}

impl Driver for SimulatedFleet {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }

    fn scope(&self) -> Scope {
        Scope::Fleet
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        self.sim.read().unwrap_or_else(|e| e.into_inner()).observe()
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.with(|s| s.configure_host(host, settings))
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.with(|s| s.start(guest, host))
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.with(|s| s.retune(guest, host, fields))
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.with(|s| s.stop(name, host))
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        self.with(|s| s.migrate(guest, from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sim-fleet.json");
        let text = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
                    spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 4GiB}\n---\n\
                    apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: a}\n\
                    spec: {host: kvm01, cpu: {vcpus: 1}, memory: {size: 64MiB}}\n";
        let v = berth_schema::load_files([("f.yaml", text)]).expect("valid");
        let desired = Desired::from_manifests(&v.manifests);

        let fleet = SimulatedFleet::open(Some(file.clone())).expect("open");
        fleet.add_hosts(&desired);
        fleet.start(&desired.guests[0], "kvm01").expect("start");
        drop(fleet);

        let fleet = SimulatedFleet::open(Some(file)).expect("reopen");
        let observed = fleet.observe().expect("observe");
        assert_eq!(observed.hosts.len(), 1);
        assert_eq!(observed.guests.len(), 1);
        let again = fleet.start(&desired.guests[0], "kvm01");
        assert!(matches!(again, Err(DriverError::Refused(_))), "{again:?}");
    }
}
