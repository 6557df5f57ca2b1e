//! What a driver can do, declared as data: the planner classifies every change from
//! these declarations, so that `berth plan` (also in CI, with no host access) never
//! promises what the driver will refuse.
//!
//! - [`DriverKind`]: the drivers berth has; the one type behind `--driver` of `plan`,
//!   `apply` and `serve`, and what a Host manifest's `spec.driver` names.
//! - [`Capabilities`]: what one driver declares (which fields change live, whether a
//!   restart-class change can be made by a local live migration, how a guest moves to
//!   another host, whether it restarts guests).
//! - [`FleetCapabilities`]: the planner's input, the capabilities of each host. CI mode
//!   takes them from the Host manifests ([`FleetCapabilities::from_manifests`]); `apply`
//!   and `serve` put their own driver's declaration in for their host.
//! - [`Scope`]: which guests a driver sees and acts on (its host only, or the whole
//!   fleet).
//!
//! A new driver (libvirt) adds a [`DriverKind`] variant and its [`Capabilities`] in
//! [`DriverKind::capabilities`]; nothing in the planner changes.

use std::collections::{BTreeMap, BTreeSet};

use berth_schema::HostDriver;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::diff::Field;
use crate::model::Desired;

/// The drivers berth has.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "camelCase")]
pub enum DriverKind {
    /// berth-vmm processes on this host
    Local,
    /// simulated fleet, no real guests
    Sim,
    /// libvirt domains (QEMU), through a libvirt connection; chosen by a Host
    /// manifest's `spec.driver`, not on the command line
    #[value(skip)]
    Libvirt,
}

impl DriverKind {
    /// The name in messages and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Local => "local",
            DriverKind::Sim => "sim",
            DriverKind::Libvirt => "libvirt",
        }
    }

    /// What the driver can do.
    pub fn capabilities(self) -> Capabilities {
        match self {
            // berth-vmm re-pins threads, writes cgroup files, hot-adds vCPUs, pauses
            // and resumes; KSM advice and the NUMA policy are set when the VMM maps
            // guest memory, so a change of either is made by a local live migration.
            // The simulated fleet simulates berth-vmm hosts and declares the same.
            DriverKind::Local | DriverKind::Sim => Capabilities {
                driver: self,
                live: [
                    Field::State,
                    Field::Vcpus,
                    Field::VcpuPinning,
                    Field::EmulatorPinning,
                    Field::HardLimit,
                    Field::SoftLimit,
                    Field::SwapHardLimit,
                    Field::MinGuarantee,
                    Field::IoWeight,
                    Field::Labels,
                    Field::Annotations,
                ]
                .into(),
                local_migration: true,
                cross_host: CrossHost::Live,
                restart: true,
            },
            // libvirt's live APIs: vcpupin, emulatorpin, memtune, blkiotune, setvcpus
            // (hot-add), suspend/resume. KSM advice and the NUMA policy are not changed
            // live. libvirt refuses to migrate a domain to the same host, so a
            // restart-class change is a restart (when the policy allows) or blocked.
            // QEMU domains have no min_guarantee (libvirt sets it for ESX only).
            // A guest moves live to another libvirt host whose Host manifest says how
            // its libvirtd is reached (`libvirt.remoteUri`): peer-to-peer, libvirtd to
            // libvirtd ([`FleetCapabilities::why_not_live`] says when not).
            DriverKind::Libvirt => Capabilities {
                driver: self,
                live: [
                    Field::State,
                    Field::Vcpus,
                    Field::VcpuPinning,
                    Field::EmulatorPinning,
                    Field::HardLimit,
                    Field::SoftLimit,
                    Field::SwapHardLimit,
                    Field::IoWeight,
                    Field::Labels,
                    Field::Annotations,
                ]
                .into(),
                local_migration: false,
                cross_host: CrossHost::Live,
                restart: true,
            },
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<HostDriver> for DriverKind {
    fn from(driver: HostDriver) -> Self {
        match driver {
            HostDriver::BerthVmm => DriverKind::Local,
            HostDriver::Libvirt => DriverKind::Libvirt,
        }
    }
}

/// How a driver moves a running guest to another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CrossHost {
    /// A live migration (the guest keeps running).
    Live,
    /// Only stopped on the source and started on the destination.
    Cold,
    /// Not at all.
    No,
}

/// What one driver declares it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The driver, for messages.
    pub driver: DriverKind,
    /// The fields it changes in a running guest. A field DESIGN.md's table calls live
    /// but missing here is applied like a restart-class change.
    pub live: BTreeSet<Field>,
    /// Whether it makes a restart-class change by a live migration into a new VMM on
    /// the same host.
    pub local_migration: bool,
    /// How it moves a guest to another host.
    pub cross_host: CrossHost,
    /// Whether it restarts guests (stop, then start), when a guest's policy allows.
    pub restart: bool,
}

impl Capabilities {
    /// Whether the driver changes `field` in a running guest.
    pub fn changes_live(&self, field: Field) -> bool {
        self.live.contains(&field)
    }
}

