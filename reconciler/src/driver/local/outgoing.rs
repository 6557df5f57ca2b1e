//! Migrations this host started, for when the process that started one dies before
//! it ends.
//!
//! After the source VMM sends `Commit` it never resumes the guest by itself: if the
//! destination's answer does not come, the VMM reports `switchoverUnknown` and keeps
//! the guest paused until someone who knows whether the destination runs the guest
//! calls `migrateResolve`. The VMM reports only the address it streamed to, which
//! names no host and no service to ask. So before a source VMM is told to migrate,
//! the driver records where to, in `<state>/migrations/<guest>.json`
//! ([`OutgoingRecord`]): the destination host, its service's address (for a migration
//! to another host), the stream address and the source VMM's pid. A successor of a
//! SIGKILLed `berth serve` finds the unanswered switchovers with
//! [`LocalDriver::unknown_switchovers`] and whom to ask in the record.
//!
//! A migration followed by this process is marked ([`LocalDriver::begin_outgoing`]):
//! it resolves its own switchover, so [`LocalDriver::unknown_switchovers`] leaves it
//! out, and never drops its record as stale while it is being written.

use std::path::PathBuf;

use berth_hypervisor::control::{Client, ClientError, Op};
use berth_hypervisor::migration::{MigrateResolveArgs, MigrationPhase, MigrationStatus};
use serde::{Deserialize, Serialize};

use super::follow::CannotTell;
use super::{failed, process_exists, write_atomically, LocalDriver, STOP_TIMEOUT};
use crate::driver::DriverError;

/// Where a migration away from this host went, written before the source VMM is told
/// to migrate. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutgoingRecord {
    /// The guest.
    pub guest: String,
    /// The destination host (this host for a local migration).
    pub to: String,
    /// The destination service's URL (`http://host:port`), to ask whether it runs the
    /// guest; `None` for a local migration, whose incoming VMM is asked directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The address the source VMM streams to.
    pub destination: String,
    /// The source VMM.
    pub source_pid: i32,
    /// The incoming VMM of a local migration: its committed marker, if the source did
    /// not confirm `Running`, is removed once the source is resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_pid: Option<i32>,
}

/// A VMM of this host in `switchoverUnknown` that no migration of this process follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownSwitchover {
    /// The guest.
    pub guest: String,
    /// The source VMM, which holds the guest paused.
    pub pid: i32,
    /// Where the VMM streamed to, as it reports it.
    pub destination: Option<String>,
    /// Why the VMM could not tell the outcome.
    pub error: Option<String>,
    /// The record of the migration, when there is one for this VMM.
    pub record: Option<OutgoingRecord>,
}

/// How [`LocalDriver::resolve_switchover`] ended the unknown switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The destination runs the guest: the source VMM dropped its copy and exited.
    DestinationRuns,
    /// The destination does not: the guest runs here again (or stays paused, if it was
    /// paused before the migration).
    ResumedHere,
    /// The VMM was no longer in `switchoverUnknown` (resolved by someone else) or is
    /// gone: nothing was done.
    AlreadyEnded,
}

/// Marks a migration as followed by this process until dropped.
#[derive(Debug)]
pub struct OutgoingGuard<'a> {
    driver: &'a LocalDriver,
    guest: String,
}

impl Drop for OutgoingGuard<'_> {
    fn drop(&mut self) {
        self.driver.followed().remove(&self.guest);
    }
}

impl LocalDriver {
    fn migrations_dir(&self) -> PathBuf {
        self.state_dir.join("migrations")
    }

    fn record_path(&self, guest: &str) -> PathBuf {
        self.migrations_dir().join(format!("{guest}.json"))
    }

    fn followed(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.outgoing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guests whose migration away this process follows now (local ones too), in
    /// name order.
    pub fn outgoing_in_flight(&self) -> Vec<String> {
        let mut guests: Vec<String> = self.followed().iter().cloned().collect();
        guests.sort();
        guests
    }

    /// Marks a migration of `guest` away from this VMM as followed by this process.
    ///
    /// # Errors
    /// [`DriverError::Refused`] when one is followed already.
    pub fn begin_outgoing(&self, guest: &str) -> Result<OutgoingGuard<'_>, DriverError> {
        if !self.followed().insert(guest.to_owned()) {
            return Err(DriverError::Refused(format!(
                "a migration of {guest} is already under way"
            )));
        }
        Ok(OutgoingGuard {
            driver: self,
            guest: guest.to_owned(),
        })
    }

