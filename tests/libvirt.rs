//! The libvirt side of berth-hypervisor against the real libvirtd (`qemu:///system`) and
//! a real Linux guest: Debian's kernel from /boot with a busybox initrd made here, in a
//! TCG domain (`type='qemu'`; KVM on these machines runs guest code about 1000 times
//! slower than hardware). The guest's init writes a counter to the serial console and to
//! its virtio disk five times a second; the counter carries the boot id, so a restart
//! shows.
//!
//! Needs root, libvirtd and virtlogd running, qemu-system-x86, a kernel in /boot,
//! busybox-static and cpio (`.ci/run` installs and starts them). A test that cannot run
//! fails, naming what is missing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_hypervisor::host::cgroup::Knob;
use berth_hypervisor::host::hugepages::{HugePagePool, PoolReservation};
use berth_hypervisor::libvirt::migrate::{Destination, Outcome};
use berth_hypervisor::libvirt::{ConsoleLog, Libvirt, LibvirtError, RunState, Shutdown};
use berth_schema::{Bytes, CpuSet, DomainType, Guest, MemTune, PageSize};

const URI: &str = "qemu:///system";

/// Debian builds virtio (and the ACPI power button) as modules: these go into the
/// initrd, loaded in this order.
const MODULES: [&str; 7] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/acpi/button.ko",
];

/// The guest's init: counter lines on ttyS0 and in the first sector of /dev/vda, and
/// what the disk held at boot. It ignores ACPI power-off (a graceful shutdown ends in a
/// destroy at the timeout) unless its command line has `berth.poweroff`: then it powers
/// off at the ACPI power button.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk button; do
  insmod /lib/modules/$m.ko
done
button=/sys/firmware/acpi/interrupts/ff_pwr_btn
grep -q berth.poweroff /proc/cmdline || button=/nonexistent
while [ ! -b /dev/vda ]; do usleep 10000; done
boot=$(cat /proc/sys/kernel/random/boot_id)
prev=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' | head -n1)
echo "berth-init boot=$boot cpus=$(nproc) disk-before=[$prev]" > /dev/ttyS0
n=0
while true; do
  n=$((n+1))
  echo "berth-counter $n boot=$boot" > /dev/ttyS0
  printf 'berth-counter %d boot=%s\n' $n $boot | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
  if [ -r $button ] && read presses rest < $button && [ "$presses" -gt 0 ]; then poweroff -f; fi
  usleep 200000
done
"#;

/// A kernel, an initrd and a disk in a directory QEMU (user libvirt-qemu) can read;
/// removed on drop.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new() -> Images {
        let dir = tempfile::Builder::new()
            .prefix("berth-libvirt-")
            .tempdir()
            .expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let kernel = fs::read_dir("/boot")
            .expect("/boot: install linux-image-amd64")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .max()
            .expect("no /boot/vmlinuz-*: install linux-image-amd64");
        fs::copy(&kernel, dir.path().join("vmlinuz")).unwrap();
        let root = dir.path().join("root");
        for sub in ["bin", "dev", "proc", "sys", "lib/modules"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let version = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap();
        let mut entries = vec![
            ".",
            "bin",
            "bin/busybox",
            "dev",
            "proc",
            "sys",
            "init",
            "lib",
            "lib/modules",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        for module in MODULES {
            let from = Path::new("/lib/modules")
                .join(version)
                .join("kernel")
                .join(module);
            let file = Path::new(module).file_name().unwrap().to_str().unwrap();
            fs::copy(&from, root.join("lib/modules").join(file)).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (the kernel's modules are in linux-image-amd64)",
                    from.display()
                )
            });
            entries.push(format!("lib/modules/{file}"));
        }
        let busybox = Path::new("/bin/busybox");
        assert!(
            Command::new("dpkg")
                .args(["-s", "busybox-static"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "busybox-static is not installed (the initrd needs a static busybox)"
        );
        fs::copy(busybox, root.join("bin/busybox")).unwrap();
        fs::write(root.join("init"), INIT).unwrap();
        fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        let initrd = fs::File::create(dir.path().join("initrd.cpio")).unwrap();
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(initrd)
            .spawn()
            .expect("run cpio (apt-get install cpio)");
        {
            use std::io::Write;
            let mut stdin = cpio.stdin.take().unwrap();
            for entry in &entries {
                writeln!(stdin, "{entry}").unwrap();
            }
        }
        assert!(cpio.wait().unwrap().success(), "cpio failed");
        for p in ["vmlinuz", "initrd.cpio"] {
            fs::set_permissions(dir.path().join(p), fs::Permissions::from_mode(0o644)).unwrap();
        }
        let disk = fs::File::create(dir.path().join("disk.raw")).unwrap();
        disk.set_len(16 << 20).unwrap();
        Images { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn console(&self) -> ConsoleLog {
        ConsoleLog(self.path("console.log"))
    }

    /// The Guest manifest of the test guest on a TCG libvirt host, as text, with `extra`
    /// lines appended to its spec.
    fn guest_text(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: berth.dev/v1
kind: Guest
metadata: {{name: {name}}}
spec:
  host: virt01
  boot: {{kernel: {kernel}, initrd: {initrd}, cmdline: 'console=ttyS0 quiet panic=-1'}}
  cpu: {{vcpus: 1, maxVcpus: 2}}
  memory: {{size: 256MiB}}
  disks:
    - {{source: {disk}, shared: true}}
{extra}",
            kernel = self.path("vmlinuz"),
            initrd = self.path("initrd.cpio"),
            disk = self.path("disk.raw"),
        )
    }

    /// [`Images::guest_text`], parsed.
    fn guest(&self, name: &str, extra: &str) -> Guest {
        let text = self.guest_text(name, extra);
        serde_yaml::from_str(&text).expect("test manifest")
    }
}

/// Connects, or fails naming what to start.
fn connect() -> Libvirt {
    Libvirt::open(URI).unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}; start virtlogd and libvirtd (.ci/run does)",
            std::error::Error::source(&e)
        )
    })
}

/// Destroys and undefines the named domain on drop, whatever the test did.
struct Domain<'a> {
    libvirt: &'a Libvirt,
    name: String,
}

/// A test guest's domain and console log, both removed at the end of the test (the
/// log's stale copy from an earlier run is removed at once).
struct GuestCleanup<'a> {
    _domain: Domain<'a>,
    console: PathBuf,
}

impl<'a> GuestCleanup<'a> {
    fn new(libvirt: &'a Libvirt, name: &str, console: &ConsoleLog) -> GuestCleanup<'a> {
        let _ = fs::remove_file(&console.0);
        GuestCleanup {
            _domain: Domain {
                libvirt,
                name: name.to_owned(),
            },
            console: PathBuf::from(&console.0),
        }
    }
}

impl Drop for GuestCleanup<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.console);
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        match self.libvirt.remove(&self.name) {
            Ok(()) | Err(LibvirtError::NoDomain(_)) => {}
            // Not berth's (a test defined it by hand): virsh removes it.
            Err(LibvirtError::Unmanaged(_)) => {
                for args in [["destroy", &self.name], ["undefine", &self.name]] {
                    let _ = Command::new("virsh")
                        .args(["-c", URI])
                        .args(args)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
            Err(e) => eprintln!("cleanup of {}: {e}", self.name),
        }
    }
}

