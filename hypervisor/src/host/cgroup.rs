//! One cgroup per guest, `<parent>/<name>` (`berth/web-1`), on cgroup v1 and v2.
//!
//! The guest's cgroup carries libvirt's `memtune`, the cpuset and the block I/O weight:
//!
//! | manifest | cgroup v1 | cgroup v2 |
//! |---|---|---|
//! | `hardLimit` | `memory.limit_in_bytes` | `memory.max` |
//! | `softLimit` | `memory.soft_limit_in_bytes` | `memory.high` |
//! | `swapHardLimit` (memory + swap) | `memory.memsw.limit_in_bytes` | `memory.swap.max` = swapHardLimit - hardLimit (swap only) |
//! | `minGuarantee` | not enforceable | `memory.min` |
//! | cpuset | `cpuset.cpus`, `cpuset.mems` | `cpuset.cpus`, `cpuset.mems` |
//! | `io.weight` | `blkio.weight` or `blkio.bfq.weight` | `io.weight` or `io.bfq.weight` |
//!
//! A setting the host cannot enforce (`memory.min` on v1, an I/O weight without a weight
//! file, a controller that is not mounted) is never dropped silently: the setters return it
//! as [`NotEnforced`] and [`GuestCgroup::read`] reports it as [`Knob::NotEnforced`] with the
//! reason.
//!
//! Order matters on v1: `memory.memsw.limit_in_bytes` must stay at or above
//! `memory.limit_in_bytes` after every write, so [`GuestCgroup::set_memtune`] writes the
//! memory+swap limit first when the new memory limit is above the current memory+swap
//! limit, and last otherwise (libvirt does the same). A v1 cpuset accepts tasks only once
//! `cpuset.cpus` and `cpuset.mems` are set, so [`Cgroups::create`] copies them from the
//! parent.
//!
//! Values are read back from the files: what the kernel holds, not what was asked for.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_schema::{Bytes, CpuSet, MemTune};
use serde::{Deserialize, Serialize};

use super::affinity::Pid;
use super::{os_message, read_file, write_file, KeptFiles};

/// Where the kernel lists the mounts of the calling process.
pub const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// The parent of every guest cgroup unless [`Cgroups::with_parent`] says otherwise.
pub const DEFAULT_PARENT: &str = "berth";

/// v1 reports "no limit" as `LONG_MAX` rounded down to the page size
/// (9223372036854771712 with 4 KiB pages); any value this large is unlimited.
const V1_UNLIMITED_FROM: u64 = 0x7FFF_FFFF_FF00_0000;

/// How long `rmdir` is retried while the kernel still counts exited tasks in a cgroup.
const RMDIR_RETRIES: u32 = 40;
const RMDIR_RETRY_DELAY: Duration = Duration::from_millis(25);

/// Why a cgroup operation failed; each variant names the step and the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read.
    #[error("Cannot read {}: {}", .path.display(), os_message(.error))]
    Read {
        /// The file.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A cgroup file refused a value.
    #[error("Cannot write {value} to {}: {}", .path.display(), os_message(.error))]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A cgroup directory could not be created.
    #[error("Cannot create the cgroup {}: {}", .path.display(), os_message(.error))]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("Cannot remove the cgroup {}: {}", .path.display(), os_message(.error))]
    RemoveDir {
        /// The directory.
        path: PathBuf,
        /// The error from the kernel.
        error: io::Error,
    },
    /// A cgroup file held something unexpected.
    #[error("Cannot parse {}: {reason}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No cgroup filesystem is mounted.
    #[error("No cgroup filesystem is mounted (according to {})", .mountinfo.display())]
    NotMounted {
        /// The mount table that was searched.
        mountinfo: PathBuf,
    },
    /// A guest or parent name cannot be a cgroup directory name.
    #[error("{name:?} cannot name a cgroup: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The cgroup still has processes, so it belongs to a guest that runs.
    #[error(
        "The cgroup {} still holds processes {}: a VMM for this guest may still run",
        .path.display(), pid_list(.pids)
    )]
    InUse {
        /// The directory.
        path: PathBuf,
        /// The processes in it.
        pids: Vec<Pid>,
    },
    /// The memory limits contradict each other.
    #[error("Cannot apply the memory limits: {0}")]
    InvalidMemTune(String),
    /// A cpuset must name at least one CPU.
    #[error("Cannot set an empty cpuset on {}", .path.display())]
    EmptyCpuset {
        /// The guest cgroup.
        path: PathBuf,
    },
    /// An I/O weight outside what any cgroup version accepts.
    #[error("Cannot set I/O weight {weight}: expected 1 to 10000 (100 to 1000 on cgroup v1)")]
    InvalidIoWeight {
        /// The weight.
        weight: u16,
    },
}

fn pid_list(pids: &[Pid]) -> String {
    pids.iter()
        .map(Pid::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cgroup version berth manages guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CgroupVersion {
    /// Controllers mounted separately under `/sys/fs/cgroup/<controller>`.
    V1,
    /// The unified hierarchy.
    V2,
}

/// A setting as read back from the host: in force with this value, or not enforceable on
/// this host, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Knob<T> {
    /// The kernel holds this value.
    Enforced(T),
    /// The host cannot enforce the setting.
    NotEnforced(String),
}

impl<T> Knob<T> {
    /// The value in force, if the setting is enforceable.
    pub fn value(&self) -> Option<&T> {
        match self {
            Knob::Enforced(value) => Some(value),
            Knob::NotEnforced(_) => None,
        }
    }

    /// Whether the host enforces the setting.
    pub fn is_enforced(&self) -> bool {
        matches!(self, Knob::Enforced(_))
    }
}

/// A requested setting that the host cannot enforce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotEnforced {
    /// The manifest field, such as `minGuarantee`.
    pub setting: String,
    /// Why the host cannot enforce it.
    pub reason: String,
}

impl std::fmt::Display for NotEnforced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not enforced: {}", self.setting, self.reason)
    }
}

/// Memory limits as read back; `None` inside [`Knob::Enforced`] means unlimited (or, for
/// `min_guarantee`, zero), so the values compare directly with [`MemTune`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryReadback {
    /// `hardLimit`.
    pub hard_limit: Knob<Option<Bytes>>,
    /// `softLimit`.
    pub soft_limit: Knob<Option<Bytes>>,
    /// `swapHardLimit`: memory plus swap, converted back from v2's swap-only value.
    pub swap_hard_limit: Knob<Option<Bytes>>,
    /// `minGuarantee`.
    pub min_guarantee: Knob<Option<Bytes>>,
    /// Memory charged to the cgroup now (`memory.usage_in_bytes` / `memory.current`).
    pub usage: Option<Bytes>,
}

/// Everything a guest cgroup holds, read from its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupReadback {
    /// The cgroup version.
    pub version: CgroupVersion,
    /// The memory limits.
    pub memory: MemoryReadback,
    /// `cpuset.cpus` (on v2, the effective set when none is configured).
    pub cpus: Knob<CpuSet>,
    /// `cpuset.mems` (on v2, the effective set when none is configured).
    pub mems: Knob<CpuSet>,
    /// The proportional I/O weight.
    pub io_weight: Knob<u16>,
    /// The processes in the cgroup (`cgroup.procs`), sorted.
    pub processes: Vec<Pid>,
}

/// What a guest's cgroup enforces, read from its files: [`CgroupReadback`] without the
/// cpuset files, the process list and the memory usage (what an observe compares with
/// the spec; a brief status carries this). A [`CgroupReadback`]'s JSON reads as one too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupLimits {
    /// The cgroup version.
    pub version: CgroupVersion,
    /// The memory limits (`usage` is not read).
    pub memory: MemoryReadback,
    /// The proportional I/O weight, when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<Knob<u16>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Controller {
    Memory,
    Cpuset,
    Io,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpuset, Controller::Io];

    fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpuset => "cpuset",
            Controller::Io => "blkio",
        }
    }

    fn v2_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpuset => "cpuset",
            Controller::Io => "io",
        }
    }

    fn setting(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpuset => "cpuset",
            Controller::Io => "io.weight",
        }
    }
}

