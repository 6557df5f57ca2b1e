//! berth's etcd layer at fleet scale, against one real etcd 3.4 on loopback (started here,
//! as the tests do): H hosts each holding a lease with the default timeouts (TTL 10 s,
//! renewed every second) and publishing its record and 10 guests.
//!
//! Prints, per fleet size: the time to publish, to read the whole fleet in one range
//! read (median of 5), what etcd handled per second at rest over 10 s (lease renewals and
//! writes, from etcd's own /metrics), the median acquire of a free guest and of a
//! migration's two swaps, one client at a time.
//!
//!     cargo bench -p berth-tests --bench etcd

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use berth_reconciler::etcd::{read_fleet, Acquire, EtcdConfig, HostSession};
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let validated = berth_schema::load_path(&berth_tests::workspace_root().join("manifests"))
        .expect("example manifests");
    let example = Observed::as_written(&Desired::from_manifests(&validated.manifests));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
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
            let writes_before = metric(port, "etcd_mvcc_put_total", "")
                + metric(port, "etcd_mvcc_delete_total", "")
                + metric(port, "etcd_mvcc_txn_total", "");
            tokio::time::sleep(Duration::from_secs(10)).await;
            let renewals = (metric(port, "grpc_server_msg_received_total", "LeaseKeepAlive")
                - renewals_before)
                / 10.0;
            let writes = (metric(port, "etcd_mvcc_put_total", "")
                + metric(port, "etcd_mvcc_delete_total", "")
                + metric(port, "etcd_mvcc_txn_total", "")
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
