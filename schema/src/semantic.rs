//! Checks that need more than one field or more than one document: limits that must be
//! ordered, pinning that must fit the host, pools that must be large enough.
//!
//! Capacity checks (hugepage pools, host memory, shared CPUs) count the guests that
//! hold resources: a `stopped` guest holds none.

use std::collections::{BTreeMap, BTreeSet};

use crate::cpuset::CpuSet;
use crate::diagnostic::Diagnostic;
use crate::load::{ManifestSet, Typed};
use crate::manifest::{
    Boot, BootFrom, CpuMode, DomainType, Guest, GuestState, Host, HostDriver, MigrationMode,
    ANNOTATION_PRUNE, ANNOTATION_SUSPEND,
};
use crate::source::{index_path, Manifest, Origin};
use crate::structure::suggest;
use crate::units::{Bytes, PageSize};

/// The smallest guest: the heartbeat payload needs its page tables, stack and two MiB
/// of working memory.
pub const MIN_GUEST_MEMORY: Bytes = Bytes::mib(2);

/// Linux supports at most 1024 NUMA nodes (`CONFIG_NODES_SHIFT` = 10).
pub const MAX_NUMA_NODES: u32 = 1024;

/// Builds the set from documents that passed the structural checks, and checks it.
pub(crate) fn assemble(
    documents: Vec<(Origin, Typed)>,
    hosts_complete: bool,
) -> (ManifestSet, Vec<Diagnostic>) {
    let mut set = ManifestSet::default();
    let mut out = Vec::new();
    for (origin, typed) in documents {
        match typed {
            Typed::Guest(object) => {
                let object = *object;
                insert(&mut set.guests, "Guest", object.metadata.name.clone(), Manifest { object, origin }, &mut out)
            }
            Typed::Host(object) => insert(&mut set.hosts, "Host", object.metadata.name.clone(), Manifest { object: *object, origin }, &mut out),
            Typed::Fleet(object) => match &set.fleet {
                Some(first) => out.push(origin.error(
                    "kind",
                    format!("a second Fleet document (the first is at {}); a repository has at most one", first.origin.short()),
                )),
                None => set.fleet = Some(Manifest { object, origin }),
            },
        }
    }
    out.extend(check(&set, hosts_complete));
    (set, out)
}

fn insert<T>(
    map: &mut BTreeMap<String, Manifest<T>>,
    kind: &str,
    name: String,
    manifest: Manifest<T>,
    out: &mut Vec<Diagnostic>,
) {
    if let Some(first) = map.get(&name) {
        out.push(manifest.origin.error(
            "metadata.name",
            format!(
                "duplicate {kind} name {name} (first defined at {})",
                first.origin.short()
            ),
        ));
    } else {
        map.insert(name, manifest);
    }
}

/// Every check across fields and documents of a set. `hosts_complete` says whether every
/// Host document of the revision is in the set; when not, a guest's unknown host is not
/// reported (the host may be the document that failed).
pub fn check(set: &ManifestSet, hosts_complete: bool) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for host in set.hosts.values() {
        check_host(host, &mut out);
        check_annotations(&host.origin, &host.metadata.annotations, &mut out);
    }
    for guest in set.guests.values() {
        check_placement(guest, set, hosts_complete, &mut out);
        let host = set.hosts.get(&guest.spec.host);
        if host.is_none() && hosts_complete && !guest.spec.host.is_empty() {
            let known: Vec<&str> = set.hosts.keys().map(String::as_str).collect();
            let hint = match suggest(&guest.spec.host, known.iter().copied()) {
                Some(near) => format!("; did you mean {near}?"),
                None if known.is_empty() => "; no Host document defines any".to_owned(),
                None => format!(" (known hosts: {})", known.join(", ")),
            };
            out.push(guest.origin.error(
                "spec.host",
                format!("unknown host {}{hint}", guest.spec.host),
            ));
        }
        check_guest(guest, host.map(|h| &h.object), &mut out);
        check_annotations(&guest.origin, &guest.metadata.annotations, &mut out);
    }
    let by_host = set.guests_by_host();
    for host in set.hosts.values() {
        let guests: Vec<&Manifest<Guest>> = by_host
            .get(host.metadata.name.as_str())
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .copied()
            .filter(|g| holds_resources(g))
            .collect();
        check_capacity(&guests, host, &mut out);
        check_shared_cpus(&guests, host, &mut out);
    }
    check_passthrough_migration(set, &mut out);
    check_macs(set, &mut out);
    if let Some(fleet) = &set.fleet {
        if fleet.spec.max_concurrent_migrations == 0 {
            out.push(fleet.origin.error(
                "spec.maxConcurrentMigrations",
                "must be at least 1, or no guest could ever move",
            ));
        }
        if fleet.spec.max_concurrent_migrations_per_host == 0 {
            out.push(fleet.origin.error(
                "spec.maxConcurrentMigrationsPerHost",
                "must be at least 1, or no guest could ever move",
            ));
        }
    }
    out
}

