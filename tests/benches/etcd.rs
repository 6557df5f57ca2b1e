//! berth's etcd layer at fleet scale, against one real etcd 3.4 on loopback (started here,
//! as the tests do): H hosts each holding a lease with the default timeouts (TTL 10 s,
//! renewed every second) and publishing its record and 10 guests.
//!
//! Prints, per fleet size: the time to publish, to read the whole fleet in one range
//! read (median of 5), what etcd handled per second at rest over 10 s (lease renewals and
//! writes, from etcd's own /metrics), the median acquire of a free guest and of a
//! migration's two swaps, one client at a time.
//!
//! Then the scheduler and HA restart with 1,000 hosts (labelled in 10 racks, published
//! to etcd with their capacity) and 10,000 guests placed by `hostSelector` (10% HA):
//! the pure scheduler's time, the leader's first round (scheduling and writing 10,000
//! placement records, term-guarded), a round after 1% of the guests changed, etcd's
//! requests at rest with the leader following, and the failover: from a host's death
//! (its lease no longer renewed, default timeouts) to its HA guests placed elsewhere.
//!
//!     cargo bench -p berth-tests --bench etcd

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use berth_reconciler::etcd::{
    lead_round, read_fleet, Acquire, EtcdConfig, HostEvent, HostSession, HostWatch, Leadership,
};
use berth_reconciler::{Desired, Observed};
use berth_tests::etcd::Etcd;

