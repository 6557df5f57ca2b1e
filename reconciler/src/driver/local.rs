//! `LocalDriver`: berth-vmm processes on this host, one per guest, under a state
//! directory (default `/var/lib/berth`).
//!
//! Layout: `<state>/guests/<name>/` is the VMM's own directory (`vmm.lock`, `pid`,
//! `control.sock`, `console.log`, `spec.yaml`, see `berth_hypervisor::statedir`); the
//! driver adds `start.json` (the spec it started the VMM with, JSON because observe
//! parses it for every guest; an older berth wrote `start.yaml`, still read for the
//! VMMs it started), `metadata.json` (labels
//! and annotations, with the `berth.dev/managed` marker) and `vmm.log` (the VMM's
//! stdout and stderr). `<state>/apply.lock` serialises applies ([`StateLock`]).
//!
//! Observation asks each VMM for its status over the control socket: thread affinity
//! from `/proc`, cgroup values from the cgroup files, hugepages and locked memory from
//! `/proc/<pid>/status`. Nothing is taken from what berth last asked for, except a
//! setting the host cannot enforce (a v1 `minGuarantee`, an I/O weight without a weight
//! file), which exists nowhere else and is reported as asked. Settings that cannot
//! change during a VMM's life (boot source, CPU model, NUMA policy) come from the spec
//! the VMM was built from.
//!
//! A restart-class change (hugepage backing, memory size, maxVcpus, locking) is applied
//! by a local live migration into a new VMM built from the manifest (`berth-vmm run
//! --incoming`); the guest pauses only for the switchover. The incoming VMM is made
//! one way for a local and a cross-host move ([`LocalDriver::prepare_incoming`]), and
//! both are followed to their end by one state machine ([`follow`]).
//!
//! VMMs are started detached (their own session, stdin closed, output to `vmm.log`), so
//! they outlive `berth apply` and `berth serve` restarts. Each migration away from a
//! VMM is recorded in `<state>/migrations/` first ([`outgoing`]), so that a switchover
//! left unknown by a process that died can be resolved by its successor.

pub mod follow;
mod lock;
mod outgoing;

use lock::{try_lock, vmm_lock_held};
pub use lock::{LockError, SharedStateHold, SharedStateLock, StateLock};

use follow::FollowError;
pub use outgoing::{OutgoingGuard, OutgoingRecord, Resolved, UnknownSwitchover};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_hypervisor::control::client::StatusRequests;
use berth_hypervisor::control::{Client, ClientError, GuestRunState, Op, Retune, Status};
use berth_hypervisor::host::cgroup::{CgroupLimits, Cgroups, Knob};
use berth_hypervisor::host::hugepages::{self, HugePagePool};
use berth_hypervisor::host::{affinity, sysinfo};
use berth_hypervisor::migration::{MigrateArgs, MigrationPhase, MigrationStatus};
use berth_schema::{Boot, Bytes, CpuMode, CpuSet, Guest, GuestState, MemTune, PageSize, Pinning};
use serde::{Deserialize, Serialize};

use super::{Driver, DriverError, DriverKind, Scope};
use crate::diff::{Field, HostSetting};
use crate::model::{
    CpuInfo, HugepagePool, Observed, ObservedCpu, ObservedGuest, ObservedHost, ObservedMemory,
    ANNOTATION_MANAGED,
};

/// The state directory when none is given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";

/// The environment variable naming the berth-vmm binary.
pub const VMM_ENV: &str = "BERTH_VMM";

/// How long a VMM gets to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a VMM gets to shut down (the VMM's own vCPU timeout is the same).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Labels and annotations kept beside the VMM, in `metadata.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Metadata {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// A guest as the local driver sees it: the observed guest and the VMM's status.
#[derive(Debug, Clone)]
pub struct LocalGuest {
    /// The guest in the reconciler's terms.
    pub observed: ObservedGuest,
    /// The VMM's brief status ([`berth_hypervisor::control::StatusArgs::brief`]), as it
    /// reported it; `None` when it did not answer (`observed.unresponsive` says why).
    pub status: Option<Status>,
    /// The VMM's pid, when known.
    pub pid: Option<i32>,
}

/// How long a VMM that holds its lock gets to answer a status request.
pub const PROBE_PATIENCE: Duration = Duration::from_secs(3);

/// What asking a guest's VMM for its status found.
enum Probe {
    /// It answered (on this connection, when it is kept).
    Answered(Option<Client>, Box<Status>),
    /// It holds its lock, so it runs, but did not answer in time.
    Unresponsive {
        /// Its pid, from its pid file.
        pid: Option<i32>,
        /// What went wrong.
        why: String,
    },
    /// No VMM holds the guest's lock.
    Gone,
}

/// Runs guests as berth-vmm processes on this host. See the module documentation.
#[derive(Debug)]
pub struct LocalDriver {
    host: String,
    state_dir: PathBuf,
    vmm: PathBuf,
    /// VMMs this process started, reaped once they exit (so that a long-lived
    /// `berth serve` keeps no zombies).
    children: Mutex<Vec<Child>>,
    /// Set by [`LocalDriver::cancel_migrations`]: migrations in flight are cancelled
    /// (the guest stays in its source VMM) and no new one starts.
    cancel: AtomicBool,
    /// Guests whose migration away this process follows ([`LocalDriver::begin_outgoing`]).
    outgoing: Mutex<HashSet<String>>,
    /// 1: an observe asks one VMM after the other; more: it asks every VMM at once from
    /// one thread, and probes those that did not answer on up to this many threads.
    observe_workers: usize,
    /// Each guest's files as an observe last read them ([`GuestFiles::read_kept`]).
    files_read: Mutex<HashMap<PathBuf, KeptGuestFiles>>,
    /// The fence file an HA guest's VMM reads its first deadline from
    /// ([`LocalDriver::fence_ha_guests`]).
    ha_fence: std::sync::OnceLock<PathBuf>,
}

impl LocalDriver {
    /// A driver for host `host` (the name guests' `spec.host` uses for this machine),
    /// keeping guests under `state_dir`, starting `vmm` (see [`locate_vmm`]).
    pub fn new(host: impl Into<String>, state_dir: impl Into<PathBuf>, vmm: PathBuf) -> Self {
        LocalDriver {
            host: host.into(),
            state_dir: state_dir.into(),
            vmm,
            children: Mutex::new(Vec::new()),
            cancel: AtomicBool::new(false),
            outgoing: Mutex::new(HashSet::new()),
            observe_workers: OBSERVE_WORKERS,
            files_read: Mutex::new(HashMap::new()),
            ha_fence: std::sync::OnceLock::new(),
        }
    }

    /// From now on, the VMM of every HA guest (`availability: {onHostFailure: restart}`)
    /// this driver starts has its self-fence armed from its first instant, to the
    /// deadline in `file` (`berth-vmm run --fence-file`), which `berth serve` keeps
    /// current while its lease is held ([`crate::etcd::keep_fences`]), and renewed from
    /// there. Without it, a service that died between a start and its first renewal would
    /// leave the guest running unfenced while the leader restarts it elsewhere. A VMM
    /// whose deadline passed before its vCPUs could start refuses to start them. Set
    /// once; later calls are ignored.
    pub fn fence_ha_guests(&self, file: PathBuf) {
        let _ = self.ha_fence.set(file);
    }

    /// With `workers` above 1 (default [`OBSERVE_WORKERS`]), an observe asks every VMM
    /// at once from one thread and probes those that did not answer at once (gone,
    /// starting, slow) on up to `workers` threads; 1 asks one VMM after the other.
    pub fn observe_workers(mut self, workers: usize) -> Self {
        self.observe_workers = workers.max(1);
        self
    }