/// `host` or `hostSelector` (one of them), and what only a selector-placed guest may say.
fn check_placement(
    guest: &Manifest<Guest>,
    set: &ManifestSet,
    hosts_complete: bool,
    out: &mut Vec<Diagnostic>,
) {
    let o = &guest.origin;
    let spec = &guest.spec;
    match (&spec.host_selector, spec.host.is_empty()) {
        (None, true) => out.push(o.error(
            "spec.host",
            "a guest needs host (a Host's name) or hostSelector (labels of Hosts)",
        )),
        (Some(_), false) => out.push(o.error(
            "spec.hostSelector",
            format!(
                "names hostSelector and host {}; a guest is placed by one of them",
                spec.host
            ),
        )),
        (Some(selector), true) if hosts_complete => {
            let matching = set
                .hosts
                .values()
                .filter(|h| {
                    selector
                        .iter()
                        .all(|(k, v)| h.metadata.labels.get(k) == Some(v))
                })
                .count();
            if matching == 0 && !set.hosts.is_empty() {
                let mut labels: BTreeSet<String> = BTreeSet::new();
                for h in set.hosts.values() {
                    labels.extend(h.metadata.labels.iter().map(|(k, v)| format!("{k}: {v}")));
                }
                let known = if labels.is_empty() {
                    "no Host has labels".to_owned()
                } else {
                    format!(
                        "Host labels: {}",
                        labels.into_iter().collect::<Vec<_>>().join(", ")
                    )
                };
                out.push(o.warning(
                    "spec.hostSelector",
                    format!("matches no Host ({known}); the guest cannot be placed"),
                ));
            }
        }
        _ => {}
    }
    if spec.host_selector.is_none() {
        if !spec.anti_affinity.is_empty() {
            out.push(o.error(
                "spec.antiAffinity",
                "applies only to guests placed by hostSelector",
            ));
        }
        if spec.restarts_on_host_failure() {
            out.push(o.error(
                "spec.availability.onHostFailure",
                format!(
                    "restart applies only to guests placed by hostSelector; a guest pinned to \
                     host {} cannot be restarted elsewhere",
                    spec.host
                ),
            ));
        }
    }
}

fn check_annotations(
    origin: &Origin,
    annotations: &BTreeMap<String, String>,
    out: &mut Vec<Diagnostic>,
) {
    for key in [ANNOTATION_SUSPEND, ANNOTATION_PRUNE] {
        if let Some(value) = annotations.get(key) {
            if value != "true" && value != "false" {
                let path = crate::source::child_path("metadata.annotations", key);
                out.push(origin.error(
                    path,
                    format!("expected \"true\" or \"false\", found {value:?}"),
                ));
            }
        }
    }
}