/// A unique domain name per test process.
fn name(test: &str) -> String {
    format!("berth-t{}-{test}", std::process::id())
}

/// Counter lines seen so far: (counter, boot id). Whole lines only: the last one may
/// still be being written (a boot id cut short is not another boot).
fn counters(console: &ConsoleLog) -> Vec<(u64, String)> {
    let text = fs::read_to_string(&console.0).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("berth-counter ")?;
            let (n, boot) = rest.split_once(" boot=")?;
            Some((n.parse().ok()?, boot.to_owned()))
        })
        .collect()
}

/// Waits until the console shows counter `n` or more; returns the latest.
fn wait_counter(console: &ConsoleLog, at_least: u64, timeout: Duration) -> (u64, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(last) = counters(console).last() {
            if last.0 >= at_least {
                return last.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "counter {at_least} not seen within {timeout:?}; console:\n{}",
            fs::read_to_string(&console.0).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The counter never went back and the boot id never changed: no restart.
fn assert_no_reset(console: &ConsoleLog) {
    let seen = counters(console);
    assert!(!seen.is_empty());
    let boots: std::collections::BTreeSet<&str> = seen.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(boots.len(), 1, "the guest rebooted: {boots:?}");
    for pair in seen.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "counter jumped: {pair:?}");
    }
}

/// QEMU's pid for a running domain (libvirt's pid file).
fn qemu_pid(name: &str) -> u32 {
    fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .expect("QEMU pid file")
        .trim()
        .parse()
        .unwrap()
}

/// The affinity the kernel holds for QEMU's thread of vCPU `vcpu` ("CPU n/TCG").
fn kernel_vcpu_affinity(pid: u32, vcpu: u32) -> CpuSet {
    let comm = format!("CPU {vcpu}/TCG");
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        if fs::read_to_string(task.join("comm"))
            .unwrap_or_default()
            .trim()
            == comm
        {
            let status = fs::read_to_string(task.join("status")).unwrap();
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap();
            return list.trim().parse().unwrap();
        }
    }
    panic!("no thread {comm} in QEMU {pid}");
}

/// The memory cgroup's limit the kernel holds for QEMU (cgroup v1 or v2).
fn kernel_memory_limit(pid: u32) -> Option<u64> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let file = PathBuf::from(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            return fs::read_to_string(file).ok()?.trim().parse().ok();
        }
        if controllers.is_empty() {
            let file = PathBuf::from(format!("/sys/fs/cgroup{path}/memory.max"));
            if let Ok(text) = fs::read_to_string(file) {
                return text.trim().parse().ok();
            }
        }
    }
    None
}

#[test]
fn a_tcg_linux_guest_boots_and_takes_live_changes_without_a_restart() {
    let libvirt = connect();
    let images = Images::new();
    let name = name("live");
    let mut guest = images.guest(&name, "");
    guest.spec.memory.tune = Some(MemTune {
        hard_limit: Some(Bytes::mib(512)),
        ..MemTune::default()
    });
    let console = images.console();
    let _domain = Domain {
        libvirt: &libvirt,
        name: name.clone(),
    };

    let started = Instant::now();
    let observed = libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &console)
        .expect("create");
    wait_counter(&console, 1, Duration::from_secs(60));
    eprintln!(
        "boot: define+start to the first counter line in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(observed.state, RunState::Running);
    assert_eq!((observed.vcpus, observed.max_vcpus), (1, 2));
    assert_eq!(observed.memory, Bytes::mib(256));
    assert_eq!(observed.memtune.hard_limit, Some(Bytes::mib(512)));
    let owner = observed.owner.expect("berth owns the domain it created");
    assert_eq!(owner.revision, "rev-1");
    let listed = libvirt.list().unwrap();
    assert!(listed.iter().any(|d| d.name == name && d.owner.is_some()));

    let pid = qemu_pid(&name);
    let (before, _) = wait_counter(&console, 3, Duration::from_secs(30));

    // vcpupin, live and config, read back from libvirt and from the kernel.
    let one: CpuSet = "1".parse().unwrap();
    assert_eq!(libvirt.pin_vcpu(&name, 0, &one).unwrap(), one);
    assert_eq!(kernel_vcpu_affinity(pid, 0), one);
    let zero: CpuSet = "0".parse().unwrap();
    assert_eq!(libvirt.pin_emulator(&name, &zero).unwrap(), zero);

    // memtune hard limit, live: the cgroup holds it.
    let tune = MemTune {
        hard_limit: Some(Bytes::mib(1024)),
        ..MemTune::default()
    };
    let in_force = libvirt.set_memtune(&name, &tune).unwrap();
    assert_eq!(in_force.hard_limit, Some(Bytes::mib(1024)));
    assert_eq!(kernel_memory_limit(pid), Some(1024 << 20));

    // vCPU hot-add: QEMU gets a second vCPU thread.
    assert_eq!(libvirt.set_vcpus(&name, 2).unwrap(), 2);
    kernel_vcpu_affinity(pid, 1);

    // A block I/O weight the host cannot enforce is reported so, never as done.
    match libvirt.set_io_weight(&name, 500).unwrap() {
        Knob::Enforced(w) => {
            assert_eq!(w, 500);
            assert_eq!(
                libvirt.observe(&name).unwrap().unwrap().io_weight,
                Knob::Enforced(500)
            );
        }
        Knob::NotEnforced(reason) => {
            assert!(!reason.is_empty());
            assert!(matches!(
                libvirt.observe(&name).unwrap().unwrap().io_weight,
                Knob::NotEnforced(_)
            ));
        }
    }

    // Drift by hand with virsh: observe reads it back from libvirt.
    let status = Command::new("virsh")
        .args(["-c", URI, "vcpupin", &name, "0", "0", "--live"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let drifted = libvirt.observe(&name).unwrap().unwrap();
    assert_eq!(drifted.vcpu_pins[0], zero, "hand-made pinning is visible");
    assert_eq!(libvirt.pin_vcpu(&name, 0, &one).unwrap(), one);
    assert_eq!(kernel_vcpu_affinity(pid, 0), one);

    // Pause: the counter stops; resume: it carries on.
    libvirt.suspend(&name).unwrap();
    assert_eq!(
        libvirt.observe(&name).unwrap().unwrap().state,
        RunState::Paused
    );
    let paused_at = counters(&console).last().unwrap().0;
    std::thread::sleep(Duration::from_millis(1000));
    assert!(counters(&console).last().unwrap().0 <= paused_at + 1);
    libvirt.resume(&name).unwrap();
    wait_counter(&console, paused_at + 3, Duration::from_secs(30));

    let after = libvirt.observe(&name).unwrap().unwrap();
    assert_eq!(after.vcpus, 2);
    assert_eq!(after.vcpu_pins[0], one);
    assert_eq!(after.emulator_pin, zero);
    assert_eq!(after.memtune.hard_limit, Some(Bytes::mib(1024)));
    assert!(counters(&console).last().unwrap().0 > before);
    assert_no_reset(&console);

    // The guest's init ignores ACPI power-off: destroyed at the timeout.
    let stop = libvirt.shutdown(&name, Duration::from_secs(2)).unwrap();
    assert_eq!(stop, Shutdown::Destroyed);
    let stopped = libvirt.observe(&name).unwrap().unwrap();
    assert_eq!(stopped.state, RunState::Stopped);
    // The live changes went to the persistent config too.
    assert_eq!(stopped.vcpu_pins[0], one);
    assert_eq!(stopped.memtune.hard_limit, Some(Bytes::mib(1024)));
}

#[test]
fn what_the_guest_wrote_to_its_disk_is_there_after_a_restart() {
    let libvirt = connect();
    let images = Images::new();
    let name = name("disk");
    let guest = images.guest(&name, "");
    let console = images.console();
    let _domain = Domain {
        libvirt: &libvirt,
        name: name.clone(),
    };
    libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &console)
        .unwrap();
    wait_counter(&console, 5, Duration::from_secs(60));
    assert_eq!(
        libvirt.shutdown(&name, Duration::from_secs(1)).unwrap(),
        Shutdown::Destroyed
    );
    let (last, boot) = counters(&console).last().cloned().unwrap();
    libvirt.start(&name).unwrap();
    // The line is complete once its closing bracket is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        let text = fs::read_to_string(&console.0).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .filter(|l| l.starts_with("berth-init") && l.trim_end().ends_with(']'))
            .nth(1)
        {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "second boot not seen:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The destroy may land between the console line and the disk write of the last
    // counter: the disk holds the last or the one before.
    let on_disk = [last, last.saturating_sub(1)]
        .iter()
        .any(|n| line.contains(&format!("disk-before=[berth-counter {n} boot={boot}]")));
    assert!(on_disk, "disk lost the counter {last}: {line}");
}

#[test]
fn bad_input_names_the_guest_and_field_and_creates_nothing() {
    let libvirt = connect();
    let images = Images::new();
    let console = images.console();

    let name_disk = name("nodisk");
    let mut guest = images.guest(&name_disk, "");
    guest.spec.disks[0].source = images.path("missing.raw");
    let err = libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &console)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "guest {name_disk}: spec.disks[0].source: {} does not exist on this host (berth does not create disk images)",
            images.path("missing.raw")
        )
    );
    assert!(libvirt.observe(&name_disk).unwrap().is_none());

    let name_bridge = name("nobridge");
    let guest = images.guest(&name_bridge, "  nics:\n    - {bridge: berthnobr0}\n");
    let err = libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &console)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "guest {name_bridge}: spec.nics[0].bridge: berthnobr0 is not a bridge on this host"
        )
    );
    assert!(libvirt.observe(&name_bridge).unwrap().is_none());

    let err = Libvirt::open("qemu+unix:///system?socket=/nonexistent/libvirt-sock").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent"),
        "{err}"
    );
}