/// One mounted hierarchy: its root and the controllers berth uses in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    root: PathBuf,
    controllers: BTreeSet<Controller>,
}

/// The host's cgroup hierarchies and the parent under which guest cgroups live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    version: CgroupVersion,
    hierarchies: Vec<Hierarchy>,
    parent: String,
}

impl Cgroups {
    /// Finds the cgroup hierarchies in `/proc/self/mountinfo`.
    ///
    /// cgroup v1 is used when the v1 memory controller is mounted (then it is not
    /// available in v2); otherwise the unified hierarchy.
    ///
    /// # Errors
    /// [`CgroupError::Read`] on the mount table, [`CgroupError::NotMounted`] when no cgroup
    /// filesystem is mounted.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = PathBuf::from(MOUNTINFO_PATH);
        let text = read_file(&path).map_err(|error| CgroupError::Read {
            path: path.clone(),
            error,
        })?;
        Self::from_mountinfo(&text).ok_or(CgroupError::NotMounted { mountinfo: path })
    }

    /// The hierarchies named by a mountinfo text, or `None` when it has no cgroup mount.
    pub fn from_mountinfo(mountinfo: &str) -> Option<Self> {
        let mut v1: Vec<Hierarchy> = Vec::new();
        let mut v2: Option<PathBuf> = None;
        for line in mountinfo.lines() {
            let Some((mount, fs)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = mount.split_whitespace().nth(4) else {
                continue;
            };
            let mut fs = fs.split_whitespace();
            let (Some(fs_type), _, Some(options)) = (fs.next(), fs.next(), fs.next()) else {
                continue;
            };
            match fs_type {
                "cgroup2" if v2.is_none() => v2 = Some(unescape_mount_path(mount_point)),
                "cgroup" => {
                    let seen: BTreeSet<Controller> = v1
                        .iter()
                        .flat_map(|h| h.controllers.iter().copied())
                        .collect();
                    let controllers: BTreeSet<Controller> = options
                        .split(',')
                        .filter_map(|o| Controller::ALL.into_iter().find(|c| c.v1_name() == o))
                        .filter(|c| !seen.contains(c))
                        .collect();
                    if !controllers.is_empty() {
                        v1.push(Hierarchy {
                            root: unescape_mount_path(mount_point),
                            controllers,
                        });
                    }
                }
                _ => {}
            }
        }
        let has_v1_memory = v1
            .iter()
            .any(|h| h.controllers.contains(&Controller::Memory));
        let (version, hierarchies) = match v2 {
            Some(root) if !has_v1_memory => (
                CgroupVersion::V2,
                vec![Hierarchy {
                    root,
                    controllers: Controller::ALL.into_iter().collect(),
                }],
            ),
            _ if !v1.is_empty() => (CgroupVersion::V1, v1),
            _ => return None,
        };
        Some(Cgroups {
            version,
            hierarchies,
            parent: DEFAULT_PARENT.to_owned(),
        })
    }

    /// Cgroups under `root`, for tests and unusual mounts: on v1 each controller's
    /// hierarchy is `root/<controller>` (`memory`, `cpuset`, `blkio`) when that directory
    /// exists; on v2 `root` is the unified hierarchy.
    pub fn at(root: impl Into<PathBuf>, version: CgroupVersion) -> Self {
        let root = root.into();
        let hierarchies = match version {
            CgroupVersion::V1 => Controller::ALL
                .into_iter()
                .map(|c| Hierarchy {
                    root: root.join(c.v1_name()),
                    controllers: [c].into_iter().collect(),
                })
                .filter(|h| h.root.is_dir())
                .collect(),
            CgroupVersion::V2 => vec![Hierarchy {
                root,
                controllers: Controller::ALL.into_iter().collect(),
            }],
        };
        Cgroups {
            version,
            hierarchies,
            parent: DEFAULT_PARENT.to_owned(),
        }
    }

    /// Puts guest cgroups under `parent` (one or more `/`-separated names) instead of
    /// `berth`; tests use `berth-test-<pid>`.
    ///
    /// # Errors
    /// [`CgroupError::InvalidName`] when a component is not a plain directory name.
    pub fn with_parent(mut self, parent: &str) -> Result<Self, CgroupError> {
        for component in parent.split('/') {
            validate_name(component).map_err(|reason| CgroupError::InvalidName {
                name: parent.to_owned(),
                reason,
            })?;
        }
        self.parent = parent.to_owned();
        Ok(self)
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The parent of the guest cgroups, relative to each hierarchy root.
    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// The guest cgroup directories, one per hierarchy, whether or not they exist.
    fn guest(&self, name: &str) -> Result<GuestCgroup, CgroupError> {
        validate_name(name).map_err(|reason| CgroupError::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        let dirs = self
            .hierarchies
            .iter()
            .map(|h| GuestDir {
                root: h.root.clone(),
                dir: h.root.join(&self.parent).join(name),
                controllers: h.controllers.clone(),
            })
            .collect();
        Ok(GuestCgroup {
            name: name.to_owned(),
            version: self.version,
            dirs,
        })
    }

    /// Creates the cgroup of guest `name` in every hierarchy (and its parents), ready for
    /// processes to join. An existing, empty cgroup is reused.
    ///
    /// On v1 the cpuset of the parent and of the guest is copied from above, since a
    /// cpuset without CPUs or memory nodes refuses tasks. On v2 the memory, cpuset and io
    /// controllers are enabled for the children of the root and the parent, where
    /// available.
    ///
    /// # Errors
    /// [`CgroupError::InvalidName`], [`CgroupError::InUse`] when the cgroup exists and
    /// holds processes, or the I/O error of the step that failed.
    pub fn create(&self, name: &str) -> Result<GuestCgroup, CgroupError> {
        let guest = self.guest(name)?;
        for d in &guest.dirs {
            let mut above = d.root.clone();
            for component in self.parent.split('/') {
                if self.version == CgroupVersion::V2 {
                    enable_controllers(&above)?;
                }
                let next = above.join(component);
                make_dir(&next)?;
                if self.version == CgroupVersion::V1 && d.controllers.contains(&Controller::Cpuset)
                {
                    inherit_cpuset(&next, &above)?;
                }
                above = next;
            }
            if self.version == CgroupVersion::V2 {
                enable_controllers(&above)?;
            }
            if !make_dir(&d.dir)? {
                let pids = read_procs(&d.dir)?;
                if !pids.is_empty() {
                    return Err(CgroupError::InUse {
                        path: d.dir.clone(),
                        pids,
                    });
                }
            }
            if self.version == CgroupVersion::V1 && d.controllers.contains(&Controller::Cpuset) {
                inherit_cpuset(&d.dir, &above)?;
            }
        }
        Ok(guest)
    }

    /// The cgroup of guest `name` if it exists in any hierarchy, for reading back or
    /// retuning a running guest.
    ///
    /// # Errors
    /// [`CgroupError::InvalidName`].
    pub fn open(&self, name: &str) -> Result<Option<GuestCgroup>, CgroupError> {
        let guest = self.guest(name)?;
        Ok(guest.dirs.iter().any(|d| d.dir.is_dir()).then_some(guest))
    }

    /// The names of the guest cgroups that exist under the parent, in any hierarchy.
    ///
    /// # Errors
    /// [`CgroupError::Read`] when a parent directory cannot be listed.
    pub fn guests(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = BTreeSet::new();
        for h in &self.hierarchies {
            let dir = h.root.join(&self.parent);
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(CgroupError::Read { path: dir, error }),
            };
            for entry in entries {
                let entry = entry.map_err(|error| CgroupError::Read {
                    path: dir.clone(),
                    error,
                })?;
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    if let Some(name) = entry.file_name().to_str() {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Removes the cgroup left behind by a VMM that died without cleaning up (SIGKILL).
    /// Returns whether there was anything to remove.
    ///
    /// # Errors
    /// [`CgroupError::InUse`] when processes are still in it: that guest may still run,
    /// and nothing is removed. [`CgroupError::RemoveDir`] when the kernel refuses.
    pub fn remove_stale(&self, name: &str) -> Result<bool, CgroupError> {
        let guest = self.guest(name)?;
        for d in &guest.dirs {
            if d.dir.is_dir() {
                let pids = read_procs(&d.dir)?;
                if !pids.is_empty() {
                    return Err(CgroupError::InUse {
                        path: d.dir.clone(),
                        pids,
                    });
                }
            }
        }
        let mut existed = false;
        for d in &guest.dirs {
            existed |= remove_dir(&d.dir)?;
        }
        Ok(existed)
    }

    /// Removes the parent directories when no guest cgroup is left in them (for tests and
    /// uninstalling). Returns whether anything was removed.
    ///
    /// # Errors
    /// [`CgroupError::RemoveDir`] when the kernel refuses for another reason than children.
    pub fn remove_parent_if_empty(&self) -> Result<bool, CgroupError> {
        let mut removed = false;
        for h in &self.hierarchies {
            let components: Vec<&str> = self.parent.split('/').collect();
            for depth in (1..=components.len()).rev() {
                let dir = components[..depth]
                    .iter()
                    .fold(h.root.clone(), |p, c| p.join(c));
                match std::fs::remove_dir(&dir) {
                    Ok(()) => removed = true,
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::EBUSY)
                            || e.raw_os_error() == Some(libc::ENOTEMPTY) =>
                    {
                        break
                    }
                    Err(error) => return Err(CgroupError::RemoveDir { path: dir, error }),
                }
            }
        }
        Ok(removed)
    }
}

/// The cgroup of one guest, in every hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCgroup {
    name: String,
    version: CgroupVersion,
    dirs: Vec<GuestDir>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestDir {
    root: PathBuf,
    dir: PathBuf,
    controllers: BTreeSet<Controller>,
}

impl GuestCgroup {
    /// The guest name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The guest's directory in every hierarchy (one on v2).
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.dir.as_path()).collect()
    }

    fn dir_for(&self, controller: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.controllers.contains(&controller))
            .map(|d| d.dir.as_path())
    }

    fn missing_controller(&self, controller: Controller) -> String {
        match self.version {
            CgroupVersion::V1 => {
                format!("no cgroup v1 {} hierarchy is mounted", controller.v1_name())
            }
            CgroupVersion::V2 => format!(
                "the cgroup v2 {} controller is not enabled",
                controller.v2_name()
            ),
        }
    }

    /// Moves process `pid` (all its threads) into the cgroup in every hierarchy.
    ///
    /// Join before guest memory is allocated: memory charged before the move stays
    /// charged to the old cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Write`] naming the `cgroup.procs` file that refused.
    pub fn add_process(&self, pid: Pid) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves the calling thread into the cgroup in every hierarchy: `0` written to
    /// `tasks` on v1, which moves only this thread and so skips the kernel's RCU grace
    /// period for whole-process moves; on v2 the whole process through `cgroup.procs`.
    /// Threads the caller creates afterwards start in the cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Write`] naming the file that refused.
    pub fn add_current_thread(&self) -> Result<(), CgroupError> {
        match self.version {
            CgroupVersion::V1 => {
                for d in &self.dirs {
                    write(&d.dir.join("tasks"), "0")?;
                }
                Ok(())
            }
            CgroupVersion::V2 => self.add_process(std::process::id() as Pid),
        }
    }

    /// Moves one thread into the cgroup: `tasks` on v1; `cgroup.threads` on v2, which
    /// works only within a threaded subtree.
    ///
    /// # Errors
    /// [`CgroupError::Write`] naming the file that refused.
    pub fn add_thread(&self, tid: Pid) -> Result<(), CgroupError> {
        let file = match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.threads",
        };
        for d in &self.dirs {
            write(&d.dir.join(file), &tid.to_string())?;
        }
        Ok(())
    }

    /// Applies `tune` as a whole: each limit that is `None` is reset to unlimited (or zero
    /// for the guarantee), so that a retune converges from any state. Returns the settings
    /// the host cannot enforce.
    ///
    /// # Errors
    /// [`CgroupError::InvalidMemTune`] when `swapHardLimit` is set without a `hardLimit`
    /// or below it; [`CgroupError::Write`] when the kernel refuses a value (for example a
    /// hard limit below what the guest uses and cannot reclaim: "Device or resource busy").
    pub fn set_memtune(&self, tune: &MemTune) -> Result<Vec<NotEnforced>, CgroupError> {
        validate_memtune(tune)?;
        let requested = [
            ("hardLimit", tune.hard_limit),
            ("softLimit", tune.soft_limit),
            ("swapHardLimit", tune.swap_hard_limit),
            ("minGuarantee", tune.min_guarantee),
        ];
        let Some(dir) = self.dir_for(Controller::Memory) else {
            let reason = self.missing_controller(Controller::Memory);
            return Ok(requested
                .iter()
                .filter(|(_, value)| value.is_some())
                .map(|(setting, _)| not_enforced(setting, &reason))
                .collect());
        };
        match self.version {
            CgroupVersion::V1 => set_memtune_v1(dir, tune),
            CgroupVersion::V2 => set_memtune_v2(dir, tune),
        }
    }

    /// Restricts the guest to `cpus`, and its memory to the NUMA nodes `mems` (all of the
    /// parent's nodes when `None`). Returns the settings the host cannot enforce.
    ///
    /// A thread runs on its own affinity intersected with `cpuset.cpus` (on the cpuset
    /// alone when they do not intersect). Linux 6.2 and later restore the requested
    /// affinity when the cpuset widens again; older kernels reset it to the cpuset, so
    /// re-pin vCPU and emulator threads after changing the cpuset.
    ///
    /// # Errors
    /// [`CgroupError::EmptyCpuset`]; [`CgroupError::Write`] when the kernel refuses (a
    /// CPU outside the parent's set, an offline CPU or a node without memory).
    pub fn set_cpuset(
        &self,
        cpus: &CpuSet,
        mems: Option<&CpuSet>,
    ) -> Result<Vec<NotEnforced>, CgroupError> {
        if cpus.is_empty() {
            return Err(CgroupError::EmptyCpuset {
                path: self.dirs.first().map(|d| d.dir.clone()).unwrap_or_default(),
            });
        }
        let reason = self.missing_controller(Controller::Cpuset);
        let Some(dir) = self.dir_for(Controller::Cpuset) else {
            return Ok(self.cpuset_not_enforced(mems, &reason));
        };
        let cpus_file = dir.join("cpuset.cpus");
        if !cpus_file.exists() {
            return Ok(self.cpuset_not_enforced(mems, &reason));
        }
        write(&cpus_file, &cpus.to_string())?;
        let mems_value = match (mems, self.version) {
            (Some(mems), _) => mems.to_string(),
            (None, CgroupVersion::V2) => String::new(),
            (None, CgroupVersion::V1) => {
                let parent = dir.parent().unwrap_or(dir).join("cpuset.mems");
                read(&parent)?.trim().to_owned()
            }
        };
        write(&dir.join("cpuset.mems"), &mems_value)?;
        Ok(Vec::new())
    }

    fn cpuset_not_enforced(&self, mems: Option<&CpuSet>, reason: &str) -> Vec<NotEnforced> {
        let mut out = vec![not_enforced("cpuset", reason)];
        if mems.is_some() {
            out.push(not_enforced("numa.nodeset", reason));
        }
        out
    }

    /// Sets the proportional block I/O weight. Returns it as not enforced when the host's
    /// I/O scheduler has no weight file (CFQ is gone since Linux 5.0; only BFQ offers
    /// weights).
    ///
    /// # Errors
    /// [`CgroupError::InvalidIoWeight`] for 0 or above 10000; [`CgroupError::Write`] when
    /// the kernel refuses the value.
    pub fn set_io_weight(&self, weight: u16) -> Result<Vec<NotEnforced>, CgroupError> {
        if weight == 0 || weight > 10_000 {
            return Err(CgroupError::InvalidIoWeight { weight });
        }
        let Some(dir) = self.dir_for(Controller::Io) else {
            return Ok(vec![not_enforced(
                Controller::Io.setting(),
                &self.missing_controller(Controller::Io),
            )]);
        };
        match self.io_weight_file(dir) {
            Ok(file) => {
                let value = match self.version {
                    CgroupVersion::V1 => weight.to_string(),
                    CgroupVersion::V2 => format!("default {weight}"),
                };
                write(&file, &value)?;
                Ok(Vec::new())
            }
            Err(reason) => Ok(vec![not_enforced(Controller::Io.setting(), &reason)]),
        }
    }

    /// The weight file this host offers, or why there is none.
    fn io_weight_file(&self, dir: &Path) -> Result<PathBuf, String> {
        let names = self.io_weight_names();
        names
            .iter()
            .map(|name| dir.join(name))
            .find(|path| path.exists())
            .ok_or_else(|| no_weight_file(names, dir))
    }

    /// The weight files this cgroup version may offer, in order of preference.
    fn io_weight_names(&self) -> [&'static str; 2] {
        match self.version {
            CgroupVersion::V1 => ["blkio.weight", "blkio.bfq.weight"],
            CgroupVersion::V2 => ["io.weight", "io.bfq.weight"],
        }
    }

    /// Reads back everything the cgroup holds.
    ///
    /// # Errors
    /// [`CgroupError::Read`] or [`CgroupError::Parse`] on a file that exists but cannot be
    /// read or makes no sense.
    pub fn read(&self) -> Result<CgroupReadback, CgroupError> {
        self.read_with(&mut KeptFiles::passing())
    }

    /// [`GuestCgroup::read`] through `files`, which may keep the cgroup's files open
    /// between calls (a VMM's status; close them before the cgroup is removed).
    ///
    /// # Errors
    /// As [`GuestCgroup::read`].
    pub fn read_with(&self, files: &mut KeptFiles) -> Result<CgroupReadback, CgroupError> {
        let memory = self.read_memory(files, true)?;
        let cpus = match self.dir_for(Controller::Cpuset) {
            Some(dir) => read_cpuset_file(files, dir, "cpuset.cpus")?,
            None => None,
        };
        let (cpus, mems) = match (self.dir_for(Controller::Cpuset), cpus) {
            (Some(dir), Some(cpus)) => (
                Knob::Enforced(cpus),
                Knob::Enforced(read_cpuset_file(files, dir, "cpuset.mems")?.ok_or_else(|| {
                    CgroupError::Read {
                        path: dir.join("cpuset.mems"),
                        error: io::ErrorKind::NotFound.into(),
                    }
                })?),
            ),
            _ => {
                let reason = self.missing_controller(Controller::Cpuset);
                (Knob::NotEnforced(reason.clone()), Knob::NotEnforced(reason))
            }
        };
        let io_weight = self.read_io_weight(files)?;
        let processes = match self.dirs.first() {
            Some(d) => read_procs_in(files, &d.dir)?,
            None => Vec::new(),
        };
        Ok(CgroupReadback {
            version: self.version,
            memory,
            cpus,
            mems,
            io_weight,
            processes,
        })
    }

    /// The limits the cgroup enforces ([`CgroupLimits`]), through `files`: the memory
    /// limits, and the I/O weight when `io_weight`, read from their files as
    /// [`GuestCgroup::read_with`] reads them; nothing else is read.
    ///
    /// # Errors
    /// As [`GuestCgroup::read`].
    pub fn read_limits_with(
        &self,
        files: &mut KeptFiles,
        io_weight: bool,
    ) -> Result<CgroupLimits, CgroupError> {
        Ok(CgroupLimits {
            version: self.version,
            memory: self.read_memory(files, false)?,
            io_weight: if io_weight {
                Some(self.read_io_weight(files)?)
            } else {
                None
            },
        })
    }

    /// The memory limits, and the usage when `usage`.
    fn read_memory(
        &self,
        files: &mut KeptFiles,
        usage: bool,
    ) -> Result<MemoryReadback, CgroupError> {
        Ok(match self.dir_for(Controller::Memory) {
            Some(dir) => match self.version {
                CgroupVersion::V1 => read_memory_v1(files, dir, usage)?,
                CgroupVersion::V2 => read_memory_v2(files, dir, usage)?,
            },
            None => {
                let reason = self.missing_controller(Controller::Memory);
                MemoryReadback {
                    hard_limit: Knob::NotEnforced(reason.clone()),
                    soft_limit: Knob::NotEnforced(reason.clone()),
                    swap_hard_limit: Knob::NotEnforced(reason.clone()),
                    min_guarantee: Knob::NotEnforced(reason),
                    usage: None,
                }
            }
        })
    }

    /// The proportional I/O weight, from the first weight file this cgroup has.
    fn read_io_weight(&self, files: &mut KeptFiles) -> Result<Knob<u16>, CgroupError> {
        let Some(dir) = self.dir_for(Controller::Io) else {
            return Ok(Knob::NotEnforced(self.missing_controller(Controller::Io)));
        };
        let names = self.io_weight_names();
        for name in names {
            let file = dir.join(name);
            if let Some(text) = read_optional_in(files, &file)? {
                return Ok(Knob::Enforced(parse_io_weight(&text).ok_or_else(|| {
                    CgroupError::Parse {
                        path: file,
                        reason: format!("{:?} holds no default weight", text.trim()),
                    }
                })?));
            }
        }
        Ok(Knob::NotEnforced(no_weight_file(names, dir)))
    }

    /// Moves any process still in the cgroup to the hierarchy root, then removes the
    /// cgroup in every hierarchy. A VMM may call this on its own cgroup as it exits.
    ///
    /// # Errors
    /// [`CgroupError::Write`] when a process cannot be moved out, [`CgroupError::RemoveDir`]
    /// when the kernel still refuses the removal after retrying for about a second.
    pub fn remove(self) -> Result<(), CgroupError> {
        for d in &self.dirs {
            if !d.dir.is_dir() {
                continue;
            }
            let target = d.root.join("cgroup.procs");
            for pid in read_procs(&d.dir)? {
                match write_file(&target, &pid.to_string()) {
                    Ok(()) => {}
                    // The process exited meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(error) => {
                        return Err(CgroupError::Write {
                            path: target,
                            value: pid.to_string(),
                            error,
                        })
                    }
                }
            }
            remove_dir(&d.dir)?;
        }
        Ok(())
    }
}