fn check_host(host: &Manifest<Host>, out: &mut Vec<Diagnostic>) {
    let spec = &host.spec;
    let o = &host.origin;
    let port_ok = spec
        .address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok {
        out.push(o.error(
            "spec.address",
            format!(
                "{:?} is not host:port (for example 127.0.0.1:7410)",
                spec.address
            ),
        ));
    }
    if spec.cpus.is_empty() {
        out.push(o.error("spec.cpus", "the host needs at least one CPU"));
    } else if spec.cpus.difference(&spec.reserved_cpus).is_empty() {
        out.push(o.error(
            "spec.reservedCpus",
            format!(
                "reserves every CPU ({}); none is left for guests",
                spec.cpus
            ),
        ));
    }
    match (&spec.libvirt, spec.driver) {
        (Some(_), HostDriver::BerthVmm) => out.push(o.error(
            "spec.libvirt",
            "applies only to driver libvirt, and this host runs driver berth-vmm (set driver: libvirt)",
        )),
        (Some(libvirt), HostDriver::Libvirt) => {
            if libvirt.uri.trim().is_empty() {
                out.push(o.error("spec.libvirt.uri", "must not be empty (for example qemu:///system)"))
            }
            if let Some(remote) = &libvirt.remote_uri {
                if libvirt.migration_uri.is_none() && crate::manifest::uri_host(remote).is_none() {
                    out.push(o.error(
                        "spec.libvirt.remoteUri",
                        format!("{remote:?} names no host (for example qemu+tcp://10.0.0.2/system); the other hosts' libvirtd must reach this one by it"),
                    ))
                }
            }
            if libvirt.migration_uri.is_some() && libvirt.remote_uri.is_none() {
                out.push(o.error(
                    "spec.libvirt.migrationUri",
                    "needs remoteUri too: the other hosts' libvirtd open remoteUri to migrate a guest here",
                ))
            }
            if !libvirt.is_local() {
                let set = [
                    (!spec.hugepages.is_empty(), "spec.hugepages"),
                    (spec.ksm != crate::KsmSpec::default(), "spec.ksm"),
                    (spec.transparent_hugepages != crate::ThpMode::default(), "spec.transparentHugepages"),
                ];
                for (_, field) in set.iter().filter(|(set, _)| *set) {
                    // Guests on hugepages are planned against the pool a Host declares.
                    let pages = if *field == "spec.hugepages" {
                        "; guests on hugepages need a host whose pool berth keeps, so run berth on that machine with a local URI to place them there"
                    } else {
                        ""
                    };
                    out.push(o.error(
                        *field,
                        format!("berth sets host settings only on the machine it runs on, and this libvirt host is reached remotely ({}); set it on that machine and leave it out, or use a local URI such as qemu:///system{pages}", libvirt.uri),
                    ))
                }
            }
        }
        _ => {}
    }
    let pool: u64 = spec
        .hugepages
        .iter()
        .map(|(size, pages)| size.bytes().saturating_mul(*pages))
        .fold(0, u64::saturating_add);
    if pool > spec.memory.get() {
        out.push(o.error(
            "spec.hugepages",
            format!(
                "the hugepage pools hold {} but the host has {} of memory",
                Bytes(pool),
                spec.memory
            ),
        ));
    }
}

fn check_guest(guest: &Manifest<Guest>, host: Option<&Host>, out: &mut Vec<Diagnostic>) {
    let o = &guest.origin;
    let spec = &guest.spec;
    let cpu = &spec.cpu;
    let max = cpu.max();
    if cpu.vcpus > max {
        out.push(o.error(
            "spec.cpu.vcpus",
            format!("{} vCPUs is more than maxVcpus ({max})", cpu.vcpus),
        ));
    }
    match (cpu.mode, &cpu.model) {
        (CpuMode::Custom, None) => out.push(o.error(
            "spec.cpu.mode",
            "mode custom needs a model (for example kvm64)",
        )),
        (CpuMode::HostPassthrough | CpuMode::HostModel, Some(_)) => out.push(o.warning(
            "spec.cpu.model",
            "ignored: a model applies only with mode custom",
        )),
        _ => {}
    }
    let mut pinned = CpuSet::new();
    if let Some(pinning) = &cpu.pinning {
        for (vcpu, cpus) in &pinning.vcpus {
            let path = format!("spec.cpu.pinning.vcpus.{vcpu}");
            if *vcpu >= max {
                out.push(o.error(
                    &path,
                    format!(
                        "vCPU {vcpu} does not exist: vCPUs are numbered 0 to {} (maxVcpus {max})",
                        max.saturating_sub(1)
                    ),
                ));
            }
            if let Some(host) = host {
                check_pinned_cpus(o, &path, cpus, host, false, out);
            }
            pinned = pinned.union(cpus);
        }
        if let (Some(emulator), Some(host)) = (&pinning.emulator, host) {
            check_pinned_cpus(o, "spec.cpu.pinning.emulator", emulator, host, true, out);
        }
    }
    if cpu.dedicated && pinned.is_empty() {
        out.push(o.warning("spec.cpu.dedicated", "has no effect without vCPU pinning"));
    }
    check_memory(guest, host, out);
    check_boot(o, &spec.boot, out);
    check_devices(guest, out);
    if let Some(host) = host {
        check_driver_fields(guest, host, out);
    }
    if spec.migration.completion_timeout_per_gib.get().is_zero() {
        out.push(o.error(
            "spec.migration.completionTimeoutPerGiB",
            "must be more than 0",
        ));
    }
}

