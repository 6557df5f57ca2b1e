//! Domain XML built from a Guest manifest with quick-xml's writer (never by pasting
//! strings), and berth's `<metadata>` element read back from a domain.
//!
//! The element berth owns in `<metadata>` records the manifest revision the domain was
//! last converged to and a fingerprint of the Guest spec, so observe can tell berth's
//! domains from the others (which it lists as unmanaged and never touches).

use std::io;

use berth_schema::{
    Boot, BootFrom, CpuMode, DiskBus, DiskCache, DiskFormat, DomainType, Guest, GuestSpec,
    NicModel, NumaMode,
};
use quick_xml::events::{BytesText, Event};
use quick_xml::{Reader, Writer};

/// The XML namespace of berth's `<metadata>` element.
pub const METADATA_NS: &str = "https://berth.dev/xmlns/libvirt-guest/1";

/// The element name (and namespace prefix) of berth's `<metadata>` element.
pub const METADATA_KEY: &str = "berth";

/// What berth records in a domain's `<metadata>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ownership {
    /// The manifest revision (a git commit, or a directory's label) applied last.
    pub revision: String,
    /// [`fingerprint`] of the Guest spec applied last.
    pub fingerprint: String,
    /// The Guest's labels and annotations when berth last applied it, as JSON
    /// (`{"labels": {...}, "annotations": {...}}`).
    pub object_meta: String,
}

impl Ownership {
    /// What berth records for `guest` applied at `revision`.
    pub fn of(guest: &Guest, revision: &str) -> Ownership {
        let meta = serde_json::json!({
            "labels": guest.metadata.labels,
            "annotations": guest.metadata.annotations,
        });
        Ownership {
            revision: revision.to_owned(),
            fingerprint: fingerprint(&guest.spec),
            object_meta: meta.to_string(),
        }
    }
}

/// The restart-class settings of a domain as its XML describes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    /// `<os><kernel>`.
    pub kernel: Option<String>,
    /// `<os><initrd>`.
    pub initrd: Option<String>,
    /// `<os><cmdline>`.
    pub cmdline: Option<String>,
    /// `<cpu mode=...>`; `None` without a `<cpu>` element.
    pub cpu_mode: Option<String>,
    /// `<cpu><model>`.
    pub cpu_model: Option<String>,
    /// `<memoryBacking><hugepages><page size>` in KiB; `Some(0)` for hugepages of the
    /// default size.
    pub hugepage_kib: Option<u64>,
    /// `<memoryBacking><locked/>`.
    pub locked: bool,
    /// `<memoryBacking><nosharepages/>`.
    pub nosharepages: bool,
    /// `<blkiotune><weight>`: a weight was set for the domain.
    pub blkio_weight: Option<u32>,
}

fn at(path: &[Vec<u8>], want: &[&[u8]]) -> bool {
    path.len() == want.len() && path.iter().zip(want).all(|(a, b)| a.as_slice() == *b)
}

