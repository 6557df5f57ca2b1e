//! Where each guest was last placed on another host, by the revisions enforced here,
//! remembered across restarts in the state directory: the start guard
//! ([`super::Coordination::may_start`]) holds a start back when the host a guest was
//! last placed on cannot be asked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::model::Desired;

/// Where each guest was last placed on another host than this one, by the revisions
/// enforced here; kept in a JSON file so that it survives a restart.
#[derive(Debug, Default)]
pub struct Placements {
    file: Option<PathBuf>,
    elsewhere: Mutex<BTreeMap<String, String>>,
}

impl Placements {
    /// Loads the record from `file` (a missing or unreadable file is an empty record).
    pub fn open(file: Option<PathBuf>) -> Self {
        let elsewhere = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Placements {
            file,
            elsewhere: Mutex::new(elsewhere),
        }
    }

    /// Records the placements of a newly enforced revision.
    pub fn record(&self, desired: &Desired, me: &str) {
        let mut map = self.elsewhere.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for g in desired.guests.iter().filter(|g| g.spec.host != me) {
            if map.get(&g.metadata.name) != Some(&g.spec.host) {
                map.insert(g.metadata.name.clone(), g.spec.host.clone());
                changed = true;
            }
        }
        if let (true, Some(file)) = (changed, &self.file) {
            let text = serde_json::to_vec_pretty(&*map).expect("a map of strings serializes");
            let tmp = file.with_extension("json.tmp");
            if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file)) {
                tracing::error!(error = %e, file = %file.display(), "cannot save the placements");
            }
        }
    }

    /// The other host `guest` was last placed on.
    pub fn last_elsewhere(&self, guest: &str) -> Option<String> {
        self.elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(guest)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("placements.json");
        let text = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
                    spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 4GiB}\n---\n\
                    apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\n\
                    spec: {host: kvm01, cpu: {vcpus: 1}, memory: {size: 64MiB}}\n";
        let v = berth_schema::load_files([("g.yaml", text)]).expect("valid");
        let desired = Desired::from_manifests(&v.manifests);
        let placements = Placements::open(Some(file.clone()));
        placements.record(&desired, "kvm02");
        placements.record(&desired, "kvm01"); // placed here: the record keeps kvm01
        drop(placements);
        let placements = Placements::open(Some(file));
        assert_eq!(placements.last_elsewhere("web-1").as_deref(), Some("kvm01"));
        assert_eq!(placements.last_elsewhere("db-1"), None);
    }
}
