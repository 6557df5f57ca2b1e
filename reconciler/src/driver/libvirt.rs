//! The libvirt driver: a host whose Host manifest says `driver: libvirt` runs its guests
//! as libvirt domains (QEMU, with disks and network cards), reached at the manifest's
//! URI. Observed values are read back from libvirt; live changes go through libvirt's
//! live APIs (live and persistent config). Domains without berth's `<metadata>` are not
//! berth's: they are left out of the observed guests and never touched.
//!
//! libvirt cannot migrate a guest to the same host, so a restart-class change is not a
//! local live migration here: this driver refuses it, naming the reason. A guest moves
//! live to another libvirt host whose Host manifest has `libvirt.remoteUri`
//! ([`LibvirtDriver::migrate_away`]): peer-to-peer, this host's libvirtd to the
//! other's, after the pre-checks of [`Libvirt::migrate`]. A domain arriving from another
//! host is not this host's guest until its migration has finished.
//!
//! Host settings (hugepage pools, KSM, transparent hugepages) are the kernel's of the
//! machine libvirtd runs on: with a local URI (`qemu:///system`) that is this machine,
//! and they are observed and set as the local driver does; a remote URI's host
//! settings are not berth's (validation refuses them in the manifest).

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use berth_hypervisor::host::cgroup::Knob;
use berth_hypervisor::libvirt::import::QEMU_DEFAULT_CPU_MODEL;
use berth_hypervisor::libvirt::migrate::{Destination, Outcome, Progress};
use berth_hypervisor::libvirt::{ConsoleLog, Libvirt, LibvirtError, ObservedDomain, RunState};
use berth_schema::{
    Boot, BootFrom, CpuMode, CpuSet, Guest, GuestState, KsmSpec, LibvirtSpec, MemTune, NumaSpec,
    PageSize, Pinning, ThpMode,
};

use super::{Driver, DriverError, DriverKind, LocalDriver, Scope};
use crate::diff::{Field, HostSetting};
use crate::model::{
    CpuInfo, Desired, Observed, ObservedCpu, ObservedGuest, ObservedHost, ObservedMemory,
    ANNOTATION_MANAGED,
};

/// How long a guest has to power off when asked before it is destroyed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Guests of one host, as libvirt domains.
pub struct LibvirtDriver {
    host: String,
    spec: LibvirtSpec,
    revision: RwLock<String>,
    conn: Mutex<Libvirt>,
    /// The other libvirt hosts that say how to reach them, from the Host manifests.
    peers: RwLock<BTreeMap<String, LibvirtSpec>>,
    /// Guests migrating away from here, and where to.
    outgoing: Mutex<BTreeMap<String, String>>,
    /// With a local URI: this machine's host settings, as the local driver reads and
    /// sets them.
    machine: Option<LocalDriver>,
}

/// What a completed migration to another host measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time, start to end.
    pub elapsed: Duration,
    /// libvirt's last job-statistics sample (bytes sent so far, passes).
    pub last: Option<Progress>,
    /// How long the guest was paused for the switchover, as libvirt measured it
    /// (the destination's statistics of the completed job); `None` when libvirt did not
    /// say.
    pub downtime: Option<Duration>,
}

impl std::fmt::Debug for LibvirtDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtDriver")
            .field("host", &self.host)
            .field("uri", &self.spec.uri)
            .finish()
    }
}

fn failed(e: LibvirtError) -> DriverError {
    match e {
        LibvirtError::Invalid { .. } | LibvirtError::Unmanaged(_) => {
            DriverError::Refused(e.to_string())
        }
        LibvirtError::NoDomain(_) => DriverError::NotFound(e.to_string()),
        LibvirtError::Connect { ref source, .. }
        | LibvirtError::Call { ref source, .. }
        | LibvirtError::Host { ref source, .. } => {
            // The report shows one line per action: libvirt's message goes in it.
            DriverError::failed(e.to_string(), source.clone())
        }
        other => DriverError::failed("libvirt", other),
    }
}