#[test]
fn a_domain_defined_by_hand_is_listed_as_unmanaged_and_left_alone() {
    let libvirt = connect();
    let images = Images::new();
    let name = name("byhand");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type><kernel>{}</kernel></os></domain>",
        images.path("vmlinuz")
    );
    let file = images.dir.path().join("byhand.xml");
    fs::write(&file, xml).unwrap();
    let status = Command::new("virsh")
        .args(["-c", URI, "define"])
        .arg(&file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = Command::new("virsh")
                .args(["-c", URI, "undefine", &self.0])
                .stdout(Stdio::null())
                .status();
        }
    }
    let _undefine = Undefine(name.clone());

    let listed = libvirt.list().unwrap();
    let found = listed.iter().find(|d| d.name == name).expect("listed");
    assert!(found.owner.is_none());
    assert_eq!(found.state, RunState::Stopped);

    let guest = images.guest(&name, "");
    let err = libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &images.console())
        .unwrap_err();
    assert!(matches!(err, LibvirtError::Unmanaged(_)), "{err}");
    assert!(matches!(
        libvirt.pin_vcpu(&name, 0, &"0".parse().unwrap()),
        Err(LibvirtError::Unmanaged(_))
    ));
    assert!(libvirt.observe(&name).unwrap().unwrap().owner.is_none());
}

/// The Host manifest of a TCG libvirt host whose libvirtd is at `uri`, with `extra`
/// keys in its `libvirt`. With a local URI berth owns this machine's host settings: the
/// manifest says the ones in force, so that no test changes them.
fn host_text(name: &str, address: &str, uri: &str, extra: &str) -> String {
    let thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap()
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']').map(str::to_owned))
        .unwrap();
    let ksm = fs::read_to_string("/sys/kernel/mm/ksm/run").unwrap().trim() == "1";
    let settings = if uri.contains("://") && !uri.contains(":///") {
        String::new()
    } else {
        format!("  transparentHugepages: {thp}\n  ksm: {{enabled: {ksm}}}\n")
    };
    format!(
        "apiVersion: berth.dev/v1
kind: Host
metadata: {{name: {name}}}
spec:
  address: {address}
  cpus: 0-1
  memory: 8GiB
{settings}  driver: libvirt
  libvirt: {{uri: '{uri}', domainType: qemu{extra}}}
"
    )
}

/// A manifest directory: Host virt01 (libvirt, TCG) and the test guest, with `extra`
/// lines appended to the guest's spec.
fn write_manifests(dir: &Path, images: &Images, name: &str, extra: &str) {
    let host = host_text("virt01", "127.0.0.1:7499", URI, "");
    let guest = images.guest_text(name, extra);
    fs::write(dir.join("hosts.yaml"), host).unwrap();
    fs::write(dir.join("guest.yaml"), guest).unwrap();
}