/// Reads the restart-class settings from a domain's XML.
pub fn parse_definition(domain: &str) -> Option<Definition> {
    let mut reader = Reader::from_str(domain);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut def = Definition::default();
    loop {
        let event = reader.read_event().ok()?;
        let (element, empty) = match &event {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            _ => (None, false),
        };
        if let Some(e) = element {
            let attr = |name: &str| {
                e.try_get_attribute(name)
                    .ok()
                    .flatten()
                    .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
            };
            path.push(e.local_name().as_ref().to_vec());
            if at(&path, &[b"domain", b"cpu"]) {
                def.cpu_mode = Some(attr("mode").unwrap_or_else(|| "custom".to_owned()));
            } else if at(&path, &[b"domain", b"memoryBacking", b"hugepages"]) {
                def.hugepage_kib.get_or_insert(0);
            } else if at(&path, &[b"domain", b"memoryBacking", b"hugepages", b"page"]) {
                let size: u64 = attr("size")?.parse().ok()?;
                let kib = match attr("unit").as_deref().unwrap_or("KiB") {
                    "KiB" | "K" | "k" => size,
                    "MiB" | "M" => size << 10,
                    "GiB" | "G" => size << 20,
                    _ => return None,
                };
                def.hugepage_kib = Some(kib);
            } else if at(&path, &[b"domain", b"memoryBacking", b"locked"]) {
                def.locked = true;
            } else if at(&path, &[b"domain", b"memoryBacking", b"nosharepages"]) {
                def.nosharepages = true;
            }
            if empty {
                path.pop();
            }
            continue;
        }
        let slot = if at(&path, &[b"domain", b"os", b"kernel"]) {
            Some(&mut def.kernel)
        } else if at(&path, &[b"domain", b"os", b"initrd"]) {
            Some(&mut def.initrd)
        } else if at(&path, &[b"domain", b"os", b"cmdline"]) {
            Some(&mut def.cmdline)
        } else if at(&path, &[b"domain", b"cpu", b"model"]) {
            Some(&mut def.cpu_model)
        } else {
            None
        };
        if let (Event::Text(t), true) = (&event, at(&path, &[b"domain", b"blkiotune", b"weight"])) {
            def.blkio_weight = t.decode().ok()?.trim().parse().ok();
        }
        match event {
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) => {
                if let Some(slot) = slot {
                    slot.get_or_insert_with(String::new)
                        .push_str(&t.decode().ok()?);
                }
            }
            // An entity inside a text value (`&amp;`) comes as its own event.
            Event::GeneralRef(r) => {
                let resolved = match r.as_ref() {
                    b"amp" => "&",
                    b"lt" => "<",
                    b"gt" => ">",
                    b"quot" => "\"",
                    b"apos" => "'",
                    _ => return None,
                };
                if let Some(slot) = slot {
                    slot.get_or_insert_with(String::new).push_str(resolved);
                }
            }
            Event::Eof => return Some(def),
            _ => {}
        }
    }
}

/// The Guest spec's fingerprint: SHA-256 of its canonical JSON (maps are ordered), in hex.
pub fn fingerprint(spec: &GuestSpec) -> String {
    let json = serde_json::to_vec(spec).expect("a GuestSpec always serializes");
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the guest's serial console is written (besides the pty `virsh console` reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLog(pub String);

impl ConsoleLog {
    /// libvirt's own log directory: `/var/log/libvirt/qemu/NAME-console.log`.
    pub fn default_for(name: &str) -> Self {
        ConsoleLog(format!("/var/log/libvirt/qemu/{name}-console.log"))
    }
}

/// The complete domain definition of `guest`, owned by berth at `revision`.
///
/// # Errors
/// Only when writing to memory fails, which it does not; kept as a `Result` so that the
/// writer's errors are not unwrapped.
pub fn domain_xml(
    guest: &Guest,
    domain_type: DomainType,
    revision: &str,
    console: &ConsoleLog,
) -> io::Result<String> {
    let spec = &guest.spec;
    let owner = Ownership::of(guest, revision);
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    w.create_element("domain")
        .with_attribute(("type", domain_type.as_str()))
        .write_inner_content(|w| {
            text(w, "name", &guest.metadata.name)?;
            w.create_element("metadata")
                .write_inner_content(|w| write_ownership(w, &owner))?;
            w.create_element("memory")
                .with_attribute(("unit", "KiB"))
                .write_text_content(BytesText::new(&kib(spec.memory.size.get())))?;
            write_memory_backing(w, spec)?;
            write_memtune(w, spec)?;
            if let Some(io) = &spec.io {
                w.create_element("blkiotune")
                    .write_inner_content(|w| text(w, "weight", &io.weight.to_string()))?;
            }
            let current = spec.cpu.vcpus.to_string();
            w.create_element("vcpu")
                .with_attributes([("placement", "static"), ("current", current.as_str())])
                .write_text_content(BytesText::new(&spec.cpu.max().to_string()))?;
            write_cputune(w, spec)?;
            if let Some(numa) = &spec.memory.numa {
                let nodeset = numa.nodeset.to_string();
                w.create_element("numatune").write_inner_content(|w| {
                    w.create_element("memory")
                        .with_attributes([
                            ("mode", numa_mode(numa.mode)),
                            ("nodeset", nodeset.as_str()),
                        ])
                        .write_empty()?;
                    Ok::<(), io::Error>(())
                })?;
            }
            write_os(w, spec)?;
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                w.create_element("apic").write_empty()?;
                Ok::<(), io::Error>(())
            })?;
            write_cpu(w, spec)?;
            text(w, "on_poweroff", "destroy")?;
            text(w, "on_reboot", "restart")?;
            text(w, "on_crash", "destroy")?;
            w.create_element("devices")
                .write_inner_content(|w| write_devices(w, spec, console))?;
            Ok::<(), io::Error>(())
        })?;
    String::from_utf8(w.into_inner()).map_err(io::Error::other)
}

