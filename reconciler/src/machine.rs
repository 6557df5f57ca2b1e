//! The Host manifest checked against the machine it describes, before `berth apply` or
//! `berth serve` act on it: its CPUs (and the CPUs its guests are pinned to) online,
//! its memory present, the hugepage sizes it and its guests use offered by the kernel,
//! and `/dev/kvm` there. A mismatch is a diagnostic naming the file, line and field,
//! and nothing is done: a Host naming CPU 64 on a 2-CPU machine would otherwise pass
//! validation and fail at a VMM's start with a cgroup's "Numerical result out of range".

use std::path::Path;

use berth_hypervisor::host::affinity::{online_cpus, AffinityError};
use berth_hypervisor::host::hugepages::{supported_page_sizes, HugePageError};
use berth_hypervisor::host::sysinfo::{read_meminfo, SysInfoError};
use berth_schema::{
    Bytes, CpuSet, Diagnostic, Guest, Host, Invalid, Manifest, ManifestSet, PageSize,
};

/// The device the local driver runs guests on.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What a Host manifest is checked against: facts of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// `/sys/devices/system/cpu/online`.
    pub online_cpus: CpuSet,
    /// `MemTotal` of `/proc/meminfo`.
    pub memory: Bytes,
    /// The hugepage sizes the kernel offers (`/sys/kernel/mm/hugepages/hugepages-*`).
    pub page_sizes: Vec<PageSize>,
    /// Whether `/dev/kvm` exists.
    pub kvm: bool,
}

