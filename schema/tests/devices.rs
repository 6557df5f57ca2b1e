//! Disks, network cards, boot from disk and the host's driver: what each driver can
//! honour is checked before anything is applied, naming the field, its line and the
//! host's driver.

use berth_schema::{load_files, BootFrom, DiskBus, DiskCache, DomainType, HostDriver, Invalid};

const LIBVIRT_HOST: &str = "apiVersion: berth.dev/v1
kind: Host
metadata: {name: virt01}
spec:
  address: 127.0.0.1:7410
  cpus: 0-1
  memory: 4GiB
  driver: libvirt
  libvirt: {uri: 'qemu:///system', domainType: qemu}
";

const VMM_HOST: &str = "apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm01}
spec: {address: 127.0.0.1:7411, cpus: 0-1, memory: 4GiB}
";

fn guest(host: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth.dev/v1
kind: Guest
metadata: {{name: web-1}}
spec:
  host: {host}
  boot: {{kernel: /var/lib/berth/vmlinuz, initrd: /var/lib/berth/initrd.gz}}
  cpu: {{vcpus: 1}}
  memory: {{size: 256MiB}}
{extra}"
    )
}

fn load(guest: &str) -> Result<berth_schema::Validated, Invalid> {
    load_files([
        ("hosts.yaml", format!("{LIBVIRT_HOST}---\n{VMM_HOST}")),
        ("guest.yaml", guest.to_owned()),
    ])
}

/// The one error of a revision that must fail, as `file:line: field: message`.
fn only_error(guest: &str) -> String {
    let e = load(guest).expect_err("must be invalid");
    assert_eq!(e.error_count(), 1, "{e}");
    let d = &e.diagnostics[0];
    format!(
        "{}:{}: {}: {}",
        d.file,
        d.line.unwrap_or(0),
        d.path,
        d.message
    )
}

#[test]
fn a_libvirt_guest_with_disks_and_nics_loads() {
    let text = guest(
        "virt01",
        "  disks:
    - {source: /srv/web-1.raw, shared: true}
    - {source: /srv/data.qcow2, bus: scsi, format: qcow2, cache: writeback, readOnly: true}
  nics:
    - {network: default, mac: '52:54:00:12:34:56'}
    - {bridge: br0, model: e1000}
",
    );
    let v = load(&text).unwrap();
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    let g = &v.manifests.guests["web-1"];
    assert_eq!(g.spec.disks.len(), 2);
    assert_eq!(g.spec.disks[0].bus, DiskBus::Virtio);
    assert_eq!(g.spec.disks[0].cache, DiskCache::None);
    assert!(g.spec.disks[0].shared);
    assert_eq!(g.spec.disks[1].bus, DiskBus::Scsi);
    assert_eq!(g.spec.nics[1].bridge.as_deref(), Some("br0"));
    let h = &v.manifests.hosts["virt01"];
    assert_eq!(h.spec.driver, HostDriver::Libvirt);
    assert_eq!(h.spec.libvirt_or_default().domain_type, DomainType::Qemu);
    assert_eq!(
        v.manifests.hosts["kvm01"].spec.libvirt_or_default().uri,
        "qemu:///system"
    );
}

#[test]
fn disks_on_a_berth_vmm_host_name_the_field_and_the_driver() {
    let text = guest("kvm01", "  disks:\n    - {source: /srv/web-1.raw}\n");
    assert_eq!(
        only_error(&text),
        "guest.yaml:10: spec.disks: host kvm01 runs driver berth-vmm, which cannot attach disks; \
         place the guest on a host with driver: libvirt"
    );
    let text = guest("kvm01", "  nics:\n    - {network: default}\n");
    assert!(
        only_error(&text).contains("guest.yaml:10: spec.nics: host kvm01 runs driver berth-vmm")
    );
}

#[test]
fn the_heartbeat_payload_on_a_libvirt_host_is_an_error() {
    let text = "apiVersion: berth.dev/v1
kind: Guest
metadata: {name: web-1}
spec:
  host: virt01
  cpu: {vcpus: 1}
  memory: {size: 64MiB}
";
    let e = only_error(text);
    assert!(
        e.starts_with("guest.yaml:4: spec.boot.kernel: builtin:heartbeat runs only under berth-vmm, and host virt01 runs driver libvirt"),
        "{e}"
    );
}