impl LibvirtDriver {
    /// Connects to host `host`'s libvirt; `revision` is recorded in the `<metadata>`
    /// of every domain this driver defines or changes.
    ///
    /// # Errors
    /// When libvirtd does not answer at the URI.
    pub fn new(host: &str, spec: LibvirtSpec, revision: &str) -> Result<Self, DriverError> {
        let conn =
            Libvirt::open(&spec.uri).map_err(|e| DriverError::failed(format!("host {host}"), e))?;
        let machine = spec
            .is_local()
            .then(|| LocalDriver::new(host, "/nonexistent", "berth-vmm".into()));
        Ok(LibvirtDriver {
            host: host.to_owned(),
            spec,
            revision: RwLock::new(revision.to_owned()),
            conn: Mutex::new(conn),
            peers: RwLock::new(BTreeMap::new()),
            outgoing: Mutex::new(BTreeMap::new()),
            machine,
        })
    }

    /// The host this driver acts on.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The connection settings.
    pub fn spec(&self) -> &LibvirtSpec {
        &self.spec
    }

    /// Takes a new revision: recorded in the domains defined or changed from now on,
    /// and the other libvirt hosts of its Host manifests become migration destinations.
    pub fn set_desired(&self, revision: &str, desired: &Desired) {
        *self.revision.write().unwrap_or_else(|e| e.into_inner()) = revision.to_owned();
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = desired
            .hosts
            .iter()
            .filter(|h| {
                h.metadata.name != self.host && h.spec.driver == berth_schema::HostDriver::Libvirt
            })
            .map(|h| (h.metadata.name.clone(), h.spec.libvirt_or_default()))
            .collect();
    }

    fn revision(&self) -> String {
        self.revision
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether guest `name` runs here (a domain of berth's, running or paused, not one
    /// still arriving): what a migration source asks to follow its move to the end.
    ///
    /// # Errors
    /// When libvirtd cannot be asked.
    pub fn runs(&self, name: &str) -> Result<bool, DriverError> {
        let domain = self.libvirt().observe(name).map_err(failed)?;
        Ok(domain.is_some_and(|d| {
            d.owner.is_some()
                && !d.incoming
                && matches!(d.state, RunState::Running | RunState::Paused)
        }))
    }

    /// Live-migrates `guest` from here to host `to` (a libvirt host whose manifest has
    /// `libvirt.remoteUri`), calling `progress` with each sample of libvirt's job
    /// statistics. On failure the guest keeps running here.
    ///
    /// # Errors
    /// When `to` cannot be reached or refuses (pre-checks), or libvirt fails.
    pub fn migrate_away(
        &self,
        guest: &Guest,
        to: &str,
        mut progress: impl FnMut(Progress),
    ) -> Result<MigrationReport, DriverError> {
        let name = &guest.metadata.name;
        let spec = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(to)
            .cloned()
            .ok_or_else(|| {
                DriverError::Refused(format!(
                    "{name}: host {to} is not a libvirt host of the enforced revision"
                ))
            })?;
        let (uri, migrate_uri) = spec.migration_target().ok_or_else(|| {
            DriverError::Refused(format!(
                "{name}: the Host manifest of {to} does not say how to reach its libvirtd (spec.libvirt.remoteUri)"
            ))
        })?;
        let dest = Libvirt::open(&uri).map_err(|e| {
            DriverError::failed(format!("{name}: reaching host {to}'s libvirtd"), e)
        })?;
        // A connection of its own: the migration takes seconds, and observe goes on.
        let source = Libvirt::open(&self.spec.uri).map_err(failed)?;
        self.outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), to.to_owned());
        let started = Instant::now();
        let mut last = None;
        let result = source.migrate(guest, &dest, &Destination { uri, migrate_uri }, |p| {
            last = Some(p);
            progress(p);
        });
        self.outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let outcome = result.map_err(|e| {
            DriverError::failed(
                format!("migrating {name} to {to}; the guest stays on {}", self.host),
                e,
            )
        })?;
        let elapsed = started.elapsed();
        // A measure, not part of the move: a failure to read it loses only the number.
        let downtime = dest.migration_downtime(name).ok().flatten();
        Ok(MigrationReport {
            outcome,
            elapsed,
            last,
            downtime,
        })
    }