fn not_enforced(setting: &str, reason: &str) -> NotEnforced {
    NotEnforced {
        setting: setting.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A guest or parent name must be one plain directory name.
fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name == "." || name == ".." {
        return Err("it names the current or parent directory");
    }
    if name.len() > 255 {
        return Err("it is longer than 255 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

fn validate_memtune(tune: &MemTune) -> Result<(), CgroupError> {
    match (tune.hard_limit, tune.swap_hard_limit) {
        (None, Some(swap)) => Err(CgroupError::InvalidMemTune(format!(
            "swapHardLimit {swap} needs a hardLimit (it bounds memory plus swap)"
        ))),
        (Some(hard), Some(swap)) if swap < hard => Err(CgroupError::InvalidMemTune(format!(
            "swapHardLimit {swap} is below hardLimit {hard} (it bounds memory plus swap)"
        ))),
        _ => Ok(()),
    }
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4);
        if bytes[i] == b'\\' && digits.is_some_and(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
        {
            let value = digits
                .into_iter()
                .flatten()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn no_weight_file(names: [&str; 2], dir: &Path) -> String {
    format!(
        "neither {} nor {} exists in {}: the host's I/O scheduler offers no \
         proportional weights (select BFQ for the disks)",
        names[0],
        names[1],
        dir.display()
    )
}

fn read(path: &Path) -> Result<String, CgroupError> {
    read_in(&mut KeptFiles::passing(), path)
}

fn read_in(files: &mut KeptFiles, path: &Path) -> Result<String, CgroupError> {
    files.read(path).map_err(|error| CgroupError::Read {
        path: path.to_owned(),
        error,
    })
}

/// The file's text, or `None` when the file does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    read_optional_in(&mut KeptFiles::passing(), path)
}

/// [`read_optional`] through `files`.
fn read_optional_in(files: &mut KeptFiles, path: &Path) -> Result<Option<String>, CgroupError> {
    match files.read(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(CgroupError::Read {
            path: path.to_owned(),
            error,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    write_file(path, value).map_err(|error| CgroupError::Write {
        path: path.to_owned(),
        value: if value.is_empty() {
            "\"\"".to_owned()
        } else {
            value.to_owned()
        },
        error,
    })
}

/// Creates a directory; returns false when it already existed.
fn make_dir(path: &Path) -> Result<bool, CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(CgroupError::CreateDir {
            path: path.to_owned(),
            error,
        }),
    }
}

/// Removes a cgroup directory, retrying while the kernel still reports it busy (tasks
/// that just exited). Returns false when it did not exist.
fn remove_dir(path: &Path) -> Result<bool, CgroupError> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_RETRIES => {
                attempt += 1;
                std::thread::sleep(RMDIR_RETRY_DELAY);
            }
            Err(error) => {
                return Err(CgroupError::RemoveDir {
                    path: path.to_owned(),
                    error,
                })
            }
        }
    }
}

/// The processes in a cgroup directory (empty when it has no `cgroup.procs`).
fn read_procs(dir: &Path) -> Result<Vec<Pid>, CgroupError> {
    read_procs_in(&mut KeptFiles::passing(), dir)
}

/// [`read_procs`] through `files`.
fn read_procs_in(files: &mut KeptFiles, dir: &Path) -> Result<Vec<Pid>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let Some(text) = read_optional_in(files, &path)? else {
        return Ok(Vec::new());
    };
    let mut pids = text
        .split_whitespace()
        .map(|word| {
            word.parse::<Pid>().map_err(|_| CgroupError::Parse {
                path: path.clone(),
                reason: format!("{word:?} is not a process id"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// v1: a cpuset with no CPUs or no memory nodes refuses tasks, so fill them from above.
fn inherit_cpuset(dir: &Path, from: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let path = dir.join(file);
        if read(&path)?.trim().is_empty() {
            write(&path, read(&from.join(file))?.trim())?;
        }
    }
    Ok(())
}

/// v2: enables memory, cpuset and io for the children of `dir`, as far as `dir` has them.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let Some(available) = read_optional(&dir.join("cgroup.controllers"))? else {
        return Ok(());
    };
    let enabled = read_optional(&dir.join("cgroup.subtree_control"))?.unwrap_or_default();
    let missing: Vec<String> = Controller::ALL
        .iter()
        .map(|c| c.v2_name())
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if !missing.is_empty() {
        write(&dir.join("cgroup.subtree_control"), &missing.join(" "))?;
    }
    Ok(())
}

/// A limit as cgroup files write it: a number, `max` (v2) or a huge number (v1).
/// `None` is unlimited.
pub fn parse_limit(text: &str) -> Option<Option<u64>> {
    let text = text.trim();
    if text == "max" || text == "-1" {
        return Some(None);
    }
    let value: u64 = text.parse().ok()?;
    Some((value < V1_UNLIMITED_FROM).then_some(value))
}

/// The default weight of a `blkio.weight`, `io.weight` or `io.bfq.weight` file: a bare
/// number, or the `default N` line among per-device lines.
pub fn parse_io_weight(text: &str) -> Option<u16> {
    let mut bare = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("default"), Some(value), None) => return value.parse().ok(),
            (Some(value), None, None) if bare.is_none() => bare = value.parse().ok(),
            _ => {}
        }
    }
    bare
}

fn read_limit(path: &Path) -> Result<Option<Bytes>, CgroupError> {
    read_limit_in(&mut KeptFiles::passing(), path)
}

fn read_limit_in(files: &mut KeptFiles, path: &Path) -> Result<Option<Bytes>, CgroupError> {
    let text = read_in(files, path)?;
    parse_limit_text(path, &text)
}

fn parse_limit_text(path: &Path, text: &str) -> Result<Option<Bytes>, CgroupError> {
    parse_limit(text)
        .map(|limit| limit.map(Bytes))
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_owned(),
            reason: format!("{:?} is not a limit", text.trim()),
        })
}