/// vCPU threads run only on the host's guest CPUs; emulator threads may also run on
/// the CPUs reserved for the host, which is where housekeeping usually goes.
fn check_pinned_cpus(
    o: &Origin,
    path: &str,
    cpus: &CpuSet,
    host: &Host,
    emulator: bool,
    out: &mut Vec<Diagnostic>,
) {
    let hs = &host.spec;
    let name = &host.metadata.name;
    let known = hs.cpus.union(&hs.reserved_cpus);
    let missing = cpus.difference(&known);
    if !missing.is_empty() {
        out.push(o.error(
            path,
            format!(
                "CPU {missing} is not among host {name}'s cpus ({})",
                hs.cpus
            ),
        ));
    }
    let reserved = cpus.intersection(&hs.reserved_cpus);
    if !emulator && !reserved.is_empty() {
        out.push(o.error(
            path,
            format!(
                "CPU {reserved} is reserved for host {name} itself (reservedCpus {})",
                hs.reserved_cpus
            ),
        ));
    }
}

fn check_memory(guest: &Manifest<Guest>, host: Option<&Host>, out: &mut Vec<Diagnostic>) {
    let o = &guest.origin;
    let m = &guest.spec.memory;
    let size = m.size;
    if size < MIN_GUEST_MEMORY {
        out.push(o.error(
            "spec.memory.size",
            format!("{size} is too small; a guest needs at least {MIN_GUEST_MEMORY}"),
        ));
    }
    if let Some(host) = host {
        if size > host.spec.memory {
            out.push(o.error(
                "spec.memory.size",
                format!(
                    "{size} is more than host {}'s memory ({})",
                    host.metadata.name, host.spec.memory
                ),
            ));
        }
    }
    if let Some(huge) = &m.hugepages {
        let page = huge.page_size;
        if size.get() % page.bytes() != 0 {
            out.push(o.error(
                "spec.memory.size",
                format!("{size} is not a whole number of {page} hugepages"),
            ));
        }
    }
    if let Some(numa) = &m.numa {
        if let Some(node) = numa.nodeset.iter().find(|n| *n >= MAX_NUMA_NODES) {
            out.push(o.error(
                "spec.memory.numa.nodeset",
                format!("NUMA node {node} is beyond the {MAX_NUMA_NODES} nodes Linux supports"),
            ));
        }
        if numa.nodeset.is_empty() {
            out.push(o.error("spec.memory.numa.nodeset", "needs at least one NUMA node"));
        }
    }
    let Some(tune) = &m.tune else { return };
    let p = "spec.memory.tune";
    if let (Some(soft), Some(hard)) = (tune.soft_limit, tune.hard_limit) {
        if soft > hard {
            out.push(o.error(
                format!("{p}.softLimit"),
                format!("{soft} is more than hardLimit ({hard})"),
            ));
        }
    }
    if let (Some(hard), Some(swap)) = (tune.hard_limit, tune.swap_hard_limit) {
        if hard > swap {
            out.push(o.error(format!("{p}.swapHardLimit"), format!("{swap} is less than hardLimit ({hard}); memory plus swap cannot be below memory")));
        }
    }
    if let (None, Some(soft), Some(swap)) = (tune.hard_limit, tune.soft_limit, tune.swap_hard_limit)
    {
        if soft > swap {
            out.push(o.error(
                format!("{p}.softLimit"),
                format!("{soft} is more than swapHardLimit ({swap})"),
            ));
        }
    }
    if let Some(min) = tune.min_guarantee {
        if min > size {
            out.push(o.error(
                format!("{p}.minGuarantee"),
                format!("{min} is more than the guest's memory ({size})"),
            ));
        }
    }
    if let Some(hard) = tune.hard_limit {
        if hard < size && !tune.allow_hard_limit_below_size {
            out.push(o.error(
                format!("{p}.hardLimit"),
                format!("{hard} is less than the guest's memory ({size}): the guest could be OOM-killed; set allowHardLimitBelowSize: true if you mean it"),
            ));
        }
    }
}