    fn libvirt(&self) -> std::sync::MutexGuard<'_, Libvirt> {
        // A panic while holding the connection leaves nothing half-written in it.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_host(&self, host: &str) -> Result<(), DriverError> {
        if host == self.host {
            Ok(())
        } else {
            Err(DriverError::NotFound(format!(
                "host {host} is not this driver's host {} ({})",
                self.host, self.spec.uri
            )))
        }
    }

    fn observed_guest(&self, d: ObservedDomain) -> Option<ObservedGuest> {
        if d.incoming {
            // Arriving from another host: that host's guest until the move finishes.
            return None;
        }
        let owner = d.owner?;
        let meta: serde_json::Value = serde_json::from_str(&owner.object_meta).unwrap_or_default();
        let map = |key: &str| -> BTreeMap<String, String> {
            serde_json::from_value(meta[key].clone()).unwrap_or_default()
        };
        let mut annotations = map("annotations");
        annotations.insert(ANNOTATION_MANAGED.to_owned(), "true".to_owned());
        let def = &d.definition;
        let boot = match &def.kernel {
            Some(kernel) => Boot {
                from: BootFrom::Kernel,
                kernel: kernel.clone(),
                initrd: def.initrd.clone(),
                cmdline: def.cmdline.clone(),
                heartbeat: None,
            },
            None => Boot {
                from: BootFrom::Disk,
                ..Boot::default()
            },
        };
        let mode = match def.cpu_mode.as_deref() {
            Some("host-passthrough") => CpuMode::HostPassthrough,
            Some("host-model") => CpuMode::HostModel,
            _ => CpuMode::Custom,
        };
        let unpinned = |set: &CpuSet| *set == d.host_cpus;
        let vcpus: BTreeMap<u32, CpuSet> = d
            .vcpu_pins
            .iter()
            .enumerate()
            .filter(|(_, set)| !unpinned(set))
            .map(|(i, set)| (i as u32, set.clone()))
            .collect();
        let emulator = Some(d.emulator_pin.clone()).filter(|s| !unpinned(s));
        let pinning =
            (!vcpus.is_empty() || emulator.is_some()).then_some(Pinning { vcpus, emulator });
        let tune = MemTune {
            hard_limit: d.memtune.hard_limit,
            soft_limit: d.memtune.soft_limit,
            swap_hard_limit: d.memtune.swap_hard_limit,
            min_guarantee: d.memtune.min_guarantee,
            allow_hard_limit_below_size: false,
        };
        let numa = d.numa.as_ref().and_then(|(mode, nodeset)| {
            nodeset.clone().map(|nodeset| NumaSpec {
                mode: *mode,
                nodeset,
            })
        });
        // A weight counts only when one was set and the host enforces it.
        let io_weight = match (&d.io_weight, def.blkio_weight) {
            (Knob::Enforced(w), Some(_)) => u16::try_from(*w).ok(),
            _ => None,
        };
        Some(ObservedGuest {
            host: self.host.clone(),
            state: match d.state {
                RunState::Paused => GuestState::Paused,
                RunState::Stopped => GuestState::Stopped,
                RunState::Running | RunState::Transient => GuestState::Running,
            },
            boot,
            cpu: ObservedCpu {
                vcpus: d.vcpus,
                max_vcpus: d.max_vcpus,
                mode,
                // No <cpu> element: QEMU's default model.
                model: match (mode, &def.cpu_mode) {
                    (CpuMode::Custom, None) => Some(QEMU_DEFAULT_CPU_MODEL.to_owned()),
                    (CpuMode::Custom, Some(_)) => def.cpu_model.clone(),
                    _ => None,
                },
                pinning,
            },
            memory: ObservedMemory {
                size: d.memory,
                hugepages: def.hugepage_kib.map(|kib| match kib {
                    1_048_576 => PageSize::Huge1G,
                    _ => PageSize::Huge2M,
                }),
                locked: def.locked,
                share_pages: !def.nosharepages,
                tune: Some(tune).filter(|t| *t != MemTune::default()),
                numa,
            },
            io_weight,
            labels: map("labels"),
            annotations,
            migrating_to: self
                .outgoing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&d.name)
                .cloned(),
            unresponsive: None,
            name: d.name,
        })
    }
}

