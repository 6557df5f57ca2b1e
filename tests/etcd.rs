//! berth's etcd layer against a real etcd (Debian's `etcd-server` 3.4), one etcd per
//! test: host leases and what hosts publish, one-read fleet views, guest ownership with
//! fencing tokens, leader election with failover, `berth serve` joining an etcd with
//! TLS and a password (and its error when either is wrong), and the self-fence of an HA guest
//! (berth-vmm, real KVM: root and /dev/kvm) when its host is cut off from etcd.
//!
//! Leases here are short (2 s, etcd's minimum with the harness's raft timers, renewed
//! every 250 ms, self-fence after 1 s) so that expiry can be waited for.

use std::time::{Duration, Instant};

use berth_reconciler::etcd::{
    read_fleet, read_owner, resolve_switchover, Acquire, EtcdConfig, EtcdStore, HostEvent,
    HostSession, HostWatch, Leadership, LeaseHealth, LeaseState, LeaseTimeouts, Switchover,
};
use berth_reconciler::{Desired, Observed};
use berth_tests::etcd::Etcd;

fn short_leases(etcd: &Etcd) -> EtcdConfig {
    let mut config = EtcdConfig::new(&etcd.endpoint());
    config.request_timeout = Duration::from_millis(500);
    config.lease = LeaseTimeouts {
        ttl: Duration::from_secs(2),
        renew_every: Duration::from_millis(250),
        self_fence_after: Duration::from_secs(1),
    };
    config
}

async fn connect(etcd: &Etcd) -> EtcdStore {
    short_leases(etcd).connect().await.expect("connect to etcd")
}

/// The example repository as it would run: its hosts and guests as observed.
fn example_fleet() -> Observed {
    let validated = berth_schema::load_path(&berth_tests::workspace_root().join("manifests"))
        .expect("the example manifests are valid");
    Observed::as_written(&Desired::from_manifests(&validated.manifests))
}

/// Polls `cond` every 20 ms for up to `timeout`; returns how long it took.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_host_publishes_itself_and_its_guests_and_one_read_returns_the_fleet() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let fleet = example_fleet();
    let host = &fleet.hosts[0];
    let session = HostSession::open(&store, &host.name, None).await.unwrap();
    session
        .publish_host(host, Some("127.0.0.1:7410"))
        .await
        .unwrap();
    let guests: Vec<_> = fleet.guests.clone();
    assert!(guests.len() >= 2, "the example runs two guests");
    assert_eq!(
        session.publish_observed(&guests).await.unwrap(),
        guests.len()
    );
    // Unchanged guests are not written again.
    assert_eq!(session.publish_observed(&guests).await.unwrap(), 0);
    let won = session.acquire(&guests[0].name).await.unwrap();
    let Acquire::Owned(owned) = won else {
        panic!("{won:?}")
    };

    let view = read_fleet(&store).await.unwrap();
    let published = &view.hosts[&host.name];
    assert_eq!(published.lease, session.lease());
    assert_eq!(&published.record.observed, host);
    assert_eq!(published.record.address.as_deref(), Some("127.0.0.1:7410"));
    assert_eq!(published.record.lease_ttl_seconds, 2);
    assert_eq!(published.record.self_fence_after_ms, 1000);
    assert_eq!(view.observed, guests);
    assert_eq!(view.owners[&guests[0].name], owned);
    assert!(view.revision >= owned.token.0);

    // One guest stops and another is retuned: one delete and one write.
    let mut changed = vec![guests[1].clone()];
    changed[0].io_weight = Some(123);
    assert_eq!(session.publish_observed(&changed).await.unwrap(), 2);
    let view = read_fleet(&store).await.unwrap();
    assert_eq!(view.observed, changed);

    // A clean shutdown revokes the lease: everything the host published goes at once.
    session.close().await.unwrap();
    let view = read_fleet(&store).await.unwrap();
    assert!(view.hosts.is_empty(), "{:?}", view.hosts);
    assert!(view.observed.is_empty());
    assert!(view.owners.is_empty());
}

#[tokio::test]
async fn a_dead_hosts_records_and_ownership_expire_with_its_lease() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let fleet = example_fleet();
    let a = HostSession::open(&store, "kvm01", None).await.unwrap();
    let b = HostSession::open(&store, "kvm02", None).await.unwrap();
    a.publish_host(&fleet.hosts[0], None).await.unwrap();
    a.publish_observed(&fleet.guests).await.unwrap();
    assert!(matches!(
        a.acquire("web-1").await.unwrap(),
        Acquire::Owned(_)
    ));

    // The host keeps its lease for well past the TTL while it renews.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.health().state, LeaseState::Held);
    match b.acquire("web-1").await.unwrap() {
        Acquire::HeldElsewhere(o) => assert_eq!(o.record.host, "kvm01"),
        other => panic!("{other:?}"),
    }

    // A crash: renewals stop, nothing is revoked.
    let died = Instant::now();
    drop(a);
    wait_for(
        "kvm01's records to expire",
        Duration::from_secs(5),
        || async {
            let view = read_fleet(&store).await.unwrap();
            view.hosts.is_empty() && view.observed.is_empty() && view.owners.is_empty()
        },
    )
    .await;
    let gone_after = died.elapsed();
    // Not before the TTL counted from the last renewal (at most 250 ms before the
    // crash), and not much after it.
    assert!(
        gone_after >= Duration::from_millis(1700) && gone_after < Duration::from_millis(3500),
        "{gone_after:?}"
    );
    match b.acquire("web-1").await.unwrap() {
        Acquire::Owned(o) => {
            assert_eq!(o.record.host, "kvm02");
            assert_eq!(o.lease, b.lease());
        }
        other => panic!("{other:?}"),
    }
}

async fn acquire_all(session: &HostSession, guests: &[String]) -> Vec<Acquire> {
    let mut results = Vec::new();
    for g in guests {
        results.push(session.acquire(g).await.unwrap());
    }
    results
}

