//! Live migration between two libvirt hosts: peer-to-peer (the source libvirtd talks to
//! the destination's), live, persistent on the destination and undefined on the source,
//! with the manifest's policy. Pre-checks run before anything moves; progress comes from
//! libvirt's job statistics; past the completion timeout the job is aborted (the guest
//! stays on the source) or switched over (the guest is paused so the rest is copied).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use berth_schema::{Guest, GuestState, MigrationMode, OnTimeout};
use serde::Serialize;
use virt::domain::MigrateParameters;
use virt::sys;

use super::{call, ffi, Libvirt, LibvirtError};

/// Where the guest goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The destination's libvirt URI as the source's libvirtd reaches it
    /// (`qemu+tcp://10.0.0.2/system`).
    pub uri: String,
    /// Where QEMU sends the migration stream (`tcp://10.0.0.2`).
    pub migrate_uri: String,
}

/// One sample of libvirt's job statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Time since the start.
    pub elapsed_ms: u64,
    /// Bytes sent so far.
    pub data_processed: u64,
    /// Bytes left in this pass.
    pub data_remaining: u64,
    /// Bytes of guest memory and state.
    pub data_total: u64,
    /// Memory passes so far.
    pub iteration: u64,
}

/// How a migration ended (a failure is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The guest runs on the destination.
    Completed,
    /// Past the completion timeout the guest was paused to finish the copy; it runs on
    /// the destination (resumed there if the manifest wants it running).
    SwitchedOver,
}

impl Libvirt {
    /// How long guest `name`, just migrated here, was paused for the switchover, as
    /// libvirt measured it (the `downtime` of the domain's completed migration job);
    /// `None` when libvirt keeps no such statistics. Read once: libvirt drops them when
    /// they are read.
    ///
    /// # Errors
    /// When libvirtd cannot be asked.
    pub fn migration_downtime(&self, name: &str) -> Result<Option<Duration>, LibvirtError> {
        let Some(dom) = self.lookup(name)? else {
            return Ok(None);
        };
        ffi::completed_downtime_ms(&dom)
            .map(|ms| ms.map(Duration::from_millis))
            .map_err(|source| call(name, "reading the completed job's statistics", source))
    }