/// Runs `berth` with `args`; returns (exit code, stdout + stderr).
fn berth(args: &[&str]) -> (i32, String) {
    let out = Command::new(berth_tests::bin("berth"))
        .args(args)
        .output()
        .expect("run berth");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `berth get guests -o json` on virt01 (the system libvirtd): `name`'s row, and the
/// whole output for messages.
fn guest_row_on_virt01(name: &str) -> (serde_json::Value, String) {
    let (code, out) = berth(&[
        "get",
        "guests",
        "--libvirt-uri",
        URI,
        "--host",
        "virt01",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}");
    let json = &out[out.find('[').unwrap_or(0)..=out.rfind(']').unwrap_or(0)];
    let rows: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"));
    let row = rows
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no row for {name}: {out}"));
    (row, out)
}

#[test]
fn berth_apply_boots_a_libvirt_guest_retunes_it_live_and_undoes_drift() {
    let libvirt = connect();
    let images = Images::new();
    let name = name("apply");
    let manifests = images.dir.path().join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    let state = images.dir.path().join("state");
    let console = ConsoleLog::default_for(&name);
    let _cleanup = GuestCleanup::new(&libvirt, &name, &console);
    let dir = manifests.to_str().unwrap();
    let state_dir = state.to_str().unwrap();
    let apply = [
        "apply",
        dir,
        "--yes",
        "--host",
        "virt01",
        "--state-dir",
        state_dir,
    ];
    let plan = ["plan", dir, "--host", "virt01", "--detailed-exitcode"];

    write_manifests(&manifests, &images, &name, "");
    let (code, out) = berth(&apply);
    assert_eq!(code, 0, "{out}");
    wait_counter(&console, 3, Duration::from_secs(60));
    let (code, out) = berth(&plan);
    assert_eq!(code, 0, "right after apply, plan shows no changes:\n{out}");
    let pid = qemu_pid(&name);
    let all: CpuSet = "0-1".parse().unwrap();
    assert_eq!(kernel_vcpu_affinity(pid, 0), all);

    // Drift by hand: plan shows it, apply undoes it.
    let status = Command::new("virsh")
        .args(["-c", URI, "vcpupin", &name, "0", "0", "--live"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let (code, out) = berth(&plan);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("spec.cpu.pinning"), "{out}");
    let (code, out) = berth(&apply);
    assert_eq!(code, 0, "{out}");
    assert_eq!(kernel_vcpu_affinity(pid, 0), all);

    // A pinning and memtune commit, applied live.
    let pinned = "  cpu: {vcpus: 1, maxVcpus: 2, pinning: {vcpus: {0: '1'}}}\n";
    let text = fs::read_to_string(manifests.join("guest.yaml"))
        .unwrap()
        .replace("  cpu: {vcpus: 1, maxVcpus: 2}\n", pinned)
        .replace(
            "  memory: {size: 256MiB}\n",
            "  memory: {size: 256MiB, tune: {hardLimit: 1GiB}}\n",
        );
    fs::write(manifests.join("guest.yaml"), text).unwrap();
    let (code, out) = berth(&plan);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("live"), "{out}");
    let (code, out) = berth(&apply);
    assert_eq!(code, 0, "{out}");
    assert_eq!(kernel_vcpu_affinity(pid, 0), "1".parse().unwrap());
    assert_eq!(kernel_memory_limit(pid), Some(1 << 30));
    let (code, out) = berth(&plan);
    assert_eq!(code, 0, "{out}");
    assert_eq!(qemu_pid(&name), pid, "the same QEMU runs the guest");
    let (n, _) = counters(&console).last().cloned().unwrap();
    wait_counter(&console, n + 2, Duration::from_secs(30));
    assert_no_reset(&console);

    // Restart-class changes (blocked, or a restart, per the policy) are tested on
    // virt02 in berth_apply_moves_a_libvirt_guest_live_and_restarts_it_on_hugepages_as_planned.
}

#[test]
fn a_domain_defined_by_hand_is_imported_and_then_planned_without_changes() {
    let libvirt = connect();
    let images = Images::new();
    let name = name("import");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>\
         <vcpu placement='static' current='1'>2</vcpu>\
         <cputune><vcpupin vcpu='0' cpuset='1'/></cputune>\
         <os><type arch='x86_64'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>\
         <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>\
         <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
         <serial type='pty'><log file='{console}'/><target port='0'/></serial>\
         <memballoon model='none'/></devices></domain>",
        kernel = images.path("vmlinuz"),
        initrd = images.path("initrd.cpio"),
        disk = images.path("disk.raw"),
        console = images.path("console.log"),
    );
    let file = images.dir.path().join("byhand.xml");
    fs::write(&file, xml).unwrap();
    let virsh = |args: &[&str]| {
        let status = Command::new("virsh")
            .args(["-c", URI])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "virsh {args:?}");
    };
    virsh(&["define", file.to_str().unwrap()]);
    let _domain = Domain {
        libvirt: &libvirt,
        name: name.clone(),
    };
    virsh(&["start", &name]);
    // A hard limit in the XML at start makes libvirt raise QEMU's RLIMIT_MEMLOCK, which
    // this sandbox forbids; set live, it works.
    virsh(&[
        "memtune",
        &name,
        "--hard-limit",
        "1048576",
        "--live",
        "--config",
    ]);
    assert!(libvirt.observe(&name).unwrap().unwrap().owner.is_none());

    let out_dir = images.dir.path().join("imported");
    let out = out_dir.to_str().unwrap();
    let (code, text) = berth(&["import", &name, "--host", "virt01", "--out", out]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("imported {name} (adopted)")),
        "{text}"
    );
    let guest = fs::read_to_string(out_dir.join("guests").join(format!("{name}.yaml"))).unwrap();
    assert!(guest.contains("hardLimit: 1GiB"), "{guest}");
    assert!(libvirt.observe(&name).unwrap().unwrap().owner.is_some());

    let (code, text) = berth(&["plan", out, "--host", "virt01", "--detailed-exitcode"]);
    assert_eq!(code, 0, "an imported domain plans without changes:\n{text}");

    // A second import into the same directory overwrites nothing.
    let (code, text) = berth(&["import", &name, "--host", "virt01", "--out", out]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("never overwrites"), "{text}");
}

/// A second libvirt host on this machine: libvirtd and virtlogd in their own network
/// namespace (a veth pair to this one) and mount namespace (private /run/libvirt,
/// /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /etc/libvirt), with their
/// own host UUID, libvirtd listening on TCP at the namespace's address. On drop, its
/// domains are destroyed and undefined, the daemons stopped by pid, the namespace
/// removed.
struct PeerHost {
    netns: String,
    dir: tempfile::TempDir,
    address: String,
}

const PEER_SCRIPT: &str = r#"set -euo pipefail
NS=$1; DIR=$2; HOSTIP=$3; PEERIP=$4; UUID=$5
ip netns add $NS
ip link add ${NS}h type veth peer name ${NS}p
ip link set ${NS}p netns $NS
ip addr add $HOSTIP/30 dev ${NS}h
ip link set ${NS}h up
ip netns exec $NS ip addr add $PEERIP/30 dev ${NS}p
ip netns exec $NS ip link set ${NS}p up
ip netns exec $NS ip link set lo up
mkdir -p $DIR/run $DIR/lib/qemu $DIR/cache/qemu $DIR/log/qemu $DIR/etc $DIR/hugepages
# The configuration, not this host's domain definitions.
cp -a /etc/libvirt/. $DIR/etc/
find $DIR/etc/qemu -maxdepth 1 -name '*.xml' -delete
rm -rf $DIR/etc/qemu/autostart
# Guest memory on 2 MiB hugepages: a hugetlbfs of its own (mounted below).
echo "hugetlbfs_mount = \"$DIR/hugepages\"" >> $DIR/etc/qemu.conf
cat >> $DIR/etc/libvirtd.conf <<CONF
listen_tls = 0
listen_tcp = 1
listen_addr = "$PEERIP"
auth_tcp = "none"
host_uuid = "$UUID"
CONF
# nsenter, not ip netns exec: that mounts a new /sys, without the cgroup hierarchies.
nsenter --net=/run/netns/$NS unshare --mount --propagation private bash -c "
  set -e
  mount --bind $DIR/run /run/libvirt
  mount --bind $DIR/lib /var/lib/libvirt
  mount --bind $DIR/cache /var/cache/libvirt
  mount --bind $DIR/log /var/log/libvirt
  mount --bind $DIR/etc /etc/libvirt
  mount -t hugetlbfs -o pagesize=2M berth-hugepages $DIR/hugepages
  # A fresh libvirtd probes every QEMU binary at its first capabilities query (seconds
  # each here; this host's cache does not carry over, see PeerHost::start): the guests
  # are x86_64, so the i386 emulator is hidden from it.
  if [ -e /usr/bin/qemu-system-i386 ]; then mount --bind /dev/null /usr/bin/qemu-system-i386; fi
  virtlogd -d -p /run/libvirt/virtlogd.pid
  libvirtd -d --listen -p /run/libvirt/libvirtd.pid
