//! The VMM's settings, derived once from a `Guest` manifest and checked before any
//! resource is taken.

use std::path::PathBuf;

use berth_schema::{
    CpuMode, CpuSet, Guest, GuestState, HeartbeatSpec, IoSpec, MemTune, NumaSpec, PageSize, Pinning,
};

/// Why a guest spec cannot be run by this VMM.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The name would escape the state directory or is not a DNS label.
    #[error("Invalid guest name {name:?}: {reason}")]
    Name {
        /// The name as written.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// vCPU counts out of range.
    #[error("Invalid vCPU count: {0}")]
    Vcpus(String),
    /// Memory size unusable.
    #[error("Invalid memory size: {0}")]
    Memory(String),
    /// Heartbeat settings out of range.
    #[error("Invalid heartbeat settings: {0}")]
    Heartbeat(String),
    /// Pinning names a vCPU the guest does not have.
    #[error("Invalid pinning: {0}")]
    Pinning(String),
}

/// Guest-side memory backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory with normal pages (THP per host policy).
    Anonymous,
    /// hugetlb pages of this size.
    Hugetlb(PageSize),
}

impl Backing {
    /// The granule that the memory size must be a multiple of.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Anonymous => 4096,
            Backing::Hugetlb(size) => size.bytes(),
        }
    }
}

/// Memory settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Anonymous or hugetlb.
    pub backing: Backing,
    /// mlock guest memory.
    pub locked: bool,
    /// KSM may merge guest pages.
    pub share_pages: bool,
    /// NUMA policy.
    pub numa: Option<NumaSpec>,
}

#[cfg(test)]
impl MemoryConfig {
    /// Plain anonymous memory of `size` bytes: not locked, not shared, no NUMA policy.
    pub(crate) fn anonymous(size: u64) -> Self {
        MemoryConfig {
            size,
            backing: Backing::Anonymous,
            locked: false,
            share_pages: false,
            numa: None,
        }
    }
}

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootConfig {
    /// The built-in heartbeat payload.
    Heartbeat(HeartbeatSpec),
    /// A Linux kernel.
    Linux {
        /// bzImage or vmlinux.
        kernel: PathBuf,
        /// Optional initrd.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
}

/// Everything the VMM needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The guest name (a DNS label).
    pub name: String,
    /// Memory.
    pub memory: MemoryConfig,
    /// vCPUs started at boot.
    pub vcpus: u32,
    /// vCPUs created (hot-add limit).
    pub max_vcpus: u32,
    /// CPU model mode.
    pub cpu_mode: CpuMode,
    /// The named model for `custom`.
    pub cpu_model: Option<String>,
    /// vCPU and emulator pinning.
    pub pinning: Pinning,
    /// cgroup memory limits.
    pub memtune: Option<MemTune>,
    /// Block I/O weight.
    pub io: Option<IoSpec>,
    /// Boot source.
    pub boot: BootConfig,
    /// Start with vCPUs paused (manifest `state: paused`).
    pub start_paused: bool,
}

/// The most vCPUs a guest may have: xAPIC IDs are 8 bits, 0xFF is broadcast.
pub const MAX_VCPUS: u32 = 254;

/// Smallest guest: the heartbeat's fixed layout takes the first 2 MiB.
pub const MIN_MEMORY: u64 = 4 << 20;

/// Largest heartbeat tick rate: each tick costs tens of microseconds on this host.
pub const MAX_TICK_HZ: u32 = 10_000;