fn check_boot(o: &Origin, boot: &Boot, out: &mut Vec<Diagnostic>) {
    if let Some(builtin) = boot.kernel.strip_prefix("builtin:") {
        if !boot.is_heartbeat() {
            out.push(o.error(
                "spec.boot.kernel",
                format!(
                    "unknown built-in payload {builtin:?} (the only one is {})",
                    Boot::HEARTBEAT
                ),
            ));
        }
        for (field, set) in [
            ("initrd", boot.initrd.is_some()),
            ("cmdline", boot.cmdline.is_some()),
        ] {
            if set {
                out.push(o.warning(
                    format!("spec.boot.{field}"),
                    "ignored: the built-in payload is not Linux",
                ));
            }
        }
    } else if boot.heartbeat.is_some() {
        out.push(o.warning(
            "spec.boot.heartbeat",
            "ignored: the guest boots a Linux kernel, not the heartbeat payload",
        ));
    }
    if boot.kernel.trim().is_empty() {
        out.push(o.error(
            "spec.boot.kernel",
            "must name a kernel or builtin:heartbeat",
        ));
    }
    if let Some(hb) = &boot.heartbeat {
        if hb.tick_hz == 0 || hb.tick_hz > 1000 {
            out.push(o.error(
                "spec.boot.heartbeat.tickHz",
                format!("{} is out of range (expected 1 to 1000)", hb.tick_hz),
            ));
        }
        if hb.ticks_per_line == 0 {
            out.push(o.error("spec.boot.heartbeat.ticksPerLine", "must be at least 1"));
        }
    }
}

/// Disks and network cards on their own: paths, boot order, one attachment per card.
fn check_devices(guest: &Manifest<Guest>, out: &mut Vec<Diagnostic>) {
    let o = &guest.origin;
    let spec = &guest.spec;
    let mut sources: BTreeMap<&str, usize> = BTreeMap::new();
    let mut orders: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let path = index_path("spec.disks", i);
        if !disk.source.starts_with('/') {
            out.push(o.error(
                format!("{path}.source"),
                format!("{:?} is not an absolute path", disk.source),
            ));
        }
        if let Some(first) = sources.insert(&disk.source, i) {
            out.push(o.error(
                format!("{path}.source"),
                format!("{} is also spec.disks[{first}]", disk.source),
            ));
        }
        if let Some(order) = disk.boot_order {
            if order == 0 {
                out.push(o.error(format!("{path}.bootOrder"), "starts at 1"));
            } else if let Some(first) = orders.insert(order, i) {
                out.push(o.error(
                    format!("{path}.bootOrder"),
                    format!("{order} is also the boot order of spec.disks[{first}]"),
                ));
            }
            if spec.boot.from == BootFrom::Kernel {
                out.push(o.warning(
                    format!("{path}.bootOrder"),
                    "ignored: the guest boots a kernel directly (boot.from: kernel)",
                ));
            }
        }
    }
    if spec.boot.from == BootFrom::Disk {
        if spec.disks.is_empty() {
            out.push(o.error("spec.boot.from", "disk, but the guest has no disks"));
        }
        let boot = &spec.boot;
        for (field, set) in [
            ("kernel", !boot.is_heartbeat()),
            ("initrd", boot.initrd.is_some()),
            ("cmdline", boot.cmdline.is_some()),
        ] {
            if set {
                out.push(o.warning(
                    format!("spec.boot.{field}"),
                    "ignored: the guest boots from its disks (boot.from: disk)",
                ));
            }
        }
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        let path = index_path("spec.nics", i);
        match (&nic.bridge, &nic.network) {
            (Some(_), Some(_)) => out.push(o.error(
                path.clone(),
                "names both a bridge and a network; a card attaches to one",
            )),
            (None, None) => {
                out.push(o.error(path.clone(), "needs a bridge or a network to attach to"))
            }
            (Some(name), None) | (None, Some(name)) if name.trim().is_empty() => {
                out.push(o.error(path.clone(), "names an empty bridge or network"))
            }
            _ => {}
        }
        if let Some(mac) = &nic.mac {
            match parse_mac(mac) {
                None => out.push(o.error(
                    format!("{path}.mac"),
                    format!("{mac:?} is not a MAC address (six hex pairs, 52:54:00:12:34:56)"),
                )),
                Some(bytes) if bytes[0] & 1 == 1 => out.push(o.error(
                    format!("{path}.mac"),
                    format!("{mac} is a multicast address; a card needs a unicast one"),
                )),
                Some(_) => {}
            }
        }
    }
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut bytes = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut bytes {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(bytes)
}

