//! Pre-checks, made by the destination on the source's `Config` frame before any byte
//! of memory moves; every problem found is reported at once, and the source fails the
//! migration with them while the guest keeps running.
//!
//! From the seeds: the same CPU vendor and the feature flags the guest sees (nx among
//! them) unless the CPU mode is a common model; a 64-bit guest only to a 64-bit host;
//! no guest of that name already running on the destination (other than the source of
//! a local migration); enough RAM, vCPUs, online pinned CPUs. The hugepages are taken
//! (and faulted in) when the incoming VMM starts, so a short pool stops it there.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use berth_schema::{CpuMode, CpuSet};
use serde::{Deserialize, Serialize};

use super::wire::MemoryBounds;
use crate::arch::x86_64::cpuid;
use crate::config::VmConfig;
use crate::payload::heartbeat::Layout;

/// The version of [`SourceConfig`]. Version 2 added [`SourceConfig::xsave_size`] (and
/// goes with machine state version 2).
pub const CONFIG_VERSION: u32 = 2;

/// Who the source is: enough to recognise a local migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceIdentity {
    /// The source host's `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The source VMM's pid.
    pub pid: i32,
}

impl SourceIdentity {
    /// This process on this host.
    pub fn here() -> SourceIdentity {
        SourceIdentity {
            boot_id: boot_id(),
            pid: std::process::id() as i32,
        }
    }
}

/// The host's boot id (empty when unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// What the source sends first (the `Config` frame, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceConfig {
    /// [`CONFIG_VERSION`].
    pub version: u32,
    /// Guest name.
    pub name: String,
    /// RAM ranges `(start, length)`.
    pub ranges: Vec<(u64, u64)>,
    /// vCPUs created (state comes for all of them).
    pub max_vcpus: u32,
    /// vCPUs started.
    pub online_vcpus: u32,
    /// CPU mode.
    pub cpu_mode: CpuMode,
    /// The CPU vendor the guest sees.
    pub cpu_vendor: String,
    /// The feature flags the guest sees.
    pub cpu_flags: BTreeSet<String>,
    /// Whether the guest runs in 64-bit mode.
    pub long_mode: bool,
    /// The heartbeat payload's layout, when the guest runs it.
    pub heartbeat: Option<Layout>,
    /// Connections the source opens (stream numbers `0..connections`).
    pub connections: u32,
    /// The source.
    pub source: SourceIdentity,
    /// Bytes in each vCPU's XSAVE area as the source's KVM reads it (absent from
    /// version 1, which the version check refuses).
    #[serde(default)]
    pub xsave_size: u32,
}

/// A VMM already holding a guest's state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningGuest {
    /// Its pid, from the pid file.
    pub pid: Option<i32>,
}

/// What the destination knows about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationFacts {
    /// The guest name the incoming VMM was started for.
    pub name: String,
    /// CPU vendor of this host's KVM.
    pub cpu_vendor: String,
    /// Flags this host's KVM can give a guest.
    pub cpu_flags: BTreeSet<String>,
    /// Whether this host is 64-bit (`lm` in /proc/cpuinfo).
    pub host_64bit: bool,
    /// RAM ranges of the incoming machine.
    pub ranges: Vec<(u64, u64)>,
    /// vCPUs created here.
    pub max_vcpus: u32,
    /// Pinned CPUs that are not online (empty when all are).
    pub offline_pinned_cpus: String,
    /// A VMM already running this guest here.
    pub running_here: Option<RunningGuest>,
    /// This host's boot id.
    pub boot_id: String,
    /// Bytes of XSAVE area this host's KVM takes per vCPU.
    pub xsave_size: u32,
}

