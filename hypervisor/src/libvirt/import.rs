//! `berth import`: a Guest manifest from an existing domain's XML, so that an operator
//! adopts berth with one command. What a Guest manifest cannot express (a block-device
//! disk, a CD-ROM, a user-mode network card...) is an error naming the element: a
//! manifest that silently dropped a device would remove it at the next restart.

use std::collections::BTreeMap;

use berth_schema::{
    Boot, BootFrom, Bytes, CpuMode, CpuSet, CpuSpec, Disk, DiskBus, DiskCache, DiskFormat,
    DomainType, Guest, GuestSpec, GuestState, HugepageSpec, IoSpec, MemTune, MemorySpec, Metadata,
    MigrationPolicy, Nic, NicModel, NumaMode, NumaSpec, PageSize, Pinning, RestartPolicy,
    API_VERSION,
};
use roxmltree::{Document, Node};

/// QEMU's CPU model for x86_64 when a domain has no `<cpu>` element.
pub const QEMU_DEFAULT_CPU_MODEL: &str = "qemu64";

/// Why a domain cannot become a Guest manifest.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The XML does not parse.
    #[error("the domain XML does not parse")]
    Xml(#[from] roxmltree::Error),
    /// Something berth's manifests cannot say, or a value out of range.
    #[error("domain {domain}: {what}")]
    Unsupported {
        /// The domain's name.
        domain: String,
        /// What, naming the element.
        what: String,
    },
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn text<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).and_then(|n| n.text()).map(str::trim)
}

/// A size element (`<memory unit='KiB'>262144</memory>`) in bytes.
fn size(node: Node) -> Option<Bytes> {
    let value: u64 = node.text()?.trim().parse().ok()?;
    let unit = match node.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    value.checked_mul(unit).map(Bytes)
}

