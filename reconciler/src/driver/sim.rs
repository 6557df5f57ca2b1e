//! `SimDriver`: a simulated fleet, no real guests.
//!
//! An in-memory set of hosts and guests for tests, scale runs and benchmarks. It keeps
//! capacity accounts (memory for guests on normal pages, hugepage pools, pinned CPUs)
//! and refuses what a real host would refuse, so an action planned in the wrong order
//! shows up as a capacity error rather than passing silently. Failures can be injected
//! per operation and target.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use berth_schema::{Bytes, Guest, GuestState, PageSize};

use super::{Driver, DriverError, DriverKind, Scope};
use crate::classify::{rule, Rule};
use crate::diff::{Field, HostSetting};
use crate::model::{pages_for, Desired, Observed, ObservedGuest, ObservedHost};

/// The operations of the simulated fleet, for fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOp {
    /// [`Driver::observe`].
    Observe,
    /// [`Driver::configure_host`].
    ConfigureHost,
    /// [`Driver::start`].
    Start,
    /// [`Driver::retune`].
    Retune,
    /// [`Driver::stop`].
    Stop,
    /// [`Driver::migrate`].
    Migrate,
}

#[derive(Debug, Default)]
struct SimFleet {
    hosts: BTreeMap<String, ObservedHost>,
    guests: BTreeMap<String, ObservedGuest>,
    /// Failures to inject: the next operation of this kind on this guest or host fails.
    faults: Vec<(SimOp, String)>,
    /// Every operation done, in order, for tests.
    log: Vec<String>,
}

/// A simulated fleet, no real guests. See the module documentation.
#[derive(Debug, Default)]
pub struct SimDriver {
    fleet: Mutex<SimFleet>,
}

impl SimDriver {
    /// An empty simulated fleet with these hosts.
    pub fn new(hosts: impl IntoIterator<Item = ObservedHost>) -> Self {
        let fleet = SimFleet {
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
            ..SimFleet::default()
        };
        SimDriver {
            fleet: Mutex::new(fleet),
        }
    }

    /// A simulated fleet running exactly what the manifests say.
    pub fn from_manifests(desired: &Desired) -> Self {
        Self::from_observed(Observed::as_written(desired))
    }

    /// A simulated fleet in the given state.
    pub fn from_observed(observed: Observed) -> Self {
        let sim = Self::new(observed.hosts);
        {
            let mut fleet = sim.lock();
            for g in observed.guests {
                fleet.guests.insert(g.name.clone(), g);
            }
        }
        sim
    }

    fn lock(&self) -> MutexGuard<'_, SimFleet> {
        // A panic in another test thread must not hide this one's results.
        self.fleet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `op` on `target` (a guest or host name) fail.
    pub fn inject_fault(&self, op: SimOp, target: &str) {
        self.lock().faults.push((op, target.to_owned()));
    }

    /// Changes a running guest behind berth's back (drift made by hand).
    pub fn tamper(&self, name: &str, edit: impl FnOnce(&mut ObservedGuest)) {
        if let Some(g) = self.lock().guests.get_mut(name) {
            edit(g);
        }
    }

    /// Kills a guest behind berth's back.
    pub fn kill(&self, name: &str) {
        self.lock().guests.remove(name);
    }

    /// The operations done so far, one line each.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }
}

impl SimFleet {
    fn fault(&mut self, op: SimOp, target: &str) -> Result<(), DriverError> {
        match self
            .faults
            .iter()
            .position(|(o, t)| *o == op && t == target)
        {
            Some(i) => {
                self.faults.remove(i);
                Err(DriverError::Simulated(format!("{op:?} {target}")))
            }
            None => Ok(()),
        }
    }

    fn host(&self, name: &str) -> Result<&ObservedHost, DriverError> {
        self.hosts
            .get(name)
            .ok_or_else(|| DriverError::NotFound(format!("no simulated host {name}")))
    }

    fn running(&self, name: &str, host: &str) -> Result<&ObservedGuest, DriverError> {
        self.guests
            .get(name)
            .filter(|g| g.host == host && g.has_vmm())
            .ok_or_else(|| DriverError::NotFound(format!("guest {name} does not run on {host}")))
    }

    /// Normal-page bytes and hugepages per size held on `host`, plus `extra`.
    fn usage(&self, host: &str, extra: &[&ObservedGuest]) -> (u64, BTreeMap<PageSize, u64>) {
        let mut normal = 0;
        let mut pages: BTreeMap<PageSize, u64> = BTreeMap::new();
        for g in self
            .guests
            .values()
            .filter(|g| g.host == host && g.has_vmm())
            .chain(extra.iter().copied())
        {
            match g.memory.hugepages {
                Some(size) => *pages.entry(size).or_default() += pages_for(g.memory.size, size),
                None => normal += g.memory.size.get(),
            }
        }
        (normal, pages)
    }