/// A limit file that may be missing: not enforced (with `reason`) when it is.
fn read_limit_knob(
    files: &mut KeptFiles,
    path: &Path,
    reason: &str,
) -> Result<Knob<Option<Bytes>>, CgroupError> {
    match read_optional_in(files, path)? {
        Some(text) => Ok(Knob::Enforced(parse_limit_text(path, &text)?)),
        None => Ok(Knob::NotEnforced(reason.to_owned())),
    }
}

fn missing_file(path: &Path) -> String {
    format!("{} does not exist on this host", path.display())
}

const V1_NO_MIN: &str = "cgroup v1 has no memory.min: the guarantee is not enforced";
const V1_NO_MEMSW: &str = "swap accounting is off (no memory.memsw.limit_in_bytes; \
     boot with swapaccount=1)";

fn v1_value(limit: Option<Bytes>) -> String {
    limit.map_or_else(|| "-1".to_owned(), |b| b.get().to_string())
}

fn v2_value(limit: Option<Bytes>) -> String {
    limit.map_or_else(|| "max".to_owned(), |b| b.get().to_string())
}

fn set_memtune_v1(dir: &Path, tune: &MemTune) -> Result<Vec<NotEnforced>, CgroupError> {
    let mut skipped = Vec::new();
    let limit = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    write(
        &dir.join("memory.soft_limit_in_bytes"),
        &v1_value(tune.soft_limit),
    )?;
    if memsw.exists() {
        // Keep memsw >= limit after each write: a limit above the current memsw must wait
        // for the new memsw; otherwise memsw may drop only after the limit did.
        let current_memsw = read_limit(&memsw)?.map_or(u64::MAX, Bytes::get);
        let new_limit = tune.hard_limit.map_or(u64::MAX, Bytes::get);
        if new_limit <= current_memsw {
            write(&limit, &v1_value(tune.hard_limit))?;
            write(&memsw, &v1_value(tune.swap_hard_limit))?;
        } else {
            write(&memsw, &v1_value(tune.swap_hard_limit))?;
            write(&limit, &v1_value(tune.hard_limit))?;
        }
    } else {
        write(&limit, &v1_value(tune.hard_limit))?;
        if tune.swap_hard_limit.is_some() {
            skipped.push(not_enforced("swapHardLimit", V1_NO_MEMSW));
        }
    }
    if tune.min_guarantee.is_some() {
        skipped.push(not_enforced("minGuarantee", V1_NO_MIN));
    }
    Ok(skipped)
}