impl DestinationFacts {
    /// The facts of the incoming machine built from `config` with `ranges` of RAM,
    /// `supported` CPUID and `xsave_size` bytes of XSAVE area, looking for a running VMM
    /// of the guest under `state_root`.
    pub fn gather(
        config: &VmConfig,
        ranges: Vec<(u64, u64)>,
        supported: &kvm_bindings::CpuId,
        xsave_size: usize,
        state_root: &Path,
    ) -> DestinationFacts {
        let pinned: CpuSet = config
            .pinning
            .vcpus
            .values()
            .chain(config.pinning.emulator.iter())
            .flat_map(|s| s.iter())
            .collect();
        let offline = match crate::host::affinity::ensure_online(&pinned) {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        };
        DestinationFacts {
            name: config.name.clone(),
            cpu_vendor: cpuid::vendor(supported),
            cpu_flags: cpuid::feature_flags(supported)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            host_64bit: crate::host::sysinfo::read_cpuinfo().is_ok_and(|c| c.is_64bit()),
            ranges,
            max_vcpus: config.max_vcpus,
            offline_pinned_cpus: offline,
            running_here: running_vmm(&crate::statedir::StateDir::path_of(
                state_root,
                &config.name,
            )),
            boot_id: boot_id(),
            xsave_size: xsave_size as u32,
        }
    }
}

/// A VMM holding the lock of the state directory `dir`, if any (probed with a
/// non-blocking shared flock that is released at once).
pub fn running_vmm(dir: &Path) -> Option<RunningGuest> {
    let file = std::fs::File::open(dir.join("vmm.lock")).ok()?;
    // SAFETY: flock on an fd we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above; releases the probe.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        return None;
    }
    let pid = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Some(RunningGuest { pid })
}