/// Checks that `name` is a DNS label that cannot escape the state directory.
///
/// # Errors
/// [`ConfigError::Name`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let fail = |reason| {
        Err(ConfigError::Name {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.contains('/') || name.contains("..") {
        return fail("it must not contain '/' or '..'");
    }
    if name.len() > 63 {
        return fail("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return fail("it must be a DNS label: lowercase letters, digits and '-'");
    }
    Ok(())
}

impl VmConfig {
    /// Derives and checks the settings of `guest`. Host facts (online CPUs, free
    /// hugepages, NUMA nodes) are checked later, when the resources are taken.
    ///
    /// # Errors
    /// The first problem found, as a [`ConfigError`].
    pub fn from_guest(guest: &Guest) -> Result<VmConfig, ConfigError> {
        validate_name(&guest.metadata.name)?;
        let spec = &guest.spec;
        let vcpus = spec.cpu.vcpus;
        let max_vcpus = spec.cpu.max();
        if vcpus == 0 {
            return Err(ConfigError::Vcpus("vcpus must be at least 1".into()));
        }
        if max_vcpus < vcpus {
            return Err(ConfigError::Vcpus(format!(
                "maxVcpus {max_vcpus} is below vcpus {vcpus}"
            )));
        }
        if max_vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(format!(
                "maxVcpus {max_vcpus} is above the limit of {MAX_VCPUS}"
            )));
        }
        let backing = match spec.memory.hugepages {
            Some(h) => Backing::Hugetlb(h.page_size),
            None => Backing::Anonymous,
        };
        let size = spec.memory.size.get();
        if size < MIN_MEMORY {
            return Err(ConfigError::Memory(format!(
                "{} is below the minimum of 4MiB",
                spec.memory.size
            )));
        }
        if size % backing.page_size() != 0 {
            return Err(ConfigError::Memory(format!(
                "{} is not a multiple of the page size {}",
                spec.memory.size,
                berth_schema::Bytes(backing.page_size())
            )));
        }
        let pinning = spec.cpu.pinning.clone().unwrap_or_default();
        if let Some((&index, _)) = pinning.vcpus.range(max_vcpus..).next() {
            return Err(ConfigError::Pinning(format!(
                "vCPU {index} is pinned but the guest has at most {max_vcpus} vCPUs"
            )));
        }
        if let Some((index, _)) = pinning.vcpus.iter().find(|(_, set)| set.is_empty()) {
            return Err(ConfigError::Pinning(format!(
                "vCPU {index} is pinned to no CPU"
            )));
        }
        if pinning.emulator.as_ref().is_some_and(CpuSet::is_empty) {
            return Err(ConfigError::Pinning(
                "the emulator is pinned to no CPU".into(),
            ));
        }
        let boot = if spec.boot.is_heartbeat() {
            let hb = spec.boot.heartbeat.unwrap_or_default();
            if hb.tick_hz == 0 || hb.tick_hz > MAX_TICK_HZ {
                return Err(ConfigError::Heartbeat(format!(
                    "tickHz {} is outside 1..={MAX_TICK_HZ}",
                    hb.tick_hz
                )));
            }
            if hb.ticks_per_line == 0 {
                return Err(ConfigError::Heartbeat(
                    "ticksPerLine must be at least 1".into(),
                ));
            }
            BootConfig::Heartbeat(hb)
        } else {
            BootConfig::Linux {
                kernel: PathBuf::from(&spec.boot.kernel),
                initrd: spec.boot.initrd.as_ref().map(PathBuf::from),
                cmdline: spec
                    .boot
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
            }
        };
        Ok(VmConfig {
            name: guest.metadata.name.clone(),
            memory: MemoryConfig {
                size,
                backing,
                locked: spec.memory.locked,
                share_pages: spec.memory.share_pages,
                numa: spec.memory.numa.clone(),
            },
            vcpus,
            max_vcpus,
            cpu_mode: spec.cpu.mode,
            cpu_model: spec.cpu.model.clone(),
            pinning,
            memtune: spec.memory.tune.clone(),
            io: spec.io,
            boot,
            start_paused: spec.state == GuestState::Paused,
        })
    }

    /// The CPUs vCPU `index` is pinned to, if pinned.
    pub fn vcpu_pinning(&self, index: u32) -> Option<&CpuSet> {
        self.pinning.vcpus.get(&index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(yaml_spec: &str) -> Guest {
        let text = format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: g1}}\nspec:\n{yaml_spec}"
        );
        serde_yaml::from_str(&text).unwrap()
    }

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["../x", "a/b", "..", "", "Upper", "-a", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        validate_name("web-1").unwrap();
        let msg = validate_name("../etc").unwrap_err().to_string();
        assert!(msg.contains("'..'"), "{msg}");
    }

    #[test]
    fn heartbeat_defaults_and_limits() {
        let g = guest("  host: h\n  cpu: {vcpus: 2, maxVcpus: 3}\n  memory: {size: 64MiB}\n");
        let c = VmConfig::from_guest(&g).unwrap();
        assert_eq!((c.vcpus, c.max_vcpus), (2, 3));
        assert_eq!(c.boot, BootConfig::Heartbeat(HeartbeatSpec::default()));
        assert_eq!(c.memory.backing, Backing::Anonymous);
        let g = guest(
            "  host: h\n  cpu: {vcpus: 1}\n  memory: {size: 64MiB}\n  boot: {heartbeat: {tickHz: 0}}\n",
        );
        assert!(VmConfig::from_guest(&g)
            .unwrap_err()
            .to_string()
            .contains("tickHz"));
    }

    #[test]
    fn memory_and_pinning_are_checked() {
        let g = guest(
            "  host: h\n  cpu: {vcpus: 1}\n  memory: {size: 65MiB, hugepages: {pageSize: 2MiB}}\n",
        );
        let msg = VmConfig::from_guest(&g).unwrap_err().to_string();
        assert!(msg.contains("multiple of the page size"), "{msg}");
        let g = guest(
            "  host: h\n  cpu: {vcpus: 1, pinning: {vcpus: {3: \"0\"}}}\n  memory: {size: 64MiB}\n",
        );
        let msg = VmConfig::from_guest(&g).unwrap_err().to_string();
        assert!(msg.contains("vCPU 3 is pinned"), "{msg}");
        let g = guest("  host: h\n  cpu: {vcpus: 3, maxVcpus: 2}\n  memory: {size: 64MiB}\n");
        assert!(VmConfig::from_guest(&g).is_err());
    }
}