    /// Records where a migration goes, before its source VMM is told to migrate.
    ///
    /// # Errors
    /// When the record cannot be written: then the migration must not start, since
    /// an unknown switchover could not be resolved after a restart.
    pub fn record_outgoing(&self, record: &OutgoingRecord) -> Result<(), DriverError> {
        let dir = self.migrations_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("creating {}", dir.display()), e))?;
        let text = serde_json::to_string_pretty(record).expect("the record serializes");
        write_atomically(&self.record_path(&record.guest), &text)
    }

    /// The record of the migration of `guest`, if any.
    pub fn outgoing_record(&self, guest: &str) -> Option<OutgoingRecord> {
        let text = std::fs::read_to_string(self.record_path(guest)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Removes the record of a migration that ended (completed, failed, resolved).
    pub fn forget_outgoing(&self, guest: &str) {
        let _ = std::fs::remove_file(self.record_path(guest));
    }

    /// Removes the record once its migration is over; keeps it while the source VMM
    /// may still switch over (it lives but its outcome went unread), so that the next
    /// look at unknown switchovers finds it.
    pub fn forget_outgoing_if_ended(&self, record: &OutgoingRecord) {
        if self.migration_ended(record) {
            self.forget_outgoing(&record.guest);
        }
    }

    /// The VMMs of this host whose switchover is unknown and that no migration of this
    /// process follows, with their records. Records of migrations that ended (the
    /// source VMM exited, or reports an end) are removed on the way.
    pub fn unknown_switchovers(&self) -> Vec<UnknownSwitchover> {
        let followed = self.followed().clone();
        let mut out = Vec::new();
        let guests = std::fs::read_dir(self.guests_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.contains('.') && !followed.contains(n));
        for guest in guests {
            let Some((pid, status)) = self.outgoing_status(&guest) else {
                continue;
            };
            if status.phase != MigrationPhase::SwitchoverUnknown {
                continue;
            }
            let record = self.outgoing_record(&guest).filter(|r| r.source_pid == pid);
            out.push(UnknownSwitchover {
                guest,
                pid,
                destination: status.destination,
                error: status.error,
                record,
            });
        }
        let records = std::fs::read_dir(self.migrations_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_owned));
        for guest in records {
            // Held while deciding, so that a migration that begins meanwhile (its
            // record written, its source not migrating yet) is not taken for ended.
            let followed = self.followed();
            if followed.contains(&guest) {
                continue;
            }
            match self.outgoing_record(&guest) {
                Some(record) if !self.migration_ended(&record) => {}
                _ => self.forget_outgoing(&guest),
            }
            drop(followed);
        }
        out
    }

    /// The pid and migration status of the VMM of `guest`, when it answers and has
    /// migrated (or is migrating) away.
    fn outgoing_status(&self, guest: &str) -> Option<(i32, MigrationStatus)> {
        let mut client = Client::connect(self.socket(guest)).ok()?;
        let pid = client.status().ok()?.pid;
        let status: MigrationStatus =
            serde_json::from_value(client.call(Op::MigrateStatus).ok()?).ok()?;
        (status.role.as_deref() == Some("outgoing")).then_some((pid, status))
    }

    /// Whether the migration of `record` is over: its source VMM exited, another VMM
    /// runs the guest, or the source reports an end. A VMM that does not answer but
    /// lives is not over.
    fn migration_ended(&self, record: &OutgoingRecord) -> bool {
        if !process_exists(record.source_pid) {
            return true;
        }
        let Ok(mut client) = Client::connect(self.socket(&record.guest)) else {
            return false;
        };
        match client.status() {
            Ok(status) if status.pid != record.source_pid => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        let status = client
            .call(Op::MigrateStatus)
            .ok()
            .and_then(|v| serde_json::from_value::<MigrationStatus>(v).ok());
        status.is_some_and(|s| !s.phase.is_active())
    }

    /// Whether the incoming VMM of a local migration of `guest` runs the guest: it ran
    /// the guest if and only if it read `Commit`, and then it waits in
    /// `<guest>.incoming/` for the source to exit.
    ///
    /// # Errors
    /// When it cannot tell yet (the incoming VMM is still before or at `Loaded`, or
    /// does not answer).
    pub fn local_incoming_runs(&self, guest: &str) -> Result<bool, CannotTell> {
        let status = Client::connect(self.incoming_socket(guest))
            .and_then(|mut c| c.call(Op::MigrateStatus))
            .ok()
            .and_then(|v| serde_json::from_value::<MigrationStatus>(v).ok());
        if status.as_ref().is_some_and(|s| s.committed) {
            // It read Commit: run, also if its vCPUs then failed to start.
            return Ok(true);
        }
        match status.map(|s| s.phase) {
            Some(MigrationPhase::Completed) => Ok(true),
            Some(MigrationPhase::Failed | MigrationPhase::Cancelled) => Ok(false),
            Some(phase) => Err(CannotTell::Incoming {
                guest: guest.to_owned(),
                phase,
            }),
            None if self.incoming_under_way(guest) => Err(CannotTell::IncomingSilent {
                guest: guest.to_owned(),
            }),
            // Gone after reading Commit: its durable marker says it may have run.
            None if self.incoming_committed(guest) => Ok(true),
            // Gone without having run the guest, or never started.
            None => Ok(false),
        }
    }

    /// Ends the unknown switchover of the VMM `pid` of `guest` with the destination's
    /// answer: `destination_running` drops the copy here (the VMM exits, and this waits
    /// for it), otherwise the guest resumes here. The record is removed.
    ///
    /// # Errors
    /// When the VMM cannot be asked.
    pub fn resolve_switchover(
        &self,
        guest: &str,
        pid: i32,
        destination_running: bool,
    ) -> Result<Resolved, DriverError> {
        let mut client = match Client::connect(self.socket(guest)) {
            Ok(c) => c,
            Err(_) if !process_exists(pid) => return Ok(Resolved::AlreadyEnded),
            Err(e) => return Err(failed(format!("asking the VMM of {guest}"), e)),
        };
        let status = client
            .status()
            .map_err(|e| failed(format!("reading the status of {guest}"), e))?;
        if status.pid != pid {
            return Ok(Resolved::AlreadyEnded);
        }
        let args = MigrateResolveArgs {
            destination_running,
        };
        match client.call(Op::MigrateResolve(args)) {
            Ok(_) => {}
            Err(ClientError::Refused { .. }) => return Ok(Resolved::AlreadyEnded),
            Err(e) => return Err(failed(format!("resolving the switchover of {guest}"), e)),
        }
        let record = self.outgoing_record(guest);
        self.forget_outgoing(guest);
        if destination_running {
            if !self.wait_gone(pid, STOP_TIMEOUT) {
                return Err(DriverError::Failed {
                    context: format!("dropping the copy of {guest} here"),
                    cause: format!(
                        "the VMM (pid {pid}) is still running {STOP_TIMEOUT:?} after the resolution"
                    )
                    .into(),
                });
            }
            // A local migration's new VMM kept its committed marker for this source,
            // which is gone now.
            if let Some(new_vmm) = record
                .filter(|r| r.peer.is_none() && r.source_pid == pid)
                .and_then(|r| r.destination_pid)
            {
                let _ = self.forget_committed(guest, new_vmm);
            }
            Ok(Resolved::DestinationRuns)
        } else {
            Ok(Resolved::ResumedHere)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(dir: &std::path::Path) -> LocalDriver {
        LocalDriver::new("kvm01", dir, PathBuf::from("/nonexistent/berth-vmm"))
    }

    #[test]
    fn records_survive_and_ended_ones_are_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let local = driver(tmp.path());
        // A pid that cannot be alive: the migration it names is over.
        let record = OutgoingRecord {
            guest: "web-1".into(),
            to: "kvm02".into(),
            peer: Some("http://10.0.0.2:7410".into()),
            destination: "10.0.0.2:40123".into(),
            source_pid: i32::MAX,
            destination_pid: None,
        };
        local.record_outgoing(&record).expect("write");
        assert_eq!(
            driver(tmp.path()).outgoing_record("web-1"),
            Some(record.clone()),
            "read back by another driver, as after a restart"
        );
        // Followed here: left alone, even though it looks ended.
        {
            let _guard = local.begin_outgoing("web-1").expect("not followed yet");
            assert!(local.begin_outgoing("web-1").is_err(), "followed once");
            assert_eq!(local.outgoing_in_flight(), ["web-1"]);
            assert!(local.unknown_switchovers().is_empty());
            assert!(local.outgoing_record("web-1").is_some());
        }
        assert!(local.unknown_switchovers().is_empty());
        assert_eq!(local.outgoing_record("web-1"), None, "an ended record goes");
    }

    #[test]
    fn a_live_source_keeps_its_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let local = driver(tmp.path());
        // This process stands for a source VMM that lives but does not answer.
        local
            .record_outgoing(&OutgoingRecord {
                guest: "web-1".into(),
                to: "kvm01".into(),
                peer: None,
                destination: "127.0.0.1:40123".into(),
                source_pid: std::process::id() as i32,
                destination_pid: None,
            })
            .expect("write");
        assert!(local.unknown_switchovers().is_empty());
        assert!(local.outgoing_record("web-1").is_some());
        // No incoming VMM there: a local destination that never ran the guest.
        assert_eq!(local.local_incoming_runs("web-1").ok(), Some(false));
    }

    #[test]
    fn a_dead_destination_that_read_commit_counts_as_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let local = driver(tmp.path());
        let marker = berth_hypervisor::migration::incoming::committed_marker(tmp.path(), "web-1");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        // What an incoming VMM that read Commit and then died leaves: its durable
        // marker, and no VMM holding the directory.
        berth_hypervisor::migration::receive::write_committed_marker(&marker).unwrap();
        assert!(local.incoming_committed("web-1"));
        assert_eq!(local.local_incoming_runs("web-1").ok(), Some(true));
        std::fs::remove_file(&marker).unwrap();
        assert_eq!(local.local_incoming_runs("web-1").ok(), Some(false));
    }
}