#[tokio::test]
async fn two_hosts_racing_to_acquire_the_same_guests_exactly_one_wins_each() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let a = HostSession::open(&store, "kvm01", None).await.unwrap();
    let b = HostSession::open(&store, "kvm02", None).await.unwrap();
    let guests: Vec<String> = (0..50).map(|i| format!("g{i}")).collect();
    let (ra, rb) = tokio::join!(acquire_all(&a, &guests), acquire_all(&b, &guests));
    let mut wins = [0, 0];
    for ((g, x), y) in guests.iter().zip(ra).zip(rb) {
        match (x, y) {
            (Acquire::Owned(won), Acquire::HeldElsewhere(seen)) => {
                assert_eq!(won, seen, "{g}");
                assert_eq!(won.record.host, "kvm01");
                wins[0] += 1;
            }
            (Acquire::HeldElsewhere(seen), Acquire::Owned(won)) => {
                assert_eq!(won, seen, "{g}");
                assert_eq!(won.record.host, "kvm02");
                wins[1] += 1;
            }
            other => panic!("{g}: not exactly one owner: {other:?}"),
        }
        let record = read_owner(&store, g).await.unwrap().expect("an owner");
        let expected_lease = if record.record.host == "kvm01" {
            a.lease()
        } else {
            b.lease()
        };
        assert_eq!(record.lease, expected_lease, "{g}");
    }
    assert_eq!(wins[0] + wins[1], guests.len());
    // Acquiring again is idempotent for the owner and still refused to the other.
    for g in &guests {
        let owner = read_owner(&store, g).await.unwrap().unwrap();
        let (mine, theirs) = if owner.record.host == "kvm01" {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert_eq!(
            mine.acquire(g).await.unwrap(),
            Acquire::Owned(owner.clone())
        );
        assert_eq!(
            theirs.acquire(g).await.unwrap(),
            Acquire::HeldElsewhere(owner)
        );
    }
}

#[tokio::test]
async fn a_migration_hands_ownership_over_by_compare_and_swap() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let a = HostSession::open(&store, "kvm01", None).await.unwrap();
    let b = HostSession::open(&store, "kvm02", None).await.unwrap();
    let c = HostSession::open(&store, "kvm03", None).await.unwrap();
    let Acquire::Owned(start) = a.acquire("web-1").await.unwrap() else {
        panic!("kvm01 acquires a free guest")
    };

    // Only the owner can begin, and only with the current token.
    let refused = b
        .begin_handover("web-1", start.token, "kvm02")
        .await
        .unwrap();
    assert!(refused.is_err(), "{refused:?}");
    let moving = a
        .begin_handover("web-1", start.token, "kvm02")
        .await
        .unwrap()
        .expect("the owner begins the handover");
    assert_eq!(moving.record.host, "kvm01");
    assert_eq!(moving.record.moving_to.as_deref(), Some("kvm02"));
    assert!(moving.token > start.token);
    assert_eq!(
        moving.lease,
        a.lease(),
        "still bound to the source until the swap"
    );

    // The old token is stale everywhere.
    let stale = a
        .begin_handover("web-1", start.token, "kvm03")
        .await
        .unwrap();
    let fenced = stale.expect_err("a stale token cannot swap");
    assert_eq!(fenced.current.as_ref(), Some(&moving));
    assert!(fenced.to_string().contains("moving to kvm02"), "{fenced}");
    assert!(a.verify("web-1", start.token).await.unwrap().is_err());
    assert!(b
        .complete_handover("web-1", start.token)
        .await
        .unwrap()
        .is_err());
    // A third host cannot take it, even with the current token.
    assert!(c
        .complete_handover("web-1", moving.token)
        .await
        .unwrap()
        .is_err());
    assert_eq!(
        resolve_switchover(&store, "web-1", "kvm01", "kvm02")
            .await
            .unwrap(),
        Switchover::Moving(moving.clone())
    );

    // The destination's swap is the commit point.
    let done = b
        .complete_handover("web-1", moving.token)
        .await
        .unwrap()
        .expect("the destination completes the handover");
    assert_eq!(done.record.host, "kvm02");
    assert_eq!(done.record.moving_to, None);
    assert_eq!(done.lease, b.lease());
    assert_eq!(
        resolve_switchover(&store, "web-1", "kvm01", "kvm02")
            .await
            .unwrap(),
        Switchover::Destination(done.clone())
    );
    assert!(a.verify("web-1", moving.token).await.unwrap().is_err());
    assert!(a
        .abort_handover("web-1", moving.token)
        .await
        .unwrap()
        .is_err());
    assert_eq!(
        b.verify("web-1", done.token).await.unwrap(),
        Ok(done.clone())
    );

    // A migration abandoned before its switchover: the source takes the record back.
    let moving = b
        .begin_handover("web-1", done.token, "kvm03")
        .await
        .unwrap()
        .unwrap();
    let back = b
        .abort_handover("web-1", moving.token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.record.moving_to, None);
    assert_eq!(
        resolve_switchover(&store, "web-1", "kvm02", "kvm03")
            .await
            .unwrap(),
        Switchover::Source(back.clone())
    );
    assert!(c
        .complete_handover("web-1", moving.token)
        .await
        .unwrap()
        .is_err());

    // The source dies mid-handover: the record goes with its lease; neither side may
    // resume the guest on its own word.
    let moving = b
        .begin_handover("web-1", back.token, "kvm03")
        .await
        .unwrap()
        .unwrap();
    drop(b);
    wait_for(
        "kvm02's lease to expire",
        Duration::from_secs(5),
        || async { read_owner(&store, "web-1").await.unwrap().is_none() },
    )
    .await;
    assert_eq!(
        resolve_switchover(&store, "web-1", "kvm02", "kvm03")
            .await
            .unwrap(),
        Switchover::Neither(None)
    );
    assert!(c
        .complete_handover("web-1", moving.token)
        .await
        .unwrap()
        .is_err());

    // Release: only with the current token.
    let Acquire::Owned(owned) = c.acquire("web-1").await.unwrap() else {
        panic!("kvm03 acquires the free guest")
    };
    assert!(c.release("web-1", moving.token).await.unwrap().is_err());
    c.release("web-1", owned.token).await.unwrap().unwrap();
    assert_eq!(read_owner(&store, "web-1").await.unwrap(), None);
}