/// Why the machine's facts could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The online CPUs.
    #[error("cannot read this machine's online CPUs")]
    Cpus(#[source] AffinityError),
    /// `/proc/meminfo`.
    #[error("cannot read this machine's memory size")]
    Memory(#[source] SysInfoError),
    /// The hugepage sizes.
    #[error("cannot read the hugepage sizes this kernel offers")]
    PageSizes(#[source] HugePageError),
}

impl Machine {
    /// Reads this machine's facts.
    ///
    /// # Errors
    /// When a sysfs or procfs file cannot be read.
    pub fn read() -> Result<Machine, MachineError> {
        Ok(Machine {
            online_cpus: online_cpus().map_err(MachineError::Cpus)?,
            memory: read_meminfo().map_err(MachineError::Memory)?.total,
            page_sizes: supported_page_sizes().map_err(MachineError::PageSizes)?,
            kvm: Path::new(KVM_DEVICE).exists(),
        })
    }

    /// Every way the Host manifest `host` and the guests placed on it do not fit this
    /// machine, each naming its file, line and field.
    pub fn check<'a>(
        &self,
        host: &Manifest<Host>,
        guests: impl IntoIterator<Item = &'a Manifest<Guest>>,
    ) -> Vec<Diagnostic> {
        let mut problems = Vec::new();
        let origin = &host.origin;
        if !self.kvm {
            problems.push(origin.error(
                "",
                format!(
                    "this machine has no {KVM_DEVICE}: host {} cannot run guests here",
                    host.metadata.name
                ),
            ));
        }
        for (field, set) in [
            ("spec.cpus", &host.spec.cpus),
            ("spec.reservedCpus", &host.spec.reserved_cpus),
        ] {
            if let Some(message) = self.offline(set) {
                problems.push(origin.error(field, message));
            }
        }
        if host.spec.memory > self.memory {
            problems.push(origin.error(
                "spec.memory",
                format!(
                    "{} is more than this machine has ({} in /proc/meminfo)",
                    host.spec.memory, self.memory
                ),
            ));
        }
        for size in host.spec.hugepages.keys() {
            if let Some(message) = self.unoffered(*size) {
                // The page size is the key: point at it, not at the page count.
                let field = format!("spec.hugepages.{size}");
                let at = origin.locate_key(&field);
                problems.push(Diagnostic::error(&origin.file, Some(at), field, message));
            }
        }
        for guest in guests {
            self.check_guest(guest, &mut problems);
        }
        problems
    }

    fn check_guest(&self, guest: &Manifest<Guest>, problems: &mut Vec<Diagnostic>) {
        let origin = &guest.origin;
        if let Some(pinning) = &guest.spec.cpu.pinning {
            for (vcpu, set) in &pinning.vcpus {
                if let Some(message) = self.offline(set) {
                    problems.push(origin.error(format!("spec.cpu.pinning.vcpus.{vcpu}"), message));
                }
            }
            if let Some(message) = pinning.emulator.as_ref().and_then(|e| self.offline(e)) {
                problems.push(origin.error("spec.cpu.pinning.emulator", message));
            }
        }
        if let Some(hugepages) = &guest.spec.memory.hugepages {
            if let Some(message) = self.unoffered(hugepages.page_size) {
                problems.push(origin.error("spec.memory.hugepages.pageSize", message));
            }
        }
    }

    fn offline(&self, set: &CpuSet) -> Option<String> {
        let missing = set.difference(&self.online_cpus);
        (!missing.is_empty()).then(|| {
            format!(
                "CPU {missing} is not online on this machine (online: {})",
                self.online_cpus
            )
        })
    }

    fn unoffered(&self, size: PageSize) -> Option<String> {
        (!self.page_sizes.contains(&size)).then(|| {
            let offered: Vec<String> = self.page_sizes.iter().map(ToString::to_string).collect();
            format!(
                "this kernel offers no {size} hugepages (offered: {})",
                if offered.is_empty() {
                    "none".to_owned()
                } else {
                    offered.join(", ")
                }
            )
        })
    }

    /// Checks the Host manifest named `host` in `set` (and its guests) against this
    /// machine. A set without that Host is left to the caller (nothing to check).
    ///
    /// # Errors
    /// [`Invalid`] with every mismatch.
    pub fn ensure_fits(&self, set: &ManifestSet, host: &str) -> Result<(), Invalid> {
        let Some(manifest) = set.hosts.get(host) else {
            return Ok(());
        };
        let mut diagnostics = self.check(manifest, set.guests_on(host));
        if diagnostics.is_empty() {
            return Ok(());
        }
        berth_schema::diagnostic::sort(&mut diagnostics);
        Err(Invalid { diagnostics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm01}
spec:
  address: 127.0.0.1:7410
  cpus: \"0-1\"
  memory: 16GiB
  hugepages: {2MiB: 64}
";

    const GUEST: &str = "\
apiVersion: berth.dev/v1
kind: Guest
metadata: {name: web-1}
spec:
  host: kvm01
  boot: {kernel: builtin:heartbeat}
  cpu:
    vcpus: 2
    pinning: {vcpus: {0: \"0\", 1: \"1\"}, emulator: \"0-1\"}
  memory:
    size: 128MiB
    hugepages: {pageSize: 2MiB}
";

    fn two_cpus() -> Machine {
        Machine {
            online_cpus: "0-1".parse().unwrap(),
            memory: Bytes::gib(24),
            page_sizes: vec![PageSize::Huge2M],
            kvm: true,
        }
    }

    fn check(machine: &Machine, host: &str, guest: &str) -> Vec<String> {
        let set = berth_schema::load_files([("hosts.yaml", host), ("guests.yaml", guest)])
            .expect("valid manifests")
            .manifests;
        match machine.ensure_fits(&set, "kvm01") {
            Ok(()) => Vec::new(),
            Err(invalid) => invalid
                .diagnostics
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    #[test]
    fn the_example_fits_a_two_cpu_machine() {
        assert_eq!(check(&two_cpus(), HOST, GUEST), Vec::<String>::new());
    }

    #[test]
    fn each_mismatch_names_its_file_line_and_field() {
        let host = HOST
            .replace("cpus: \"0-1\"", "cpus: \"0-1,64\"")
            .replace("memory: 16GiB", "memory: 64GiB")
            .replace("{2MiB: 64}", "{2MiB: 64, 1GiB: 1}");
        let guest = GUEST.replace("1: \"1\"}", "1: \"64\"}");
        let machine = Machine {
            kvm: false,
            ..two_cpus()
        };
        assert_eq!(
            check(&machine, &host, &guest),
            [
                "guests.yaml:9:34: error: spec.cpu.pinning.vcpus.1: CPU 64 is not online on this machine (online: 0-1)",
                "hosts.yaml:1:1: error: this machine has no /dev/kvm: host kvm01 cannot run guests here",
                "hosts.yaml:6:9: error: spec.cpus: CPU 64 is not online on this machine (online: 0-1)",
                "hosts.yaml:7:11: error: spec.memory: 64GiB is more than this machine has (24GiB in /proc/meminfo)",
                "hosts.yaml:8:25: error: spec.hugepages.1GiB: this kernel offers no 1GiB hugepages (offered: 2MiB)",
            ]
        );
    }
}