    /// Cancels the migrations in flight (the VMM's `migrateCancel`: a migration
    /// before its switchover ends with the guest in its source VMM) and refuses new
    /// ones; `berth serve` calls it on SIGTERM.
    pub fn cancel_migrations(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether [`LocalDriver::cancel_migrations`] was called.
    pub fn cancelling(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The control socket of the VMM running guest `name`.
    pub fn control_socket(&self, name: &str) -> PathBuf {
        self.socket(name)
    }

    /// The guests with a directory in this host's state (running, or stopped and not
    /// yet cleaned up), sorted; not the `<name>.incoming` of a migration under way. One
    /// directory listing, no request to any VMM.
    ///
    /// # Errors
    /// When the state directory exists and cannot be listed.
    pub fn guest_dir_names(&self) -> std::io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(self.guests_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            // The entry's type from the directory listing: no `stat` per guest.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            // `<name>.incoming` belongs to a migration under way; guest names have no dot.
            .filter(|n| !n.contains('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether an incoming VMM for `name` (a migration to this host) holds its lock.
    pub fn incoming_under_way(&self, name: &str) -> bool {
        vmm_lock_held(&self.guests_dir().join(format!("{name}.incoming")))
    }

    /// Starts an incoming VMM for `guest` listening on `listen` (a migration from
    /// another host); returns its pid and the listen address and one-time token it
    /// reported. The VMM removes itself if the migration fails before its commit, and
    /// takes over the guest's directory after it.
    ///
    /// # Errors
    /// When the guest already runs here or is already arriving, or the VMM cannot be
    /// built.
    pub fn prepare_incoming(
        &self,
        guest: &Guest,
        listen: &str,
    ) -> Result<(i32, String, String), DriverError> {
        let name = &guest.metadata.name;
        if let Some((_, status)) = self.refuse_if_running(name)? {
            return Err(DriverError::Refused(format!(
                "guest {name} already runs on {} (pid {})",
                self.host, status.pid
            )));
        }
        if self.incoming_under_way(name) {
            return Err(DriverError::Refused(format!(
                "a migration of {name} to {} is already under way",
                self.host
            )));
        }
        self.spawn_incoming(guest, listen)
    }

    /// Starts a VMM that waits for a migration of `guest` on `listen` (the one way an
    /// incoming VMM is made, for a local or a cross-host move); returns its pid and the
    /// address and one-time token it reported. A VMM that reports neither is ended.
    fn spawn_incoming(
        &self,
        guest: &Guest,
        listen: &str,
    ) -> Result<(i32, String, String), DriverError> {
        let name = &guest.metadata.name;
        let pid = {
            let _pool_lock = match guest.spec.memory.hugepages {
                Some(_) => Some(lock_hugepage_pools()?),
                None => None,
            };
            self.spawn_vmm(guest, Some(listen))?
        };
        let status = Client::connect(self.incoming_socket(name))
            .and_then(|mut c| c.call(Op::MigrateStatus))
            .map_err(|e| failed(format!("asking the incoming VMM of {name}"), e))
            .and_then(|v| {
                serde_json::from_value::<MigrationStatus>(v)
                    .map_err(|e| failed("reading the incoming VMM's status", e))
            });
        match status {
            Ok(MigrationStatus {
                listen: Some(listen),
                token: Some(token),
                ..
            }) => Ok((pid, listen, token)),
            Ok(_) => {
                kill_pid(pid);
                Err(DriverError::Failed {
                    context: format!("preparing the incoming migration of {name}"),
                    cause: "the incoming VMM reported no address and token".into(),
                })
            }
            Err(e) => {
                kill_pid(pid);
                Err(e)
            }
        }
    }

    /// The host this driver acts on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn guests_dir(&self) -> PathBuf {
        self.state_dir.join("guests")
    }

    fn guest_dir(&self, name: &str) -> PathBuf {
        self.guests_dir().join(name)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.guest_dir(name).join("control.sock")
    }

    /// The control socket of the incoming VMM of `name` (in `<name>.incoming/`).
    pub fn incoming_socket(&self, name: &str) -> PathBuf {
        self.guests_dir()
            .join(format!("{name}.incoming"))
            .join("control.sock")
    }

    fn check_host(&self, host: &str) -> Result<(), DriverError> {
        if host == self.host {
            Ok(())
        } else {
            Err(DriverError::NotFound(format!(
                "host {host} is not this host ({}): the local driver acts on this host only",
                self.host
            )))
        }
    }

    /// Every guest with a live VMM, with its full status, by name. A directory whose
    /// VMM is dead (killed by hand) has its stale files and cgroup removed.
    ///
    /// # Errors
    /// When the state directory cannot be listed.
    pub fn guests(&self) -> Result<Vec<LocalGuest>, DriverError> {
        self.reap();
        let dir = self.guests_dir();
        let names = self
            .guest_dir_names()
            .map_err(|e| failed(format!("listing {}", dir.display()), e))?;
        let online = affinity::online_cpus().map_err(|e| failed("reading the online CPUs", e))?;
        let observe = |name: &String, probe: Probe, files: Option<GuestFiles>| match probe {
            Probe::Answered(client, status) => {
                let files = files.unwrap_or_else(|| GuestFiles::read(&self.guest_dir(name)));
                let mut observed = self.observed_with(name, &status, &online, files);
                // A second request only while a migration is under way (or the VMM
                // is too old to say).
                if status.migration.is_none_or(MigrationPhase::is_active) {
                    let client = client.map_or_else(|| Client::connect(self.socket(name)), Ok);
                    observed.migrating_to = client
                        .ok()
                        .and_then(|mut c| self.outgoing_migration(&mut c));
                }
                Some(LocalGuest {
                    observed,
                    pid: Some(status.pid),
                    status: Some(*status),
                })
            }
            // Never dropped: it runs, it is only not telling how.
            Probe::Unresponsive { pid, why } => Some(LocalGuest {
                observed: self.unresponsive_guest(name, why),
                status: None,
                pid,
            }),
            Probe::Gone => {
                self.clean_if_dead(name);
                None
            }
        };
        let mut guests: Vec<LocalGuest> = if self.observe_workers <= 1 {
            names
                .iter()
                .filter_map(|name| observe(name, self.probe(name), None))
                .collect()
        } else {
            // Every VMM asked at once from this thread, which reads the guests' files
            // while the VMMs answer; one that did not answer at once (gone, starting,
            // slow) gets the patient probe, on up to `observe_workers` threads.
            let sockets: Vec<PathBuf> = names.iter().map(|n| self.socket(n)).collect();
            let asked = StatusRequests::send(&sockets);
            let files: Vec<GuestFiles> = {
                let mut kept = self.files_read.lock().unwrap_or_else(|e| e.into_inner());
                let dirs: Vec<PathBuf> = names.iter().map(|n| self.guest_dir(n)).collect();
                let listed: HashSet<&PathBuf> = dirs.iter().collect();
                kept.retain(|dir, _| listed.contains(dir));
                dirs.iter()
                    .map(|dir| GuestFiles::read_kept(dir, &mut kept))
                    .collect()
            };
            let replies = asked.replies(PROBE_PATIENCE);
            let silent: Vec<&String> = names
                .iter()
                .zip(&replies)
                .filter(|(_, r)| r.is_err())
                .map(|(n, _)| n)
                .collect();
            let mut probed =
                in_parallel(&silent, self.observe_workers, |n| self.probe(n)).into_iter();
            names
                .iter()
                .zip(replies)
                .zip(files)
                .filter_map(|((name, reply), files)| {
                    let probe = match reply {
                        Ok(status) => Probe::Answered(None, Box::new(status)),
                        Err(_) => probed.next().unwrap_or(Probe::Gone),
                    };
                    observe(name, probe, Some(files))
                })
                .collect()
        };
        // A guest that arrived by migration and runs, but whose VMM could not take over
        // `<name>/` yet (the handover failed; the VMM keeps trying): seen from
        // `<name>.incoming/`, never left running unseen.
        let mut arrived: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".incoming").map(str::to_owned))
            .filter(|n| !guests.iter().any(|g| &g.observed.name == n))
            .collect();
        arrived.sort();
        for name in arrived {
            if let Some(status) = self.committed_incoming_status(&name) {
                // Its spec is the one it was started with, in `<name>.incoming/` (the
                // guest's own directory may not have one yet, or an old one).
                let incoming =
                    berth_hypervisor::migration::incoming::incoming_dir(&self.state_dir, &name);
                let observed =
                    self.observed_with(&name, &status, &online, GuestFiles::read(&incoming));
                guests.push(LocalGuest {
                    observed,
                    pid: Some(status.pid),
                    status: Some(status),
                });
            }
        }
        Ok(guests)
    }

    /// The status of the incoming VMM of `name` if it read `Commit` (so it runs the
    /// guest, or did) and still answers in `<name>.incoming/`.
    fn committed_incoming_status(&self, name: &str) -> Option<Status> {
        let mut client = Client::connect(self.incoming_socket(name)).ok()?;
        let migration: MigrationStatus =
            serde_json::from_value(client.call(Op::MigrateStatus).ok()?).ok()?;
        if !migration.committed {
            return None;
        }
        client.status().ok()
    }

    /// Whether an incoming VMM of `name` read `Commit` here and its source has not
    /// confirmed `Running` (its durable marker is there, and no VMM holds the directory:
    /// the VMM handed the guest over, or ended): the guest counts as run here.
    pub fn incoming_committed(&self, name: &str) -> bool {
        !self.incoming_under_way(name)
            && berth_hypervisor::migration::incoming::committed_marker(&self.state_dir, name)
                .exists()
    }

    /// Removes the committed marker that the incoming VMM `pid` of `name` left in
    /// `<name>.incoming/` (its source did not confirm `Running`), once that source no
    /// longer needs the answer: it was resolved, or it resolves from the fleet's
    /// ownership record. A marker of another VMM is left alone (it may be the answer
    /// to another source), and so is a directory an incoming VMM holds. True when it
    /// removed one.
    ///
    /// # Errors
    /// The directory cannot be removed.
    pub fn forget_committed(&self, name: &str, pid: i32) -> std::io::Result<bool> {
        use berth_hypervisor::migration::{incoming, receive};
        let marker = incoming::committed_marker(&self.state_dir, name);
        if receive::committed_marker_pid(&marker) != Some(pid) || self.incoming_under_way(name) {
            return Ok(false);
        }
        std::fs::remove_dir_all(incoming::incoming_dir(&self.state_dir, name))?;
        Ok(true)
    }

    /// Asks the VMM of `name` for its status. A VMM that holds its lock runs (it may be
    /// starting, paused in a switchover or just slow on a loaded machine): it gets
    /// [`PROBE_PATIENCE`] to answer, and is reported [`Probe::Unresponsive`] rather
    /// than gone when it does not, since a guest not seen is a guest planned to start.
    fn probe(&self, name: &str) -> Probe {
        let socket = self.socket(name);
        let deadline = Instant::now() + PROBE_PATIENCE;
        loop {
            let error = match Client::connect(&socket) {
                Ok(mut client) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let asked = client
                        .set_timeout(left.max(Duration::from_millis(100)))
                        .and_then(|()| client.brief_status());
                    match asked {
                        Ok(status) => return Probe::Answered(Some(client), Box::new(status)),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if !vmm_lock_held(&self.guest_dir(name)) {
                return Probe::Gone;
            }
            let pid = std::fs::read_to_string(self.guest_dir(name).join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            // A VMM that arrived by migration takes `<name>/` (lock and pid first) before
            // its control socket moves there; until then it answers in
            // `<name>.incoming/`.
            if let Some(status) = self
                .committed_incoming_status(name)
                .filter(|s| Some(s.pid) == pid)
            {
                return Probe::Answered(None, Box::new(status));
            }
            if Instant::now() > deadline {
                let why = match error {
                    ClientError::Io(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        format!("no status within {PROBE_PATIENCE:?}")
                    }
                    e => format!("no status within {PROBE_PATIENCE:?}; last: {e}"),
                };
                return Probe::Unresponsive { pid, why };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Refuses to start or receive `name` while a VMM of it runs here, answering or not.
    fn refuse_if_running(&self, name: &str) -> Result<Option<(Client, Status)>, DriverError> {
        match self.probe(name) {
            Probe::Gone => Ok(None),
            Probe::Unresponsive { pid, why } => Err(DriverError::Refused(format!(
                "guest {name} already runs on {} (pid {}) but its VMM does not answer ({why})",
                self.host,
                pid.map_or_else(|| "unknown".into(), |p| p.to_string()),
            ))),
            Probe::Answered(Some(client), status) => Ok(Some((client, *status))),
            // (`probe` keeps its connection; a new one otherwise.)
            Probe::Answered(None, status) => Client::connect(self.socket(name))
                .map(|client| Some((client, *status)))
                .map_err(|e| failed(format!("asking the VMM of {name} again"), e)),
        }
    }

    /// The guest of an unresponsive VMM, as the spec it was built from describes it.
    fn unresponsive_guest(&self, name: &str, why: String) -> ObservedGuest {
        let dir = self.guest_dir(name);
        let spec = start_spec(&dir);
        let mut guest = match &spec {
            Some(spec) => ObservedGuest::as_written(spec),
            None => ObservedGuest {
                name: name.to_owned(),
                host: self.host.clone(),
                state: GuestState::Running,
                boot: Boot::default(),
                cpu: ObservedCpu {
                    vcpus: 0,
                    max_vcpus: 0,
                    mode: CpuMode::default(),
                    model: None,
                    pinning: None,
                },
                memory: ObservedMemory {
                    size: Bytes(0),
                    hugepages: None,
                    locked: false,
                    share_pages: false,
                    tune: None,
                    numa: None,
                },
                io_weight: None,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                migrating_to: None,
                unresponsive: None,
            },
        };
        guest.name = name.to_owned();
        guest.host.clone_from(&self.host);
        if guest.state == GuestState::Stopped {
            guest.state = GuestState::Running;
        }
        if let Some(metadata) = read_metadata(&dir) {
            guest.labels = metadata.labels;
            guest.annotations = metadata.annotations;
        }
        guest.unresponsive = Some(why);
        guest
    }

    /// Where the guest is being migrated to, while a migration runs: this host for a
    /// local migration, else the destination's address.
    fn outgoing_migration(&self, client: &mut Client) -> Option<String> {
        let value = client.call(Op::MigrateStatus).ok()?;
        let status: MigrationStatus = serde_json::from_value(value).ok()?;
        if !status.phase.is_active() || status.role.as_deref() != Some("outgoing") {
            return None;
        }
        let destination = status.destination?;
        let local = destination
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        Some(if local {
            self.host.clone()
        } else {
            destination
        })
    }

    /// Removes what a dead VMM left (socket, pid file, cgroup), holding its lock so that
    /// no VMM can be starting meanwhile. The console log and specs stay for inspection.
    fn clean_if_dead(&self, name: &str) {
        let dir = self.guest_dir(name);
        let Some(_lock) = try_lock(&dir.join("vmm.lock")) else {
            return;
        };
        for file in ["control.sock", "pid"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        if let Ok(cgroups) = Cgroups::detect() {
            let _ = cgroups.remove_stale(name);
        }
    }

    /// The guest `status` describes, with what its files say (`files`, read from its
    /// directory).
    fn observed_with(
        &self,
        name: &str,
        status: &Status,
        online: &CpuSet,
        files: GuestFiles,
    ) -> ObservedGuest {
        // Boot, CPU model and NUMA policy do not change during a VMM's life.
        let GuestFiles { spec, metadata } = files;
        let metadata = metadata.unwrap_or_else(|| Metadata {
            labels: spec
                .as_ref()
                .map(|g| g.metadata.labels.clone())
                .unwrap_or_default(),
            annotations: spec
                .as_ref()
                .map(|g| g.metadata.annotations.clone())
                .unwrap_or_default(),
        });
        let readback: Option<CgroupLimits> = status
            .cgroup
            .as_ref()
            .and_then(|c| c.get("values"))
            .and_then(|v| CgroupLimits::deserialize(v).ok());
        let state = match status.state {
            GuestRunState::Running => GuestState::Running,
            GuestRunState::Paused => GuestState::Paused,
            // A halted or crashed guest runs no more: it is started again (its VMM is
            // shut down first).
            GuestRunState::Halted | GuestRunState::Crashed => GuestState::Stopped,
        };
        // A guest that asks for no weight runs with the cgroup's default one, which is
        // not a change to undo.
        let io_weight = match readback.as_ref().and_then(|r| r.io_weight.as_ref()) {
            Some(Knob::Enforced(weight)) if status.io.is_some() => Some(*weight),
            _ => status.io.map(|io| io.weight),
        };
        ObservedGuest {
            name: name.to_owned(),
            host: self.host.clone(),
            state,
            boot: spec.as_ref().map(|g| g.spec.boot.clone()).unwrap_or(Boot {
                kernel: status.boot.clone(),
                ..Boot::default()
            }),
            cpu: ObservedCpu {
                vcpus: status.vcpus,
                max_vcpus: status.max_vcpus,
                mode: spec
                    .as_ref()
                    .map_or(CpuMode::default(), |g| g.spec.cpu.mode),
                model: spec.as_ref().and_then(|g| g.spec.cpu.model.clone()),
                pinning: pinning_in_force(status, online),
            },
            memory: ObservedMemory {
                size: Bytes(status.memory.size),
                hugepages: backing_page_size(&status.memory.backing),
                locked: status.memory.locked > 0,
                share_pages: status.memory.share_pages,
                tune: memtune_in_force(readback.as_ref(), status.memtune.as_ref()),
                numa: spec.as_ref().and_then(|g| g.spec.memory.numa.clone()),
            },
            io_weight,
            labels: metadata.labels,
            annotations: metadata.annotations,
            migrating_to: None,
            unresponsive: None,
        }
    }

    pub(crate) fn observe_host(&self) -> Result<ObservedHost, DriverError> {
        let cpus = affinity::online_cpus().map_err(|e| failed("reading the online CPUs", e))?;
        let meminfo = sysinfo::read_meminfo().map_err(|e| failed("reading the host memory", e))?;
        let mut pools = BTreeMap::new();
        for size in
            hugepages::supported_page_sizes().map_err(|e| failed("listing hugepage pools", e))?
        {
            let stats = HugePagePool::new(size)
                .stats()
                .map_err(|e| failed(format!("reading the {size} hugepage pool"), e))?;
            pools.insert(
                size,
                HugepagePool {
                    total: stats.total,
                    free: stats.free,
                },
            );
        }
        let ksm = sysinfo::read_ksm().map_err(|e| failed("reading the KSM settings", e))?;
        let thp = sysinfo::read_thp_mode()
            .map_err(|e| failed("reading the transparent hugepage mode", e))?;
        let cpu = sysinfo::read_cpuinfo().map_err(|e| failed("reading /proc/cpuinfo", e))?;
        Ok(ObservedHost {
            name: self.host.clone(),
            cpus,
            memory_total: meminfo.total,
            memory_free: meminfo.available,
            hugepages: pools,
            ksm: ksm.spec(),
            transparent_hugepages: thp,
            cpu: CpuInfo {
                vendor: Some(cpu.vendor),
                model: Some(cpu.model_name).filter(|m| !m.is_empty()),
                flags: cpu.flags,
            },
        })
    }

    /// The VMM of `name`: in `<name>/`, else a committed incoming VMM still in
    /// `<name>.incoming/` (its handover failed), which is adopted as the guest's VMM.
    fn connect(&self, name: &str) -> Result<Client, DriverError> {
        Client::connect(self.socket(name)).or_else(|e| {
            if self.committed_incoming_status(name).is_some() {
                if let Ok(client) = Client::connect(self.incoming_socket(name)) {
                    return Ok(client);
                }
            }
            Err(DriverError::NotFound(format!(
                "guest {name} does not run on {} ({e})",
                self.host
            )))
        })
    }

    /// Stops guest `name` also while its VMM's outgoing migration is in
    /// `switchoverUnknown` (`berth stop --force-unknown-switchover`): only for an
    /// operator who knows the destination runs the guest; otherwise it is lost.
    ///
    /// # Errors
    /// As [`Driver::stop`].
    pub fn stop_forced(&self, name: &str) -> Result<(), DriverError> {
        let mut probe = self.connect(name)?;
        let pid = probe
            .status()
            .map_err(|e| failed(format!("reading the status of {name}"), e))?
            .pid;
        match self.connect(name)?.shutdown_forced(STOP_TIMEOUT) {
            Ok(()) | Err(ClientError::Closed | ClientError::Io(_)) => {}
            Err(e) => return Err(failed(format!("shutting down guest {name}"), e)),
        }
        if !self.wait_gone(pid, STOP_TIMEOUT) {
            return Err(DriverError::Failed {
                context: format!("stopping guest {name}"),
                cause: format!("the VMM (pid {pid}) is still running after a forced shutdown")
                    .into(),
            });
        }
        self.clean_if_dead(name);
        Ok(())
    }

    /// Waits for the process `pid` to end.
    fn wait_gone(&self, pid: i32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap();
            if !process_exists(pid) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn reap(&self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }

    /// Shuts the VMM of `name` down and waits for its process to end.
    fn shutdown(&self, name: &str, client: Client, pid: i32) -> Result<(), DriverError> {
        match client.shutdown(STOP_TIMEOUT) {
            Ok(()) | Err(ClientError::Closed | ClientError::Io(_)) => {}
            Err(e) => return Err(failed(format!("shutting down guest {name}"), e)),
        }
        if self.wait_gone(pid, STOP_TIMEOUT) {
            Ok(())
        } else {
            Err(DriverError::Failed {
                context: format!("stopping guest {name}"),
                cause: format!(
                    "the VMM (pid {pid}) is still running {STOP_TIMEOUT:?} after shutdown"
                )
                .into(),
            })
        }
    }

    /// Live-migrates the guest into a new VMM on this host built from `guest` (the
    /// restart-class changes: hugepage backing, memory size, maxVcpus, locking...).
    /// On failure before the commit the guest keeps running in its old VMM.
    fn local_migrate(&self, guest: &Guest) -> Result<(), DriverError> {
        let name = &guest.metadata.name;
        if self.cancelling() {
            return Err(DriverError::Refused(format!(
                "{name}: not migrating, the service is stopping"
            )));
        }
        let _following = self.begin_outgoing(name)?;
        let mut source = self.connect(name)?;
        let source_pid = source
            .status()
            .map_err(|e| failed(format!("reading the status of {name}"), e))?
            .pid;
        let migration_failed = |what: String| DriverError::Failed {
            context: format!("migrating {name} into a new VMM"),
            cause: what.into(),
        };
        let (dest_pid, listen, token) = self.spawn_incoming(guest, "127.0.0.1:0")?;
        let record = OutgoingRecord {
            guest: name.clone(),
            to: self.host.clone(),
            peer: None,
            destination: listen.clone(),
            source_pid,
            destination_pid: Some(dest_pid),
        };
        if let Err(e) = self.record_outgoing(&record) {
            kill_pid(dest_pid);
            return Err(e);
        }
        let args = MigrateArgs {
            destination: listen,
            token,
            policy: guest.spec.migration,
            connections: None,
        };
        if let Err(e) = source.call(Op::Migrate(args)) {
            self.forget_outgoing(name);
            kill_pid(dest_pid);
            return Err(failed(format!("starting the migration of {name}"), e));
        }
        let new_vmm = NewVmm {
            driver: self,
            guest: name,
            pid: dest_pid,
        };
        let outcome = follow::follow(
            &mut source,
            &new_vmm,
            &follow::Follow {
                guest: name,
                // Generous: the policy's completion timeout applies inside the VMM.
                deadline: Duration::from_secs(600),
                // The new VMM tells within its link timeout whether it read Commit.
                resolve_within: Duration::from_secs(30),
                ask_every: Duration::from_millis(20),
                cancelling: &|| self.cancelling(),
            },
        );
        self.forget_outgoing_if_ended(&record);
        match outcome {
            Ok(_) => {}
            Err(FollowError::Failed(reason)) => {
                // The incoming VMM exits by itself when the migration fails before commit.
                if !self.wait_gone(dest_pid, STOP_TIMEOUT) {
                    kill_pid(dest_pid);
                }
                return Err(migration_failed(reason));
            }
            // The new VMM may run the guest: it is left alone, never killed.
            Err(FollowError::Unknown(reason)) => {
                return Err(migration_failed(format!(
                "{reason}; the switchover is unknown, the new VMM (pid {dest_pid}) is left alone"
            )))
            }
        }
        if !process_exists(dest_pid) {
            // The new VMM read Commit and ended: the guest counts as run there (never
            // twice), so its old VMM was shut down too. Its committed marker is the
            // answer for the old VMM until that one is gone.
            if !self.wait_gone(source_pid, STOP_TIMEOUT) {
                return Err(migration_failed(format!(
                    "the new VMM (pid {dest_pid}) read Commit and then ended, and the old \
                     one (pid {source_pid}) did not exit; the guest counts as run there: \
                     resolve the old VMM's switchover (migrateResolve with \
                     destinationRunning: true)"
                )));
            }
            let _ = self.forget_committed(name, dest_pid);
            return Err(migration_failed(
                "the new VMM read Commit and then ended: the guest counts as run there, so \
                 its old VMM was shut down too; it is started afresh by the next apply"
                    .to_owned(),
            ));
        }
        if !self.wait_gone(source_pid, STOP_TIMEOUT) {
            return Err(migration_failed(format!(
                "the guest runs in the new VMM (pid {dest_pid}), but the old one (pid {source_pid}) did not exit"
            )));
        }
        // The new VMM takes over the guest's directory once the old one is gone.
        let socket = self.socket(name);
        let handed_over = Instant::now() + Duration::from_secs(30);
        loop {
            if Client::connect(&socket)
                .and_then(|mut c| c.status())
                .is_ok_and(|s| s.pid == dest_pid)
            {
                break;
            }
            if Instant::now() > handed_over {
                return Err(migration_failed(format!(
                    "the new VMM (pid {dest_pid}) runs the guest but did not take over {}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The old VMM is gone: nobody asks the new one's committed marker any more. The
        // new VMM lets go of `<name>.incoming/` just after its socket moved.
        let released = Instant::now() + Duration::from_secs(5);
        while self.incoming_under_way(name) && Instant::now() < released {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.forget_committed(name, dest_pid);
        let dir = self.guest_dir(name);
        let _ = std::fs::rename(dir.join("incoming.json"), dir.join("start.json"));
        let _ = std::fs::remove_file(dir.join("start.yaml"));
        self.write_metadata(guest)
    }

    fn write_metadata(&self, guest: &Guest) -> Result<(), DriverError> {
        let mut annotations = guest.metadata.annotations.clone();
        annotations.insert(ANNOTATION_MANAGED.to_owned(), "true".to_owned());
        let metadata = Metadata {
            labels: guest.metadata.labels.clone(),
            annotations,
        };
        let path = self.guest_dir(&guest.metadata.name).join("metadata.json");
        let text = serde_json::to_string_pretty(&metadata).unwrap_or_default();
        write_atomically(&path, &text)
    }

    /// Starts a VMM for `guest` and waits until its control socket answers; with
    /// `incoming` (a listen address) the VMM waits for a live migration instead of
    /// booting. Returns its pid.
    fn spawn_vmm(&self, guest: &Guest, incoming: Option<&str>) -> Result<i32, DriverError> {
        let name = &guest.metadata.name;
        // An HA guest's VMM is fenced from its start, an incoming one too (see
        // `berth-vmm run --fence-file`).
        let fence_file = self
            .ha_fence
            .get()
            .filter(|_| guest.spec.restarts_on_host_failure());
        let dir = self.guest_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("creating {}", dir.display()), e))?;
        let mut spec = guest.clone();
        spec.metadata
            .annotations
            .insert(ANNOTATION_MANAGED.to_owned(), "true".to_owned());
        // One start file, JSON: observe parses it for every guest, and berth-vmm reads
        // it as its --spec. A `start.yaml` that an older berth wrote beside it goes.
        let spec_path = dir.join(match incoming {
            Some(_) => "incoming.json",
            None => "start.json",
        });
        let json = serde_json::to_string(&spec)
            .map_err(|e| failed(format!("writing the spec of {name}"), e))?;
        write_atomically(&spec_path, &json)?;
        if incoming.is_none() {
            let _ = std::fs::remove_file(dir.join("start.yaml"));
            self.write_metadata(guest)?;
        }

        let log_path = dir.join("vmm.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(format!("opening {}", log_path.display()), e))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| failed(format!("opening {}", log_path.display()), e))?;
        let mut command = Command::new(&self.vmm);
        command
            .arg("run")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(
                fence_file
                    .iter()
                    .flat_map(|f| [std::ffi::OsStr::new("--fence-file"), f.as_os_str()]),
            )
            .args(incoming.iter().flat_map(|addr| ["--incoming", addr]))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: setsid is async-signal-safe and touches no memory of this process; it
        // runs in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            failed(
                format!("starting {} for guest {name}", self.vmm.display()),
                e,
            )
        })?;
        let pid = child.id() as i32;
        let socket = match incoming {
            Some(_) => self.incoming_socket(name),
            None => self.socket(name),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let outcome = loop {
            if let Ok(Some(exit)) = child.try_wait() {
                break Err(format!(
                    "berth-vmm exited ({exit}) before it was ready: {}",
                    log_since(&log_path, log_start)
                ));
            }
            if let Ok(status) = Client::connect(&socket).and_then(|mut c| c.status()) {
                if status.pid == pid {
                    break Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "berth-vmm (pid {pid}) was not ready within {START_TIMEOUT:?}; killed it: {}",
                    log_since(&log_path, log_start)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match outcome {
            Ok(()) => {
                self.children
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(child);
                Ok(pid)
            }
            Err(message) => Err(DriverError::Failed {
                context: format!("starting guest {name}"),
                cause: message.into(),
            }),
        }
    }
}

impl Driver for LocalDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Local
    }

    fn scope(&self) -> Scope {
        Scope::Host(self.host.clone())
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        let guests = self.guests()?.into_iter().map(|g| g.observed).collect();
        Ok(Observed {
            guests,
            hosts: vec![self.observe_host()?],
        })
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.check_host(host)?;
        for setting in settings {
            match *setting {
                HostSetting::HugepagePool(size, pages) => resize_pool(host, size, pages)?,
                HostSetting::KsmEnabled(_)
                | HostSetting::KsmPagesToScan(_)
                | HostSetting::KsmSleepMillisecs(_) => {
                    let mut spec = sysinfo::read_ksm()
                        .map_err(|e| failed("reading the KSM settings", e))?
                        .spec();
                    match *setting {
                        HostSetting::KsmEnabled(on) => spec.enabled = on,
                        HostSetting::KsmPagesToScan(n) => spec.pages_to_scan = Some(n),
                        HostSetting::KsmSleepMillisecs(n) => spec.sleep_millisecs = Some(n),
                        _ => {}
                    }
                    sysinfo::write_ksm(&spec).map_err(|e| failed("writing the KSM settings", e))?;
                }
                HostSetting::TransparentHugepages(mode) => sysinfo::write_thp_mode(mode)
                    .map_err(|e| failed("writing the transparent hugepage mode", e))?,
            }
        }
        Ok(())
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.check_host(host)?;
        let name = &guest.metadata.name;
        if let Some((client, status)) = self.refuse_if_running(name)? {
            match status.state {
                GuestRunState::Halted | GuestRunState::Crashed => {
                    self.shutdown(name, client, status.pid)?;
                }
                GuestRunState::Running | GuestRunState::Paused => {
                    return Err(DriverError::Refused(format!(
                        "guest {name} already runs on {host} (pid {})",
                        status.pid
                    )))
                }
            }
        }
        if self.incoming_under_way(name) {
            return Err(DriverError::Refused(format!(
                "guest {name} is arriving on {host} by a live migration; not starting a second copy"
            )));
        }
        // A hugepage-backed guest takes its pages under the pool lock, so that tests
        // that count free pages exactly (and pool resizes) do not race with it.
        let _pool_lock = match guest.spec.memory.hugepages {
            Some(_) => Some(lock_hugepage_pools()?),
            None => None,
        };
        self.spawn_vmm(guest, None).map(drop)
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.check_host(host)?;
        let name = &guest.metadata.name;
        let mut client = self.connect(name)?;
        let status = client
            .status()
            .map_err(|e| failed(format!("reading the status of {name}"), e))?;
        let capabilities = self.capabilities();
        if let Some(field) = fields.iter().find(|f| !capabilities.changes_live(**f)) {
            return Err(DriverError::Refused(format!(
                "{name}: the local driver cannot change {field} in a running guest"
            )));
        }
        let spec = &guest.spec;
        let wanted_pins = spec.cpu.pinning.clone().unwrap_or_default();
        let mut retune = Retune::default();
        let mut state_change = None;
        let mut metadata = false;
        for field in fields {
            match field {
                Field::VcpuPinning => {
                    let online = affinity::online_cpus()
                        .map_err(|e| failed("reading the online CPUs", e))?;
                    let in_force = pinning_in_force(&status, &online).unwrap_or_default();
                    let pinning = retune.pinning.get_or_insert_with(Pinning::default);
                    pinning.vcpus = wanted_pins.vcpus.clone();
                    retune.unpin_vcpus = in_force
                        .vcpus
                        .keys()
                        .chain(status.pinning.vcpus.keys())
                        .filter(|i| !wanted_pins.vcpus.contains_key(i))
                        .copied()
                        .collect::<std::collections::BTreeSet<u32>>()
                        .into_iter()
                        .collect();
                }
                Field::EmulatorPinning => match &wanted_pins.emulator {
                    Some(set) => {
                        retune.pinning.get_or_insert_with(Pinning::default).emulator =
                            Some(set.clone());
                    }
                    None => retune.unpin_emulator = true,
                },
                Field::HardLimit
                | Field::SoftLimit
                | Field::SwapHardLimit
                | Field::MinGuarantee => {
                    retune.memtune = Some(spec.memory.tune.clone().unwrap_or_default());
                }
                Field::IoWeight => match spec.io {
                    Some(io) => retune.io = Some(io),
                    None => {
                        return Err(DriverError::Refused(format!(
                            "{name}: an I/O weight cannot be removed from a running guest; \
                             write the weight you want (100 is the kernel's default)"
                        )))
                    }
                },
                Field::Vcpus => retune.vcpus = Some(spec.cpu.vcpus),
                Field::State => state_change = Some(spec.state),
                Field::Labels | Field::Annotations => metadata = true,
                other => {
                    return Err(DriverError::Refused(format!(
                        "{name}: {other} cannot be changed live"
                    )))
                }
            }
        }
        if retune != Retune::default() {
            client
                .retune(&retune)
                .map_err(|e| failed(format!("retuning {name}"), e))?;
        }
        match state_change {
            Some(GuestState::Paused) => {
                client
                    .pause()
                    .map_err(|e| failed(format!("pausing {name}"), e))?;
            }
            Some(GuestState::Running) => {
                client
                    .resume()
                    .map_err(|e| failed(format!("resuming {name}"), e))?;
            }
            Some(GuestState::Stopped) | None => {}
        }
        if metadata {
            self.write_metadata(guest)?;
        }
        Ok(())
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.check_host(host)?;
        let mut client = self.connect(name)?;
        let status = client
            .status()
            .map_err(|e| failed(format!("reading the status of {name}"), e))?;
        self.shutdown(name, client, status.pid)?;
        self.clean_if_dead(name);
        Ok(())
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        self.check_host(from)?;
        let name = &guest.metadata.name;
        if from != to {
            return Err(DriverError::Refused(format!(
                "{name}: the local driver migrates within this host only; a move to {to} \
                 is done by berth serve"
            )));
        }
        self.local_migrate(guest)
    }
}

/// The incoming VMM of a local migration, as the follower asks it.
struct NewVmm<'a> {
    driver: &'a LocalDriver,
    guest: &'a str,
    pid: i32,
}

impl follow::Destination for NewVmm<'_> {
    fn runs_guest(&self) -> Result<bool, follow::CannotTell> {
        // Handed over already: the new VMM answers on the guest's own socket.
        let handed_over = Client::connect(self.driver.socket(self.guest))
            .and_then(|mut c| c.status())
            .is_ok_and(|s| s.pid == self.pid);
        if handed_over {
            return Ok(true);
        }
        match self.driver.local_incoming_runs(self.guest)? {
            // It says no, and will exit: until it has, it is not taken at its word.
            false if process_exists(self.pid) => {
                Err(follow::CannotTell::NotExited { pid: self.pid })
            }
            running => Ok(running),
        }
    }

    fn name(&self) -> String {
        format!("the new VMM (pid {})", self.pid)
    }
}

/// How many VMMs that did not answer an observe's first request at once are probed
/// at once by default: a probe mostly waits (for a starting or slow VMM), so more
/// threads than CPUs pay off.
pub const OBSERVE_WORKERS: usize = 32;

/// `f` of every item, in order, on up to `workers` threads.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let workers = items.len().min(workers);
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else {
                            return done;
                        };
                        done.push((i, f(item)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an observing thread does not panic"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The berth-vmm binary: `explicit` (`--vmm-path`), else `$BERTH_VMM`, else `berth-vmm`
/// next to the running executable.
///
/// # Errors
/// [`DriverError::NotFound`] naming where it looked.
pub fn locate_vmm(explicit: Option<&Path>) -> Result<PathBuf, DriverError> {
    if let Some(path) = explicit {
        return existing(path.to_owned(), "--vmm-path");
    }
    if let Some(path) = std::env::var_os(VMM_ENV).filter(|v| !v.is_empty()) {
        return existing(PathBuf::from(path), VMM_ENV);
    }
    let exe = std::env::current_exe().map_err(|e| failed("locating the berth executable", e))?;
    let beside = exe
        .parent()
        .map(|d| d.join("berth-vmm"))
        .unwrap_or_else(|| PathBuf::from("berth-vmm"));
    existing(beside, "the directory of berth").map_err(|_| {
        DriverError::NotFound(format!(
            "berth-vmm is not next to {} ; pass --vmm-path or set {VMM_ENV}",
            exe.display()
        ))
    })
}

fn existing(path: PathBuf, from: &str) -> Result<PathBuf, DriverError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(DriverError::NotFound(format!(
            "berth-vmm not found at {} (from {from})",
            path.display()
        )))
    }
}

/// What observe reads from a guest's directory besides the VMM's status.
#[derive(Debug, Clone, Default)]
struct GuestFiles {
    /// The spec its VMM was built from ([`start_spec`]).
    spec: Option<Guest>,
    /// Its labels and annotations as last applied.
    metadata: Option<Metadata>,
}

impl GuestFiles {
    fn read(dir: &Path) -> GuestFiles {
        GuestFiles {
            spec: start_spec(dir),
            metadata: read_metadata(dir),
        }
    }

    /// [`GuestFiles::read`], parsed again only when `start.json` or `metadata.json`
    /// changed since `kept` took them: one `stat` per file instead of opening, reading
    /// and parsing it on every observe. Both files are only ever replaced whole
    /// (written beside and renamed over), so a change gives a new inode. A directory
    /// without `start.json` (a VMM started by an older berth) is read every time.
    fn read_kept(dir: &Path, kept: &mut HashMap<PathBuf, KeptGuestFiles>) -> GuestFiles {
        let stamps = (
            FileStamp::of(&dir.join("start.json")),
            FileStamp::of(&dir.join("metadata.json")),
        );
        if stamps.0.is_none() {
            return GuestFiles::read(dir);
        }
        if let Some(known) = kept.get(dir).filter(|k| k.stamps == stamps) {
            return known.files.clone();
        }
        let files = GuestFiles::read(dir);
        kept.insert(
            dir.to_owned(),
            KeptGuestFiles {
                stamps,
                files: files.clone(),
            },
        );
        files
    }
}

/// A guest's files as read, and what their `stat` said then.
#[derive(Debug)]
struct KeptGuestFiles {
    /// `start.json`, `metadata.json`.
    stamps: (Option<FileStamp>, Option<FileStamp>),
    files: GuestFiles,
}

/// What tells a file's content apart without reading it: its device, inode, size and
/// modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// `None` when the file does not exist (or cannot be read).
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The spec the VMM in `dir` was built from: `start.json` (written beside `start.yaml`
/// for observe, which reads it for every guest: JSON parses many times faster than
/// YAML), else `start.yaml` (a VMM started by an older berth), else the VMM's own
/// record `spec.yaml`. `start.*` follows a local migration into a new VMM.
fn start_spec(dir: &Path) -> Option<Guest> {
    if let Some(guest) = std::fs::read(dir.join("start.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    {
        return Some(guest);
    }
    ["start.yaml", "spec.yaml"].iter().find_map(|file| {
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        serde_yaml::from_str(&text).ok()
    })
}

/// The pinning in force, read back from `/proc` through the VMM's status. A thread is
/// reported pinned when the VMM was asked to pin it or when its affinity is narrower than
/// the online CPUs (someone pinned it by hand). A vCPU not started yet reports the pin
/// it will get.
fn pinning_in_force(status: &Status, online: &CpuSet) -> Option<Pinning> {
    let asked = &status.pinning;
    let mut vcpus = BTreeMap::new();
    for v in status.vcpu.iter().filter(|v| v.index < status.max_vcpus) {
        match (&v.affinity, asked.vcpus.get(&v.index)) {
            (Some(actual), pinned) if pinned.is_some() || actual != online => {
                vcpus.insert(v.index, actual.clone());
            }
            (None, Some(pin)) => {
                vcpus.insert(v.index, pin.clone());
            }
            _ => {}
        }
    }
    let expected = asked.emulator.as_ref().unwrap_or(online);
    let actual: Vec<&CpuSet> = status
        .emulator_threads
        .iter()
        .filter_map(|t| t.affinity.as_ref())
        .collect();
    let emulator = actual
        .iter()
        .find(|a| **a != expected)
        .or(actual.first())
        .map(|a| (*a).clone())
        .filter(|a| asked.emulator.is_some() || a != online);
    (!vcpus.is_empty() || emulator.is_some()).then_some(Pinning { vcpus, emulator })
}

/// Memory limits in force, from the cgroup files; a limit the host cannot enforce is
/// reported as asked (it exists nowhere else).
fn memtune_in_force(readback: Option<&CgroupLimits>, asked: Option<&MemTune>) -> Option<MemTune> {
    let knob = |k: Option<&Knob<Option<Bytes>>>, asked: Option<Bytes>| match k {
        Some(Knob::Enforced(v)) => *v,
        _ => asked,
    };
    let memory = readback.map(|r| &r.memory);
    let tune = MemTune {
        hard_limit: knob(
            memory.map(|m| &m.hard_limit),
            asked.and_then(|t| t.hard_limit),
        ),
        soft_limit: knob(
            memory.map(|m| &m.soft_limit),
            asked.and_then(|t| t.soft_limit),
        ),
        swap_hard_limit: knob(
            memory.map(|m| &m.swap_hard_limit),
            asked.and_then(|t| t.swap_hard_limit),
        ),
        min_guarantee: knob(
            memory.map(|m| &m.min_guarantee),
            asked.and_then(|t| t.min_guarantee),
        ),
        allow_hard_limit_below_size: false,
    };
    (tune != MemTune::default()).then_some(tune)
}

/// `hugetlb-2MiB` -> 2 MiB pages; `anonymous` -> none.
fn backing_page_size(backing: &str) -> Option<PageSize> {
    match backing.strip_prefix("hugetlb-")? {
        "2MiB" => Some(PageSize::Huge2M),
        "1GiB" => Some(PageSize::Huge1G),
        _ => None,
    }
}

/// Resizes one hugepage pool and checks what the kernel gave.
fn resize_pool(host: &str, size: PageSize, pages: u64) -> Result<(), DriverError> {
    let _lock = lock_hugepage_pools()?;
    let pool = HugePagePool::new(size);
    let before = pool
        .stats()
        .map_err(|e| failed(format!("reading the {size} hugepage pool"), e))?;
    let held = before.total.saturating_sub(before.free) + before.reserved;
    if pages < held {
        return Err(DriverError::Capacity {
            host: host.to_owned(),
            detail: format!(
                "cannot shrink the {size} hugepage pool to {pages} pages: {held} are held by running guests"
            ),
        });
    }
    let after = pool
        .set_total(pages)
        .map_err(|e| failed(format!("resizing the {size} hugepage pool"), e))?;
    if after.total < pages {
        // Leave the pool as it was rather than half grown.
        let _ = pool.set_total(before.total);
        return Err(DriverError::Capacity {
            host: host.to_owned(),
            detail: format!(
                "asked the kernel for {pages} {size} hugepages, it gave {} (memory is short or fragmented); the pool stays at {}",
                after.total, before.total
            ),
        });
    }
    Ok(())
}

/// Holds the lock that serialises hugepage pool changes (the one
/// `berth_hypervisor::host::hugepages::PoolReservation` takes).
fn lock_hugepage_pools() -> Result<File, DriverError> {
    hugepages::lock_pools().map_err(|e| failed("locking the hugepage pools", e))
}

/// SIGKILL to a process this driver started (by its pid, never by name).
fn kill_pid(pid: i32) {
    // SAFETY: kill takes no memory; `pid` is a VMM this driver spawned and still knows.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Whether process `pid` still runs, for a VMM that stopped answering: a zombie (its
/// leader exited, even while its other threads are still torn down) counts as gone,
/// since a VMM exits right after it completed a migration. `serve::remote` keeps a
/// stricter test for waiting until a process is reaped.
/// Whether process `pid` still runs: it exists and is not a zombie (or dead) whose
/// threads have all ended. A zombie still answers kill(0), so /proc tells; a leader
/// that exited while its other threads (vCPUs) still run is not gone yet.
pub(crate) fn process_exists(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let ended = stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']));
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    !(ended && threads <= 1)
}

fn read_metadata(dir: &Path) -> Option<Metadata> {
    let text = std::fs::read_to_string(dir.join("metadata.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_atomically(path: &Path, text: &str) -> Result<(), DriverError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| failed(format!("writing {}", path.display()), e))
}

/// What the VMM wrote to its log since `offset`, trimmed to the last lines.
fn log_since(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.take(64 * 1024).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(10)..];
    if tail.is_empty() {
        "(no output)".to_owned()
    } else {
        tail.join(" / ")
    }
}

fn failed(
    context: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> DriverError {
    DriverError::failed(context, source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_hypervisor::control::{ThreadStatus, VcpuStatus};
    use berth_hypervisor::vstate::vcpu::VcpuRunState;

    fn cpus(s: &str) -> CpuSet {
        s.parse().unwrap()
    }

    #[test]
    fn the_start_spec_is_read_from_json_as_written_and_from_yaml_without_it() {
        let yaml = "apiVersion: berth.dev/v1\nkind: Guest\n\
            metadata: {name: web-1, labels: {tier: web}, annotations: {a: b}}\n\
            spec:\n  host: kvm01\n  state: paused\n\
            \x20 boot: {kernel: \"builtin:heartbeat\", heartbeat: {tickHz: 5}}\n\
            \x20 cpu: {vcpus: 2, maxVcpus: 4, mode: host-model,\n\
            \x20       pinning: {vcpus: {0: \"0\", 1: \"0-1,^0\"}, emulator: \"0-1\"}}\n\
            \x20 memory: {size: 256MiB, hugepages: {pageSize: 2MiB}, locked: true,\n\
            \x20          tune: {hardLimit: 320MiB, softLimit: 256MiB, swapHardLimit: 512MiB},\n\
            \x20          numa: {mode: strict, nodeset: \"0\"}}\n\
            \x20 io: {weight: 500}\n\
            \x20 migration: {mode: live, maxDowntime: 30ms, autoConverge: false}\n";
        let guest: Guest = serde_yaml::from_str(yaml).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("start.yaml"), yaml).unwrap();
        assert_eq!(start_spec(dir.path()).as_ref(), Some(&guest));
        std::fs::write(
            dir.path().join("start.json"),
            serde_json::to_string(&guest).unwrap(),
        )
        .unwrap();
        // From JSON, the same guest (the YAML is renamed away to prove which was read).
        std::fs::rename(dir.path().join("start.yaml"), dir.path().join("old.yaml")).unwrap();
        assert_eq!(start_spec(dir.path()), Some(guest));
    }

    #[test]
    fn in_parallel_keeps_the_order_of_the_items() {
        let items: Vec<u32> = (0..500).collect();
        let doubled = in_parallel(&items, 8, |i| {
            std::thread::sleep(Duration::from_micros(u64::from(i % 7)));
            i * 2
        });
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(in_parallel(&[] as &[u32], 8, |i| *i), Vec::<u32>::new());
        assert_eq!(in_parallel(&items, 1, |i| *i), items);
    }

    fn status(vcpus: &[(u32, Option<&str>)], emulator: &[&str], asked: Pinning) -> Status {
        let json = serde_json::json!({
            "name": "g", "pid": 1, "state": "running", "boot": "builtin:heartbeat",
            "vcpus": vcpus.len(), "maxVcpus": vcpus.len(), "vcpu": [], "emulatorThreads": [],
            "pinning": {}, "memory": {"size": 4194304, "backing": "anonymous", "hugepages": 0,
            "rss": 0, "locked": 0, "sharePages": false},
            "console": {"path": "", "lines": 0, "bytes": 0, "rotations": 0},
            "ignoredAccesses": {"pio": 0, "mmio": 0}, "uptimeMs": 0
        });
        let mut s: Status = serde_json::from_value(json).unwrap();
        s.vcpu = vcpus
            .iter()
            .map(|(i, a)| VcpuStatus {
                index: *i,
                tid: a.map(|_| 100 + *i as i32),
                affinity: a.map(cpus),
                run_state: VcpuRunState::Running,
                ticks: None,
                lines: None,
            })
            .collect();
        s.emulator_threads = emulator
            .iter()
            .enumerate()
            .map(|(n, a)| ThreadStatus {
                tid: n as i32,
                name: "t".into(),
                affinity: Some(cpus(a)),
            })
            .collect();
        s.pinning = asked;
        s
    }

    #[test]
    fn pinning_is_what_proc_shows() {
        let online = cpus("0-1");
        // Asked for 0 and 1, emulator 0-1 (all CPUs): reported, though as wide as online.
        let asked = Pinning {
            vcpus: [(0, cpus("0")), (1, cpus("1"))].into(),
            emulator: Some(cpus("0-1")),
        };
        let s = status(
            &[(0, Some("0")), (1, Some("1"))],
            &["0-1", "0-1"],
            asked.clone(),
        );
        assert_eq!(pinning_in_force(&s, &online), Some(asked.clone()));
        // A vCPU re-pinned by hand shows its new set; an emulator thread likewise.
        let s = status(&[(0, Some("1")), (1, Some("1"))], &["0-1", "1"], asked);
        let p = pinning_in_force(&s, &online).unwrap();
        assert_eq!(p.vcpus[&0], cpus("1"));
        assert_eq!(p.emulator, Some(cpus("1")));
        // Nothing asked, nothing narrowed: no pinning.
        let s = status(&[(0, Some("0-1"))], &["0-1"], Pinning::default());
        assert_eq!(pinning_in_force(&s, &online), None);
        // Nothing asked, a floating vCPU pinned by hand: drift.
        let s = status(&[(0, Some("0"))], &["0-1"], Pinning::default());
        assert_eq!(pinning_in_force(&s, &online).unwrap().vcpus[&0], cpus("0"));
    }

    #[test]
    fn unenforceable_limits_are_reported_as_asked() {
        // A full status's readback, read as the limits (a brief status carries only
        // those, without the usage).
        let readback: CgroupLimits = serde_json::from_value(serde_json::json!({
            "version": "v1",
            "memory": {
                "hardLimit": {"enforced": 201326592},
                "softLimit": {"enforced": null},
                "swapHardLimit": {"enforced": 268435456},
                "minGuarantee": {"notEnforced": "cgroup v1 has no memory.min"},
                "usage": 0
            },
            "cpus": {"enforced": "0-1"}, "mems": {"enforced": "0"},
            "ioWeight": {"notEnforced": "no weight file"}, "processes": []
        }))
        .unwrap();
        let brief: CgroupLimits = serde_json::from_value(serde_json::json!({
            "version": "v1",
            "memory": {
                "hardLimit": {"enforced": 201326592},
                "softLimit": {"enforced": null},
                "swapHardLimit": {"enforced": 268435456},
                "minGuarantee": {"notEnforced": "cgroup v1 has no memory.min"}
            },
            "ioWeight": {"notEnforced": "no weight file"}
        }))
        .unwrap();
        assert_eq!(brief.memory.hard_limit, readback.memory.hard_limit);
        assert_eq!(brief.memory.usage, None);
        assert!(readback.io_weight.is_some());
        let asked = MemTune {
            hard_limit: Some(Bytes::mib(128)),
            soft_limit: Some(Bytes::mib(100)),
            min_guarantee: Some(Bytes::mib(64)),
            ..MemTune::default()
        };
        let t = memtune_in_force(Some(&readback), Some(&asked)).unwrap();
        // In force: what the files hold, not what was asked.
        assert_eq!(t.hard_limit, Some(Bytes::mib(192)));
        assert_eq!(t.soft_limit, None);
        assert_eq!(t.swap_hard_limit, Some(Bytes::mib(256)));
        // Not enforceable here: as asked.
        assert_eq!(t.min_guarantee, Some(Bytes::mib(64)));
        assert_eq!(memtune_in_force(None, None), None);
    }

    #[test]
    fn backing_names() {
        assert_eq!(backing_page_size("hugetlb-2MiB"), Some(PageSize::Huge2M));
        assert_eq!(backing_page_size("hugetlb-1GiB"), Some(PageSize::Huge1G));
        assert_eq!(backing_page_size("anonymous"), None);
    }

    #[test]
    fn apply_lock_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path(), false, "berth apply").unwrap();
        let e = StateLock::acquire(dir.path(), false, "berth stop").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("berth apply (pid {}) holds ", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("apply.lock"), "{msg}");
        drop(held);
        StateLock::acquire(dir.path(), false, "berth apply").unwrap();
    }

    #[test]
    fn a_missing_vmm_binary_is_named() {
        let e = locate_vmm(Some(Path::new("/nonexistent/berth-vmm"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "berth-vmm not found at /nonexistent/berth-vmm (from --vmm-path)"
        );
    }
}