/// A field that the guest's host's driver cannot honour.
fn check_driver_fields(guest: &Manifest<Guest>, host: &Host, out: &mut Vec<Diagnostic>) {
    let o = &guest.origin;
    let spec = &guest.spec;
    let name = &host.metadata.name;
    let driver = host.spec.driver;
    match driver {
        HostDriver::BerthVmm => {
            let unsupported = [
                ("spec.disks", !spec.disks.is_empty(), "attach disks"),
                ("spec.nics", !spec.nics.is_empty(), "attach network cards"),
                (
                    "spec.boot.from",
                    spec.boot.from == BootFrom::Disk,
                    "boot from a disk",
                ),
            ];
            for (path, set, what) in unsupported {
                if set {
                    out.push(o.error(
                        path,
                        format!("host {name} runs driver {driver}, which cannot {what}; place the guest on a host with driver: libvirt"),
                    ));
                }
            }
        }
        HostDriver::Libvirt => {
            if spec.boot.from == BootFrom::Kernel && spec.boot.is_heartbeat() {
                out.push(o.error(
                    "spec.boot.kernel",
                    format!("{} runs only under berth-vmm, and host {name} runs driver {driver}; boot a Linux kernel or boot.from: disk", Boot::HEARTBEAT),
                ));
            }
            let libvirt = host.spec.libvirt_or_default();
            if libvirt.domain_type == DomainType::Qemu && spec.cpu.mode == CpuMode::HostPassthrough
            {
                out.push(o.error(
                    "spec.cpu.mode",
                    format!("host-passthrough needs KVM, and host {name} runs driver {driver} with domainType qemu (TCG); use host-model or a custom model"),
                ));
            }
        }
    }
}

/// A MAC address names one card in the whole fleet.
fn check_macs(set: &ManifestSet, out: &mut Vec<Diagnostic>) {
    let mut seen: BTreeMap<[u8; 6], String> = BTreeMap::new();
    for guest in set.guests.values() {
        for (i, nic) in guest.spec.nics.iter().enumerate() {
            let Some(mac) = nic.mac.as_deref().and_then(parse_mac) else {
                continue;
            };
            let here = format!("guest {} spec.nics[{i}]", guest.metadata.name);
            if let Some(first) = seen.get(&mac) {
                out.push(guest.origin.error(
                    format!("{}.mac", index_path("spec.nics", i)),
                    format!(
                        "{} is also the MAC of {first}",
                        nic.mac.as_deref().unwrap_or_default()
                    ),
                ));
            } else {
                seen.insert(mac, here);
            }
        }
    }
}

fn holds_resources(guest: &Guest) -> bool {
    guest.spec.state != GuestState::Stopped
}