fn metric(port: u16, name: &str, label: &str) -> f64 {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// etcd's writes so far (puts, deletes and transactions), from its `/metrics`.
fn writes(port: u16) -> f64 {
    metric(port, "etcd_mvcc_put_total", "")
        + metric(port, "etcd_mvcc_delete_total", "")
        + metric(port, "etcd_mvcc_txn_total", "")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Sections to run: the arguments that are not options (`-- schedule reconcile`), or
/// every section.
fn wanted(section: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    named.is_empty() || named.iter().any(|n| n == section)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if wanted("layer") {
        etcd_layer(&runtime);
    }
    if wanted("schedule") {
        pure_scheduling();
    }
    if wanted("leader") {
        scheduling(&runtime);
    }
    // Only when named (1,000 hosts' loops in this process take minutes and GiBs).
    if std::env::args().any(|a| a == "reconcile") {
        reconcile::fleet(&runtime);
    }
}

fn etcd_layer(runtime: &tokio::runtime::Runtime) {
    let validated = berth_schema::load_path(&berth_tests::workspace_root().join("manifests"))
        .expect("example manifests");
    let example = Observed::as_written(&Desired::from_manifests(&validated.manifests));
    println!(
        "| hosts | guests | publish | read fleet (median of 5) | observed guests (JSON) | renewals/s at rest | writes/s at rest | acquire (median) | handover, 2 swaps (median) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for hosts in [100usize, 1000] {
        let etcd = Etcd::start();
        let port: u16 = etcd.endpoint().rsplit(':').next().unwrap().parse().unwrap();
        runtime.block_on(async {
            let store = EtcdConfig::new(&etcd.endpoint()).connect().await.unwrap();
            let started = Instant::now();
            let mut sessions = Vec::new();
            for h in 0..hosts {
                let name = format!("h{h:04}");
                let session = HostSession::open(&store, &name, None).await.unwrap();
                let mut host = example.hosts[0].clone();
                host.name = name.clone();
                session.publish_host(&host, None).await.unwrap();
                let guests: Vec<_> = (0..10)
                    .map(|g| {
                        let mut guest = example.guests[g % example.guests.len()].clone();
                        guest.name = format!("{name}-g{g}");
                        guest.host = name.clone();
                        guest
                    })
                    .collect();
                session.publish_observed(&guests).await.unwrap();
                sessions.push(session);
            }
            let publish = started.elapsed();
            let mut reads = Vec::new();
            let mut bytes = 0;
            for _ in 0..5 {
                let t = Instant::now();
                let view = read_fleet(&store).await.unwrap();
                reads.push(t.elapsed());
                assert_eq!(view.hosts.len(), hosts);
                assert_eq!(view.observed.len(), hosts * 10);
                bytes = serde_json::to_vec(&view.observed).unwrap().len();
            }
            // At rest: nothing changes, the hosts only renew.
            let renewals_before = metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive");
            let writes_before = writes(port);
            tokio::time::sleep(Duration::from_secs(10)).await;
            let renewals = (metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive")
                - renewals_before)
                / 10.0;
            let writes = (writes(port)
                - writes_before)
                / 10.0;
            let (a, b) = (&sessions[0], &sessions[1]);
            let mut acquires = Vec::new();
            let mut handovers = Vec::new();
            for i in 0..200 {
                let guest = format!("free-{i}");
                let t = Instant::now();
                let Acquire::Owned(owned) = a.acquire(&guest).await.unwrap() else {
                    panic!("free guest")
                };
                acquires.push(t.elapsed());
                let t = Instant::now();
                let moving = a
                    .begin_handover(&guest, owned.token, b.host())
                    .await
                    .unwrap()
                    .unwrap();
                b.complete_handover(&guest, moving.token)
                    .await
                    .unwrap()
                    .unwrap();
                handovers.push(t.elapsed());
            }
            println!(
                "| {hosts} | {} | {:.2?} | {:.2?} | {} KiB | {renewals:.0} | {writes:.1} | {:.2?} | {:.2?} |",
                hosts * 10,
                publish,
                median(reads),
                bytes / 1024,
                median(acquires),
                median(handovers),
            );
            drop(sessions);
        });
    }
}

/// The pure scheduler alone, median of 5: 10,000 selector guests on 1,000 hosts from
/// nothing, then again after 1% of the guests grew past any host's room (every host
/// refuses each of them), keeping the previous placements.
fn pure_scheduling() {
    let (hosts, guests) = (1000usize, 10_000usize);
    let desired = selector_fleet(hosts, guests);
    let mut firsts = Vec::new();
    let mut placements = Default::default();
    for _ in 0..5 {
        let t = Instant::now();
        placements =
            berth_reconciler::scheduler::schedule(&desired, &[], &|_| true, &Default::default());
        firsts.push(t.elapsed());
    }
    let previous: std::collections::BTreeMap<String, String> = placements
        .iter()
        .filter_map(|(g, p)| p.host().map(|h| (g.clone(), h.to_owned())))
        .collect();
    let changed = grow_one_percent(&desired);
    let mut agains = Vec::new();
    let mut unplaced = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let again = berth_reconciler::scheduler::schedule(&changed, &[], &|_| true, &previous);
        agains.push(t.elapsed());
        unplaced = again.values().filter(|p| p.host().is_none()).count();
    }
    println!();
    println!("| hosts | selector guests | schedule from nothing (median of 5) | after 1% grew past every host (median of 5) | unplaced then |");
    println!("|---|---|---|---|---|");
    println!(
        "| {hosts} | {guests} | {:.2?} | {:.2?} | {unplaced} |",
        median(firsts),
        median(agains)
    );
}

/// `desired` with 1% of its guests (100 of 10,000) grown to 45 GiB, more than any host
/// has left.
fn grow_one_percent(desired: &Desired) -> Desired {
    let mut changed = desired.clone();
    for g in changed
        .guests
        .iter_mut()
        .filter(|g| g.metadata.name[1..].parse::<usize>().unwrap() % 100 == 1)
    {
        g.spec.memory.size = berth_schema::Bytes::gib(45);
    }
    changed
}

/// 1,000 hosts in 10 racks and 10,000 guests placed by selector, 10% of them HA.
fn selector_fleet(hosts: usize, guests: usize) -> Desired {
    selector_fleet_with(hosts, guests, "")
}

/// [`selector_fleet`], each guest's spec ending with `extra` (`, io: {weight: 100}`).
fn selector_fleet_with(hosts: usize, guests: usize, extra: &str) -> Desired {
    let mut text = String::new();
    for h in 0..hosts {
        text.push_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: h{h:04}, labels: {{rack: r{}}}}}\n\
             spec: {{address: '127.0.0.1:7410', cpus: 0-63, memory: 64GiB, hugepages: {{2MiB: 4096}}}}\n---\n",
            h % 10
        ));
    }
    for g in 0..guests {
        let ha = if g % 10 == 0 {
            ", availability: {onHostFailure: restart}"
        } else {
            ""
        };
        let memory = if g % 4 == 0 {
            "{size: 1GiB, hugepages: {pageSize: 2MiB}}"
        } else {
            "{size: 2GiB}"
        };
        text.push_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: g{g:05}, labels: {{app: a{}}}}}\n\
             spec: {{hostSelector: {{rack: r{}}}, antiAffinity: {{app: a{}}}, cpu: {{vcpus: 1}}, memory: {memory}{ha}{extra}}}\n---\n",
            g % 500,
            g % 10,
            g % 500
        ));
    }
    let set = berth_schema::load_files([("fleet.yaml", text)]).expect("valid manifests");
    Desired::from_manifests(&set.manifests)
}