    /// Live-migrates berth's guest to `to` (whose own connection is `dest`), after the
    /// pre-checks: every disk on shared storage, different host UUIDs, no domain of
    /// that name on the destination, the pinned CPUs present there. `progress` gets
    /// each job-statistics sample (every 200 ms).
    ///
    /// # Errors
    /// A failed pre-check ([`LibvirtError::Invalid`], nothing moved), or libvirt's
    /// failure; on an abort or failure the guest keeps running on the source.
    pub fn migrate(
        &self,
        guest: &Guest,
        dest: &Libvirt,
        to: &Destination,
        mut progress: impl FnMut(Progress),
    ) -> Result<Outcome, LibvirtError> {
        let name = &guest.metadata.name;
        let policy = &guest.spec.migration;
        let refuse = |field: &str, message: String| LibvirtError::Invalid {
            guest: name.clone(),
            field: field.to_owned(),
            message,
        };
        if policy.mode == MigrationMode::Cold {
            return Err(refuse(
                "spec.migration.mode",
                "cold; a live migration was asked".to_owned(),
            ));
        }
        if let Some(i) = guest.spec.disks.iter().position(|d| !d.shared) {
            return Err(refuse(
                &format!("spec.disks[{i}].shared"),
                format!(
                    "{} is not on shared storage (shared: true); berth does not copy disks in a live migration",
                    guest.spec.disks[i].source
                ),
            ));
        }
        let (here, there) = (self.host_uuid()?, dest.host_uuid()?);
        if here == there {
            return Err(refuse(
                "spec.host",
                format!("the source and destination have the same host UUID {here}; libvirt refuses to migrate to the same host"),
            ));
        }
        if dest.observe(name)?.is_some() {
            return Err(refuse(
                "spec.host",
                format!("a domain named {name} already exists at {}", dest.uri()),
            ));
        }
        let cpus = dest.node()?.cpus;
        if let Some(pinning) = &guest.spec.cpu.pinning {
            let wanted = pinning
                .vcpus
                .values()
                .chain(pinning.emulator.iter())
                .fold(berth_schema::CpuSet::new(), |a, b| a.union(b));
            let missing = wanted.difference(&cpus);
            if !missing.is_empty() {
                return Err(refuse(
                    "spec.cpu.pinning",
                    format!("CPU {missing} does not exist at {}", dest.uri()),
                ));
            }
        }

        let dom = self.managed(name)?;
        let mut flags = sys::VIR_MIGRATE_LIVE
            | sys::VIR_MIGRATE_PEER2PEER
            | sys::VIR_MIGRATE_PERSIST_DEST
            | sys::VIR_MIGRATE_UNDEFINE_SOURCE
            // Every disk is on shared storage (checked above); libvirt cannot tell
            // a shared directory from a local one.
            | sys::VIR_MIGRATE_UNSAFE;
        if policy.auto_converge {
            flags |= sys::VIR_MIGRATE_AUTO_CONVERGE;
        }
        let params = MigrateParameters {
            uri: Some(to.migrate_uri.clone()),
            // libvirt's unit is MiB/s; 0 is unlimited.
            bandwidth: policy.bandwidth.limit().map(|b| (b >> 20).max(1)),
            ..MigrateParameters::default()
        };
        let gib = guest.spec.memory.size.get().div_ceil(1 << 30).max(1);
        let timeout = policy.completion_timeout_per_gib.get() * gib as u32;
        let downtime_ms = policy.max_downtime.get().as_millis().max(1) as u64;
        let started = Instant::now();
        let mut switched = false;
        // Job statistics come from a thread of their own: libvirt holds such a query
        // while the domain's job lock is busy (for up to 30 s on a loaded machine), and
        // the completion timeout below must not wait for it. The thread owns a reference
        // to the domain and ends at its next sample after the migration.
        let finished = Arc::new(AtomicBool::new(false));
        let (samples, received) = mpsc::channel();
        {
            let dom = dom.clone();
            let finished = Arc::clone(&finished);
            std::thread::spawn(move || {
                let mut downtime_set = false;
                while !finished.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let Ok(Some(sample)) = ffi::job_progress(&dom) else {
                        continue;
                    };
                    if !downtime_set {
                        // Accepted once the job exists.
                        downtime_set = dom.migrate_set_max_downtime(downtime_ms, 0).is_ok();
                    }
                    if samples.send(sample).is_err() {
                        break;
                    }
                }
            });
        }
        let result = std::thread::scope(|scope| {
            let job = scope.spawn(|| dom.migrate_to_uri3(Some(&to.uri), params, flags));
            while !job.is_finished() {
                if let Ok([processed, remaining, total, iteration]) =
                    received.recv_timeout(Duration::from_millis(200))
                {
                    progress(Progress {
                        elapsed_ms: started.elapsed().as_millis() as u64,
                        data_processed: processed,
                        data_remaining: remaining,
                        data_total: total,
                        iteration,
                    });
                }
                // The timeout is kept by the clock alone, never by the statistics.
                if started.elapsed() > timeout && !switched {
                    match policy.on_timeout {
                        OnTimeout::Abort => {
                            // Asked again on every tick until the job ends: libvirt refuses
                            // an abort before the job has reached QEMU.
                            let _ = ffi::abort_job(&dom);
                        }
                        OnTimeout::Switchover => {
                            switched = dom.suspend().is_ok();
                        }
                    }
                }
            }
            job.join().expect("the migration thread does not panic")
        });
        finished.store(true, Ordering::Relaxed);
        if let Err(source) = result {
            if switched {
                // The guest stayed here, paused by the switchover: it runs again.
                let _ = dom.resume();
            }
            return Err(call(name, "migrating", source));
        }
        if switched && guest.spec.state == GuestState::Running {
            dest.resume(name)?;
        }
        Ok(if switched {
            Outcome::SwitchedOver
        } else {
            Outcome::Completed
        })
    }
}