fn set_memtune_v2(dir: &Path, tune: &MemTune) -> Result<Vec<NotEnforced>, CgroupError> {
    // v2's swap.max bounds swap alone; the manifest bounds memory plus swap.
    let swap_only = match (tune.swap_hard_limit, tune.hard_limit) {
        (Some(swap), Some(hard)) => Some(Bytes(swap.get() - hard.get())),
        _ => None,
    };
    let files = [
        (
            "hardLimit",
            "memory.max",
            tune.hard_limit,
            v2_value(tune.hard_limit),
        ),
        (
            "softLimit",
            "memory.high",
            tune.soft_limit,
            v2_value(tune.soft_limit),
        ),
        (
            "swapHardLimit",
            "memory.swap.max",
            tune.swap_hard_limit,
            v2_value(swap_only),
        ),
        (
            "minGuarantee",
            "memory.min",
            tune.min_guarantee,
            tune.min_guarantee.map_or(0, Bytes::get).to_string(),
        ),
    ];
    let mut skipped = Vec::new();
    for (setting, file, requested, value) in files {
        let path = dir.join(file);
        if path.exists() {
            write(&path, &value)?;
        } else if requested.is_some() {
            skipped.push(not_enforced(setting, &missing_file(&path)));
        }
    }
    Ok(skipped)
}