#[test]
fn host_passthrough_on_a_tcg_host_is_an_error() {
    let text =
        guest("virt01", "").replace("cpu: {vcpus: 1}", "cpu: {vcpus: 1, mode: host-passthrough}");
    let e = only_error(&text);
    assert!(e.starts_with("guest.yaml:7: spec.cpu.mode: host-passthrough needs KVM, and host virt01 runs driver libvirt with domainType qemu"), "{e}");
}

#[test]
fn boot_from_disk() {
    let text = guest(
        "virt01",
        "  disks:\n    - {source: /srv/a.raw, bootOrder: 2}\n    - {source: /srv/b.raw, bootOrder: 1}\n",
    )
    .replace(
        "boot: {kernel: /var/lib/berth/vmlinuz, initrd: /var/lib/berth/initrd.gz}",
        "boot: {from: disk}",
    );
    let v = load(&text).unwrap();
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    assert_eq!(v.manifests.guests["web-1"].spec.boot.from, BootFrom::Disk);

    let no_disk = guest("virt01", "").replace(
        "boot: {kernel: /var/lib/berth/vmlinuz, initrd: /var/lib/berth/initrd.gz}",
        "boot: {from: disk}",
    );
    assert_eq!(
        only_error(&no_disk),
        "guest.yaml:6: spec.boot.from: disk, but the guest has no disks"
    );
    let on_vmm = text.replace("host: virt01", "host: kvm01");
    let e = load(&on_vmm).unwrap_err();
    assert!(
        e.to_string().contains(
            "spec.boot.from: host kvm01 runs driver berth-vmm, which cannot boot from a disk"
        ),
        "{e}"
    );
}

#[test]
fn every_bad_device_is_reported_at_once_with_its_line() {
    let text = guest(
        "virt01",
        "  disks:
    - {source: relative.raw}
    - {source: /srv/a.raw, bootOrder: 1}
    - {source: /srv/a.raw}
  nics:
    - {bridge: br0, network: default}
    - {}
    - {network: default, mac: '01:00:5e:00:00:01'}
",
    );
    let e = load(&text).unwrap_err();
    let got: Vec<String> = e
        .diagnostics
        .iter()
        .map(|d| format!("{}:{} {}", d.line.unwrap_or(0), d.path, d.severity))
        .collect();
    assert_eq!(
        got,
        [
            "10:spec.disks[0].source error",
            "11:spec.disks[1].bootOrder warning",
            "12:spec.disks[2].source error",
            "14:spec.nics[0] error",
            "15:spec.nics[1] error",
            "16:spec.nics[2].mac error",
        ],
        "{e}"
    );
}

#[test]
fn a_malformed_mac_is_a_structural_error() {
    let text = guest(
        "virt01",
        "  nics:\n    - {network: default, mac: 'zz:54:00:12:34:56'}\n",
    );
    let e = only_error(&text);
    assert!(e.starts_with("guest.yaml:10: spec.nics[0].mac: \"zz:54:00:12:34:56\" does not have the expected form"), "{e}");
}

#[test]
fn a_mac_is_unique_across_guests_and_libvirt_settings_need_the_libvirt_driver() {
    let a = guest(
        "virt01",
        "  nics:\n    - {network: default, mac: '52:54:00:00:00:01'}\n",
    );
    let b = a.replace("name: web-1", "name: web-2");
    let e = load_files([
        ("hosts.yaml", LIBVIRT_HOST.to_owned()),
        ("a.yaml", a),
        ("b.yaml", b),
    ])
    .unwrap_err();
    assert_eq!(e.error_count(), 1, "{e}");
    assert!(
        e.diagnostics[0]
            .message
            .contains("is also the MAC of guest web-1 spec.nics[0]"),
        "{e}"
    );

    let host = VMM_HOST.replace(
        "memory: 4GiB}",
        "memory: 4GiB, libvirt: {uri: 'qemu:///system'}}",
    );
    let e = load_files([("hosts.yaml", host)]).unwrap_err();
    assert!(
        e.to_string().contains(
            "spec.libvirt: applies only to driver libvirt, and this host runs driver berth-vmm"
        ),
        "{e}"
    );
}
