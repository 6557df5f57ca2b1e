//! The libvirt side: guests that libvirtd and QEMU run, through the `virt` crate
//! (libvirt's own Rust bindings, LGPL-2.1).
//!
//! - [`xml`]: the domain XML built from a Guest, and berth's `<metadata>` element;
//! - [`Libvirt`]: one connection; observe (read back from libvirt, never from what berth
//!   asked), define and start, live changes (applied to the live domain and its
//!   persistent config, then read back), pause, graceful shutdown, undefine;
//! - `ffi`: the calls `virt` does not wrap, each `unsafe` documented.
//!
//! Every call blocks on libvirtd: async callers run them on a blocking thread.

mod ffi;
pub mod import;
pub mod migrate;
pub mod xml;

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_schema::{BootFrom, Bytes, CpuSet, DomainType, Guest, GuestState, MemTune, NumaMode};
use serde::Serialize;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState, MemoryParameters, NUMAParameters};
use virt::sys;

use crate::host::cgroup::Knob;
pub use xml::{ConsoleLog, Definition, Ownership};

/// A failed libvirt operation, naming the guest (and the field, for bad input).
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The connection could not be opened.
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        /// The URI tried.
        uri: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A call on a domain failed.
    #[error("guest {guest}: {op} failed")]
    Call {
        /// The domain.
        guest: String,
        /// What was being done.
        op: &'static str,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A call on the connection failed.
    #[error("libvirt at {uri}: {op} failed")]
    Host {
        /// The connection's URI.
        uri: String,
        /// What was being done.
        op: &'static str,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// The Guest names something this host does not have; nothing was created.
    #[error("guest {guest}: {field}: {message}")]
    Invalid {
        /// The guest.
        guest: String,
        /// The manifest field, as `spec.disks[0].source`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A domain of that name exists and berth does not own it.
    #[error("guest {0}: a domain of that name exists and is not managed by berth (no berth <metadata>); berth leaves it alone (use `berth import` to adopt it)")]
    Unmanaged(String),
    /// No domain of that name.
    #[error("guest {0}: no such domain")]
    NoDomain(String),
    /// libvirt returned XML berth cannot read.
    #[error("guest {guest}: libvirt's {what} cannot be read")]
    Unreadable {
        /// The guest.
        guest: String,
        /// Which document.
        what: String,
    },
    /// The domain XML could not be written.
    #[error("guest {guest}: building the domain XML")]
    Xml {
        /// The guest.
        guest: String,
        /// The writer's error.
        #[source]
        source: io::Error,
    },
}

/// A domain's run state as libvirt reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RunState {
    /// vCPUs run (libvirt's running or blocked).
    Running,
    /// Suspended.
    Paused,
    /// Defined but not running (shut off, crashed).
    Stopped,
    /// Shutting down, or another transient state.
    Transient,
}

impl RunState {
    fn of(state: DomainState) -> RunState {
        match state {
            DomainState::Running | DomainState::Blocked => RunState::Running,
            DomainState::Paused | DomainState::PMSuspended => RunState::Paused,
            DomainState::Shutoff | DomainState::Crashed => RunState::Stopped,
            DomainState::NoState | DomainState::Shutdown => RunState::Transient,
        }
    }

    /// Whether this is the state a manifest asks for.
    pub fn is(self, wanted: GuestState) -> bool {
        matches!(
            (self, wanted),
            (RunState::Running, GuestState::Running)
                | (RunState::Paused, GuestState::Paused)
                | (RunState::Stopped, GuestState::Stopped)
        )
    }
}

/// cgroup memory limits in force; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedMemTune {
    /// `hard_limit`.
    pub hard_limit: Option<Bytes>,
    /// `soft_limit`.
    pub soft_limit: Option<Bytes>,
    /// `swap_hard_limit`.
    pub swap_hard_limit: Option<Bytes>,
    /// `min_guarantee` (not supported by QEMU domains: always `None` there).
    pub min_guarantee: Option<Bytes>,
}