/// Every reason the guest described by `source` cannot come here.
pub fn check(source: &SourceConfig, dest: &DestinationFacts) -> Vec<String> {
    let mut problems = Vec::new();
    if source.version != CONFIG_VERSION {
        problems.push(format!(
            "the source speaks migration config version {}, this VMM {CONFIG_VERSION}",
            source.version
        ));
    }
    if source.name != dest.name {
        problems.push(format!(
            "this incoming VMM was started for guest {:?}, not {:?}",
            dest.name, source.name
        ));
    }
    if source.cpu_mode != CpuMode::Custom && source.cpu_vendor != dest.cpu_vendor {
        problems.push(format!(
            "CPU vendor differs: the guest sees {:?}, this host is {:?} (use a common CPU model, mode custom, to migrate across vendors)",
            source.cpu_vendor, dest.cpu_vendor
        ));
    }
    let missing: Vec<&str> = source
        .cpu_flags
        .iter()
        .filter(|f| !dest.cpu_flags.contains(*f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "this host's CPU lacks flags the guest sees: {}",
            missing.join(", ")
        ));
    }
    if source.xsave_size > dest.xsave_size {
        problems.push(format!(
            "the guest's XSAVE state is {} bytes per vCPU, this host's KVM takes only {} (KVM_CAP_XSAVE2): extended register state (such as AMX tiles) would be lost",
            source.xsave_size, dest.xsave_size
        ));
    }
    if source.long_mode && !dest.host_64bit {
        problems.push("a 64-bit guest cannot move to a 32-bit host".into());
    }
    let bounds = MemoryBounds::new(dest.ranges.iter().copied());
    let source_bytes: u64 = source.ranges.iter().map(|r| r.1).sum();
    let dest_bytes: u64 = dest.ranges.iter().map(|r| r.1).sum();
    let fits = source.ranges.iter().all(|&(start, len)| {
        len == 0
            || (bounds.contains_page(start)
                && start
                    .checked_add(len - super::wire::PAGE_SIZE as u64)
                    .is_some_and(|last| bounds.contains_page(last))
                && dest
                    .ranges
                    .iter()
                    .any(|&(s, l)| start >= s && start + len <= s + l))
    });
    if !fits {
        problems.push(format!(
            "the guest has {} of RAM, this incoming VMM {} (memory can grow, not shrink)",
            berth_schema::Bytes(source_bytes),
            berth_schema::Bytes(dest_bytes)
        ));
    }
    if dest.max_vcpus < source.max_vcpus {
        problems.push(format!(
            "the guest has maxVcpus {}, this incoming VMM {} (it can grow, not shrink)",
            source.max_vcpus, dest.max_vcpus
        ));
    }
    if !dest.offline_pinned_cpus.is_empty() {
        problems.push(format!(
            "pinned CPUs are not online here: {}",
            dest.offline_pinned_cpus
        ));
    }
    if let Some(running) = &dest.running_here {
        let local_source = source.source.boot_id == dest.boot_id
            && !dest.boot_id.is_empty()
            && running.pid == Some(source.source.pid);
        if !local_source {
            problems.push(format!(
                "guest {:?} already runs on this host{}",
                dest.name,
                running
                    .pid
                    .map(|p| format!(" (VMM pid {p})"))
                    .unwrap_or_default()
            ));
        }
    }
    if source.connections == 0 || source.connections > super::MAX_CONNECTIONS {
        problems.push(format!(
            "{} connections asked for; 1 to {} allowed",
            source.connections,
            super::MAX_CONNECTIONS
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SourceConfig, DestinationFacts) {
        let flags: BTreeSet<String> = ["nx", "lm", "sse2"].iter().map(|s| s.to_string()).collect();
        let source = SourceConfig {
            version: CONFIG_VERSION,
            name: "web-1".into(),
            ranges: vec![(0, 64 << 20)],
            max_vcpus: 2,
            online_vcpus: 2,
            cpu_mode: CpuMode::HostPassthrough,
            cpu_vendor: "GenuineIntel".into(),
            cpu_flags: flags.clone(),
            long_mode: true,
            heartbeat: None,
            connections: 2,
            source: SourceIdentity {
                boot_id: "b1".into(),
                pid: 10,
            },
            xsave_size: 4096,
        };
        let dest = DestinationFacts {
            name: "web-1".into(),
            cpu_vendor: "GenuineIntel".into(),
            cpu_flags: flags,
            host_64bit: true,
            ranges: vec![(0, 128 << 20)],
            max_vcpus: 4,
            offline_pinned_cpus: String::new(),
            running_here: None,
            boot_id: "b2".into(),
            xsave_size: 4096,
        };
        (source, dest)
    }

    #[test]
    fn a_compatible_destination_passes_and_may_grow() {
        let (s, mut d) = pair();
        assert_eq!(check(&s, &d), Vec::<String>::new());
        // A larger XSAVE area here takes the source's whole.
        d.xsave_size = 11008;
        assert_eq!(check(&s, &d), Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_reported() {
        let (mut s, mut d) = pair();
        d.cpu_flags.remove("nx");
        d.cpu_vendor = "AuthenticAMD".into();
        d.ranges = vec![(0, 32 << 20)];
        d.max_vcpus = 1;
        d.host_64bit = false;
        d.running_here = Some(RunningGuest { pid: Some(99) });
        s.name = "web-2".into();
        s.xsave_size = 11008;
        let problems = check(&s, &d).join("\n");
        for needle in [
            "lacks flags the guest sees: nx",
            "vendor differs",
            "memory can grow, not shrink",
            "maxVcpus 2",
            "32-bit host",
            "already runs on this host (VMM pid 99)",
            "started for guest",
            "XSAVE state is 11008 bytes per vCPU, this host's KVM takes only 4096",
        ] {
            assert!(
                problems.contains(needle),
                "{needle} missing in:\n{problems}"
            );
        }
        // A common model crosses vendors.
        let (mut s, mut d) = pair();
        s.cpu_mode = CpuMode::Custom;
        d.cpu_vendor = "AuthenticAMD".into();
        assert!(check(&s, &d).is_empty());
    }

    #[test]
    fn the_local_source_is_not_a_conflict() {
        let (s, mut d) = pair();
        d.boot_id = "b1".into();
        d.running_here = Some(RunningGuest { pid: Some(10) });
        assert!(check(&s, &d).is_empty());
        d.running_here = Some(RunningGuest { pid: Some(11) });
        assert_eq!(check(&s, &d).len(), 1);
    }
}