/// The libvirt hosts that guests running on host `here` are placed on (by `desired`)
/// and that `here` can move them to live (their Host manifest has
/// `libvirt.remoteUri`), observed from their libvirtd (CPUs and memory; their host
/// settings are taken as their manifests say): what `berth apply` and `berth plan` on
/// a libvirt host need to plan such a move. A host that does not answer is
/// left out, with the reason in the second list.
pub fn destinations(
    here: &str,
    desired: &Desired,
    observed: &Observed,
) -> (Vec<ObservedHost>, Vec<String>) {
    let wanted: std::collections::BTreeSet<&str> = desired
        .guests
        .iter()
        .filter(|g| !g.spec.host.is_empty() && g.spec.host != here)
        .filter(|g| {
            observed
                .guests
                .iter()
                .any(|o| o.name == g.metadata.name && o.host == here)
        })
        .map(|g| g.spec.host.as_str())
        .collect();
    let (mut hosts, mut unreachable) = (Vec::new(), Vec::new());
    for host in desired.hosts.iter().filter(|h| {
        wanted.contains(h.metadata.name.as_str())
            && h.spec.driver == berth_schema::HostDriver::Libvirt
    }) {
        let name = &host.metadata.name;
        let Some((uri, _)) = host.spec.libvirt_or_default().migration_target() else {
            continue;
        };
        match Libvirt::open(&uri).and_then(|c| c.node()) {
            // Its CPUs and memory from its libvirtd; its host settings as its manifest
            // says: they are its own apply's to make, not this host's.
            Ok(node) => hosts.push(ObservedHost {
                cpus: node.cpus,
                memory_total: node.memory_total,
                memory_free: node.memory_free,
                ..ObservedHost::as_written(host, [])
            }),
            Err(e) => unreachable.push(format!(
                "host {name} ({uri}): {}",
                berth_hypervisor::report::one_line(&e)
            )),
        }
    }
    (hosts, unreachable)
}

/// Host `name` as its libvirtd reports it. Its host settings are filled in only for
/// this machine (see the module documentation).
fn host_of(name: &str, node: berth_hypervisor::libvirt::Node) -> ObservedHost {
    ObservedHost {
        name: name.to_owned(),
        cpus: node.cpus,
        memory_total: node.memory_total,
        memory_free: node.memory_free,
        hugepages: BTreeMap::new(),
        ksm: KsmSpec::default(),
        transparent_hugepages: ThpMode::default(),
        cpu: CpuInfo::default(),
    }
}