/// berth's `<metadata>` element alone, as `virDomainSetMetadata` takes it: without a
/// namespace, which libvirt adds from the call's URI and key.
pub fn ownership_xml(owner: &Ownership) -> io::Result<String> {
    let mut w = Writer::new(Vec::new());
    w.create_element("guest").write_inner_content(|w| {
        text(w, "revision", &owner.revision)?;
        text(w, "fingerprint", &owner.fingerprint)?;
        text(w, "objectMeta", &owner.object_meta)
    })?;
    String::from_utf8(w.into_inner()).map_err(io::Error::other)
}

fn write_ownership<W: io::Write>(w: &mut Writer<W>, owner: &Ownership) -> io::Result<()> {
    let ns = format!("xmlns:{METADATA_KEY}");
    w.create_element(format!("{METADATA_KEY}:guest"))
        .with_attribute((ns.as_str(), METADATA_NS))
        .write_inner_content(|w| {
            text(w, &format!("{METADATA_KEY}:revision"), &owner.revision)?;
            text(
                w,
                &format!("{METADATA_KEY}:fingerprint"),
                &owner.fingerprint,
            )?;
            text(w, &format!("{METADATA_KEY}:objectMeta"), &owner.object_meta)
        })?;
    Ok(())
}

/// Reads berth's element as `virDomainGetMetadata` returns it (libvirt may rename the
/// prefix; only local names count).
pub fn parse_ownership(xml: &str) -> Option<Ownership> {
    let mut reader = Reader::from_str(xml);
    let mut revision = None;
    let mut fingerprint = None;
    let mut object_meta = None;
    let mut current: Option<Vec<u8>> = None;
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => current = Some(e.local_name().as_ref().to_vec()),
            Event::End(_) => current = None,
            Event::Text(t) => {
                let value = t.decode().ok()?.trim().to_owned();
                match current.as_deref() {
                    Some(b"revision") => revision = Some(value),
                    Some(b"fingerprint") => fingerprint = Some(value),
                    Some(b"objectMeta") => object_meta = Some(value),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Some(Ownership {
        revision: revision.unwrap_or_default(),
        fingerprint: fingerprint?,
        object_meta: object_meta.unwrap_or_default(),
    })
}

/// The host UUID in libvirt's capabilities XML (`<capabilities><host><uuid>`).
pub fn host_uuid(capabilities: &str) -> Option<String> {
    let mut reader = Reader::from_str(capabilities);
    let mut path: Vec<Vec<u8>> = Vec::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) => path.push(e.local_name().as_ref().to_vec()),
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t)
                if path == [b"capabilities".to_vec(), b"host".to_vec(), b"uuid".to_vec()] =>
            {
                return Some(t.decode().ok()?.trim().to_owned());
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

fn text<W: io::Write>(w: &mut Writer<W>, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(value))?;
    Ok(())
}

fn kib(bytes: u64) -> String {
    bytes.div_ceil(1024).to_string()
}

fn write_memory_backing<W: io::Write>(w: &mut Writer<W>, spec: &GuestSpec) -> io::Result<()> {
    let m = &spec.memory;
    if m.hugepages.is_none() && !m.locked && m.share_pages {
        return Ok(());
    }
    w.create_element("memoryBacking").write_inner_content(|w| {
        if let Some(huge) = &m.hugepages {
            let size = huge.page_size.kib().to_string();
            w.create_element("hugepages").write_inner_content(|w| {
                w.create_element("page")
                    .with_attributes([("size", size.as_str()), ("unit", "KiB")])
                    .write_empty()?;
                Ok::<(), io::Error>(())
            })?;
        }
        if !m.share_pages {
            w.create_element("nosharepages").write_empty()?;
        }
        if m.locked {
            w.create_element("locked").write_empty()?;
        }
        Ok::<(), io::Error>(())
    })?;
    Ok(())
}

fn write_memtune<W: io::Write>(w: &mut Writer<W>, spec: &GuestSpec) -> io::Result<()> {
    let Some(tune) = &spec.memory.tune else {
        return Ok(());
    };
    let limits = [
        ("hard_limit", tune.hard_limit),
        ("soft_limit", tune.soft_limit),
        ("swap_hard_limit", tune.swap_hard_limit),
        ("min_guarantee", tune.min_guarantee),
    ];
    if limits.iter().all(|(_, v)| v.is_none()) {
        return Ok(());
    }
    w.create_element("memtune").write_inner_content(|w| {
        for (name, value) in limits {
            if let Some(value) = value {
                w.create_element(name)
                    .with_attribute(("unit", "KiB"))
                    .write_text_content(BytesText::new(&kib(value.get())))?;
            }
        }
        Ok::<(), io::Error>(())
    })?;
    Ok(())
}

fn write_cputune<W: io::Write>(w: &mut Writer<W>, spec: &GuestSpec) -> io::Result<()> {
    let Some(pinning) = &spec.cpu.pinning else {
        return Ok(());
    };
    if pinning.vcpus.is_empty() && pinning.emulator.is_none() {
        return Ok(());
    }
    w.create_element("cputune").write_inner_content(|w| {
        for (vcpu, cpus) in &pinning.vcpus {
            let vcpu = vcpu.to_string();
            let cpus = cpus.to_string();
            w.create_element("vcpupin")
                .with_attributes([("vcpu", vcpu.as_str()), ("cpuset", cpus.as_str())])
                .write_empty()?;
        }
        if let Some(emulator) = &pinning.emulator {
            let cpus = emulator.to_string();
            w.create_element("emulatorpin")
                .with_attribute(("cpuset", cpus.as_str()))
                .write_empty()?;
        }
        Ok::<(), io::Error>(())
    })?;
    Ok(())
}

fn write_os<W: io::Write>(w: &mut Writer<W>, spec: &GuestSpec) -> io::Result<()> {
    let boot: &Boot = &spec.boot;
    let any_order = spec.disks.iter().any(|d| d.boot_order.is_some());
    w.create_element("os").write_inner_content(|w| {
        w.create_element("type")
            .with_attribute(("arch", "x86_64"))
            .write_text_content(BytesText::new("hvm"))?;
        match boot.from {
            BootFrom::Kernel => {
                text(w, "kernel", &boot.kernel)?;
                if let Some(initrd) = &boot.initrd {
                    text(w, "initrd", initrd)?;
                }
                if let Some(cmdline) = &boot.cmdline {
                    text(w, "cmdline", cmdline)?;
                }
            }
            // Per-device boot order and <os><boot> exclude each other in libvirt.
            BootFrom::Disk if !any_order => {
                w.create_element("boot")
                    .with_attribute(("dev", "hd"))
                    .write_empty()?;
            }
            BootFrom::Disk => {}
        }
        Ok::<(), io::Error>(())
    })?;
    Ok(())
}

fn write_cpu<W: io::Write>(w: &mut Writer<W>, spec: &GuestSpec) -> io::Result<()> {
    match spec.cpu.mode {
        CpuMode::HostPassthrough => {
            w.create_element("cpu")
                .with_attribute(("mode", "host-passthrough"))
                .write_empty()?;
        }
        CpuMode::HostModel => {
            w.create_element("cpu")
                .with_attribute(("mode", "host-model"))
                .write_empty()?;
        }
        CpuMode::Custom => {
            let model = spec.cpu.model.as_deref().unwrap_or_default();
            w.create_element("cpu")
                .with_attributes([("mode", "custom"), ("match", "exact")])
                .write_inner_content(|w| {
                    w.create_element("model")
                        .with_attribute(("fallback", "forbid"))
                        .write_text_content(BytesText::new(model))?;
                    Ok::<(), io::Error>(())
                })?;
        }
    }
    Ok(())
}

/// `vda`, `vdb`... for virtio; `sda`... for SATA and SCSI, numbered per prefix.
fn target_dev(bus: DiskBus, index: usize) -> String {
    let prefix = match bus {
        DiskBus::Virtio => "vd",
        DiskBus::Sata | DiskBus::Scsi => "sd",
    };
    let mut suffix = String::new();
    let mut n = index;
    loop {
        suffix.insert(0, char::from(b'a' + (n % 26) as u8));
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("{prefix}{suffix}")
}

fn write_devices<W: io::Write>(
    w: &mut Writer<W>,
    spec: &GuestSpec,
    console: &ConsoleLog,
) -> io::Result<()> {
    let (mut vd, mut sd) = (0, 0);
    for disk in &spec.disks {
        let dev = match disk.bus {
            DiskBus::Virtio => {
                vd += 1;
                target_dev(disk.bus, vd - 1)
            }
            DiskBus::Sata | DiskBus::Scsi => {
                sd += 1;
                target_dev(disk.bus, sd - 1)
            }
        };
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let cache = match disk.cache {
            DiskCache::None => "none",
            DiskCache::Writethrough => "writethrough",
            DiskCache::Writeback => "writeback",
            DiskCache::Directsync => "directsync",
            DiskCache::Unsafe => "unsafe",
        };
        let bus = match disk.bus {
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "sata",
            DiskBus::Scsi => "scsi",
        };
        w.create_element("disk")
            .with_attributes([("type", "file"), ("device", "disk")])
            .write_inner_content(|w| {
                w.create_element("driver")
                    .with_attributes([("name", "qemu"), ("type", format), ("cache", cache)])
                    .write_empty()?;
                w.create_element("source")
                    .with_attribute(("file", disk.source.as_str()))
                    .write_empty()?;
                w.create_element("target")
                    .with_attributes([("dev", dev.as_str()), ("bus", bus)])
                    .write_empty()?;
                if disk.read_only {
                    w.create_element("readonly").write_empty()?;
                }
                if let Some(order) = disk.boot_order {
                    let order = order.to_string();
                    w.create_element("boot")
                        .with_attribute(("order", order.as_str()))
                        .write_empty()?;
                }
                Ok::<(), io::Error>(())
            })?;
    }
    if spec.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
        w.create_element("controller")
            .with_attributes([("type", "scsi"), ("model", "virtio-scsi")])
            .write_empty()?;
    }
    for nic in &spec.nics {
        let (kind, source_attr, source) = match (&nic.bridge, &nic.network) {
            (Some(bridge), _) => ("bridge", "bridge", bridge.as_str()),
            (None, Some(network)) => ("network", "network", network.as_str()),
            (None, None) => continue,
        };
        let model = match nic.model {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
        };
        w.create_element("interface")
            .with_attribute(("type", kind))
            .write_inner_content(|w| {
                if let Some(mac) = &nic.mac {
                    w.create_element("mac")
                        .with_attribute(("address", mac.to_ascii_lowercase().as_str()))
                        .write_empty()?;
                }
                w.create_element("source")
                    .with_attribute((source_attr, source))
                    .write_empty()?;
                w.create_element("model")
                    .with_attribute(("type", model))
                    .write_empty()?;
                Ok::<(), io::Error>(())
            })?;
    }
    w.create_element("serial")
        .with_attribute(("type", "pty"))
        .write_inner_content(|w| {
            w.create_element("log")
                .with_attributes([("file", console.0.as_str()), ("append", "on")])
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("port", "0"))
                .write_empty()?;
            Ok::<(), io::Error>(())
        })?;
    w.create_element("console")
        .with_attribute(("type", "pty"))
        .write_empty()?;
    // No balloon: berth sizes memory from the manifest, not from a guest driver.
    w.create_element("memballoon")
        .with_attribute(("model", "none"))
        .write_empty()?;
    Ok(())
}