    /// Checks that `host` can hold what it holds now plus `extra`.
    fn check_room(&self, host: &str, extra: &[&ObservedGuest]) -> Result<(), DriverError> {
        let h = self.host(host)?;
        let capacity = |detail: String| DriverError::Capacity {
            host: host.to_owned(),
            detail,
        };
        for g in extra {
            let pinned = g.pinned_cpus();
            if !pinned.is_subset(&h.cpus) {
                return Err(capacity(format!(
                    "{} is pinned to CPUs {} that the host lacks",
                    g.name,
                    pinned.difference(&h.cpus)
                )));
            }
        }
        let (normal, pages) = self.usage(host, extra);
        let pool_bytes: u64 = h.hugepages.iter().map(|(s, p)| s.bytes() * p.total).sum();
        if normal + pool_bytes > h.memory_total.get() {
            return Err(capacity(format!(
                "guests on normal pages would hold {} + pools {} > {}",
                Bytes(normal),
                Bytes(pool_bytes),
                h.memory_total
            )));
        }
        for (size, used) in pages {
            let total = h.hugepages.get(&size).map_or(0, |p| p.total);
            if used > total {
                return Err(capacity(format!(
                    "guests would hold {used} {size} pages of a pool of {total}"
                )));
            }
        }
        Ok(())
    }

    /// Recomputes each host's free memory and pages, in one pass over the guests.
    fn refresh_free(&mut self) {
        let mut normal: BTreeMap<&str, u64> = BTreeMap::new();
        let mut pages: BTreeMap<(&str, PageSize), u64> = BTreeMap::new();
        for g in self.guests.values().filter(|g| g.has_vmm()) {
            match g.memory.hugepages {
                Some(size) => {
                    *pages.entry((g.host.as_str(), size)).or_default() +=
                        pages_for(g.memory.size, size)
                }
                None => *normal.entry(g.host.as_str()).or_default() += g.memory.size.get(),
            }
        }
        for (name, h) in &mut self.hosts {
            let pool_bytes: u64 = h.hugepages.iter().map(|(s, p)| s.bytes() * p.total).sum();
            let used = normal.get(name.as_str()).copied().unwrap_or(0);
            h.memory_free = Bytes(h.memory_total.get().saturating_sub(used + pool_bytes));
            for (size, pool) in &mut h.hugepages {
                let held = pages.get(&(name.as_str(), *size)).copied().unwrap_or(0);
                pool.free = pool.total.saturating_sub(held);
            }
        }
    }
}