impl Driver for LibvirtDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Libvirt
    }

    fn scope(&self) -> Scope {
        Scope::Host(self.host.clone())
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        let libvirt = self.libvirt();
        let domains = libvirt.list().map_err(failed)?;
        let node = libvirt.node().map_err(failed)?;
        drop(libvirt);
        let mut host = host_of(&self.host, node);
        if let Some(machine) = &self.machine {
            let settings = machine.observe_host()?;
            host.hugepages = settings.hugepages;
            host.ksm = settings.ksm;
            host.transparent_hugepages = settings.transparent_hugepages;
        }
        Ok(Observed {
            guests: domains
                .into_iter()
                .filter_map(|d| self.observed_guest(d))
                .collect(),
            hosts: vec![host],
        })
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.check_host(host)?;
        if settings.is_empty() {
            return Ok(());
        }
        match &self.machine {
            Some(machine) => machine.configure_host(host, settings),
            None => Err(DriverError::Refused(format!(
                "host {host}: libvirtd is reached remotely ({}), so berth does not change its \
                 host settings (hugepage pools, KSM, transparent hugepages); set them on that \
                 machine, or leave them out of its manifest",
                self.spec.uri
            ))),
        }
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.check_host(host)?;
        let name = &guest.metadata.name;
        let libvirt = self.libvirt();
        if let Some(existing) = libvirt.observe(name).map_err(failed)? {
            match (existing.owner.is_some(), existing.state) {
                (false, _) => return Err(failed(LibvirtError::Unmanaged(name.clone()))),
                // A stopped domain of berth's is defined anew from the manifest.
                (true, RunState::Stopped) => libvirt.remove(name).map_err(failed)?,
                (true, _) => {
                    return Err(DriverError::Refused(format!(
                        "{name} already runs on host {host}"
                    )))
                }
            }
        }
        libvirt
            .create(
                guest,
                self.spec.domain_type,
                &self.revision(),
                &ConsoleLog::default_for(name),
            )
            .map(drop)
            .map_err(failed)
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.check_host(host)?;
        let name = &guest.metadata.name;
        let spec = &guest.spec;
        let libvirt = self.libvirt();
        let now = libvirt.observe(name).map_err(failed)?.ok_or_else(|| {
            DriverError::NotFound(format!("{name} is not defined on host {host}"))
        })?;
        let pins = spec.cpu.pinning.clone().unwrap_or_default();
        for field in fields {
            match field {
                Field::VcpuPinning => {
                    for vcpu in 0..now.max_vcpus {
                        let want = pins.vcpus.get(&vcpu).unwrap_or(&now.host_cpus);
                        if now.vcpu_pins.get(vcpu as usize) != Some(want) {
                            libvirt.pin_vcpu(name, vcpu, want).map_err(failed)?;
                        }
                    }
                }
                Field::EmulatorPinning => {
                    let want = pins.emulator.as_ref().unwrap_or(&now.host_cpus);
                    libvirt.pin_emulator(name, want).map_err(failed)?;
                }
                Field::HardLimit | Field::SoftLimit | Field::SwapHardLimit => {
                    let tune = spec.memory.tune.clone().unwrap_or_default();
                    libvirt.set_memtune(name, &tune).map_err(failed)?;
                }
                Field::MinGuarantee => {
                    return Err(DriverError::Refused(format!(
                        "{name}: QEMU domains have no minGuarantee (libvirt supports it for ESX only)"
                    )))
                }
                Field::Numa => match &spec.memory.numa {
                    Some(numa) if now.numa.as_ref().is_none_or(|(mode, _)| *mode == numa.mode) => {
                        libvirt
                            .set_numa_nodeset(name, &numa.nodeset)
                            .map_err(failed)?;
                    }
                    _ => {
                        return Err(DriverError::Refused(format!(
                            "{name}: libvirt changes only the NUMA nodeset live, not the mode or its removal"
                        )))
                    }
                },
                Field::IoWeight => {
                    let Some(io) = spec.io else {
                        return Err(DriverError::Refused(format!(
                            "{name}: an I/O weight cannot be removed from a running guest"
                        )));
                    };
                    if let Knob::NotEnforced(reason) =
                        libvirt.set_io_weight(name, io.weight.into()).map_err(failed)?
                    {
                        return Err(DriverError::Refused(format!(
                            "{name}: I/O weight {} is not in force on host {host}: {reason}",
                            io.weight
                        )));
                    }
                }
                Field::Vcpus => {
                    if spec.cpu.vcpus < now.vcpus {
                        return Err(DriverError::Refused(format!(
                            "{name}: vCPUs cannot be removed live ({} -> {})",
                            now.vcpus, spec.cpu.vcpus
                        )));
                    }
                    libvirt.set_vcpus(name, spec.cpu.vcpus).map_err(failed)?;
                }
                Field::State => match (now.state, spec.state) {
                    (RunState::Paused, GuestState::Running) => libvirt.resume(name).map_err(failed)?,
                    (RunState::Stopped, GuestState::Running) => libvirt.start(name).map_err(failed)?,
                    (RunState::Running, GuestState::Paused) => libvirt.suspend(name).map_err(failed)?,
                    (RunState::Stopped, GuestState::Paused) => {
                        libvirt.start(name).map_err(failed)?;
                        libvirt.suspend(name).map_err(failed)?;
                    }
                    (_, GuestState::Stopped) => {
                        libvirt.shutdown(name, SHUTDOWN_TIMEOUT).map_err(failed)?;
                    }
                    _ => {}
                },
                Field::Labels | Field::Annotations => {}
                other => {
                    return Err(DriverError::Refused(format!(
                        "{name}: {other} cannot change live through libvirt, and libvirt cannot \
                         migrate a guest to the same host; it takes a restart"
                    )))
                }
            }
        }
        libvirt.record(guest, &self.revision()).map_err(failed)
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.check_host(host)?;
        self.libvirt()
            .shutdown(name, SHUTDOWN_TIMEOUT)
            .map(drop)
            .map_err(failed)
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        self.check_host(from)?;
        let name = &guest.metadata.name;
        if from == to {
            return Err(DriverError::Refused(format!(
                "{name}: libvirt cannot migrate a guest to the same host, so this change needs a \
                 restart (restartPolicy: ifRequired)"
            )));
        }
        self.migrate_away(guest, to, |_| {}).map(drop)
    }
}