/// The Guest manifest for a domain's XML (`virsh dumpxml --inactive` shape), placed on
/// `host` and in run `state`, with the domain's type.
///
/// # Errors
/// [`ImportError`] naming what the manifest cannot express.
pub fn guest_from_domain(
    xml: &str,
    host: &str,
    state: GuestState,
) -> Result<(Guest, DomainType), ImportError> {
    let doc = Document::parse(xml)?;
    let domain = doc.root_element();
    let name = text(domain, "name").unwrap_or_default().to_owned();
    let unsupported = |what: String| ImportError::Unsupported {
        domain: name.clone(),
        what,
    };
    let domain_type = match domain.attribute("type") {
        Some("kvm") => DomainType::Kvm,
        Some("qemu") => DomainType::Qemu,
        other => {
            return Err(unsupported(format!(
                "domain type {other:?} (berth manages kvm and qemu domains)"
            )))
        }
    };

    let memory = child(domain, "memory")
        .and_then(size)
        .ok_or_else(|| unsupported("<memory> is missing or unreadable".into()))?;
    let vcpu = child(domain, "vcpu");
    let max: u32 = vcpu
        .and_then(|v| v.text())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1);
    let current: u32 = vcpu
        .and_then(|v| v.attribute("current"))
        .and_then(|c| c.parse().ok())
        .unwrap_or(max);

    let cpuset = |node: Node, what: &str| -> Result<CpuSet, ImportError> {
        let text = node.attribute("cpuset").unwrap_or_default();
        text.parse()
            .map_err(|e| unsupported(format!("{what} cpuset {text:?}: {e}")))
    };
    let mut pinning = Pinning::default();
    if let Some(tune) = child(domain, "cputune") {
        for pin in tune.children().filter(|c| c.has_tag_name("vcpupin")) {
            let index: u32 = pin
                .attribute("vcpu")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| unsupported("a <vcpupin> without a vcpu".into()))?;
            pinning.vcpus.insert(index, cpuset(pin, "vcpupin")?);
        }
        if let Some(pin) = child(tune, "emulatorpin") {
            pinning.emulator = Some(cpuset(pin, "emulatorpin")?);
        }
    }

    let tune = child(domain, "memtune").map(|t| {
        let limit = |n: &str| child(t, n).and_then(size);
        MemTune {
            hard_limit: limit("hard_limit"),
            soft_limit: limit("soft_limit"),
            swap_hard_limit: limit("swap_hard_limit"),
            min_guarantee: None,
            allow_hard_limit_below_size: limit("hard_limit").is_some_and(|h| h < memory),
        }
    });
    let numa = match child(domain, "numatune").and_then(|n| child(n, "memory")) {
        None => None,
        Some(m) => {
            let mode = match m.attribute("mode").unwrap_or("strict") {
                "strict" => NumaMode::Strict,
                "preferred" => NumaMode::Preferred,
                "interleave" => NumaMode::Interleave,
                other => return Err(unsupported(format!("numatune mode {other}"))),
            };
            match m.attribute("nodeset") {
                Some(nodeset) => Some(NumaSpec {
                    mode,
                    nodeset: nodeset
                        .parse()
                        .map_err(|e| unsupported(format!("numatune nodeset {nodeset:?}: {e}")))?,
                }),
                None => None,
            }
        }
    };
    let io = match child(domain, "blkiotune").and_then(|b| text(b, "weight")) {
        Some(w) => Some(IoSpec {
            weight: w
                .parse()
                .map_err(|_| unsupported(format!("blkiotune weight {w:?}")))?,
        }),
        None => None,
    };

    let os = child(domain, "os");
    let kernel = os.and_then(|o| text(o, "kernel"));
    let boot = match kernel {
        Some(kernel) => Boot {
            from: BootFrom::Kernel,
            kernel: kernel.to_owned(),
            initrd: os.and_then(|o| text(o, "initrd")).map(str::to_owned),
            cmdline: os.and_then(|o| text(o, "cmdline")).map(str::to_owned),
            heartbeat: None,
        },
        None => Boot {
            from: BootFrom::Disk,
            ..Boot::default()
        },
    };

    let (mode, model) = match child(domain, "cpu") {
        None => (CpuMode::Custom, Some(QEMU_DEFAULT_CPU_MODEL.to_owned())),
        Some(cpu) => match cpu.attribute("mode").unwrap_or("custom") {
            "host-passthrough" => (CpuMode::HostPassthrough, None),
            "host-model" => (CpuMode::HostModel, None),
            "custom" => (
                CpuMode::Custom,
                Some(
                    text(cpu, "model")
                        .unwrap_or(QEMU_DEFAULT_CPU_MODEL)
                        .to_owned(),
                ),
            ),
            other => return Err(unsupported(format!("cpu mode {other}"))),
        },
    };

    let backing = child(domain, "memoryBacking");
    let hugepages = match backing.and_then(|b| child(b, "hugepages")) {
        None => None,
        Some(h) => {
            let kib = child(h, "page")
                .and_then(|p| {
                    let value: u64 = p.attribute("size")?.parse().ok()?;
                    Some(match p.attribute("unit").unwrap_or("KiB") {
                        "M" | "MiB" => value << 10,
                        "G" | "GiB" => value << 20,
                        _ => value,
                    })
                })
                .unwrap_or(2048);
            let page_size = match kib {
                2048 => PageSize::Huge2M,
                1_048_576 => PageSize::Huge1G,
                other => return Err(unsupported(format!("hugepages of {other} KiB"))),
            };
            Some(HugepageSpec { page_size })
        }
    };
    let locked = backing.is_some_and(|b| child(b, "locked").is_some());
    let share_pages = backing.is_none_or(|b| child(b, "nosharepages").is_none());

    let mut disks = Vec::new();
    let mut nics = Vec::new();
    if let Some(devices) = child(domain, "devices") {
        for disk in devices.children().filter(|c| c.has_tag_name("disk")) {
            let kind = disk.attribute("type").unwrap_or_default();
            let device = disk.attribute("device").unwrap_or("disk");
            let source = child(disk, "source").and_then(|s| s.attribute("file"));
            let (Some(source), "file", "disk") = (source, kind, device) else {
                return Err(unsupported(format!(
                    "a <disk type='{kind}' device='{device}'>: berth manifests hold file-backed disks only"
                )));
            };
            let target = child(disk, "target");
            let bus = match target.and_then(|t| t.attribute("bus")).unwrap_or("virtio") {
                "virtio" => DiskBus::Virtio,
                "sata" => DiskBus::Sata,
                "scsi" => DiskBus::Scsi,
                other => return Err(unsupported(format!("disk {source} on bus {other}"))),
            };
            let driver = child(disk, "driver");
            let format = match driver.and_then(|d| d.attribute("type")).unwrap_or("raw") {
                "raw" => DiskFormat::Raw,
                "qcow2" => DiskFormat::Qcow2,
                other => return Err(unsupported(format!("disk {source} in format {other}"))),
            };
            let cache = match driver.and_then(|d| d.attribute("cache")).unwrap_or("none") {
                "none" => DiskCache::None,
                "writethrough" => DiskCache::Writethrough,
                "writeback" | "default" => DiskCache::Writeback,
                "directsync" => DiskCache::Directsync,
                "unsafe" => DiskCache::Unsafe,
                other => return Err(unsupported(format!("disk {source} with cache {other}"))),
            };
            disks.push(Disk {
                source: source.to_owned(),
                bus,
                format,
                cache,
                read_only: child(disk, "readonly").is_some(),
                boot_order: child(disk, "boot")
                    .and_then(|b| b.attribute("order"))
                    .and_then(|o| o.parse().ok()),
                shared: false,
            });
        }
        for nic in devices.children().filter(|c| c.has_tag_name("interface")) {
            let kind = nic.attribute("type").unwrap_or_default();
            let source = child(nic, "source");
            let (bridge, network) = match kind {
                "bridge" => (source.and_then(|s| s.attribute("bridge")), None),
                "network" => (None, source.and_then(|s| s.attribute("network"))),
                other => {
                    return Err(unsupported(format!(
                        "an <interface type='{other}'>: berth manifests hold bridge and network cards only"
                    )))
                }
            };
            let model = match child(nic, "model").and_then(|m| m.attribute("type")) {
                Some("virtio") | None => NicModel::Virtio,
                Some("e1000") => NicModel::E1000,
                Some(other) => return Err(unsupported(format!("a network card of model {other}"))),
            };
            nics.push(Nic {
                bridge: bridge.map(str::to_owned),
                network: network.map(str::to_owned),
                model,
                mac: child(nic, "mac")
                    .and_then(|m| m.attribute("address"))
                    .map(str::to_owned),
            });
        }
    }

    let guest = Guest {
        api_version: API_VERSION.to_owned(),
        kind: "Guest".to_owned(),
        metadata: Metadata {
            name,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        },
        spec: GuestSpec {
            host: host.to_owned(),
            host_selector: None,
            anti_affinity: BTreeMap::new(),
            availability: Default::default(),
            state,
            boot,
            cpu: CpuSpec {
                vcpus: current,
                max_vcpus: (max != current).then_some(max),
                mode,
                model,
                pinning: (!pinning.vcpus.is_empty() || pinning.emulator.is_some())
                    .then_some(pinning),
                dedicated: false,
            },
            memory: MemorySpec {
                size: memory,
                hugepages,
                locked,
                share_pages,
                tune: tune.filter(|t| *t != MemTune::default()),
                numa,
            },
            io,
            disks,
            nics,
            migration: MigrationPolicy::default(),
            restart_policy: RestartPolicy::default(),
        },
    };
    Ok((guest, domain_type))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::xml::{domain_xml, ConsoleLog};

    #[test]
    fn a_guest_round_trips_through_the_domain_xml() {
        let text = "apiVersion: berth.dev/v1
kind: Guest
metadata: {name: web-1}
spec:
  host: virt01
  boot: {kernel: /srv/vmlinuz, initrd: /srv/initrd.gz, cmdline: 'console=ttyS0 a<b'}
  cpu: {vcpus: 1, maxVcpus: 2, mode: custom, model: kvm64, pinning: {vcpus: {0: '1'}, emulator: '0-1'}}
  memory: {size: 256MiB, hugepages: {pageSize: 2MiB}, tune: {hardLimit: 512MiB}, numa: {mode: strict, nodeset: '0'}}
  io: {weight: 500}
  disks:
    - {source: /srv/web-1.raw}
    - {source: /srv/data.qcow2, bus: scsi, format: qcow2, cache: writeback, readOnly: true}
  nics:
    - {network: default, mac: '52:54:00:aa:00:01'}
    - {bridge: br0, model: e1000}
";
        let guest: Guest = serde_yaml::from_str(text).unwrap();
        let xml = domain_xml(&guest, DomainType::Qemu, "r", &ConsoleLog("/c".into())).unwrap();
        let (back, ty) = guest_from_domain(&xml, "virt01", GuestState::Running).unwrap();
        assert_eq!(ty, DomainType::Qemu);
        assert_eq!(back, guest);
    }

    #[test]
    fn what_a_manifest_cannot_say_is_an_error_naming_it() {
        let xml = "<domain type='kvm'><name>db</name><memory>1048576</memory>\
                   <devices><disk type='block' device='disk'><source dev='/dev/sdb'/></disk></devices></domain>";
        let err = guest_from_domain(xml, "h", GuestState::Running).unwrap_err();
        assert_eq!(
            err.to_string(),
            "domain db: a <disk type='block' device='disk'>: berth manifests hold file-backed disks only"
        );
        let bare = "<domain type='kvm'><name>db</name><memory unit='MiB'>64</memory><vcpu>2</vcpu></domain>";
        let (guest, _) = guest_from_domain(bare, "h", GuestState::Stopped).unwrap();
        assert_eq!(guest.spec.memory.size, Bytes::mib(64));
        assert_eq!((guest.spec.cpu.vcpus, guest.spec.cpu.max_vcpus), (2, None));
        assert_eq!(guest.spec.cpu.model.as_deref(), Some("qemu64"));
        assert_eq!(guest.spec.boot.from, BootFrom::Disk);
    }
}