/// One domain as libvirt reports it: the running domain's values when it runs, its
/// persistent config when it does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedDomain {
    /// The domain name (the Guest's name).
    pub name: String,
    /// libvirt's UUID of the domain.
    pub uuid: String,
    /// Run state.
    pub state: RunState,
    /// A transient domain paused for an incoming migration: libvirt is receiving it
    /// from another host; it is not this host's guest until the migration finishes.
    pub incoming: bool,
    /// berth's `<metadata>`; `None` for a domain berth does not manage.
    pub owner: Option<Ownership>,
    /// vCPUs online.
    pub vcpus: u32,
    /// The most vCPUs without a restart.
    pub max_vcpus: u32,
    /// Each vCPU's affinity, by vCPU index.
    pub vcpu_pins: Vec<CpuSet>,
    /// The emulator threads' affinity.
    pub emulator_pin: CpuSet,
    /// Guest memory (libvirt's maximum memory).
    pub memory: Bytes,
    /// Memory limits.
    pub memtune: ObservedMemTune,
    /// NUMA memory mode and nodeset; `None` when libvirt reports none.
    pub numa: Option<(NumaMode, Option<CpuSet>)>,
    /// Block I/O weight, or why the host cannot enforce one.
    pub io_weight: Knob<u32>,
    /// Boot, CPU model and memory backing from the running domain's XML (the CPU mode
    /// from its persistent XML, since libvirt expands host-model in the live one).
    pub definition: Definition,
    /// Every host CPU: a vCPU pinned to all of them is not pinned.
    pub host_cpus: CpuSet,
}

/// The QEMU process of a running domain of this machine's libvirtd (`qemu:///system`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QemuProcess {
    /// QEMU's pid.
    pub pid: i32,
    /// Since QEMU started (for a guest that migrated here, since it arrived).
    pub uptime: Duration,
}

/// Where this machine's libvirtd keeps the pid files of its QEMUs.
const QEMU_RUN_DIR: &str = "/run/libvirt/qemu";

/// The QEMU process running domain `name` on this machine, from the pid file libvirtd
/// keeps for it and the kernel's record of the process (its start time, from
/// `/proc/<pid>/stat`, against `/proc/uptime`); `None` when the domain does not run
/// here. libvirt's API gives neither: only a local libvirtd's domains have them.
pub fn qemu_process(name: &str) -> Option<QemuProcess> {
    let pid: i32 = std::fs::read_to_string(Path::new(QEMU_RUN_DIR).join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    Some(QemuProcess {
        pid,
        uptime: process_uptime(&stat, &uptime)?,
    })
}

/// How long a process has run, from its `/proc/<pid>/stat` and `/proc/uptime`.
fn process_uptime(stat: &str, uptime: &str) -> Option<Duration> {
    // The command name (field 2) is in parentheses and may hold spaces: the fields
    // after its closing parenthesis start with field 3; the start time is field 22.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    let since_boot: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let started = Duration::from_millis(ticks * 1000 / hz);
    Some(Duration::from_secs_f64(since_boot).saturating_sub(started))
}

/// A host as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// The host's CPUs.
    pub cpus: CpuSet,
    /// Its memory.
    pub memory_total: Bytes,
    /// Memory free now.
    pub memory_free: Bytes,
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Shutdown {
    /// The guest was not running.
    AlreadyStopped,
    /// The guest powered off within the timeout.
    Graceful,
    /// The guest ignored the request; it was destroyed at the timeout.
    Destroyed,
}

/// One libvirt connection.
pub struct Libvirt {
    conn: Connect,
    uri: String,
    host_cpus: u32,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish()
    }
}

const LIVE_AND_CONFIG: u32 = sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG;