#[tokio::test]
async fn a_restarted_host_keeps_its_lease_and_ownership() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let first = HostSession::open(&store, "kvm01", None).await.unwrap();
    let Acquire::Owned(owned) = first.acquire("web-1").await.unwrap() else {
        panic!("acquire")
    };
    let lease = first.lease();
    drop(first);
    // `berth serve` restarts within the TTL and resumes its lease: nothing changed.
    let second = HostSession::open(&store, "kvm01", Some(lease))
        .await
        .unwrap();
    assert_eq!(second.lease(), lease);
    assert_eq!(
        second.acquire("web-1").await.unwrap(),
        Acquire::Owned(owned.clone())
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        second.verify("web-1", owned.token).await.unwrap(),
        Ok(owned.clone())
    );

    // Without the old lease (the state was lost), the host rebinds its own record to
    // its new lease; the token changes.
    let third = HostSession::open(&store, "kvm01", None).await.unwrap();
    assert_ne!(third.lease(), lease);
    let Acquire::Owned(rebound) = third.acquire("web-1").await.unwrap() else {
        panic!("the host's own record is rebound")
    };
    assert_eq!(rebound.lease, third.lease());
    assert!(rebound.token > owned.token);
    assert!(second.verify("web-1", owned.token).await.unwrap().is_err());
    drop(second);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        read_owner(&store, "web-1").await.unwrap(),
        Some(rebound),
        "the record outlives the old lease"
    );
}

#[tokio::test]
async fn a_host_cut_off_from_etcd_must_fence_before_its_lease_can_expire() {
    let mut etcd = Etcd::start();
    let store = connect(&etcd).await;
    let fleet = example_fleet();
    let session = HostSession::open(&store, "kvm01", None).await.unwrap();
    session.publish_host(&fleet.hosts[0], None).await.unwrap();
    let Acquire::Owned(_) = session.acquire("web-1").await.unwrap() else {
        panic!("acquire")
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = session.health();
    assert_eq!(before.state, LeaseState::Held);
    assert!(
        before.since_renewal < Duration::from_millis(600),
        "{before:?}"
    );

    // Partition: etcd stops answering (its requests hang).
    etcd.freeze();
    let frozen = Instant::now();
    let must_fence = wait_for(
        "the host to know it must fence",
        Duration::from_secs(3),
        || async { session.health().state != LeaseState::Held },
    )
    .await;
    let health = session.health();
    assert_eq!(health.state, LeaseState::MustFence, "{health:?}");
    // The deadline is the self-fence timeout after the last answered renewal, which
    // was sent at most one renewal period (plus its round trip) before the freeze.
    assert!(must_fence <= Duration::from_secs(1), "{must_fence:?}");
    assert!(health.fence_deadline <= Instant::now());
    wait_for(
        "the host to count its lease as expired",
        Duration::from_secs(3),
        || async { session.health().state == LeaseState::Expired },
    )
    .await;
    assert!(frozen.elapsed() <= Duration::from_secs(2));

    // etcd comes back after the TTL: the lease is gone there too; the host gets a new
    // one and publishes its record again, but its ownership is not restored for it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.thaw();
    wait_for("a new lease", Duration::from_secs(10), || async {
        let h = session.health();
        h.generation == 1 && h.state == LeaseState::Held
    })
    .await;
    wait_for(
        "the host record under the new lease",
        Duration::from_secs(5),
        || async {
            read_fleet(&store).await.is_ok_and(|v| {
                v.hosts
                    .get("kvm01")
                    .is_some_and(|h| h.lease == session.lease())
            })
        },
    )
    .await;
    let view = read_fleet(&store).await.unwrap();
    assert!(view.owners.is_empty(), "{:?}", view.owners);
    // etcd killed outright: the host notices just the same.
    etcd.stop();
    wait_for(
        "the host to know it must fence",
        Duration::from_secs(3),
        || async { session.health().state != LeaseState::Held },
    )
    .await;
}

#[tokio::test]
async fn a_new_leader_is_elected_within_one_ttl_of_the_leaders_death() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let a = HostSession::open(&store, "kvm01", None).await.unwrap();
    let b = HostSession::open(&store, "kvm02", None).await.unwrap();
    let c = HostSession::open(&store, "kvm03", None).await.unwrap();
    let leader = Leadership::campaign(&a)
        .await
        .expect("the first candidate leads");
    assert_eq!(leader.host(), "kvm01");
    assert_eq!(
        berth_reconciler::etcd::current_leader(&store)
            .await
            .unwrap()
            .as_deref(),
        Some("kvm01")
    );

    let (elected_tx, mut elected) = tokio::sync::mpsc::unbounded_channel();
    let b_store = store.clone();
    let candidates = [b, c];
    let mut tasks = Vec::new();
    for session in candidates {
        let tx = elected_tx.clone();
        tasks.push(tokio::spawn(async move {
            let won = Leadership::campaign(&session).await.expect("campaign");
            tx.send((won.host().to_owned(), won.term(), Instant::now()))
                .expect("report");
            // Lead until the test ends.
            std::future::pending::<()>().await;
            drop(session);
        }));
    }
    // Nobody else is elected while the leader lives.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(elected.try_recv().is_err());
    assert!(leader.is_leader(&store).await.unwrap());

    // The leader's guard fences its writes to its term.
    let mut client = store.client();
    let guarded =
        etcd_client::Txn::new()
            .when([leader.guard()])
            .and_then([etcd_client::TxnOp::put(
                "/berth/test-leader-write",
                "1",
                None,
            )]);
    assert!(client.txn(guarded.clone()).await.unwrap().succeeded());

    // The leader crashes.
    let died = Instant::now();
    drop(a);
    let (host, term, at) = tokio::time::timeout(Duration::from_secs(5), elected.recv())
        .await
        .expect("a new leader within 5 s")
        .expect("a candidate reported");
    let failover = at - died;
    assert!(host == "kvm02" || host == "kvm03", "{host}");
    assert!(term > leader.term());
    // One TTL after its last renewal, plus etcd's expiry check (every 500 ms).
    assert!(failover <= Duration::from_millis(3500), "{failover:?}");
    assert_eq!(
        berth_reconciler::etcd::current_leader(&b_store)
            .await
            .unwrap()
            .as_deref(),
        Some(host.as_str())
    );
    assert!(!leader.is_leader(&store).await.unwrap());
    assert!(!client.txn(guarded).await.unwrap().succeeded());
    // Exactly one new leader.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(elected.try_recv().is_err());
    eprintln!("leader failover took {failover:?} (lease TTL 2 s)");
    for task in tasks {
        task.abort();
    }
}