"
"#;

impl PeerHost {
    fn start() -> PeerHost {
        // Tests of one binary run on threads of one process: each peer gets its own
        // namespace, addresses and host UUID.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = (std::process::id() + 97 * k) % 250 + 1;
        let netns = format!("bth{}x{k}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("berth-peer-")
            .tempdir()
            .unwrap();
        let (host_ip, peer_ip) = (format!("10.211.{n}.1"), format!("10.211.{n}.2"));
        let uuid = format!("5a0c2d1e-0000-4a4a-{k:04x}-{:012x}", std::process::id());
        let peer = PeerHost {
            netns: netns.clone(),
            address: peer_ip.clone(),
            dir,
        };
        let status = Command::new("bash")
            .args(["-c", PEER_SCRIPT, "peer"])
            .args([
                &netns,
                peer.dir.path().to_str().unwrap(),
                &host_ip,
                &peer_ip,
                &uuid,
            ])
            .status()
            .expect("run bash");
        assert!(status.success(), "starting the peer libvirtd failed");
        // The new libvirtd probes QEMU at its first capabilities query (about 4 s, more
        // under load; a copy of this host's cache is refused, "host cpuid changed": the
        // CPUID it records differs between this machine's cores), and a migration's
        // pre-checks make that query. Asked here, on a thread of its own, the probe runs
        // while the test boots its guest, not inside the migration it times.
        let uri = peer.uri();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(c) = Libvirt::open(&uri) {
                    let _ = c.host_uuid();
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        peer
    }

    fn uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.address)
    }