fn read_memory_v1(
    files: &mut KeptFiles,
    dir: &Path,
    usage: bool,
) -> Result<MemoryReadback, CgroupError> {
    Ok(MemoryReadback {
        hard_limit: Knob::Enforced(read_limit_in(files, &dir.join("memory.limit_in_bytes"))?),
        soft_limit: Knob::Enforced(read_limit_in(
            files,
            &dir.join("memory.soft_limit_in_bytes"),
        )?),
        swap_hard_limit: read_limit_knob(
            files,
            &dir.join("memory.memsw.limit_in_bytes"),
            V1_NO_MEMSW,
        )?,
        min_guarantee: Knob::NotEnforced(V1_NO_MIN.to_owned()),
        usage: if usage {
            read_usage(files, &dir.join("memory.usage_in_bytes"))?
        } else {
            None
        },
    })
}

fn read_memory_v2(
    files: &mut KeptFiles,
    dir: &Path,
    usage: bool,
) -> Result<MemoryReadback, CgroupError> {
    let max = dir.join("memory.max");
    let hard_limit = read_limit_knob(files, &max, &missing_file(&max))?;
    let swap = dir.join("memory.swap.max");
    let swap_only = read_limit_knob(files, &swap, &missing_file(&swap))?;
    let swap_hard_limit = match (&swap_only, &hard_limit) {
        (Knob::Enforced(Some(swap)), Knob::Enforced(Some(hard))) => {
            Knob::Enforced(Some(Bytes(swap.get().saturating_add(hard.get()))))
        }
        (Knob::Enforced(_), Knob::Enforced(_)) => Knob::Enforced(None),
        (Knob::NotEnforced(reason), _) | (_, Knob::NotEnforced(reason)) => {
            Knob::NotEnforced(reason.clone())
        }
    };
    let high = dir.join("memory.high");
    let min = dir.join("memory.min");
    let min_guarantee = match read_limit_knob(files, &min, &missing_file(&min))? {
        Knob::Enforced(Some(Bytes(0))) => Knob::Enforced(None),
        other => other,
    };
    Ok(MemoryReadback {
        hard_limit,
        soft_limit: read_limit_knob(files, &high, &missing_file(&high))?,
        swap_hard_limit,
        min_guarantee,
        usage: if usage {
            read_usage(files, &dir.join("memory.current"))?
        } else {
            None
        },
    })
}

fn read_usage(files: &mut KeptFiles, path: &Path) -> Result<Option<Bytes>, CgroupError> {
    match read_optional_in(files, path)? {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse()
            .map(|n| Some(Bytes(n)))
            .map_err(|_| CgroupError::Parse {
                path: path.to_owned(),
                reason: format!("{:?} is not a byte count", text.trim()),
            }),
    }
}