/// Hugepage pools and host memory against the guests placed on the host that hold
/// resources (`guests`, by name).
fn check_capacity(guests: &[&Manifest<Guest>], host: &Manifest<Host>, out: &mut Vec<Diagnostic>) {
    let mut needs: BTreeMap<PageSize, Vec<(&str, u64)>> = BTreeMap::new();
    for g in guests {
        if let Some(h) = &g.spec.memory.hugepages {
            let pages = g.spec.memory.size.get().div_ceil(h.page_size.bytes());
            needs
                .entry(h.page_size)
                .or_default()
                .push((&g.metadata.name, pages));
        }
    }
    for (size, users) in needs {
        let pool = host.spec.hugepages.get(&size).copied().unwrap_or(0);
        let total: u64 = users
            .iter()
            .map(|(_, p)| p)
            .fold(0, |a, b| a.saturating_add(*b));
        if total > pool {
            let detail: Vec<String> = users.iter().map(|(g, p)| format!("{g} {p}")).collect();
            out.push(host.origin.error(
                "spec.hugepages",
                format!(
                    "the {size} pool has {pool} pages but its guests need {total} ({})",
                    detail.join(", ")
                ),
            ));
        }
    }
    let total = guests
        .iter()
        .map(|g| g.spec.memory.size.get())
        .fold(0, u64::saturating_add);
    if total > host.spec.memory.get() {
        // Overcommit is legitimate with swap and KSM, so only a warning; the hugepage
        // pools above are what cannot be overcommitted.
        out.push(host.origin.warning(
            "spec.memory",
            format!(
                "its guests ask for {} in all, more than the host's {}: memory is overcommitted",
                Bytes(total),
                host.spec.memory
            ),
        ));
    }
}

/// Two guests whose vCPUs share a host CPU: a warning, an error when either asked for
/// dedicated CPUs. `guests` are the host's guests that hold resources, by name.
fn check_shared_cpus(
    guests: &[&Manifest<Guest>],
    host: &Manifest<Host>,
    out: &mut Vec<Diagnostic>,
) {
    let mut owners: BTreeMap<u32, &Manifest<Guest>> = BTreeMap::new();
    for &guest in guests {
        let Some(pinning) = &guest.spec.cpu.pinning else {
            continue;
        };
        let mut reported = BTreeSet::new();
        for (vcpu, cpus) in &pinning.vcpus {
            for cpu in cpus.iter() {
                let Some(other) = owners.get(&cpu).copied() else {
                    continue;
                };
                if !reported.insert(cpu) {
                    continue;
                }
                let dedicated = guest.spec.cpu.dedicated || other.spec.cpu.dedicated;
                let message = format!(
                    "CPU {cpu} of host {} is also pinned by guest {} ({}){}",
                    host.metadata.name,
                    other.metadata.name,
                    other.origin.short(),
                    if dedicated {
                        ", and a guest with dedicated CPUs cannot share it"
                    } else {
                        ""
                    }
                );
                let path = format!("spec.cpu.pinning.vcpus.{vcpu}");
                out.push(if dedicated {
                    guest.origin.error(path, message)
                } else {
                    guest.origin.warning(path, message)
                });
            }
        }
        for cpus in pinning.vcpus.values() {
            for cpu in cpus.iter() {
                owners.entry(cpu).or_insert(guest);
            }
        }
    }
}

/// A host-passthrough guest sees the host's exact CPU; moving it live to a host with
/// another CPU model breaks it.
fn check_passthrough_migration(set: &ManifestSet, out: &mut Vec<Diagnostic>) {
    let models: BTreeSet<Option<&str>> = set
        .hosts
        .values()
        .map(|h| h.spec.cpu_model.as_deref())
        .collect();
    if models.len() < 2 {
        return;
    }
    let listed: Vec<String> = set
        .hosts
        .values()
        .map(|h| {
            format!(
                "{}: {}",
                h.metadata.name,
                h.spec.cpu_model.as_deref().unwrap_or("unknown")
            )
        })
        .collect();
    for guest in set.guests.values() {
        if guest.spec.cpu.mode == CpuMode::HostPassthrough
            && guest.spec.migration.mode == MigrationMode::Live
        {
            out.push(guest.origin.warning(
                "spec.cpu.mode",
                format!(
                    "host-passthrough with live migration, but the hosts' CPU models differ ({}): a live move between them fails; use host-model or a custom model, or migration mode cold",
                    listed.join(", ")
                ),
            ));
        }
    }
}
