//! Validating a repository of 1,000 guests on 4 hosts, each guest in its own file, with
//! pinning, memtune, hugepages and a migration policy, as `berth validate` sees them.
//!
//!     cargo bench -p berth-schema --bench validate

use criterion::{criterion_group, criterion_main, Criterion};

const GUESTS: usize = 1000;
const HOSTS: usize = 4;

fn repository() -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut hosts = String::new();
    for h in 0..HOSTS {
        hosts.push_str(&format!(
            "---\napiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm{h:02}, labels: {{rack: r{h}}}}}\n\
             spec:\n  address: 10.0.0.{h}:7410\n  cpus: 0-63\n  reservedCpus: 0-1\n  memory: 512GiB\n  \
             hugepages: {{2MiB: 65536}}\n  cpuModel: EPYC\n"
        ));
    }
    files.push(("hosts.yaml".to_owned(), hosts));
    for g in 0..GUESTS {
        let host = g % HOSTS;
        let cpu = 2 + (g / HOSTS) % 62;
        files.push((
            format!("guests/web-{g:04}.yaml"),
            format!(
                "apiVersion: berth.dev/v1\nkind: Guest\nmetadata:\n  name: web-{g:04}\n  labels: {{tier: web}}\n\
                 spec:\n  host: kvm{host:02}\n  state: running\n  cpu:\n    vcpus: 1\n    maxVcpus: 2\n    \
                 mode: host-model\n    pinning: {{vcpus: {{0: \"{cpu}\"}}, emulator: \"0-1\"}}\n  memory:\n    \
                 size: 128MiB\n    hugepages: {{pageSize: 2MiB}}\n    \
                 tune: {{hardLimit: 192MiB, softLimit: 160MiB, swapHardLimit: 256MiB, minGuarantee: 64MiB}}\n  \
                 io: {{weight: 500}}\n  migration: {{mode: live, maxDowntime: 30ms, bandwidth: 1GiB/s}}\n"
            ),
        ));
    }
    files
}

fn bench(c: &mut Criterion) {
    let files = repository();
    let validated =
        berth_schema::load_files(files.clone()).expect("the generated repository is valid");
    assert_eq!(validated.manifests.guests.len(), GUESTS);
    let mut group = c.benchmark_group("validate");
    group.sample_size(20);
    group.bench_function("1000 guests, 4 hosts, 1001 files", |b| {
        b.iter(|| berth_schema::load_files(files.clone()).expect("valid"))
    });
    let one_file: String = files.iter().map(|(_, t)| format!("---\n{t}")).collect();
    group.bench_function("1000 guests, 4 hosts, one file", |b| {
        b.iter(|| berth_schema::load_files([("all.yaml", one_file.as_str())]).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