    fn connect(&self) -> Libvirt {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Libvirt::open(&self.uri()) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("peer libvirtd: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn daemon_pid(&self, name: &str) -> Option<i32> {
        fs::read_to_string(self.dir.path().join("run").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PeerHost {
    fn drop(&mut self) {
        if let Ok(peer) = Libvirt::open(&self.uri()) {
            // remove() touches berth's domains only: the peer has no others.
            for name in peer.domain_names().unwrap_or_default() {
                let _ = peer.remove(&name);
            }
        }
        // QEMUs libvirtd did not end (it was killed, or failed): by their pid files.
        for pid in peer_qemus(&self.dir.path().join("run/qemu")) {
            // SAFETY: kill(2) of a live QEMU named by the peer's own pid file.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for daemon in ["libvirtd", "virtlogd"] {
            if let Some(pid) = self.daemon_pid(daemon) {
                // SAFETY: kill(2) with a pid read from the daemon's own pid file.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Live QEMU processes named by pid files in `dir` (a peer's /run/libvirt/qemu).
fn peer_qemus(dir: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .filter(|pid: &i32| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
        .collect()
}

#[test]
fn a_live_migration_to_a_second_libvirt_host_keeps_the_counter_and_the_disk() {
    let libvirt = connect();
    let peer = PeerHost::start();
    let dest = peer.connect();
    let images = Images::new();
    let name = name("migrate");
    let guest = images.guest(&name, "");
    let console = images.console();
    let _domain = Domain {
        libvirt: &libvirt,
        name: name.clone(),
    };
    libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &console)
        .unwrap();
    let (before, boot) = wait_counter(&console, 3, Duration::from_secs(90));

    // A disk that is not shared is refused before anything moves.
    let mut local = guest.clone();
    local.spec.disks[0].shared = false;
    let to = Destination {
        uri: peer.uri(),
        migrate_uri: format!("tcp://{}", peer.address),
    };
    let err = libvirt.migrate(&local, &dest, &to, |_| {}).unwrap_err();
    assert!(err.to_string().contains("spec.disks[0].shared"), "{err}");

    let started = Instant::now();
    let mut samples = Vec::new();
    let outcome = libvirt
        .migrate(&guest, &dest, &to, |p| samples.push(p))
        .expect("migrate");
    eprintln!(
        "migration: {:.2} s, {} progress samples, last {:?}",
        started.elapsed().as_secs_f64(),
        samples.len(),
        samples.last()
    );
    assert_eq!(outcome, Outcome::Completed);
    assert!(
        libvirt.observe(&name).unwrap().is_none(),
        "undefined on the source"
    );
    let there = dest
        .observe(&name)
        .unwrap()
        .expect("defined on the destination");
    assert_eq!(there.state, RunState::Running);
    assert_eq!(there.owner.unwrap().revision, "rev-1");

    // The counter carries on, same boot, written now by the destination's QEMU.
    wait_counter(&console, before + 10, Duration::from_secs(60));
    assert_no_reset(&console);
    // What the guest writes to its disk (shared by both hosts) is its latest counter.
    let sector = fs::read(images.path("disk.raw")).unwrap();
    let line = String::from_utf8_lossy(&sector[..512])
        .trim_end_matches('\0')
        .to_owned();
    let n: u64 = line
        .strip_prefix("berth-counter ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("disk holds {line:?}"));
    assert!(n > before && line.contains(&boot), "{line}");
    dest.remove(&name).unwrap();
}

#[test]
fn a_migration_past_its_timeout_or_to_a_dying_destination_leaves_the_guest_on_the_source() {
    let libvirt = connect();
    let peer = PeerHost::start();
    let dest = peer.connect();
    let images = Images::new();
    let name = name("abort");
    // 1 MiB/s for 256 MiB: the copy cannot finish within 1 s per GiB.
    let guest = images.guest(
        &name,
        "  migration: {bandwidth: 1MiB/s, completionTimeoutPerGiB: 1s, onTimeout: abort}\n",
    );
    let console = images.console();
    let _domain = Domain {
        libvirt: &libvirt,
        name: name.clone(),
    };
    libvirt
        .create(&guest, DomainType::Qemu, "rev-1", &console)
        .unwrap();
    wait_counter(&console, 3, Duration::from_secs(90));
    let to = Destination {
        uri: peer.uri(),
        migrate_uri: format!("tcp://{}", peer.address),
    };

    let err = libvirt.migrate(&guest, &dest, &to, |_| {}).unwrap_err();
    assert!(err.to_string().contains("migrating failed"), "{err}");
    let here = libvirt.observe(&name).unwrap().expect("still defined here");
    assert_eq!(here.state, RunState::Running);
    assert!(dest.observe(&name).unwrap().is_none());
    let (n, _) = counters(&console).last().cloned().unwrap();
    wait_counter(&console, n + 3, Duration::from_secs(30));

    // The destination dies midway (its libvirtd and the incoming QEMU are killed).
    let mut slow = guest.clone();
    slow.spec.migration.completion_timeout_per_gib = berth_schema::Duration::from_secs(600);
    let run = peer.dir.path().join("run");
    let killer = std::thread::spawn(move || {
        let qemu = run.join("qemu");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The incoming QEMU: a live process whose command line has -incoming.
            let pid = peer_qemus(&qemu).into_iter().find(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"-incoming"))
            });
            if let Some(pid) = pid {
                std::thread::sleep(Duration::from_millis(1500));
                let libvirtd: i32 = fs::read_to_string(run.join("libvirtd.pid"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                for victim in [pid, libvirtd] {
                    // SAFETY: kill(2) of the peer's QEMU and libvirtd, read from their
                    // pid files.
                    unsafe { libc::kill(victim, libc::SIGKILL) };
                }
                return;
            }
            assert!(Instant::now() < deadline, "the incoming QEMU never started");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let err = libvirt.migrate(&slow, &dest, &to, |_| {}).unwrap_err();
    killer.join().unwrap();
    assert!(err.to_string().contains("migrating failed"), "{err}");
    let here = libvirt.observe(&name).unwrap().expect("still defined here");
    assert_eq!(here.state, RunState::Running);
    let (n, _) = counters(&console).last().cloned().unwrap();
    wait_counter(&console, n + 3, Duration::from_secs(30));
    assert_no_reset(&console);
}

/// `berth serve` for one libvirt host, on loopback over plain HTTP with a fleet secret;
/// stopped (SIGTERM, by its pid) on drop.
struct Serve {
    child: std::process::Child,
    addr: String,
}

impl Serve {
    fn start_at(host: &str, repo: &Path, dir: &Path, secret: &Path, addr: &str) -> Serve {
        let state = dir.join(format!("state-{host}"));
        let log = fs::File::create(dir.join(format!("serve-{host}.log"))).unwrap();
        let child = Command::new(berth_tests::bin("berth"))
            .args(["serve", "--host", host, "--insecure-plain-http"])
            .arg("--repo")
            .arg(repo)
            .arg("--state-dir")
            .arg(&state)
            .arg("--fleet-secret-file")
            .arg(secret)
            .arg("--webhook-secret-file")
            .arg(secret)
            .args(["--listen", addr, "--poll-interval", "1h"])
            .args(["--resync-interval", "2s", "--debounce", "10ms"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start berth serve");
        let serve = Serve {
            child,
            addr: addr.to_owned(),
        };
        berth_tests::wait_until(&format!("{host}'s API"), Duration::from_secs(20), || {
            serve.get("/healthz").is_some_and(|(c, _)| c == 200)
        });
        serve
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let stream = std::net::TcpStream::connect(&self.addr).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        berth_tests::http_exchange(stream, &self.addr, "GET", path, &[], "").ok()
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status").expect("/status answers");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The guest's entry in `/status`, if any.
    fn guest(&self, name: &str) -> Option<serde_json::Value> {
        self.status()["guests"]
            .as_array()?
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
    }

    fn metrics(&self) -> String {
        self.get("/metrics").expect("/metrics answers").1
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the berth serve this test started, by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

/// virt01 (this machine's libvirtd) and virt02 (`peer`'s, which virt01 reaches at its
/// remoteUri), each with its own `berth serve` over one git repository in `images`'
/// directory. The first commit holds the Host manifests and `files`.
fn two_serves(
    images: &Images,
    peer: &PeerHost,
    files: &[(&str, &str)],
    message: &str,
) -> (berth_tests::GitRepo, Serve, Serve) {
    let dir = images.dir.path();
    let secret = dir.join("fleet-secret");
    fs::write(&secret, "berth-libvirt-test-secret\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let repo = berth_tests::GitRepo::new(dir.join("repo"));
    let addrs: Vec<String> = (0..2)
        .map(|_| {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        })
        .collect();
    let hosts = format!(
        "{}---\n{}",
        host_text("virt01", &addrs[0], URI, ""),
        host_text(
            "virt02",
            &addrs[1],
            &peer.uri(),
            &format!(", remoteUri: '{}'", peer.uri())
        )
    );
    let mut all = vec![("hosts.yaml", hosts.as_str())];
    all.extend_from_slice(files);
    repo.commit(&all, message);
    let a = Serve::start_at("virt01", &repo.dir, dir, &secret, &addrs[0]);
    let b = Serve::start_at("virt02", &repo.dir, dir, &secret, &addrs[1]);
    (repo, a, b)
}

#[test]
fn berth_serve_runs_a_libvirt_guest_retunes_it_and_moves_it_live_to_another_libvirt_host() {
    let libvirt = connect();
    let peer = PeerHost::start();
    let dest = peer.connect();
    let images = Images::new();
    let name = name("serve");
    let console = ConsoleLog::default_for(&name);
    let _cleanup = GuestCleanup::new(&libvirt, &name, &console);
    let guest = images.guest_text(&name, "");
    let (repo, a, b) = two_serves(&images, &peer, &[("guest.yaml", &guest)], "boot");
    assert_eq!(a.status()["driver"], "libvirt");

    // The loop boots the guest; /status and `berth get guests` read it back from libvirt.
    wait_counter(&console, 3, Duration::from_secs(90));
    berth_tests::wait_until("virt01 reports the guest", Duration::from_secs(30), || {
        a.guest(&name)
            .is_some_and(|g| g["runsHere"] == true && g["phase"] == "Running")
    });
    let (row, out) = guest_row_on_virt01(&name);
    assert_eq!(row["state"], "running", "{out}");
    assert_eq!(row["maxVcpus"], 2, "{out}");

    // A pinning commit, applied live by the loop (the watch sees the commit).
    let pid = qemu_pid(&name);
    let pinned = guest.replace(
        "  cpu: {vcpus: 1, maxVcpus: 2}\n",
        "  cpu: {vcpus: 1, maxVcpus: 2, pinning: {vcpus: {0: '1'}}}\n",
    );
    repo.commit(&[("guest.yaml", &pinned)], "pin");
    berth_tests::wait_until("vCPU 0 pinned to CPU 1", Duration::from_secs(30), || {
        kernel_vcpu_affinity(pid, 0) == "1".parse().unwrap()
    });
    berth_tests::wait_until("the retune counted", Duration::from_secs(10), || {
        a.metrics()
            .contains("berth_actions_total{kind=\"retune\",result=\"ok\"} 1")
    });

    // A placement commit: virt01's service migrates the guest live to virt02 through
    // libvirt; virt02's service adopts it.
    let (before, boot) = counters(&console).last().cloned().unwrap();
    let moved = pinned.replace("host: virt01", "host: virt02");
    repo.commit(&[("guest.yaml", &moved)], "move");
    // CI mode plans it as a live migration: virt02 says how to reach its libvirtd.
    let (code, out) = berth(&[
        "plan",
        "--repo",
        repo.dir.to_str().unwrap(),
        "--base",
        "HEAD~1",
        "--head",
        "HEAD",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("migrate live virt01 -> virt02"), "{out}");
    berth_tests::wait_until("the guest runs on virt02", Duration::from_secs(120), || {
        dest.observe(&name)
            .ok()
            .flatten()
            .is_some_and(|d| d.state == RunState::Running && !d.incoming && d.owner.is_some())
            && libvirt.observe(&name).is_ok_and(|d| d.is_none())
    });
    berth_tests::wait_until("virt02 reports the guest", Duration::from_secs(30), || {
        b.guest(&name)
            .is_some_and(|g| g["runsHere"] == true && g["phase"] == "Running")
    });
    berth_tests::wait_until("the migration counted", Duration::from_secs(10), || {
        a.metrics()
            .contains("berth_actions_total{kind=\"migrate\",result=\"ok\"} 1")
    });
    let metrics = a.metrics();
    assert!(
        metrics.contains("berth_migration_duration_seconds_count{kind=\"libvirt\"} 1"),
        "{metrics}"
    );
    // The pause at the switchover, as libvirt measured it.
    assert!(
        metrics.contains("berth_migration_downtime_seconds_count{kind=\"libvirt\"} 1"),
        "{metrics}"
    );

    // The counter carries on at the destination, same boot, no reset.
    let there = ConsoleLog(
        peer.dir
            .path()
            .join(format!("log/qemu/{name}-console.log"))
            .display()
            .to_string(),
    );
    let (after, _) = wait_counter(&there, before + 5, Duration::from_secs(60));
    let here = counters(&console);
    let moved_at = here.last().unwrap().0;
    let arrived = counters(&there);
    assert!(
        arrived.iter().all(|(_, b)| *b == boot),
        "the guest rebooted: {arrived:?}"
    );
    assert!(
        arrived[0].0 <= moved_at + 1,
        "counter lines lost at the switchover: virt01 last wrote {moved_at}, virt02 first {}",
        arrived[0].0
    );
    for pair in arrived.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "counter jumped: {pair:?}");
    }
    assert_no_reset(&console);
    // The disk (shared by both hosts) holds what the guest wrote, now from virt02.
    let sector = fs::read(images.path("disk.raw")).unwrap();
    let line = String::from_utf8_lossy(&sector[..512])
        .trim_end_matches('\0')
        .to_owned();
    let n: u64 = line
        .strip_prefix("berth-counter ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("disk holds {line:?}"));
    assert!(
        n > moved_at && line.contains(&boot),
        "{line} (after {after})"
    );

    drop(a);
    drop(b);
}

/// A disk of its own for guest `name`, beside the shared one.
fn own_disk(images: &Images, name: &str) -> String {
    let path = images.path(&format!("{name}.raw"));
    fs::File::create(&path).unwrap().set_len(16 << 20).unwrap();
    path
}

/// Benchmark, not a test (run by hand, `--ignored`): live migration of the TCG test guest
/// through `berth serve` beside `virsh migrate --live` with the same parameters, in the
/// same run, interleaved. Each round boots a guest through virt01's service and moves it
/// to virt02 by a placement commit (the time of the libvirt migration berth drives, from
/// its log, and the time from the commit to the guest running on virt02), then boots a
/// guest of the same XML with berth's library and moves it with `virsh migrate --live
/// --p2p --persistent --undefinesource --unsafe --auto-converge` (a process, timed).
/// Both with libvirt's default maximum downtime, 300 ms (virsh cannot set another in the
/// command). Prints a table; `BENCH_ROUNDS` overrides 5.
#[test]
#[ignore = "a benchmark: cargo test --release -p berth-tests --test libvirt -- --ignored --nocapture migration_bench"]
fn migration_bench() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let load = || fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
    let libvirt = connect();
    let peer = PeerHost::start();
    let dest = peer.connect();
    let images = Images::new();
    let dir = images.dir.path();
    let (repo, a, _b) = two_serves(&images, &peer, &[], "hosts");
    let policy = "  migration: {maxDowntime: 300ms, autoConverge: true}\n";
    let mut guards = Vec::new();
    let (mut berth_call, mut berth_e2e, mut virsh) = (Vec::new(), Vec::new(), Vec::new());
    // Round 0 warms up and is not counted. The first migration into the freshly started
    // second libvirtd used to take 10-11 s: that libvirtd probed its QEMU binaries at
    // the first capabilities query, which berth's pre-checks make (PeerHost::start now
    // makes it at once).
    for round in 0..=rounds {
        let warm_up = round == 0;
        // berth: boot through virt01's service, then a placement commit.
        let name = self::name(&format!("bench-b{round}"));
        let console = ConsoleLog::default_for(&name);
        guards.push(PathBuf::from(&console.0));
        let text = images
            .guest_text(&name, policy)
            .replace(&images.path("disk.raw"), &own_disk(&images, &name));
        let file = format!("{name}.yaml");
        repo.commit(&[(&file, &text)], "boot");
        wait_counter(&console, 3, Duration::from_secs(120));
        let started = Instant::now();
        repo.commit(
            &[(&file, &text.replace("host: virt01", "host: virt02"))],
            "move",
        );
        berth_tests::wait_until("the guest runs on virt02", Duration::from_secs(120), || {
            dest.observe(&name)
                .ok()
                .flatten()
                .is_some_and(|d| d.state == RunState::Running && !d.incoming)
                && libvirt.observe(&name).is_ok_and(|d| d.is_none())
        });
        let e2e_ms = started.elapsed().as_secs_f64() * 1000.0;
        // Logged once the destination has confirmed it.
        let completed = || {
            let log = fs::read_to_string(dir.join("serve-virt01.log")).unwrap_or_default();
            log.lines()
                .filter(|l| l.contains("migration completed") && l.contains(&name))
                .filter_map(|l| {
                    l.split("elapsed_ms=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
                .next_back()
        };
        berth_tests::wait_until("virt01 logs the migration", Duration::from_secs(30), || {
            completed().is_some()
        });
        let call_ms = completed().unwrap();

        // virsh: the same guest XML, moved by hand.
        let name = self::name(&format!("bench-v{round}"));
        let console = ConsoleLog(images.path(&format!("{name}.log")));
        let mut guest = images.guest(&name, policy);
        guest.spec.disks[0].source = own_disk(&images, &name);
        libvirt
            .create(&guest, DomainType::Qemu, "bench", &console)
            .unwrap();
        let _domain = Domain {
            libvirt: &libvirt,
            name: name.clone(),
        };
        wait_counter(&console, 3, Duration::from_secs(120));
        let started = Instant::now();
        let status = Command::new("virsh")
            .args(["-c", URI, "migrate", "--live", "--p2p", "--persistent"])
            .args(["--undefinesource", "--unsafe", "--auto-converge", &name])
            .arg(peer.uri())
            .args(["--migrateuri", &format!("tcp://{}", peer.address)])
            .status()
            .unwrap();
        assert!(status.success(), "virsh migrate failed");
        let virsh_ms = started.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "round {round}{}: berth {call_ms:.0} ms (commit to moved {e2e_ms:.0} ms), virsh {virsh_ms:.0} ms",
            if warm_up { " (warm-up, not counted)" } else { "" }
        );
        if !warm_up {
            berth_call.push(call_ms);
            berth_e2e.push(e2e_ms);
            virsh.push(virsh_ms);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\n| 256 MiB TCG guest, {rounds} rounds | median | min | max |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("berth serve: the libvirt migration it drives", &berth_call),
        ("berth serve: commit to running on virt02", &berth_e2e),
        ("virsh migrate --live (a process)", &virsh),
    ] {
        let (min, max) = v
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), x| (a.min(*x), b.max(*x)));
        println!(
            "| {what} | {:.0} ms | {min:.0} ms | {max:.0} ms |",
            median(v)
        );
    }
    println!(
        "\nratio berth / virsh (medians): {:.2}; commit-to-moved / virsh: {:.2}",
        median(&berth_call) / median(&virsh),
        median(&berth_e2e) / median(&virsh)
    );
    println!("load average before: {}", load_before.trim());
    println!("load average after:  {}", load().trim());
    drop(a);
    for path in guards {
        let _ = fs::remove_file(path);
    }
}

/// `berth apply` on two libvirt hosts: virt01 (this machine's libvirtd) and virt02 (a
/// [`PeerHost`], which virt01's libvirtd reaches at its remoteUri, and berth on this
/// machine at its socket, a local URI, so that berth keeps its hugepage pool).
/// - apply on virt01 boots the guest; `get guests` shows QEMU's pid and uptime;
/// - a move that needs a restart is refused by apply on virt01, nothing changed;
/// - a placement commit: plan and apply on virt01 move the guest live to virt02; the
///   counter carries on, same boot; apply on virt02 then has nothing to do;
/// - a hugepage (and memory size) change on virt02: without restartPolicy it is
///   blocked, with the reason, and apply changes nothing; with `restartPolicy:
///   ifRequired` it is a restart, and the guest comes back with 320 MiB on 2 MiB pages
///   (libvirt's XML and the pool say so).
///
/// The test grows the 2 MiB pool by the guest's 160 pages and gives them back on drop.
#[test]
fn berth_apply_moves_a_libvirt_guest_live_and_restarts_it_on_hugepages_as_planned() {
    // Dropped last: the domains are gone by then.
    let pool = HugePagePool::new(PageSize::Huge2M);
    let reservation = PoolReservation::grow(pool.clone(), 160).expect("grow the 2 MiB pool");
    assert_eq!(
        reservation.added(),
        160,
        "the kernel could not grow the pool"
    );
    let libvirt = connect();
    let peer = PeerHost::start();
    let dest = peer.connect();
    let images = Images::new();
    let name = name("applymove");
    let console = ConsoleLog::default_for(&name);
    let _cleanup = GuestCleanup::new(&libvirt, &name, &console);
    let dir = images.dir.path();
    let manifests = dir.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    let socket = format!(
        "qemu+unix:///system?socket={}",
        peer.dir.path().join("run/libvirt-sock").display()
    );
    let pages = pool.stats().unwrap().total;
    let hosts = format!(
        "{}---\n{}",
        host_text("virt01", "127.0.0.1:7498", URI, ""),
        host_text(
            "virt02",
            "127.0.0.1:7497",
            &socket,
            &format!(", remoteUri: '{}'", peer.uri())
        )
        .replace(
            "  driver: libvirt\n",
            &format!("  hugepages: {{2MiB: {pages}}}\n  driver: libvirt\n")
        )
    );
    fs::write(manifests.join("hosts.yaml"), hosts).unwrap();
    // It powers off when asked: the restart below takes no shutdown timeout.
    let guest = images
        .guest_text(&name, "")
        .replace("panic=-1'", "panic=-1 berth.poweroff'");
    fs::write(manifests.join("guest.yaml"), &guest).unwrap();
    let m = manifests.to_str().unwrap().to_owned();
    let state = |host: &str| dir.join(format!("state-{host}")).display().to_string();
    let apply = |host: &str| {
        let state = state(host);
        berth(&["apply", &m, "--yes", "--host", host, "--state-dir", &state])
    };
    let plan = |host: &str| berth(&["plan", &m, "--host", host, "--detailed-exitcode"]);

    let (code, out) = apply("virt01");
    assert_eq!(code, 0, "{out}");
    wait_counter(&console, 3, Duration::from_secs(90));
    let pid = qemu_pid(&name);
    let (row, out) = guest_row_on_virt01(&name);
    assert_eq!(row["pid"], pid, "{out}");
    let uptime = row["uptimeMs"].as_u64().unwrap_or_else(|| panic!("{out}"));
    assert!((500..600_000).contains(&uptime), "{out}");

    // A move that needs a restart (with a memory size change): apply cannot start the
    // guest on virt02, so it refuses before anything changes.
    fs::write(
        manifests.join("guest.yaml"),
        format!(
            "{}  restartPolicy: ifRequired\n",
            guest
                .replace("host: virt01", "host: virt02")
                .replace("size: 256MiB", "size: 288MiB")
        ),
    )
    .unwrap();
    let (code, out) = apply("virt01");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("only live") && out.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(qemu_pid(&name), pid, "a refused move touches nothing");

    // A placement change: virt01 moves the guest live to virt02.
    let (before, boot) = counters(&console).last().cloned().unwrap();
    fs::write(
        manifests.join("guest.yaml"),
        guest.replace("host: virt01", "host: virt02"),
    )
    .unwrap();
    let (code, out) = plan("virt01");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("migrate live virt01 -> virt02"), "{out}");
    let started = Instant::now();
    let (code, out) = apply("virt01");
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "apply: the move took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.contains("The fleet matches the manifests."), "{out}");
    assert!(libvirt.observe(&name).unwrap().is_none(), "left virt01");
    let there = dest.observe(&name).unwrap().expect("runs on virt02");
    assert_eq!(there.state, RunState::Running);
    let peer_console = ConsoleLog(
        peer.dir
            .path()
            .join(format!("log/qemu/{name}-console.log"))
            .display()
            .to_string(),
    );
    wait_counter(&peer_console, before + 3, Duration::from_secs(60));
    assert!(
        counters(&peer_console).iter().all(|(_, b)| *b == boot),
        "the guest rebooted in the move"
    );
    assert_no_reset(&console);
    let (code, out) = plan("virt02");
    assert_eq!(code, 0, "virt02 has nothing to do after the move:\n{out}");

    // A hugepage change, with no restart allowed: blocked, and nothing changes.
    let peer_pid = || -> i32 {
        fs::read_to_string(peer.dir.path().join(format!("run/qemu/{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let running = peer_pid();
    let huge = guest.replace("host: virt01", "host: virt02").replace(
        "  memory: {size: 256MiB}\n",
        "  memory: {size: 320MiB, hugepages: {pageSize: 2MiB}}\n",
    );
    fs::write(manifests.join("guest.yaml"), &huge).unwrap();
    let (code, out) = plan("virt02");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("blocked") && out.contains("restartPolicy"),
        "{out}"
    );
    let (code, out) = apply("virt02");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("nothing was changed"), "{out}");
    assert_eq!(peer_pid(), running, "a blocked change touches nothing");
    assert_eq!(
        dest.observe(&name)
            .unwrap()
            .unwrap()
            .definition
            .hugepage_kib,
        None
    );

    // Restart allowed: the guest comes back on hugepages.
    let free = |s: berth_hypervisor::host::hugepages::PoolStats| s.free - s.reserved;
    let available = free(pool.stats().unwrap());
    fs::write(
        manifests.join("guest.yaml"),
        format!("{huge}  restartPolicy: ifRequired\n"),
    )
    .unwrap();
    let (code, out) = plan("virt02");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("restart"), "{out}");
    let started = Instant::now();
    let (code, out) = apply("virt02");
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "apply: the restart took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let restarted = dest.observe(&name).unwrap().unwrap();
    assert_eq!(restarted.state, RunState::Running);
    assert_eq!(restarted.definition.hugepage_kib, Some(2048));
    assert_eq!(restarted.memory, Bytes::mib(320));
    assert_ne!(peer_pid(), running, "a new QEMU");
    assert!(
        available - free(pool.stats().unwrap()) >= 160,
        "the guest's 160 pages are taken from the pool"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !counters(&peer_console).iter().any(|(_, b)| *b != boot) {
        assert!(
            Instant::now() < deadline,
            "the restarted guest never counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out) = plan("virt02");
    assert_eq!(code, 0, "{out}");
    drop(peer);
    drop(reservation);
}