impl Driver for SimDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }

    fn scope(&self) -> Scope {
        Scope::Fleet
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        let mut fleet = self.lock();
        fleet.fault(SimOp::Observe, "")?;
        fleet.refresh_free();
        Ok(Observed {
            guests: fleet.guests.values().cloned().collect(),
            hosts: fleet.hosts.values().cloned().collect(),
        })
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        let mut fleet = self.lock();
        fleet.fault(SimOp::ConfigureHost, host)?;
        let before = fleet.host(host)?.clone();
        for setting in settings {
            let h = fleet.hosts.get_mut(host).expect("checked");
            match *setting {
                HostSetting::HugepagePool(size, pages) => {
                    h.hugepages.entry(size).or_default().total = pages;
                }
                HostSetting::KsmEnabled(on) => h.ksm.enabled = on,
                HostSetting::KsmPagesToScan(n) => h.ksm.pages_to_scan = Some(n),
                HostSetting::KsmSleepMillisecs(n) => h.ksm.sleep_millisecs = Some(n),
                HostSetting::TransparentHugepages(mode) => h.transparent_hugepages = mode,
            }
        }
        if let Err(e) = fleet.check_room(host, &[]) {
            fleet.hosts.insert(host.to_owned(), before);
            return Err(e);
        }
        fleet.log.push(format!("configure {host}"));
        Ok(())
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        let mut fleet = self.lock();
        let name = guest.metadata.name.as_str();
        fleet.fault(SimOp::Start, name)?;
        if fleet.guests.get(name).is_some_and(ObservedGuest::has_vmm) {
            return Err(DriverError::Refused(format!("guest {name} already runs")));
        }
        let mut g = ObservedGuest::as_written(guest);
        g.host = host.to_owned();
        if g.state == GuestState::Stopped {
            g.state = GuestState::Running;
        }
        fleet.check_room(host, &[&g])?;
        fleet.log.push(format!("start {name} on {host}"));
        fleet.guests.insert(name.to_owned(), g);
        Ok(())
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        let mut fleet = self.lock();
        let name = guest.metadata.name.as_str();
        fleet.fault(SimOp::Retune, name)?;
        let current = fleet.running(name, host)?.clone();
        let wanted = ObservedGuest::as_written(guest);
        let mut next = current.clone();
        let capabilities = self.capabilities();
        for &field in fields {
            if rule(field, &current, &wanted) != Rule::Live || !capabilities.changes_live(field) {
                return Err(DriverError::Refused(format!(
                    "{field} of {name} cannot change live ({} -> {})",
                    field.value(&current).unwrap_or_default(),
                    field.value(&wanted).unwrap_or_default()
                )));
            }
            match field {
                Field::State => next.state = wanted.state,
                Field::Vcpus if wanted.cpu.vcpus > current.cpu.max_vcpus => {
                    return Err(DriverError::Refused(format!(
                        "{name}: {} vCPUs exceed maxVcpus {}",
                        wanted.cpu.vcpus, current.cpu.max_vcpus
                    )));
                }
                Field::Vcpus => next.cpu.vcpus = wanted.cpu.vcpus,
                Field::VcpuPinning | Field::EmulatorPinning => {
                    next.cpu.pinning = wanted.cpu.pinning.clone()
                }
                Field::HardLimit
                | Field::SoftLimit
                | Field::SwapHardLimit
                | Field::MinGuarantee => next.memory.tune = wanted.memory.tune.clone(),
                Field::SharePages => next.memory.share_pages = wanted.memory.share_pages,
                Field::Numa => next.memory.numa = wanted.memory.numa.clone(),
                Field::IoWeight => next.io_weight = wanted.io_weight,
                Field::Labels => next.labels = wanted.labels.clone(),
                Field::Annotations => next.annotations = wanted.annotations.clone(),
                other => {
                    return Err(DriverError::Refused(format!(
                        "{other} is not a live field of the simulated fleet"
                    )))
                }
            }
        }
        fleet.guests.remove(name);
        let room = fleet.check_room(host, &[&next]);
        match room {
            Ok(()) => {
                fleet.log.push(format!("retune {name} on {host}"));
                fleet.guests.insert(name.to_owned(), next);
                Ok(())
            }
            Err(e) => {
                fleet.guests.insert(name.to_owned(), current);
                Err(e)
            }
        }
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        let mut fleet = self.lock();
        fleet.fault(SimOp::Stop, name)?;
        fleet.running(name, host)?;
        fleet.guests.remove(name);
        fleet.log.push(format!("stop {name} on {host}"));
        Ok(())
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        let mut fleet = self.lock();
        let name = guest.metadata.name.as_str();
        fleet.fault(SimOp::Migrate, name)?;
        let current = fleet.running(name, from)?.clone();
        let mut next = ObservedGuest::as_written(guest);
        next.host = to.to_owned();
        next.state = current.state;
        if next.cpu.vcpus < current.cpu.vcpus || next.memory.size < current.memory.size {
            return Err(DriverError::Refused(format!(
                "{name}: a migration cannot remove vCPUs or memory from a running guest"
            )));
        }
        if from != to {
            let (src, dst) = (fleet.host(from)?, fleet.host(to)?);
            crate::classify::cpu_compatible(current.cpu.mode, &src.cpu, &dst.cpu)
                .map_err(|why| DriverError::Refused(format!("{name} to {to}: {why}")))?;
        }
        // Both VMMs exist until the switchover.
        fleet.check_room(to, &[&next])?;
        fleet.log.push(format!("migrate {name} {from} -> {to}"));
        fleet.guests.insert(name.to_owned(), next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use berth_schema::{Bytes, Guest};

    use super::*;
    use crate::model::{CpuInfo, HugepagePool};

    fn host(name: &str, memory: Bytes) -> ObservedHost {
        ObservedHost {
            name: name.into(),
            cpus: "0-3".parse().unwrap(),
            memory_total: memory,
            memory_free: memory,
            hugepages: [(PageSize::Huge2M, HugepagePool { total: 0, free: 0 })].into(),
            ksm: Default::default(),
            transparent_hugepages: Default::default(),
            cpu: CpuInfo::default(),
        }
    }

    fn guest(name: &str, memory: &str) -> Guest {
        serde_yaml::from_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\n\
             spec: {{host: h1, cpu: {{vcpus: 1}}, memory: {{size: {memory}}}}}"
        ))
        .unwrap()
    }

    #[test]
    fn the_simulated_fleet_refuses_what_does_not_fit() {
        let sim = SimDriver::new([host("h1", Bytes::gib(2))]);
        sim.start(&guest("a", "1GiB"), "h1").unwrap();
        let err = sim.start(&guest("b", "2GiB"), "h1").unwrap_err();
        assert!(matches!(err, DriverError::Capacity { .. }), "{err}");
        let err = sim
            .configure_host("h1", &[HostSetting::HugepagePool(PageSize::Huge2M, 1024)])
            .unwrap_err();
        assert!(err.to_string().contains("pools 2GiB"), "{err}");
        assert_eq!(sim.observe().unwrap().guests.len(), 1);
        assert_eq!(sim.log(), ["start a on h1"]);
    }

    #[test]
    fn restart_class_fields_are_refused_live() {
        let sim = SimDriver::new([host("h1", Bytes::gib(4))]);
        sim.start(&guest("a", "1GiB"), "h1").unwrap();
        let err = sim
            .retune(&guest("a", "2GiB"), "h1", &[Field::MemorySize])
            .unwrap_err();
        assert!(err.to_string().contains("cannot change live"), "{err}");
    }

    #[test]
    fn injected_faults_fail_once() {
        let sim = SimDriver::new([host("h1", Bytes::gib(4))]);
        sim.inject_fault(SimOp::Start, "a");
        assert!(matches!(
            sim.start(&guest("a", "1GiB"), "h1"),
            Err(DriverError::Simulated(_))
        ));
        sim.start(&guest("a", "1GiB"), "h1").unwrap();
    }
}