fn scheduling(runtime: &tokio::runtime::Runtime) {
    let (hosts, guests) = (1000usize, 10_000usize);
    let desired = selector_fleet(hosts, guests);
    let t = Instant::now();
    let placements =
        berth_reconciler::scheduler::schedule(&desired, &[], &|_| true, &Default::default());
    let pure = t.elapsed();
    let placed = placements.values().filter(|p| p.host().is_some()).count();
    let etcd = Etcd::start();
    let port: u16 = etcd.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    runtime.block_on(async {
        let store = EtcdConfig::new(&etcd.endpoint()).connect().await.unwrap();
        let mut sessions = Vec::new();
        for host in &desired.hosts {
            let session = HostSession::open(&store, &host.metadata.name, None).await.unwrap();
            session
                .publish_host(&berth_reconciler::model::ObservedHost::as_written(host, []), None)
                .await
                .unwrap();
            sessions.push(session);
        }
        let leader = Leadership::campaign(&sessions[0]).await.unwrap();
        let t = Instant::now();
        let fleet = read_fleet(&store).await.unwrap();
        let round = lead_round(&store, &leader, &desired, &fleet).await.unwrap().unwrap();
        let first_round = t.elapsed();
        assert_eq!(round.written, guests);

        // A commit changes 1% of the guests: 100 grow to 45 GiB, more than any host
        // has left: each gets a new record (placed elsewhere or, here, nowhere, with
        // the reason).
        let changed = grow_one_percent(&desired);
        let t = Instant::now();
        let fleet = read_fleet(&store).await.unwrap();
        let round = lead_round(&store, &leader, &changed, &fleet).await.unwrap().unwrap();
        let one_percent = t.elapsed();
        let rewritten = round.written;

        // At rest: the hosts renew, the leader does its periodic round (every 10 s by
        // default: one fleet read, nothing written).
        let renewals_before = metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive");
        let ranges_before = metric(port, "grpc_server_msg_received_total", "grpc_method=\"Range\"");
        let writes_before = writes(port);
        let fleet = read_fleet(&store).await.unwrap();
        let idle = lead_round(&store, &leader, &changed, &fleet).await.unwrap().unwrap();
        assert_eq!(idle.written, 0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let renewals = (metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive")
            - renewals_before)
            / 10.0;
        let ranges = (metric(port, "grpc_server_msg_received_total", "grpc_method=\"Range\"")
            - ranges_before)
            / 10.0;
        let writes = (writes(port)
            - writes_before)
            / 10.0;

        // Failover: host h0010 (rack r0, where the HA guests are) dies (its session is dropped: no more renewals, as a
        // crash). The leader follows the host records; when h0001's record is gone, one
        // round places its HA guests elsewhere.
        let fleet = read_fleet(&store).await.unwrap();
        let victim = "h0010";
        let ha_there = fleet
            .placements
            .iter()
            .filter(|(g, r)| {
                r.host.as_deref() == Some(victim)
                    && changed
                        .guests
                        .iter()
                        .any(|d| &d.metadata.name == *g && d.spec.restarts_on_host_failure())
            })
            .count();
        let mut watch = HostWatch::open(&store, fleet.revision).await.unwrap();
        let died = Instant::now();
        drop(sessions.remove(10));
        loop {
            if let HostEvent::Gone { name, .. } = watch.next().await.unwrap().unwrap() {
                if name == victim {
                    break;
                }
            }
        }
        let gone = died.elapsed();
        let fleet = read_fleet(&store).await.unwrap();
        let round = lead_round(&store, &leader, &changed, &fleet).await.unwrap().unwrap();
        let failover = died.elapsed();
        let moved = round.moved.iter().filter(|(_, from, _)| from.as_deref() == Some(victim)).count();
        assert_eq!(moved, ha_there);
        assert!(ha_there > 0);

        println!();
        println!("| hosts | selector guests | schedule (pure) | placed | leader's first round (schedule + 10,000 records) | round after 1% changed | records rewritten | renewals/s at rest | ranges/s at rest | writes/s at rest | host dead -> record gone | -> HA guests placed elsewhere |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {hosts} | {guests} | {pure:.2?} | {placed} | {first_round:.2?} | {one_percent:.2?} | {rewritten} | {renewals:.0} | {ranges:.1} | {writes:.1} | {gone:.2?} | {failover:.2?} ({ha_there} HA guests) |"
        );
    });
}

#[path = "etcd/reconcile.rs"]
mod reconcile;