/// The capabilities of every host: the planner's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCapabilities {
    hosts: BTreeMap<String, Capabilities>,
    /// Each Host manifest's driver, and for libvirt hosts whether the manifest says
    /// how other hosts reach its libvirtd (`libvirt.remoteUri`).
    drivers: BTreeMap<String, (DriverKind, bool)>,
    /// For hosts not named (a guest placed on a host without a Host manifest).
    default: Capabilities,
}

impl Default for FleetCapabilities {
    fn default() -> Self {
        Self::uniform(DriverKind::Local.capabilities())
    }
}

impl FleetCapabilities {
    /// Every host declares `capabilities` (the simulated fleet).
    pub fn uniform(capabilities: Capabilities) -> Self {
        FleetCapabilities {
            hosts: BTreeMap::new(),
            drivers: BTreeMap::new(),
            default: capabilities,
        }
    }

    /// Each host's capabilities from its Host manifest's driver, with no host access
    /// (CI mode).
    pub fn from_manifests(desired: &Desired) -> Self {
        FleetCapabilities {
            hosts: desired
                .hosts
                .iter()
                .map(|h| {
                    let kind = DriverKind::from(h.spec.driver);
                    (h.metadata.name.clone(), kind.capabilities())
                })
                .collect(),
            drivers: desired
                .hosts
                .iter()
                .map(|h| {
                    let reachable = h
                        .spec
                        .libvirt
                        .as_ref()
                        .is_some_and(|l| l.migration_target().is_some());
                    let kind = DriverKind::from(h.spec.driver);
                    (h.metadata.name.clone(), (kind, reachable))
                })
                .collect(),
            default: DriverKind::Local.capabilities(),
        }
    }

    /// Why a guest cannot move live from `from` to `to` although `from`'s driver
    /// migrates live: the hosts run different drivers, or `to` is a libvirt host whose
    /// manifest does not say how to reach its libvirtd. `None` when it can.
    pub fn why_not_live(&self, from: &str, to: &str) -> Option<String> {
        let (Some(&(source, _)), Some(&(dest, reachable))) =
            (self.drivers.get(from), self.drivers.get(to))
        else {
            return None;
        };
        if source != dest {
            return Some(format!(
                "{from} runs driver {source} and {to} driver {dest}: no live migration between drivers"
            ));
        }
        (dest == DriverKind::Libvirt && !reachable).then(|| {
            format!(
                "the Host manifest of {to} does not say how other hosts reach its libvirtd \
                 (spec.libvirt.remoteUri)"
            )
        })
    }

    /// The capabilities the Host manifests declare, with `host`'s replaced by what its
    /// running driver declares.
    pub fn with_host(mut self, host: &str, capabilities: Capabilities) -> Self {
        self.hosts.insert(host.to_owned(), capabilities);
        self
    }

    /// What the driver of `host` can do.
    pub fn of(&self, host: &str) -> &Capabilities {
        self.hosts.get(host).unwrap_or(&self.default)
    }
}

/// Which guests a driver sees and acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The guests of this one host (berth-vmm processes here): guests placed elsewhere
    /// are another host's to start, and a move away from here is driven from here.
    Host(String),
    /// Every host of the fleet (the simulated fleet).
    Fleet,
}

impl Scope {
    /// The one host a driver of this scope acts on, if it is scoped to one.
    pub fn host(&self) -> Option<&str> {
        match self {
            Scope::Host(host) => Some(host),
            Scope::Fleet => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_manifests_give_ci_mode_its_capabilities() {
        let desired = crate::model::desired_from_yaml([
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
             spec: {address: '127.0.0.1:1', cpus: '0-1', memory: 1GiB, driver: berth-vmm}\n",
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm02}\n\
             spec: {address: '127.0.0.1:2', cpus: '0-1', memory: 1GiB, driver: libvirt}\n",
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm03}\n\
             spec: {address: '127.0.0.1:3', cpus: '0-1', memory: 1GiB, driver: libvirt,\n\
             libvirt: {remoteUri: 'qemu+tcp://10.0.0.3/system'}}\n",
        ]);
        let caps = FleetCapabilities::from_manifests(&desired);
        assert_eq!(caps.of("kvm01"), &DriverKind::Local.capabilities());
        assert!(!caps.of("kvm01").changes_live(Field::SharePages));
        assert!(caps.of("kvm01").changes_live(Field::VcpuPinning));
        assert_eq!(caps.of("kvm02"), &DriverKind::Libvirt.capabilities());
        assert!(!caps.of("kvm02").local_migration);
        assert_eq!(caps.of("kvm02").cross_host, CrossHost::Live);
        // No live move between drivers, nor to a libvirt host others cannot reach.
        assert!(caps
            .why_not_live("kvm01", "kvm02")
            .is_some_and(|r| r.contains("between drivers")));
        assert!(caps
            .why_not_live("kvm03", "kvm02")
            .is_some_and(|r| r.contains("spec.libvirt.remoteUri")));
        assert_eq!(caps.why_not_live("kvm02", "kvm03"), None);
        let mut limited = DriverKind::Local.capabilities();
        limited.local_migration = false;
        let caps = caps.with_host("kvm01", limited.clone());
        assert_eq!(caps.of("kvm01"), &limited);
        assert_eq!(caps.of("kvm09"), &DriverKind::Local.capabilities());
    }
}