/// `cpuset.cpus` / `cpuset.mems`, or on v2 the `.effective` file when nothing is
/// configured (the cgroup inherits its parent's set). `None` when the file does not exist.
fn read_cpuset_file(
    files: &mut KeptFiles,
    dir: &Path,
    file: &str,
) -> Result<Option<CpuSet>, CgroupError> {
    let mut path = dir.join(file);
    let Some(mut text) = read_optional_in(files, &path)? else {
        return Ok(None);
    };
    if text.trim().is_empty() {
        let effective = dir.join(format!("{file}.effective"));
        if let Some(t) = read_optional_in(files, &effective)? {
            path = effective;
            text = t;
        }
    }
    CpuSet::parse_list(&text)
        .map(Some)
        .map_err(|e| CgroupError::Parse {
            path,
            reason: format!("{e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::{Child, Command, Stdio};

    /// The cgroup lines of this machine's mountinfo: v1 controllers mounted separately,
    /// v2 mounted without controllers.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const UNIFIED: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn bytes(s: &str) -> Bytes {
        s.parse().unwrap()
    }

    fn cpus(s: &str) -> CpuSet {
        s.parse().unwrap()
    }

    fn tune(hard: &str, soft: &str, swap: &str, min: &str) -> MemTune {
        let opt = |s: &str| (!s.is_empty()).then(|| bytes(s));
        MemTune {
            hard_limit: opt(hard),
            soft_limit: opt(soft),
            swap_hard_limit: opt(swap),
            min_guarantee: opt(min),
            ..MemTune::default()
        }
    }

    #[test]
    fn detects_v1_when_the_memory_controller_is_mounted_there() {
        let cg = Cgroups::from_mountinfo(HYBRID).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V1);
        let roots: Vec<_> = cg.hierarchies.iter().map(|h| h.root.clone()).collect();
        assert_eq!(
            roots,
            ["cpuset", "memory", "blkio"].map(|c| PathBuf::from("/sys/fs/cgroup").join(c))
        );
        let guest = cg.guest("web-1").unwrap();
        assert_eq!(
            guest.dir_for(Controller::Memory),
            Some(Path::new("/sys/fs/cgroup/memory/berth/web-1"))
        );
    }

    #[test]
    fn detects_v2_and_joint_v1_mounts() {
        let cg = Cgroups::from_mountinfo(UNIFIED).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V2);
        assert_eq!(cg.hierarchies[0].root, Path::new("/sys/fs/cgroup"));

        let joint = "1 0 0:1 / /cg/mem\\040and\\040cpu rw - cgroup none rw,cpuset,memory\n\
                     2 0 0:2 / /cg/io rw shared:3 - cgroup none rw,blkio\n";
        let cg = Cgroups::from_mountinfo(joint).unwrap();
        assert_eq!(cg.version(), CgroupVersion::V1);
        assert_eq!(cg.hierarchies.len(), 2);
        assert_eq!(cg.hierarchies[0].root, Path::new("/cg/mem and cpu"));
        let guest = cg.guest("a").unwrap();
        assert_eq!(guest.paths().len(), 2);
        assert_eq!(
            guest.dir_for(Controller::Cpuset),
            guest.dir_for(Controller::Memory)
        );

        assert_eq!(Cgroups::from_mountinfo("garbage\n\n1 2 3\n"), None);
    }

    #[test]
    fn limits_and_weights_parse_tolerantly() {
        assert_eq!(parse_limit("9223372036854771712\n"), Some(None));
        assert_eq!(parse_limit(" max "), Some(None));
        assert_eq!(parse_limit("268435456\n"), Some(Some(268_435_456)));
        assert_eq!(parse_limit("lots"), None);
        assert_eq!(parse_io_weight("default 100\n8:0 200\n"), Some(100));
        assert_eq!(parse_io_weight("8:0 200\ndefault 300\n"), Some(300));
        assert_eq!(parse_io_weight(" 500 \n"), Some(500));
        assert_eq!(parse_io_weight("8:0 200\n"), None);
    }

    #[test]
    fn names_and_limits_are_checked() {
        let cg = Cgroups::at("/nonexistent", CgroupVersion::V2);
        for bad in ["", "..", ".", "a/b", "web 1", "x\0y"] {
            assert!(
                matches!(cg.create(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(cg.clone().with_parent("machine.slice/berth").is_ok());
        assert!(cg.clone().with_parent("berth/../..").is_err());

        let guest = cg.guest("web-1").unwrap();
        let e = guest.set_memtune(&tune("", "", "1GiB", "")).unwrap_err();
        assert!(e.to_string().contains("needs a hardLimit"), "{e}");
        let e = guest
            .set_memtune(&tune("1GiB", "", "512MiB", ""))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Cannot apply the memory limits: swapHardLimit 512MiB is below hardLimit 1GiB \
             (it bounds memory plus swap)"
        );
        assert!(matches!(
            guest.set_io_weight(0),
            Err(CgroupError::InvalidIoWeight { weight: 0 })
        ));
        assert!(matches!(
            guest.set_cpuset(&CpuSet::new(), None),
            Err(CgroupError::EmptyCpuset { .. })
        ));
    }

    /// A temporary directory shaped like a cgroup v2 mount where `berth/<name>` exists
    /// with the files the kernel would create (`without` left out).
    fn fake_v2(name: &str, without: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let guest = root.path().join("berth").join(name);
        fs::create_dir_all(&guest).unwrap();
        let controllers = "cpuset cpu io memory hugetlb pids\n";
        for dir in [root.path(), &root.path().join("berth")] {
            fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
            fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
        }
        let files = [
            ("cgroup.procs", ""),
            ("cgroup.threads", ""),
            ("memory.max", "max\n"),
            ("memory.high", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.min", "0\n"),
            ("memory.current", "1048576\n"),
            ("cpuset.cpus", "\n"),
            ("cpuset.cpus.effective", "0-1\n"),
            ("cpuset.mems", "\n"),
            ("cpuset.mems.effective", "0\n"),
            ("io.weight", "default 100\n"),
        ];
        for (file, content) in files {
            if !without.contains(&file) {
                fs::write(guest.join(file), content).unwrap();
            }
        }
        root
    }

    fn contents(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn v2_memtune_cpuset_and_io_weight_round_trip() {
        let root = fake_v2("web-1", &[]);
        let cg = Cgroups::at(root.path(), CgroupVersion::V2);
        let guest = cg.create("web-1").unwrap();
        let dir = root.path().join("berth/web-1");
        assert_eq!(guest.paths(), [dir.as_path()]);
        assert_eq!(
            contents(&root.path().join("cgroup.subtree_control")),
            "+memory +cpuset +io"
        );
        assert_eq!(
            contents(&root.path().join("berth/cgroup.subtree_control")),
            "+memory +cpuset +io"
        );

        let wanted = tune("320MiB", "256MiB", "512MiB", "128MiB");
        assert_eq!(guest.set_memtune(&wanted).unwrap(), []);
        assert_eq!(contents(&dir.join("memory.max")), "335544320");
        assert_eq!(contents(&dir.join("memory.high")), "268435456");
        // swap.max is swap alone: 512MiB - 320MiB.
        assert_eq!(contents(&dir.join("memory.swap.max")), "201326592");
        assert_eq!(contents(&dir.join("memory.min")), "134217728");

        assert_eq!(guest.set_cpuset(&cpus("1"), Some(&cpus("0"))).unwrap(), []);
        assert_eq!(contents(&dir.join("cpuset.cpus")), "1");
        assert_eq!(contents(&dir.join("cpuset.mems")), "0");
        assert_eq!(guest.set_io_weight(500).unwrap(), []);
        assert_eq!(contents(&dir.join("io.weight")), "default 500");
        guest.add_process(4242).unwrap();

        let back = guest.read().unwrap();
        assert_eq!(back.version, CgroupVersion::V2);
        let m = &back.memory;
        assert_eq!(m.hard_limit, Knob::Enforced(wanted.hard_limit));
        assert_eq!(m.soft_limit, Knob::Enforced(wanted.soft_limit));
        assert_eq!(m.swap_hard_limit, Knob::Enforced(wanted.swap_hard_limit));
        assert_eq!(m.min_guarantee, Knob::Enforced(wanted.min_guarantee));
        assert_eq!(m.usage, Some(Bytes::mib(1)));
        assert_eq!(back.cpus, Knob::Enforced(cpus("1")));
        assert_eq!(back.mems, Knob::Enforced(cpus("0")));
        assert_eq!(back.io_weight, Knob::Enforced(500));
        assert_eq!(back.processes, [4242]);

        // A retune to nothing resets every limit, and the inherited cpuset reads as the
        // effective one.
        assert_eq!(guest.set_memtune(&MemTune::default()).unwrap(), []);
        assert_eq!(contents(&dir.join("memory.max")), "max");
        assert_eq!(contents(&dir.join("memory.swap.max")), "max");
        assert_eq!(contents(&dir.join("memory.min")), "0");
        guest.set_cpuset(&cpus("0-1"), None).unwrap();
        fs::write(dir.join("cpuset.cpus"), "").unwrap();
        let back = guest.read().unwrap();
        assert_eq!(back.memory.hard_limit, Knob::Enforced(None));
        assert_eq!(back.memory.swap_hard_limit, Knob::Enforced(None));
        assert_eq!(back.memory.min_guarantee, Knob::Enforced(None));
        assert_eq!(back.cpus, Knob::Enforced(cpus("0-1")));
        assert_eq!(back.mems, Knob::Enforced(cpus("0")));

        // A cgroup with a process in it belongs to a live guest: not stale, not reused.
        let e = cg.remove_stale("web-1").unwrap_err();
        assert!(
            matches!(e, CgroupError::InUse { ref pids, .. } if pids == &[4242]),
            "{e}"
        );
        assert!(e.to_string().contains("still holds processes 4242"), "{e}");
        assert!(matches!(cg.create("web-1"), Err(CgroupError::InUse { .. })));
        assert_eq!(cg.guests().unwrap(), ["web-1"]);
        assert!(cg.open("web-1").unwrap().is_some());
        assert!(cg.open("db-1").unwrap().is_none());
    }

    #[test]
    fn v2_reports_what_the_host_cannot_enforce() {
        let root = fake_v2("web-1", &["memory.swap.max", "io.weight"]);
        let cg = Cgroups::at(root.path(), CgroupVersion::V2);
        let guest = cg.create("web-1").unwrap();
        let skipped = guest
            .set_memtune(&tune("320MiB", "", "512MiB", ""))
            .unwrap();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].setting, "swapHardLimit");
        assert!(skipped[0].reason.contains("memory.swap.max does not exist"));
        // Not requested, not reported.
        assert_eq!(guest.set_memtune(&tune("320MiB", "", "", "")).unwrap(), []);

        let skipped = guest.set_io_weight(500).unwrap();
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0]
                .to_string()
                .starts_with("io.weight is not enforced: neither io.weight nor io.bfq.weight"),
            "{}",
            skipped[0]
        );

        let back = guest.read().unwrap();
        assert!(!back.memory.swap_hard_limit.is_enforced());
        assert!(back.memory.hard_limit.is_enforced());
        assert!(matches!(back.io_weight, Knob::NotEnforced(ref r) if r.contains("BFQ")));
    }

    #[test]
    fn write_errors_name_the_value_and_the_file() {
        let root = fake_v2("web-1", &[]);
        let cg = Cgroups::at(root.path(), CgroupVersion::V2);
        let guest = cg.create("web-1").unwrap();
        let dir = root.path().join("berth/web-1");
        // A directory where the file should be makes the write fail.
        fs::remove_file(dir.join("memory.max")).unwrap();
        fs::create_dir(dir.join("memory.max")).unwrap();
        let e = guest
            .set_memtune(&tune("256MiB", "", "", ""))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "Cannot write 268435456 to {}: Is a directory",
                dir.join("memory.max").display()
            )
        );
    }

    /// Real cgroups on this host, removed on drop even when the test fails.
    struct RealCgroups {
        cgroups: Cgroups,
        children: Vec<Child>,
    }

    impl RealCgroups {
        /// `berth-test-<pid>-<tag>` on the detected hierarchy. These tests need root and
        /// cgroup v1 (CI has both): elsewhere they fail, saying why, rather than pass
        /// without running.
        fn v1(tag: &str) -> Option<Self> {
            // SAFETY: geteuid takes no arguments and cannot fail.
            let euid = unsafe { libc::geteuid() };
            assert_eq!(euid, 0, "this test needs root (it writes cgroups)");
            let cgroups = Cgroups::detect().unwrap();
            assert_eq!(
                cgroups.version(),
                CgroupVersion::V1,
                "this test needs cgroup v1 controllers (CI's and this machine's)"
            );
            let parent = format!("berth-test-{}-{tag}", std::process::id());
            Some(RealCgroups {
                cgroups: cgroups.with_parent(&parent).unwrap(),
                children: Vec::new(),
            })
        }

        fn spawn_sleeper(&mut self) -> Pid {
            let child = Command::new("sleep")
                .arg("120")
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let pid = child.id() as Pid;
            self.children.push(child);
            pid
        }
    }

    impl Drop for RealCgroups {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for name in self.cgroups.guests().unwrap_or_default() {
                if let Ok(Some(guest)) = self.cgroups.open(&name) {
                    let _ = guest.remove();
                }
            }
            let _ = self.cgroups.remove_parent_if_empty();
        }
    }

    fn cgroup_of(pid: Pid, controller: &str) -> String {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        text.lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_owned())
            })
            .unwrap()
    }

    #[test]
    fn real_v1_cgroup_memtune_cpuset_process_and_removal() {
        let Some(mut real) = RealCgroups::v1("main") else {
            return;
        };
        let cg = real.cgroups.clone();
        let guest = cg.create("web-1").unwrap();
        let parent = cg.parent().to_owned();
        for path in guest.paths() {
            assert!(
                path.ends_with(format!("{parent}/web-1")),
                "{}",
                path.display()
            );
        }

        let skipped = guest
            .set_memtune(&tune("256MiB", "128MiB", "512MiB", "64MiB"))
            .unwrap();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].setting, "minGuarantee");
        let m = guest.read().unwrap().memory;
        assert_eq!(m.hard_limit, Knob::Enforced(Some(bytes("256MiB"))));
        assert_eq!(m.soft_limit, Knob::Enforced(Some(bytes("128MiB"))));
        assert_eq!(m.swap_hard_limit, Knob::Enforced(Some(bytes("512MiB"))));
        assert!(matches!(m.min_guarantee, Knob::NotEnforced(ref r) if r.contains("memory.min")));

        // Raising the limit above the current memsw needs memsw first; lowering both
        // below the current limit needs the limit first. Both orders must succeed.
        guest.set_memtune(&tune("1GiB", "", "2GiB", "")).unwrap();
        let m = guest.read().unwrap().memory;
        assert_eq!(m.hard_limit, Knob::Enforced(Some(bytes("1GiB"))));
        assert_eq!(m.swap_hard_limit, Knob::Enforced(Some(bytes("2GiB"))));
        assert_eq!(m.soft_limit, Knob::Enforced(None));
        guest.set_memtune(&tune("64MiB", "", "96MiB", "")).unwrap();
        let m = guest.read().unwrap().memory;
        assert_eq!(m.hard_limit, Knob::Enforced(Some(bytes("64MiB"))));
        assert_eq!(m.swap_hard_limit, Knob::Enforced(Some(bytes("96MiB"))));
        guest.set_memtune(&MemTune::default()).unwrap();
        let m = guest.read().unwrap().memory;
        assert_eq!(m.hard_limit, Knob::Enforced(None));
        assert_eq!(m.swap_hard_limit, Knob::Enforced(None));

        guest.set_cpuset(&cpus("0"), None).unwrap();
        let back = guest.read().unwrap();
        assert_eq!(back.cpus, Knob::Enforced(cpus("0")));
        assert!(back.mems.value().is_some_and(|m| m.contains(0)));
        match guest.set_io_weight(500).unwrap().as_slice() {
            [] => assert_eq!(guest.read().unwrap().io_weight, Knob::Enforced(500)),
            [skipped] => {
                assert!(skipped.reason.contains("blkio.weight"), "{skipped}");
                assert!(!guest.read().unwrap().io_weight.is_enforced());
            }
            more => panic!("{more:?}"),
        }

        let pid = real.spawn_sleeper();
        guest.add_process(pid).unwrap();
        assert_eq!(guest.read().unwrap().processes, [pid]);
        assert_eq!(cgroup_of(pid, "memory"), format!("/{parent}/web-1"));
        assert_eq!(cgroup_of(pid, "cpuset"), format!("/{parent}/web-1"));
        // The cpuset is in force on the process.
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(
            crate::host::affinity::parse_cpus_allowed_list(&status),
            Ok(cpus("0"))
        );

        assert!(matches!(
            cg.remove_stale("web-1"),
            Err(CgroupError::InUse { .. })
        ));
        guest.remove().unwrap();
        assert_eq!(cgroup_of(pid, "memory"), "/");
        assert!(cg.open("web-1").unwrap().is_none());
        assert_eq!(cg.guests().unwrap(), Vec::<String>::new());
    }

    /// A hard limit below what the guest uses and cannot reclaim is refused by the
    /// kernel; the error names the value and the file, and the old limit stays in force.
    #[test]
    fn real_v1_limit_below_usage_is_refused_with_the_file_named() {
        let Some(mut real) = RealCgroups::v1("busy") else {
            return;
        };
        assert!(
            Path::new("/usr/bin/perl").exists(),
            "this test needs /usr/bin/perl to allocate memory in a child (.ci/run installs it)"
        );
        let cg = real.cgroups.clone();
        let guest = cg.create("big-1").unwrap();
        // The child allocates 32 MiB once it is in the cgroup, so the memory is charged
        // there, then says so.
        let mut child = Command::new("/usr/bin/perl")
            .args([
                "-e",
                "$| = 1; <STDIN>; $x = 'a' x (32 << 20); print \"ok\\n\"; sleep 120",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as Pid;
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        real.children.push(child);
        guest.add_process(pid).unwrap();
        std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert_eq!(line, "ok\n");
        let used = guest.read().unwrap().memory.usage.unwrap();
        assert!(used >= Bytes::mib(32), "{used}");

        let e = guest
            .set_memtune(&tune("4MiB", "", "4MiB", ""))
            .unwrap_err();
        let file = guest
            .dir_for(Controller::Memory)
            .unwrap()
            .join("memory.limit_in_bytes");
        assert_eq!(
            e.to_string(),
            format!(
                "Cannot write 4194304 to {}: Device or resource busy",
                file.display()
            )
        );
        let m = guest.read().unwrap().memory;
        assert_eq!(m.hard_limit, Knob::Enforced(None));
        assert_eq!(m.swap_hard_limit, Knob::Enforced(None));
    }

    #[test]
    fn real_v1_stale_cgroup_of_a_killed_vmm_is_removed() {
        let Some(mut real) = RealCgroups::v1("stale") else {
            return;
        };
        let cg = real.cgroups.clone();
        let guest = cg.create("db-1").unwrap();
        guest
            .set_memtune(&tune("128MiB", "", "256MiB", ""))
            .unwrap();
        let pid = real.spawn_sleeper();
        guest.add_process(pid).unwrap();

        // A second VMM for the same guest is refused while the first lives.
        assert!(matches!(cg.create("db-1"), Err(CgroupError::InUse { .. })));

        // SIGKILL, as if the VMM died: the cgroup is left behind, empty.
        let mut child = real.children.pop().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(cg.guests().unwrap(), ["db-1"]);
        assert!(cg.remove_stale("db-1").unwrap());
        assert!(!cg.remove_stale("db-1").unwrap());
        assert!(cg.open("db-1").unwrap().is_none());
        assert!(cg.remove_parent_if_empty().unwrap());
    }
}