fn numa_mode(mode: NumaMode) -> &'static str {
    match mode {
        NumaMode::Strict => "strict",
        NumaMode::Preferred => "preferred",
        NumaMode::Interleave => "interleave",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Guest {
        let text = "apiVersion: berth.dev/v1
kind: Guest
metadata: {name: web-1}
spec:
  host: virt01
  boot: {kernel: /srv/vmlinuz, initrd: /srv/initrd.gz, cmdline: 'console=ttyS0 a<b&c'}
  cpu: {vcpus: 1, maxVcpus: 2, pinning: {vcpus: {0: '1'}, emulator: '0-1'}}
  memory: {size: 256MiB, tune: {hardLimit: 512MiB}, numa: {mode: strict, nodeset: '0'}}
  io: {weight: 500}
  disks:
    - {source: /srv/web-1.raw, shared: true}
    - {source: /srv/data.qcow2, bus: scsi, format: qcow2, readOnly: true}
  nics:
    - {network: default, mac: '52:54:00:AA:00:01'}
";
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn the_domain_carries_every_setting_escaped() {
        let xml = domain_xml(
            &guest(),
            DomainType::Qemu,
            "abc123",
            &ConsoleLog("/tmp/c.log".into()),
        )
        .unwrap();
        for want in [
            "<domain type=\"qemu\">",
            "<name>web-1</name>",
            "<berth:revision>abc123</berth:revision>",
            "<memory unit=\"KiB\">262144</memory>",
            "<hard_limit unit=\"KiB\">524288</hard_limit>",
            "<weight>500</weight>",
            "<vcpu placement=\"static\" current=\"1\">2</vcpu>",
            "<vcpupin vcpu=\"0\" cpuset=\"1\"/>",
            "<emulatorpin cpuset=\"0-1\"/>",
            "<memory mode=\"strict\" nodeset=\"0\"/>",
            "<cmdline>console=ttyS0 a&lt;b&amp;c</cmdline>",
            "<cpu mode=\"host-model\"/>",
            "<target dev=\"vda\" bus=\"virtio\"/>",
            "<driver name=\"qemu\" type=\"qcow2\" cache=\"none\"/>",
            "<target dev=\"sda\" bus=\"scsi\"/>",
            "<controller type=\"scsi\" model=\"virtio-scsi\"/>",
            "<mac address=\"52:54:00:aa:00:01\"/>",
            "<source network=\"default\"/>",
            "<log file=\"/tmp/c.log\" append=\"on\"/>",
            "<nosharepages/>",
        ] {
            assert!(xml.contains(want), "{want} missing from\n{xml}");
        }
        let meta = xml
            .split("<metadata>")
            .nth(1)
            .and_then(|m| m.split("</metadata>").next())
            .unwrap();
        let owner = parse_ownership(meta).unwrap();
        assert_eq!(owner.revision, "abc123");
        assert_eq!(owner.fingerprint, fingerprint(&guest().spec));
    }

    #[test]
    fn the_definition_reads_back_from_the_xml_berth_writes() {
        let xml = domain_xml(&guest(), DomainType::Qemu, "r", &ConsoleLog("/c".into())).unwrap();
        let def = parse_definition(&xml).unwrap();
        assert_eq!(def.kernel.as_deref(), Some("/srv/vmlinuz"));
        assert_eq!(def.initrd.as_deref(), Some("/srv/initrd.gz"));
        assert_eq!(def.cmdline.as_deref(), Some("console=ttyS0 a<b&c"));
        assert_eq!(def.cpu_mode.as_deref(), Some("host-model"));
        assert_eq!(def.hugepage_kib, None);
        assert!(def.nosharepages && !def.locked);
        assert_eq!(def.blkio_weight, Some(500));
        let huge = "<domain><memoryBacking><hugepages><page size='2' unit='MiB'/></hugepages><locked/></memoryBacking>\
                    <cpu mode='custom'><model fallback='forbid'>kvm64</model></cpu></domain>";
        let def = parse_definition(huge).unwrap();
        assert_eq!(def.hugepage_kib, Some(2048));
        assert!(def.locked && !def.nosharepages);
        assert_eq!(def.cpu_model.as_deref(), Some("kvm64"));
    }

    #[test]
    fn target_names_go_past_z() {
        assert_eq!(target_dev(DiskBus::Virtio, 0), "vda");
        assert_eq!(target_dev(DiskBus::Virtio, 25), "vdz");
        assert_eq!(target_dev(DiskBus::Virtio, 26), "vdaa");
        assert_eq!(target_dev(DiskBus::Sata, 27), "sdab");
    }

    #[test]
    fn foreign_or_empty_metadata_is_not_berths() {
        assert_eq!(parse_ownership("<other xmlns='x'><a>1</a></other>"), None);
        assert_eq!(parse_ownership(""), None);
    }
}