/// Runs the `berth` binary; its exit code, stdout and stderr.
fn berth(args: &[&str]) -> (i32, String, String) {
    let out = berth_tests::command("berth")
        .args(args)
        .env_remove("BERTH_ETCD")
        .output()
        .expect("run berth");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_get_guests_and_status_read_the_fleet_from_etcd_alone() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let fleet = example_fleet();
    let kvm01 = HostSession::open(&store, "kvm01", None).await.unwrap();
    let kvm02 = HostSession::open(&store, "kvm02", None).await.unwrap();
    let mut host02 = fleet.hosts[0].clone();
    host02.name = "kvm02".into();
    kvm01
        .publish_host(&fleet.hosts[0], Some("127.0.0.1:7410"))
        .await
        .unwrap();
    kvm02.publish_host(&host02, None).await.unwrap();
    kvm01.publish_observed(&fleet.guests).await.unwrap();
    let Acquire::Owned(web) = kvm01.acquire("web-1").await.unwrap() else {
        panic!("acquire web-1")
    };
    kvm01
        .begin_handover("web-1", web.token, "kvm02")
        .await
        .unwrap()
        .unwrap();
    // A guest being started on kvm02: owned, not yet observed.
    let Acquire::Owned(db) = kvm02.acquire("db-1").await.unwrap() else {
        panic!("acquire db-1")
    };
    let _leader = Leadership::campaign(&kvm01).await.unwrap();
    let url = etcd.endpoint();

    let (code, out, err) = berth(&["get", "guests", "--fleet", "--etcd", &url, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows = rows.as_array().expect("an array");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["batch-1", "db-1", "web-1"]);
    assert_eq!(rows[0]["host"], "kvm01");
    assert_eq!(rows[0]["state"], "running");
    assert_eq!(rows[0]["owner"], serde_json::Value::Null);
    assert_eq!(rows[1]["host"], serde_json::Value::Null);
    assert_eq!(rows[1]["owner"], "kvm02");
    assert_eq!(rows[1]["token"], db.token.0);
    assert_eq!(rows[2]["owner"], "kvm01");
    assert_eq!(rows[2]["movingTo"], "kvm02");

    let (code, out, err) = berth(&["get", "guests", "--fleet", "--etcd", &url]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web-1") && l.contains("kvm01 -> kvm02")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("batch-1") && l.contains("none")),
        "{out}"
    );

    let (code, out, err) = berth(&["status", "--fleet", "--etcd", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 host(s) alive, leader kvm01."), "{out}");
    let kvm01_line = out
        .lines()
        .find(|l| l.starts_with("kvm01"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        kvm01_line.contains(&format!("{:x}", kvm01.lease())),
        "{out}"
    );
    assert!(kvm01_line.ends_with("127.0.0.1:7410"), "{out}");

    let (code, out, err) = berth(&["status", "--fleet", "--etcd", &url, "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(status["leader"], "kvm01");
    assert_eq!(status["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(status["hosts"][0]["lease"], kvm01.lease());
    assert_eq!(status["owners"].as_array().unwrap().len(), 2);
    assert_eq!(
        status["guests"].as_array().unwrap().len(),
        fleet.guests.len()
    );

    // No etcd at that address: a clear error, exit code 1, nothing printed to stdout.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (code, out, err) = berth(&[
        "status",
        "--fleet",
        "--etcd",
        &dead,
        "--etcd-timeout-ms",
        "500",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty());
    assert!(err.starts_with("error: etcd: reading the fleet"), "{err}");
    let (code, _, err) = berth(&["get", "guests", "--fleet"]);
    assert_eq!(code, 1);
    assert!(err.contains("no etcd given: pass --etcd"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway PKI made with openssl: a CA, etcd's server certificate for 127.0.0.1,
/// and a client certificate for host kvm01, all signed by the CA (P-256 keys).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("PKI directory");
        let pki = Pki { dir };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=berth-test-ca",
        ]);
        std::fs::write(pki.path("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(pki.path("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, subject) in [("server", "/CN=etcd"), ("client", "/CN=kvm01")] {
            pki.openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                subject,
            ]);
            pki.openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        pki
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn server(&self) -> berth_tests::etcd::ServerTls {
        berth_tests::etcd::ServerTls {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: self.path("ca.pem"),
        }
    }

    fn client(&self, with_certificate: bool) -> berth_reconciler::etcd::EtcdTls {
        berth_reconciler::etcd::EtcdTls {
            ca: Some(self.path("ca.pem")),
            cert: with_certificate.then(|| self.path("client.pem")),
            key: with_certificate.then(|| self.path("client.key")),
            domain: None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(pki.server());
    assert!(etcd.endpoint().starts_with("https://"));
    let mut config = short_leases(&etcd);
    config.tls = Some(pki.client(true));
    let store = config.connect().await.expect("connect over TLS");
    let session = HostSession::open(&store, "kvm01", None).await.unwrap();
    assert!(matches!(
        session.acquire("web-1").await.unwrap(),
        Acquire::Owned(_)
    ));
    assert_eq!(read_fleet(&store).await.unwrap().owners.len(), 1);

    // Without a client certificate etcd refuses the handshake.
    let mut anonymous = short_leases(&etcd);
    anonymous.tls = Some(pki.client(false));
    let refused = match anonymous.connect().await {
        Ok(store) => read_fleet(&store).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(
        refused.is_err(),
        "etcd served a client without a certificate"
    );
    // Plain HTTP to the TLS port gets nothing either.
    let plain = EtcdConfig {
        endpoints: vec![etcd.endpoint().replace("https://", "http://")],
        ..short_leases(&etcd)
    };
    let refused = match plain.connect().await {
        Ok(store) => read_fleet(&store).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(refused.is_err(), "etcd served plain HTTP on its TLS port");

    let url = etcd.endpoint();
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let (code, out, err) = berth(&[
        "get",
        "guests",
        "--fleet",
        "--etcd",
        &url,
        "--etcd-cacert",
        ca.to_str().unwrap(),
        "--etcd-cert",
        cert.to_str().unwrap(),
        "--etcd-key",
        key.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"owner\": \"kvm01\""), "{out}");
    let missing = pki.path("missing.pem");
    let (code, _, err) = berth(&[
        "status",
        "--fleet",
        "--etcd",
        &url,
        "--etcd-cacert",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "cannot read the etcd TLS file {}",
            missing.display()
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_authentication_with_a_user_and_password() {
    let etcd = Etcd::start();
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let mut config = short_leases(&etcd);
    config.auth = Some(berth_reconciler::etcd::EtcdAuth {
        user: "root".into(),
        password: "root-secret".into(),
    });
    let store = config.connect().await.expect("connect with a password");
    let session = HostSession::open(&store, "kvm01", None).await.unwrap();
    session
        .publish_host(&example_fleet().hosts[0], None)
        .await
        .unwrap();
    assert!(matches!(
        session.acquire("web-1").await.unwrap(),
        Acquire::Owned(_)
    ));
    assert_eq!(read_fleet(&store).await.unwrap().owners.len(), 1);

    let mut wrong = short_leases(&etcd);
    wrong.auth = Some(berth_reconciler::etcd::EtcdAuth {
        user: "root".into(),
        password: "guess".into(),
    });
    let error = wrong
        .connect()
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(
        error.to_string().starts_with("cannot connect to etcd at"),
        "{error}"
    );
    let anonymous = connect(&etcd).await;
    assert!(
        read_fleet(&anonymous).await.is_err(),
        "etcd served a client without a user"
    );

    let url = etcd.endpoint();
    let out = berth_tests::command("berth")
        .args(["status", "--fleet", "--etcd", &url, "--etcd-user", "root"])
        .env("BERTH_ETCD_PASSWORD", "root-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 host(s) alive"), "{stdout}");
}

/// `berth serve --driver sim --etcd` for `host` with the given etcd options (and
/// `BERTH_ETCD_PASSWORD`, when `password` is not empty), logging to `log`.
fn spawn_serve(
    host: &str,
    repo: &std::path::Path,
    state: &std::path::Path,
    log: &std::path::Path,
    etcd: &[&str],
    password: &str,
) -> std::process::Child {
    let mut command = berth_tests::command("berth");
    if !password.is_empty() {
        command.env("BERTH_ETCD_PASSWORD", password);
    }
    command
        .args(["serve", "--driver", "sim", "--host", host, "--repo"])
        .arg(repo)
        .arg("--state-dir")
        .arg(state)
        .args([
            "--insecure-plain-http",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--lease-ttl",
            "2",
            "--self-fence-ms",
            "1000",
        ])
        .args(etcd)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn berth serve")
}

/// Waits for `child` to exit within `timeout` (killed by pid and reaped otherwise).
fn exits_within(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_serve_joins_an_etcd_with_tls_and_a_password_and_says_why_when_either_is_wrong() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(pki.server());
    // Users before authentication is on: root (etcd requires it) and kvm01, the host.
    let mut admin_config = short_leases(&etcd);
    admin_config.tls = Some(pki.client(true));
    let admin = admin_config.connect().await.expect("connect over TLS");
    let mut client = admin.client();
    client.user_add("root", "root-secret", None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client
        .user_add("kvm01", "kvm01-secret", None)
        .await
        .unwrap();
    client.user_grant_role("kvm01", "root").await.unwrap();
    client.auth_enable().await.unwrap();
    let mut reader_config = admin_config.clone();
    reader_config.auth = Some(berth_reconciler::etcd::EtcdAuth {
        user: "kvm01".into(),
        password: "kvm01-secret".into(),
    });
    let reader = reader_config
        .connect()
        .await
        .expect("connect with a password");

    let dir = tempfile::tempdir().expect("temp dir");
    let repo = berth_tests::GitRepo::new(dir.path().join("repo"));
    repo.commit(
        &[(
            "hosts.yaml",
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
             spec: {address: '127.0.0.1:7410', cpus: 0-1, memory: 4GiB}\n",
        )],
        "one host",
    );
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let url = etcd.endpoint();
    let options = |ca: &std::path::Path| -> Vec<String> {
        vec![
            "--etcd".into(),
            url.clone(),
            "--etcd-cacert".into(),
            ca.display().to_string(),
            "--etcd-cert".into(),
            cert.display().to_string(),
            "--etcd-key".into(),
            key.display().to_string(),
            "--etcd-user".into(),
            "kvm01".into(),
        ]
    };
    let good = options(&ca);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();

    // The right CA, certificate and password: serve joins, holds a lease and leads.
    let log = dir.path().join("serve.log");
    let mut serve = spawn_serve(
        "kvm01",
        &repo.dir,
        &dir.path().join("state"),
        &log,
        &good,
        "kvm01-secret",
    );
    let started = Instant::now();
    let mut leader = None;
    while started.elapsed() < Duration::from_secs(30) && leader.is_none() {
        if let Some(code) = serve.try_wait().expect("wait") {
            panic!(
                "berth serve exited ({code}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        leader = berth_reconciler::etcd::current_leader(&reader)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(leader.as_deref(), Some("kvm01"), "{text}");
    assert!(text.contains("joined the fleet through etcd"), "{text}");
    eprintln!("serve led after {:?}", started.elapsed());

    // A wrong password: serve stops at once and says etcd refused it.
    let log = dir.path().join("wrong-password.log");
    let mut serve = spawn_serve(
        "kvm01",
        &repo.dir,
        &dir.path().join("state2"),
        &log,
        &good,
        "guess",
    );
    let code = exits_within(&mut serve, Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("cannot connect to etcd at {url}")),
        "{text}"
    );
    assert!(text.contains("authentication failed"), "{text}");

    // A CA that did not sign etcd's certificate: refused, naming the certificate.
    let other = Pki::new();
    let wrong_ca = options(&other.path("ca.pem"));
    let wrong_ca: Vec<&str> = wrong_ca.iter().map(String::as_str).collect();
    let log = dir.path().join("wrong-ca.log");
    let mut serve = spawn_serve(
        "kvm01",
        &repo.dir,
        &dir.path().join("state3"),
        &log,
        &wrong_ca,
        "kvm01-secret",
    );
    let code = exits_within(&mut serve, Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("cannot connect to etcd at {url}")),
        "{text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

/// Kills a `berth serve` by its pid when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_serve_with_the_simulated_driver_publishes_its_host_and_guests_to_etcd() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = berth_tests::GitRepo::new(dir.path().join("repo"));
    let manifests = |weight: u16| {
        format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm01, labels: {{rack: r0}}}}\n\
             spec: {{address: '127.0.0.1:7410', cpus: 0-1, memory: 4GiB}}\n---\n\
             apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm02, labels: {{rack: r1}}}}\n\
             spec: {{address: '127.0.0.1:7411', cpus: 0-1, memory: 4GiB}}\n---\n\
             apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: a}}\n\
             spec: {{host: kvm01, cpu: {{vcpus: 1}}, memory: {{size: 64MiB}}, io: {{weight: {weight}}}}}\n---\n\
             apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: b}}\n\
             spec: {{host: kvm02, cpu: {{vcpus: 1}}, memory: {{size: 64MiB}}}}\n---\n\
             apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: c}}\n\
             spec: {{hostSelector: {{rack: r1}}, cpu: {{vcpus: 1}}, memory: {{size: 64MiB}}}}\n"
        )
    };
    repo.commit(
        &[("fleet.yaml", &manifests(100))],
        "two hosts, three guests",
    );
    let url = etcd.endpoint();
    let etcd_args = ["--etcd", url.as_str()];
    let mut serves: Vec<Serve> = ["kvm01", "kvm02"]
        .iter()
        .map(|host| {
            Serve(spawn_serve(
                host,
                &repo.dir,
                &dir.path().join(format!("state-{host}")),
                &dir.path().join(format!("{host}.log")),
                &etcd_args,
                "",
            ))
        })
        .collect();
    let logs = || {
        ["kvm01", "kvm02"]
            .iter()
            .map(|h| {
                std::fs::read_to_string(dir.path().join(format!("{h}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let running = |view: &berth_reconciler::etcd::FleetView, weight: u16| {
        let at: Vec<(String, String, Option<u16>)> = view
            .observed
            .iter()
            .map(|g| (g.name.clone(), g.host.clone(), g.io_weight))
            .collect();
        at == [
            ("a".to_owned(), "kvm01".to_owned(), Some(weight)),
            ("b".to_owned(), "kvm02".to_owned(), None),
            ("c".to_owned(), "kvm02".to_owned(), None),
        ] && view.owners.len() == 3
            && view.hosts.len() == 2
    };
    let started = Instant::now();
    let view = loop {
        let now = read_fleet(&store).await.unwrap();
        if running(&now, 100) {
            break now;
        }
        for serve in &mut serves {
            if let Some(code) = serve.0.try_wait().expect("wait") {
                panic!("berth serve exited ({code}): {}", logs());
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the fleet in etcd: {:?}\n{}",
            now.observed,
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "both simulated hosts published after {:?}",
        started.elapsed()
    );
    for (name, host) in [("a", "kvm01"), ("b", "kvm02"), ("c", "kvm02")] {
        let owner = view.owners.get(name);
        assert_eq!(
            owner.map(|o| o.record.host.as_str()),
            Some(host),
            "{:?}",
            view.owners
        );
    }
    let kvm02 = &view.hosts["kvm02"];
    assert_eq!(kvm02.record.address.as_deref(), Some("127.0.0.1:7411"));
    assert_eq!(kvm02.record.observed.name, "kvm02");

    // What berth's CLI shows of it.
    let (code, out, err) = berth(&["get", "guests", "--fleet", "--etcd", &url, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows: Vec<(&str, &str, &str)> = rows
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap(),
                r["host"].as_str().unwrap_or("-"),
                r["owner"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("a", "kvm01", "kvm01"),
            ("b", "kvm02", "kvm02"),
            ("c", "kvm02", "kvm02")
        ],
        "{out}"
    );

    // A live change is published once the simulated host made it.
    repo.commit(&[("fleet.yaml", &manifests(200))], "a: io weight 200");
    let changed = Instant::now();
    while !running(&read_fleet(&store).await.unwrap(), 200) {
        assert!(
            changed.elapsed() < Duration::from_secs(30),
            "the retune was not published: {:?}\n{}",
            read_fleet(&store).await.unwrap().observed,
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the retune was published after {:?}", changed.elapsed());
}

async fn next_host_event(watch: &mut HostWatch) -> HostEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a host event within 5 s")
        .expect("the watch works")
        .expect("the watch goes on")
}

#[tokio::test]
async fn a_watch_from_a_fleet_read_sees_hosts_come_and_die_with_their_last_record() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let fleet = example_fleet();
    // The leader watches over its own connection, as it would from its own host.
    let leader = connect(&etcd).await;
    let start = read_fleet(&leader).await.unwrap();
    let mut watch = HostWatch::open(&leader, start.revision).await.unwrap();

    let a = HostSession::open(&store, "kvm01", None).await.unwrap();
    a.publish_host(&fleet.hosts[0], None).await.unwrap();
    match next_host_event(&mut watch).await {
        HostEvent::Published(h) => {
            assert_eq!(h.name, "kvm01");
            assert_eq!(h.lease, a.lease());
        }
        other => panic!("{other:?}"),
    }
    let b = HostSession::open(&store, "kvm02", None).await.unwrap();
    let mut host02 = fleet.hosts[0].clone();
    host02.name = "kvm02".into();
    b.publish_host(&host02, Some("127.0.0.1:7411"))
        .await
        .unwrap();
    assert!(
        matches!(next_host_event(&mut watch).await, HostEvent::Published(h) if h.name == "kvm02")
    );

    // A clean shutdown: gone at once.
    b.close().await.unwrap();
    match next_host_event(&mut watch).await {
        HostEvent::Gone { name, last, .. } => {
            assert_eq!(name, "kvm02");
            assert_eq!(last.unwrap().address.as_deref(), Some("127.0.0.1:7411"));
        }
        other => panic!("{other:?}"),
    }

    // A crash: gone one TTL after the last renewal, with the record it had (its
    // timeouts tell the leader how long it had to fence itself).
    let died = Instant::now();
    drop(a);
    match next_host_event(&mut watch).await {
        HostEvent::Gone { name, last, .. } => {
            assert_eq!(name, "kvm01");
            let last = last.unwrap();
            assert_eq!(last.observed, fleet.hosts[0]);
            assert_eq!(last.lease_ttl_seconds, 2);
            assert_eq!(last.self_fence_after_ms, 1000);
        }
        other => panic!("{other:?}"),
    }
    let noticed = died.elapsed();
    assert!(
        noticed >= Duration::from_millis(1700) && noticed < Duration::from_millis(3500),
        "{noticed:?}"
    );

    // Watching again from the same read replays every change: nothing is missed.
    let mut replay = HostWatch::open(&leader, start.revision).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(match next_host_event(&mut replay).await {
            HostEvent::Published(h) => format!("+{}", h.name),
            HostEvent::Gone { name, .. } => format!("-{name}"),
        });
    }
    assert_eq!(seen, ["+kvm01", "+kvm02", "-kvm02", "-kvm01"]);
    eprintln!("a crashed host was seen gone {noticed:?} after it stopped renewing (TTL 2 s)");
}

/// A berth-vmm heartbeat guest on this machine, killed by pid (and its cgroup removed)
/// on drop, also when the test fails.
struct Guest {
    child: Option<std::process::Child>,
    _root: tempfile::TempDir,
    socket: std::path::PathBuf,
    name: String,
}

impl Guest {
    fn start(name: &str) -> Guest {
        let root = tempfile::tempdir().expect("state root");
        let spec = root.path().join(format!("{name}.yaml"));
        std::fs::write(
            &spec,
            format!(
                "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: kvm01\n  cpu: {{vcpus: 1}}\n  memory: {{size: 16MiB}}\n  boot: {{kernel: builtin:heartbeat, heartbeat: {{tickHz: 50, ticksPerLine: 10, dirtyPagesPerTick: 0}}}}\n"
            ),
        )
        .unwrap();
        let mut child = berth_tests::command("berth-vmm")
            .arg("run")
            .arg("--spec")
            .arg(&spec)
            .arg("--state-dir")
            .arg(root.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(root.path().join("stderr")).unwrap())
            .spawn()
            .expect("spawn berth-vmm");
        let line = berth_tests::first_stdout_line(&mut child, Duration::from_secs(20));
        let mut guest = Guest {
            child: Some(child),
            _root: root,
            socket: Default::default(),
            name: name.to_owned(),
        };
        guest.socket = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("berth-vmm did not start: {line:?}"))
            .into();
        guest
    }

    fn client(&self) -> berth_hypervisor::control::Client {
        berth_hypervisor::control::Client::connect(&self.socket).expect("control socket")
    }

    /// Whether the VMM process still runs (reaps it once it exited).
    fn runs(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait().expect("try_wait")) {
            Some(None) => true,
            Some(Some(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(cgroups) = berth_hypervisor::host::cgroup::Cgroups::detect() {
            let _ = cgroups.remove_stale(&self.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_etcd_stops_its_ha_guest_before_its_lease_expires_and_keeps_the_others()
{
    berth_tests::require_root_and_kvm();
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let session = HostSession::open(&store, "kvm01", None).await.unwrap();
    let ha_name = berth_tests::unique("ha-fence");
    let plain_name = berth_tests::unique("plain-fence");
    let Acquire::Owned(_) = session.acquire(&ha_name).await.unwrap() else {
        panic!("acquire")
    };
    let mut ha = Guest::start(&ha_name);
    let mut plain = Guest::start(&plain_name);
    let mut ha_client = ha.client();

    // What berth serve does for its HA guests: renew each VMM's deadline to the host's
    // own self-fence deadline, every 100 ms, while the lease is held.
    let renew = |client: &mut berth_hypervisor::control::Client| -> Option<LeaseHealth> {
        let health = session.health();
        let left = health.vmm_fence_in(Instant::now())?;
        client.fence_deadline(Some(left)).ok()?;
        Some(health)
    };
    let running = Instant::now();
    while running.elapsed() < Duration::from_millis(1500) {
        assert!(renew(&mut ha_client).is_some(), "the lease is held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ha.runs());

    // Partition from etcd: renewals stop being answered.
    etcd.freeze();
    let mut last = session.health();
    while ha.runs() {
        if let Some(health) = renew(&mut ha_client) {
            last = health;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            last.fence_deadline.elapsed() < Duration::from_secs(3),
            "the HA guest still runs long after its fence deadline"
        );
    }
    let stopped = Instant::now();
    // The VMM stopped at the deadline it was last given, strictly before etcd can
    // expire the lease (one TTL after the last answered renewal was sent).
    let lease_expiry_earliest =
        last.fence_deadline - store.lease_timeouts().self_fence_after + store.lease_timeouts().ttl;
    assert!(stopped < lease_expiry_earliest, "fenced too late");
    assert!(
        stopped + Duration::from_millis(700) >= last.fence_deadline,
        "fenced before the deadline"
    );
    let margin = lease_expiry_earliest - stopped;
    // The guest without the policy runs on.
    assert!(plain.runs());
    assert_eq!(
        plain.client().status().unwrap().state,
        berth_hypervisor::control::GuestRunState::Running
    );

    // The partition lasts past the lease's TTL (a frozen etcd expires the lease when it
    // runs again); then another host may take the guest, and the copy here is gone.
    tokio::time::sleep_until((lease_expiry_earliest + Duration::from_secs(1)).into()).await;
    etcd.thaw();
    let other = HostSession::open(&store, "kvm02", None).await.unwrap();
    wait_for(
        "kvm02 to own the guest",
        Duration::from_secs(10),
        || async { matches!(other.acquire(&ha_name).await, Ok(Acquire::Owned(_))) },
    )
    .await;
    assert!(!ha.runs());
    assert!(plain.runs());
    eprintln!("the HA guest stopped {margin:?} before the host's lease could expire");
}

/// Three hosts labelled `rack: a` with 4 GiB each, and selector-placed guests.
fn selector_fleet() -> Desired {
    let mut text = String::new();
    for host in ["kvm01", "kvm02", "kvm03"] {
        text.push_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {host}, labels: {{rack: a}}}}\n\
             spec: {{address: '127.0.0.1:7410', cpus: '0-1', memory: 4GiB}}\n---\n"
        ));
    }
    for (guest, extra) in [
        ("a-plain", ""),
        ("b-ha", ", availability: {onHostFailure: restart}"),
        ("c-plain", ""),
    ] {
        text.push_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {guest}}}\n\
             spec: {{hostSelector: {{rack: a}}, cpu: {{vcpus: 1}}, memory: {{size: 1GiB}}{extra}}}\n---\n"
        ));
    }
    text.push_str(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: d-huge}\n\
         spec: {hostSelector: {rack: a}, cpu: {vcpus: 1}, memory: {size: 64GiB}}\n",
    );
    let set = berth_schema::load_files([("fleet.yaml", text)]).expect("valid manifests");
    Desired::from_manifests(&set.manifests)
}

async fn placed_on(store: &EtcdStore, guest: &str) -> Option<String> {
    berth_reconciler::etcd::read_placements(store)
        .await
        .unwrap()
        .get(guest)
        .and_then(|r| r.host.clone())
}

#[tokio::test]
async fn the_leader_places_selector_guests_restarts_ha_guests_of_dead_hosts_only_and_is_replaced_within_a_ttl(
) {
    use std::sync::Arc;
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let desired = Arc::new(selector_fleet());
    let (_tx, rx) = tokio::sync::watch::channel(Some(desired.clone()));
    let (rounds_tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    // Every host is up before anyone leads.
    let mut sessions = Vec::new();
    for host in &desired.hosts {
        let session = HostSession::open(&store, &host.metadata.name, None)
            .await
            .unwrap();
        session
            .publish_host(
                &berth_reconciler::model::ObservedHost::as_written(host, []),
                None,
            )
            .await
            .unwrap();
        sessions.push(session);
    }
    let mut tasks = Vec::new();
    for session in sessions {
        let rx = rx.clone();
        let tx = rounds_tx.clone();
        tasks.push(tokio::spawn(async move {
            let settings = berth_reconciler::etcd::LeaderSettings {
                resync_every: Duration::from_secs(5),
            };
            berth_reconciler::etcd::lead(&session, rx, settings, |leader, round| {
                let _ = tx.send((leader.host().to_owned(), Instant::now(), round.clone()));
            })
            .await
        }));
        if tasks.len() == 1 {
            // kvm01 leads: it campaigns first.
            let (leader, _, _) = rounds.recv().await.expect("a first round");
            assert_eq!(leader, "kvm01");
        }
    }
    // Most free memory first, then by name: a-plain on kvm01, b-ha on kvm02, c-plain on
    // kvm03; d-huge fits nowhere, with the reason recorded.
    for (guest, host) in [
        ("a-plain", "kvm01"),
        ("b-ha", "kvm02"),
        ("c-plain", "kvm03"),
    ] {
        assert_eq!(
            placed_on(&store, guest).await.as_deref(),
            Some(host),
            "{guest}"
        );
    }
    let records = berth_reconciler::etcd::read_placements(&store)
        .await
        .unwrap();
    let huge = &records["d-huge"];
    assert_eq!(huge.host, None);
    assert!(
        huge.reason
            .as_deref()
            .unwrap_or_default()
            .contains("64GiB does not fit in host kvm01's 4GiB for guests on normal pages"),
        "{huge:?}"
    );
    assert_eq!(read_fleet(&store).await.unwrap().placements, records);

    // kvm01 (the leader, running a-plain) and kvm02 (running the HA guest b-ha) die.
    while rounds.try_recv().is_ok() {}
    let died = Instant::now();
    tasks[0].abort();
    tasks[1].abort();
    let (leader, at, round) = loop {
        let (leader, at, round) = tokio::time::timeout(Duration::from_secs(6), rounds.recv())
            .await
            .expect("a round after the deaths")
            .expect("rounds");
        if round.moved.iter().any(|(g, _, _)| g == "b-ha") {
            break (leader, at, round);
        }
    };
    let took = at - died;
    assert_eq!(leader, "kvm03");
    assert_eq!(
        round.moved,
        vec![(
            "b-ha".to_owned(),
            Some("kvm02".to_owned()),
            "kvm03".to_owned()
        )]
    );
    // Not before kvm02 must have fenced itself: its last renewal was at most `died`, its
    // self-fence due `self_fence_after` later; and within a TTL plus etcd's expiry check
    // and a round.
    let timeouts = store.lease_timeouts();
    assert!(took >= timeouts.self_fence_after, "{took:?}");
    assert!(
        took <= timeouts.ttl + Duration::from_millis(1500),
        "{took:?}"
    );
    // The non-HA guest of the dead leader waits for its host.
    assert_eq!(placed_on(&store, "a-plain").await.as_deref(), Some("kvm01"));
    assert_eq!(placed_on(&store, "c-plain").await.as_deref(), Some("kvm03"));
    eprintln!(
        "HA guest re-placed {took:?} after its host died (lease TTL {:?})",
        timeouts.ttl
    );
    for task in tasks {
        task.abort();
    }
}
