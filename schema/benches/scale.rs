//! `cargo bench -p berth-schema --bench scale`: loading and validating 20,000 guests on
//! 2,000 hosts (one file per guest, the hosts in one file), as `berth validate` does
//! after reading the files. Prints the median and the spread of the runs, the CPU time
//! they took (which a busy machine changes less than the wall time), and the load
//! average, so figures from a shared machine can be judged.

use std::time::{Duration, Instant};

fn repository(guests: usize, hosts: usize) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut text = String::new();
    for h in 0..hosts {
        text.push_str(&format!(
            "---\napiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm{h:04}, labels: {{rack: r{}}}}}\n\
             spec:\n  address: 10.0.{}.{}:7410\n  cpus: 0-63\n  reservedCpus: 0-1\n  memory: 512GiB\n  \
             hugepages: {{2MiB: 65536}}\n  cpuModel: EPYC\n",
            h % 40,
            h / 250,
            h % 250
        ));
    }
    files.push(("hosts.yaml".to_owned(), text));
    for g in 0..guests {
        let host = g % hosts;
        let cpu = 2 + (g / hosts) % 62;
        files.push((
            format!("guests/web-{g:05}.yaml"),
            format!(
                "apiVersion: berth.dev/v1\nkind: Guest\nmetadata:\n  name: web-{g:05}\n  labels: {{tier: web}}\n\
                 spec:\n  host: kvm{host:04}\n  state: running\n  cpu:\n    vcpus: 1\n    maxVcpus: 2\n    \
                 mode: host-model\n    pinning: {{vcpus: {{0: \"{cpu}\"}}, emulator: \"0-1\"}}\n  memory:\n    \
                 size: 128MiB\n    hugepages: {{pageSize: 2MiB}}\n    \
                 tune: {{hardLimit: 192MiB, softLimit: 160MiB, swapHardLimit: 256MiB, minGuarantee: 64MiB}}\n  \
                 io: {{weight: 500}}\n  migration: {{mode: live, maxDowntime: 30ms, bandwidth: 1GiB/s}}\n"
            ),
        ));
    }
    files
}

/// CPU time used by this process so far (user + system, every thread), from
/// `/proc/self/stat`, in clock ticks of 10 ms.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    Duration::from_millis(fields.iter().sum::<u64>() * 10)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no flag:
    // keep that run small.
    // `-- --write-to DIR` writes the repository to DIR instead, for timing
    // `berth validate DIR`.
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let (guests, hosts, runs) = if full {
        (20_000, 2_000, 11)
    } else {
        (200, 20, 1)
    };
    let files = repository(guests, hosts);
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--write-to")
        .and_then(|i| args.get(i + 1))
    {
        let dir = std::path::Path::new(dir);
        for (name, text) in &files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
            std::fs::write(path, text).expect("write a manifest");
        }
        println!("{} files written to {}", files.len(), dir.display());
        return;
    }
    let mut times: Vec<Duration> = Vec::new();
    let mut cpu: Vec<Duration> = Vec::new();
    for _ in 0..runs {
        let files = files.clone();
        let (start, cpu_start) = (Instant::now(), cpu_time());
        let v = berth_schema::load_files(files).expect("the generated repository is valid");
        times.push(start.elapsed());
        cpu.push(cpu_time().saturating_sub(cpu_start));
        assert_eq!(v.manifests.guests.len(), guests);
        assert_eq!(v.manifests.hosts.len(), hosts);
    }
    times.sort();
    cpu.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {guests} guests, {hosts} hosts, {} files | wall: median {:.0} ms (min {:.0}, max {:.0}, {runs} runs) | \
         CPU (all threads): median {:.0} ms | load average {} |",
        files.len(),
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        ms(cpu[cpu.len() / 2]),
        load_average()
    );
}