impl Libvirt {
    /// Opens `uri` (for example `qemu:///system`).
    ///
    /// # Errors
    /// [`LibvirtError::Connect`] when libvirtd does not answer there.
    pub fn open(uri: &str) -> Result<Libvirt, LibvirtError> {
        // libvirt's default error handler prints every error to stderr (a blkio weight
        // the host's I/O scheduler lacks, on every observe); berth gets each error as a
        // value from the call that failed and reports it once, where it matters.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(virt::error::clear_error_callback);
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_owned(),
            source,
        })?;
        let host_cpus = ffi::host_cpus(&conn).map_err(|source| LibvirtError::Host {
            uri: uri.to_owned(),
            op: "reading the host's CPU count",
            source,
        })?;
        Ok(Libvirt {
            conn,
            uri: uri.to_owned(),
            host_cpus,
        })
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The host's CPUs and memory, as libvirt reports them.
    pub fn node(&self) -> Result<Node, LibvirtError> {
        let info = self
            .conn
            .node_info()
            .map_err(|source| self.host_err("reading the node info", source))?;
        let free = self
            .conn
            .free_memory()
            .map_err(|source| self.host_err("reading the free memory", source))?;
        Ok(Node {
            cpus: (0..self.host_cpus).collect(),
            memory_total: Bytes(info.memory * 1024),
            memory_free: Bytes(free),
        })
    }

    /// The host's UUID, as libvirt reports it in its capabilities.
    pub fn host_uuid(&self) -> Result<String, LibvirtError> {
        let caps = self
            .conn
            .capabilities()
            .map_err(|source| self.host_err("reading capabilities", source))?;
        xml::host_uuid(&caps).ok_or_else(|| LibvirtError::Host {
            uri: self.uri.clone(),
            op: "reading the host UUID from the capabilities",
            source: virt::error::Error::last_error(),
        })
    }

    fn host_err(&self, op: &'static str, source: virt::error::Error) -> LibvirtError {
        LibvirtError::Host {
            uri: self.uri.clone(),
            op,
            source,
        }
    }

    fn lookup(&self, name: &str) -> Result<Option<Domain>, LibvirtError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Some(dom)),
            Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => Ok(None),
            Err(source) => Err(call(name, "looking the domain up", source)),
        }
    }

    fn managed(&self, name: &str) -> Result<Domain, LibvirtError> {
        let dom = self
            .lookup(name)?
            .ok_or_else(|| LibvirtError::NoDomain(name.to_owned()))?;
        if owner_of(&dom).is_none() {
            return Err(LibvirtError::Unmanaged(name.to_owned()));
        }
        Ok(dom)
    }

    /// Every domain on the connection, berth's and the others (`owner` is `None`).
    pub fn list(&self) -> Result<Vec<ObservedDomain>, LibvirtError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|source| self.host_err("listing domains", source))?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in &domains {
            // A domain that stopped while it was read (its live vCPUs are gone) is read
            // again, as it is now; one undefined meanwhile is simply gone.
            let mut observed = self.observe_domain(dom);
            if matches!(&observed, Err(LibvirtError::Call { source, .. })
                if source.code().is(virt::error::ErrorNumber::OperationInvalid))
            {
                observed = self.observe_domain(dom);
            }
            match observed {
                Ok(observed) => out.push(observed),
                Err(LibvirtError::Call { source, .. })
                    if source.code().is(virt::error::ErrorNumber::NoDomain) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The names of every domain on the connection.
    pub fn domain_names(&self) -> Result<Vec<String>, LibvirtError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|source| self.host_err("listing domains", source))?;
        Ok(domains.iter().filter_map(|d| d.name().ok()).collect())
    }

    /// One domain, read back from libvirt; `None` when there is none of that name.
    pub fn observe(&self, name: &str) -> Result<Option<ObservedDomain>, LibvirtError> {
        match self.lookup(name)? {
            // Undefined while it was read (a migration away ended): gone.
            Some(dom) => match self.observe_domain(&dom) {
                Err(LibvirtError::Call { source, .. })
                    if source.code().is(virt::error::ErrorNumber::NoDomain) =>
                {
                    Ok(None)
                }
                other => other.map(Some),
            },
            None => Ok(None),
        }
    }

    fn observe_domain(&self, dom: &Domain) -> Result<ObservedDomain, LibvirtError> {
        let name = dom
            .name()
            .map_err(|source| self.host_err("reading a domain's name", source))?;
        let e = |op: &'static str| {
            let name = name.clone();
            move |source| call(&name, op, source)
        };
        let (state, reason) = dom.state().map_err(e("reading the state"))?;
        let state = match state {
            virt::enumutil::Enum::Known(s) => RunState::of(s),
            virt::enumutil::Enum::Unknown(_) => RunState::Transient,
        };
        let active = dom.is_active().map_err(e("reading whether it runs"))?;
        // libvirt starts the destination's QEMU paused, reason "migration", and makes
        // the domain persistent only when the migration finishes.
        let incoming = matches!(
            reason,
            virt::enumutil::Enum::Known(virt::domain::DomainStateReason::Paused(
                virt::enumutil::Enum::Known(virt::domain::DomainPausedReason::Migration)
            ))
        ) && !dom
            .is_persistent()
            .map_err(e("reading whether it is persistent"))?;
        let scope = if active {
            sys::VIR_DOMAIN_AFFECT_LIVE
        } else {
            sys::VIR_DOMAIN_AFFECT_CONFIG
        };
        let max_vcpus = dom
            .vcpus_flags(sys::VIR_DOMAIN_VCPU_MAXIMUM | scope)
            .map_err(e("reading the maximum vCPUs"))?;
        let vcpus = dom.vcpus_flags(scope).map_err(e("reading the vCPUs"))?;
        let vcpu_pins = ffi::vcpu_pin_info(dom, max_vcpus, self.host_cpus, scope)
            .map_err(e("reading the vCPU pinning"))?;
        let emulator_pin = ffi::emulator_pin_info(dom, self.host_cpus, scope)
            .map_err(e("reading the emulator pinning"))?;
        let info = dom.info().map_err(e("reading the domain info"))?;
        let mem = dom
            .memory_parameters(scope)
            .map_err(e("reading the memory parameters"))?;
        let numa = dom
            .numa_parameters(scope)
            .map_err(e("reading the NUMA parameters"))?;
        let io_weight = match ffi::blkio_weight(dom, scope) {
            Ok(Some(w)) => Knob::Enforced(w),
            Ok(None) => Knob::NotEnforced("libvirt reports no block I/O weight".to_owned()),
            Err(err) => Knob::NotEnforced(err.message().to_owned()),
        };
        Ok(ObservedDomain {
            uuid: dom.uuid_string().map_err(e("reading the UUID"))?,
            owner: owner_of(dom),
            state,
            incoming,
            vcpus,
            max_vcpus,
            vcpu_pins,
            emulator_pin,
            memory: Bytes(info.max_mem * 1024),
            memtune: ObservedMemTune {
                hard_limit: limit(mem.hard_limit),
                soft_limit: limit(mem.soft_limit),
                swap_hard_limit: limit(mem.swap_hard_limit),
                min_guarantee: limit(mem.min_guarantee),
            },
            numa: numa.mode.and_then(numa_mode).map(|mode| {
                let nodeset = numa
                    .node_set
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .and_then(|s| s.parse().ok());
                (mode, nodeset)
            }),
            io_weight,
            definition: self.definition(dom, &name)?,
            host_cpus: (0..self.host_cpus).collect(),
            name,
        })
    }

    fn definition(&self, dom: &Domain, name: &str) -> Result<Definition, LibvirtError> {
        let live = dom
            .xml_desc(0)
            .map_err(|source| call(name, "reading the domain XML", source))?;
        let config = dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|source| call(name, "reading the persistent domain XML", source))?;
        let unreadable = |what: &str| LibvirtError::Unreadable {
            guest: name.to_owned(),
            what: what.to_owned(),
        };
        let mut def = xml::parse_definition(&live).ok_or_else(|| unreadable("domain XML"))?;
        let persistent =
            xml::parse_definition(&config).ok_or_else(|| unreadable("persistent domain XML"))?;
        def.cpu_mode = persistent.cpu_mode;
        def.cpu_model = persistent.cpu_model;
        Ok(def)
    }

    /// Checks what the Guest names on this host (disk images, kernel, networks,
    /// bridges) before anything is created.
    ///
    /// # Errors
    /// [`LibvirtError::Invalid`] naming the guest and the field.
    pub fn preflight(&self, guest: &Guest) -> Result<(), LibvirtError> {
        let name = &guest.metadata.name;
        let invalid = |field: String, message: String| LibvirtError::Invalid {
            guest: name.clone(),
            field,
            message,
        };
        let spec = &guest.spec;
        if spec.boot.from == BootFrom::Kernel {
            let files = [
                ("kernel", Some(&spec.boot.kernel)),
                ("initrd", spec.boot.initrd.as_ref()),
            ];
            for (field, path) in files {
                if let Some(path) = path {
                    if !Path::new(path).is_file() {
                        return Err(invalid(
                            format!("spec.boot.{field}"),
                            format!("{path} does not exist on this host"),
                        ));
                    }
                }
            }
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            if !Path::new(&disk.source).is_file() {
                return Err(invalid(
                    format!("spec.disks[{i}].source"),
                    format!(
                        "{} does not exist on this host (berth does not create disk images)",
                        disk.source
                    ),
                ));
            }
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            if let Some(bridge) = &nic.bridge {
                if !Path::new("/sys/class/net")
                    .join(bridge)
                    .join("bridge")
                    .is_dir()
                {
                    return Err(invalid(
                        format!("spec.nics[{i}].bridge"),
                        format!("{bridge} is not a bridge on this host"),
                    ));
                }
            }
            if let Some(network) = &nic.network {
                let active = self
                    .conn
                    .list_networks()
                    .map_err(|source| self.host_err("listing networks", source))?;
                if !active.iter().any(|n| n == network) {
                    return Err(invalid(
                        format!("spec.nics[{i}].network"),
                        format!("libvirt network {network} does not exist or is not active on this host"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Defines the guest's domain (owned by berth at `revision`) and brings it to the
    /// manifest's state, then reads it back. On a failure to start, the definition
    /// made here is removed again: nothing is left half-created.
    ///
    /// # Errors
    /// Bad input ([`LibvirtError::Invalid`]), a domain of the name that berth does not
    /// own ([`LibvirtError::Unmanaged`]), or libvirt's refusal.
    pub fn create(
        &self,
        guest: &Guest,
        domain_type: DomainType,
        revision: &str,
        console: &ConsoleLog,
    ) -> Result<ObservedDomain, LibvirtError> {
        let name = &guest.metadata.name;
        if let Some(existing) = self.lookup(name)? {
            if owner_of(&existing).is_none() {
                return Err(LibvirtError::Unmanaged(name.clone()));
            }
        }
        self.preflight(guest)?;
        // Memory limits in the XML at start make libvirt raise QEMU's RLIMIT_MEMLOCK to
        // the hard limit, which needs CAP_SYS_RESOURCE (some sandboxes refuse it); set
        // through the live API right after the start, they end up the same, live and in
        // the config.
        let deferred_tune = match (&guest.spec.memory.tune, guest.spec.state) {
            (Some(tune), GuestState::Running | GuestState::Paused) => Some(tune.clone()),
            _ => None,
        };
        let mut defined = guest.clone();
        if deferred_tune.is_some() {
            defined.spec.memory.tune = None;
        }
        let text = xml::domain_xml(&defined, domain_type, revision, console).map_err(|source| {
            LibvirtError::Xml {
                guest: name.clone(),
                source,
            }
        })?;
        let dom = self
            .conn
            .define_domain_xml(&text)
            .map_err(|source| call(name, "defining the domain", source))?;
        let started = match guest.spec.state {
            GuestState::Stopped => Ok(()),
            GuestState::Running => dom.create().map(drop),
            GuestState::Paused => dom
                .create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
                .map(drop),
        };
        if let Err(source) = started {
            // Best effort: the definition made above goes; the start error is the one
            // worth reporting.
            let _ = dom.undefine();
            return Err(call(name, "starting the domain", source));
        }
        if let Some(tune) = deferred_tune {
            let tuned = self
                .set_memtune(name, &tune)
                .and_then(|_| self.write_ownership(&dom, guest, revision));
            if let Err(e) = tuned {
                // Nothing half-created: the guest without its limits goes.
                let _ = dom.destroy();
                let _ = dom.undefine();
                return Err(e);
            }
        }
        self.observe_domain(&dom)
    }

    /// Guest manifests for every domain on the connection, placed on `host`, with each
    /// domain's type (`berth import`).
    pub fn import(&self, host: &str) -> Result<Vec<(Guest, DomainType)>, LibvirtError> {
        let domains = self
            .conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            .map_err(|source| self.host_err("listing domains", source))?;
        let mut out = Vec::new();
        for dom in &domains {
            let name = dom
                .name()
                .map_err(|source| self.host_err("reading a domain's name", source))?;
            let xml = dom
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(|source| call(&name, "reading the persistent domain XML", source))?;
            let (state, _) = dom
                .state()
                .map_err(|source| call(&name, "reading the state", source))?;
            let state = match state {
                virt::enumutil::Enum::Known(s) => RunState::of(s),
                virt::enumutil::Enum::Unknown(_) => RunState::Transient,
            };
            let state = match state {
                RunState::Paused => GuestState::Paused,
                RunState::Stopped => GuestState::Stopped,
                RunState::Running | RunState::Transient => GuestState::Running,
            };
            let imported = import::guest_from_domain(&xml, host, state).map_err(|e| {
                LibvirtError::Invalid {
                    guest: name.clone(),
                    field: "domain XML".to_owned(),
                    message: e.to_string(),
                }
            })?;
            out.push(imported);
        }
        out.sort_by(|a, b| a.0.metadata.name.cmp(&b.0.metadata.name));
        Ok(out)
    }

    /// Makes an existing domain berth's: records `guest` (its manifest) at `revision` in
    /// the domain's `<metadata>`, live and in its config. Nothing else changes.
    pub fn adopt(&self, guest: &Guest, revision: &str) -> Result<(), LibvirtError> {
        let name = &guest.metadata.name;
        let dom = self
            .lookup(name)?
            .ok_or_else(|| LibvirtError::NoDomain(name.clone()))?;
        self.write_ownership(&dom, guest, revision)
    }

    /// Records `revision` and the spec's fingerprint in the domain's `<metadata>`,
    /// live and in its config.
    pub fn record(&self, guest: &Guest, revision: &str) -> Result<(), LibvirtError> {
        let dom = self.managed(&guest.metadata.name)?;
        self.write_ownership(&dom, guest, revision)
    }

    fn write_ownership(
        &self,
        dom: &Domain,
        guest: &Guest,
        revision: &str,
    ) -> Result<(), LibvirtError> {
        let name = &guest.metadata.name;
        let owner = Ownership::of(guest, revision);
        let text = xml::ownership_xml(&owner).map_err(|source| LibvirtError::Xml {
            guest: name.clone(),
            source,
        })?;
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&text),
            Some(xml::METADATA_KEY),
            Some(xml::METADATA_NS),
            impact(dom),
        )
        .map_err(|source| call(name, "recording berth's metadata", source))
    }

    /// Pins one vCPU (`virsh vcpupin --live --config`), then reads the pinning back.
    pub fn pin_vcpu(&self, name: &str, vcpu: u32, cpus: &CpuSet) -> Result<CpuSet, LibvirtError> {
        let dom = self.managed(name)?;
        let flags = impact(&dom);
        dom.pin_vcpu_flags(vcpu, &ffi::cpu_map(cpus, self.host_cpus), flags)
            .map_err(|source| call(name, "pinning a vCPU", source))?;
        let max = dom
            .vcpus_flags(sys::VIR_DOMAIN_VCPU_MAXIMUM | read_scope(flags))
            .map_err(|source| call(name, "reading the maximum vCPUs", source))?;
        let pins = ffi::vcpu_pin_info(&dom, max, self.host_cpus, read_scope(flags))
            .map_err(|source| call(name, "reading the vCPU pinning", source))?;
        Ok(pins.get(vcpu as usize).cloned().unwrap_or_default())
    }

    /// Pins the emulator threads (`virsh emulatorpin --live --config`), then reads back.
    pub fn pin_emulator(&self, name: &str, cpus: &CpuSet) -> Result<CpuSet, LibvirtError> {
        let dom = self.managed(name)?;
        let flags = impact(&dom);
        dom.pin_emulator(&ffi::cpu_map(cpus, self.host_cpus), flags)
            .map_err(|source| call(name, "pinning the emulator threads", source))?;
        ffi::emulator_pin_info(&dom, self.host_cpus, read_scope(flags))
            .map_err(|source| call(name, "reading the emulator pinning", source))
    }

    /// Sets the memory limits (`virsh memtune --live --config`); a limit the manifest
    /// leaves out is set to unlimited, so a limit set by hand is undone. Reads back.
    pub fn set_memtune(&self, name: &str, tune: &MemTune) -> Result<ObservedMemTune, LibvirtError> {
        let dom = self.managed(name)?;
        let flags = impact(&dom);
        let kib = |b: Option<Bytes>| {
            Some(b.map_or(MemoryParameters::VALUE_UNLIMITED, |b| {
                b.get().div_ceil(1024)
            }))
        };
        // libvirt checks hard <= swap as each value is set, in the order given; the
        // swap limit goes first when it grows and last when it shrinks.
        let params = MemoryParameters {
            hard_limit: kib(tune.hard_limit),
            soft_limit: kib(tune.soft_limit),
            swap_hard_limit: kib(tune.swap_hard_limit),
            // QEMU domains have no min_guarantee; leave it alone.
            min_guarantee: None,
        };
        dom.set_memory_parameters(params, flags)
            .map_err(|source| call(name, "setting the memory limits", source))?;
        let mem = dom
            .memory_parameters(read_scope(flags))
            .map_err(|source| call(name, "reading the memory limits", source))?;
        Ok(ObservedMemTune {
            hard_limit: limit(mem.hard_limit),
            soft_limit: limit(mem.soft_limit),
            swap_hard_limit: limit(mem.swap_hard_limit),
            min_guarantee: limit(mem.min_guarantee),
        })
    }

    /// Moves the guest's memory to `nodeset` (`virsh numatune --nodeset --live
    /// --config`; libvirt allows it live in strict mode). Reads back.
    pub fn set_numa_nodeset(
        &self,
        name: &str,
        nodeset: &CpuSet,
    ) -> Result<Option<CpuSet>, LibvirtError> {
        let dom = self.managed(name)?;
        let flags = impact(&dom);
        let params = NUMAParameters {
            node_set: Some(nodeset.to_string()),
            mode: None,
        };
        dom.set_numa_parameters(params, flags)
            .map_err(|source| call(name, "setting the NUMA nodeset", source))?;
        let numa = dom
            .numa_parameters(read_scope(flags))
            .map_err(|source| call(name, "reading the NUMA parameters", source))?;
        Ok(numa
            .node_set
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok()))
    }

    /// Sets the block I/O weight (`virsh blkiotune --weight --live --config`) and reads
    /// it back. A host that cannot enforce a weight (no weight file, an I/O scheduler
    /// without weights) gives [`Knob::NotEnforced`] with libvirt's reason, never success.
    pub fn set_io_weight(&self, name: &str, weight: u32) -> Result<Knob<u32>, LibvirtError> {
        let dom = self.managed(name)?;
        let flags = impact(&dom);
        if let Err(err) = ffi::set_blkio_weight(&dom, weight, flags) {
            return Ok(Knob::NotEnforced(err.message().to_owned()));
        }
        Ok(match ffi::blkio_weight(&dom, read_scope(flags)) {
            Ok(Some(w)) if w == weight => Knob::Enforced(w),
            Ok(Some(w)) => {
                Knob::NotEnforced(format!("libvirt reports weight {w} after setting {weight}"))
            }
            Ok(None) => Knob::NotEnforced("libvirt reports no block I/O weight".to_owned()),
            Err(err) => Knob::NotEnforced(err.message().to_owned()),
        })
    }

    /// Sets the number of online vCPUs (`virsh setvcpus --live --config`): hot-add up
    /// to the maximum. Reads back the live count.
    pub fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<u32, LibvirtError> {
        let dom = self.managed(name)?;
        let flags = impact(&dom);
        dom.set_vcpus_flags(vcpus, flags)
            .map_err(|source| call(name, "setting the vCPU count", source))?;
        dom.vcpus_flags(read_scope(flags))
            .map_err(|source| call(name, "reading the vCPU count", source))
    }

    /// Pauses the guest (`virsh suspend`).
    pub fn suspend(&self, name: &str) -> Result<(), LibvirtError> {
        let dom = self.managed(name)?;
        dom.suspend()
            .map_err(|source| call(name, "pausing", source))
    }

    /// Resumes a paused guest (`virsh resume`).
    pub fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        let dom = self.managed(name)?;
        dom.resume()
            .map_err(|source| call(name, "resuming", source))
    }

    /// Starts a defined, stopped guest.
    pub fn start(&self, name: &str) -> Result<(), LibvirtError> {
        let dom = self.managed(name)?;
        dom.create()
            .map(drop)
            .map_err(|source| call(name, "starting", source))
    }

    /// Asks the guest to power off (ACPI) and waits up to `timeout`; past it, destroys
    /// the domain. The definition stays.
    pub fn shutdown(&self, name: &str, timeout: Duration) -> Result<Shutdown, LibvirtError> {
        let dom = self.managed(name)?;
        if !dom
            .is_active()
            .map_err(|source| call(name, "reading whether it runs", source))?
        {
            return Ok(Shutdown::AlreadyStopped);
        }
        // A guest that cannot take the request (no ACPI) is destroyed at once below.
        let asked = dom.shutdown().is_ok();
        let deadline = Instant::now() + timeout;
        while asked && Instant::now() < deadline {
            if !dom
                .is_active()
                .map_err(|source| call(name, "reading whether it runs", source))?
            {
                return Ok(Shutdown::Graceful);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match dom.destroy() {
            Ok(()) => Ok(Shutdown::Destroyed),
            // It stopped between the last look and the destroy.
            Err(_) if !dom.is_active().unwrap_or(true) => Ok(Shutdown::Graceful),
            Err(source) => Err(call(name, "destroying", source)),
        }
    }

    /// Stops (destroys) the guest if it runs and removes its definition.
    pub fn remove(&self, name: &str) -> Result<(), LibvirtError> {
        let dom = self.managed(name)?;
        if dom
            .is_active()
            .map_err(|source| call(name, "reading whether it runs", source))?
        {
            dom.destroy()
                .map_err(|source| call(name, "destroying", source))?;
        }
        dom.undefine()
            .map_err(|source| call(name, "undefining", source))
    }

    /// Aborts the guest's running job (a migration: the guest stays here).
    pub fn abort_job(&self, name: &str) -> Result<(), LibvirtError> {
        let dom = self.managed(name)?;
        ffi::abort_job(&dom).map_err(|source| call(name, "aborting its job", source))
    }
}

fn call(guest: &str, op: &'static str, source: virt::error::Error) -> LibvirtError {
    LibvirtError::Call {
        guest: guest.to_owned(),
        op,
        source,
    }
}

/// Live and config for a running domain, config alone for a stopped one.
fn impact(dom: &Domain) -> u32 {
    if dom.is_active().unwrap_or(false) {
        LIVE_AND_CONFIG
    } else {
        sys::VIR_DOMAIN_AFFECT_CONFIG
    }
}

/// Where to read back what `flags` changed: the live domain when it was changed.
fn read_scope(flags: u32) -> u32 {
    if flags & sys::VIR_DOMAIN_AFFECT_LIVE != 0 {
        sys::VIR_DOMAIN_AFFECT_LIVE
    } else {
        sys::VIR_DOMAIN_AFFECT_CONFIG
    }
}

fn owner_of(dom: &Domain) -> Option<Ownership> {
    let text = dom
        .metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(xml::METADATA_NS),
            0,
        )
        .ok()?;
    xml::parse_ownership(&text)
}

fn limit(kib: Option<u64>) -> Option<Bytes> {
    kib.filter(|v| *v < MemoryParameters::VALUE_UNLIMITED)
        .map(|v| Bytes(v * 1024))
}

fn numa_mode(mode: i32) -> Option<NumaMode> {
    match mode as u32 {
        sys::VIR_DOMAIN_NUMATUNE_MEM_STRICT => Some(NumaMode::Strict),
        sys::VIR_DOMAIN_NUMATUNE_MEM_PREFERRED => Some(NumaMode::Preferred),
        sys::VIR_DOMAIN_NUMATUNE_MEM_INTERLEAVE => Some(NumaMode::Interleave),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_uptime_comes_from_its_start_time_and_the_system_uptime() {
        // A command name with spaces and parentheses; start time 1500 ticks.
        let stat = "4242 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 1 0 1500 99 9";
        // SAFETY: sysconf reads a constant of the system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let started = 1500.0 / hz as f64;
        let uptime = format!("{:.2} 1.00", started + 65.5);
        let took = process_uptime(stat, &uptime).unwrap();
        assert!((took.as_secs_f64() - 65.5).abs() < 0.02, "{took:?}");
        assert_eq!(process_uptime("garbage", "1.0 1.0"), None);
        // Our own process started before now.
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let now = std::fs::read_to_string("/proc/uptime").unwrap();
        assert!(process_uptime(&own, &now).is_some());
    }
}
