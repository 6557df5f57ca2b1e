//! The scheduler on manifests written as YAML.

use super::*;

fn fleet(hosts: &[(&str, &str, &str, &str)], guests: &[(&str, &str)]) -> Desired {
    let mut text = String::new();
    for (name, labels, memory, extra) in hosts {
        text.push_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {name}, labels: {labels}}}\n\
             spec: {{address: '127.0.0.1:7410', cpus: '0-3', memory: {memory}{extra}}}\n---\n"
        ));
    }
    for (name, spec) in guests {
        let cpu = if spec.contains("cpu:") {
            ""
        } else {
            "cpu: {vcpus: 1}, "
        };
        text.push_str(&format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}, labels: {{app: db}}}}\n\
             spec: {{{cpu}{spec}}}\n---\n"
        ));
    }
    let set = berth_schema::load_files([("fleet.yaml", text)]).expect("valid manifests");
    Desired::from_manifests(&set.manifests)
}

fn run(desired: &Desired, previous: &[(&str, &str)], down: &[&str]) -> BTreeMap<String, Placement> {
    let previous = previous
        .iter()
        .map(|(g, h)| ((*g).to_owned(), (*h).to_owned()))
        .collect();
    schedule(desired, &[], &|h| !down.contains(&h), &previous)
}

fn placed(p: &BTreeMap<String, Placement>, guest: &str) -> String {
    match &p[guest] {
        Placement::Placed(h) => h.clone(),
        Placement::Unplaced(why) => panic!("{guest} unplaced: {why}"),
    }
}

fn unplaced(p: &BTreeMap<String, Placement>, guest: &str) -> String {
    match &p[guest] {
        Placement::Unplaced(why) => why.clone(),
        Placement::Placed(h) => panic!("{guest} placed on {h}"),
    }
}

#[test]
fn selector_room_and_anti_affinity_decide_and_the_answer_is_deterministic() {
    let d = fleet(
        &[
            ("a1", "{rack: a}", "2GiB", ""),
            ("a2", "{rack: a}", "4GiB", ""),
            ("b1", "{rack: b}", "64GiB", ""),
        ],
        &[
            ("fixed", "host: a2, memory: {size: 3GiB}"),
            ("s1", "hostSelector: {rack: a}, memory: {size: 512MiB}"),
            (
                "s2",
                "hostSelector: {rack: a}, memory: {size: 1GiB}, antiAffinity: {app: db}",
            ),
            (
                "s3",
                "hostSelector: {rack: a}, memory: {size: 1GiB}, antiAffinity: {app: db}",
            ),
        ],
    );
    let p = run(&d, &[], &[]);
    // a2 has 1 GiB free next to `fixed`, a1 2 GiB: s1 goes to a1 (more free).
    assert_eq!(placed(&p, "s1"), "a1");
    // Every rack-a host runs an app: db guest (`fixed` on a2, s1 on a1): s2 fits nowhere.
    assert!(unplaced(&p, "s2").contains("anti-affinity"), "{p:?}");
    assert_eq!(p, run(&d, &[], &[]), "deterministic");
    assert!(
        !p.contains_key("fixed"),
        "guests named to a host are not scheduled"
    );
}

#[test]
fn guests_keep_their_host_and_hosts_that_are_down_take_nothing() {
    let d = fleet(
        &[
            ("a1", "{rack: a}", "4GiB", ""),
            ("a2", "{rack: a}", "8GiB", ""),
        ],
        &[("s1", "hostSelector: {rack: a}, memory: {size: 1GiB}")],
    );
    assert_eq!(placed(&run(&d, &[], &[]), "s1"), "a2");
    assert_eq!(placed(&run(&d, &[("s1", "a1")], &[]), "s1"), "a1");
    assert_eq!(placed(&run(&d, &[("s1", "a1")], &["a1"]), "s1"), "a2");
    let why = unplaced(&run(&d, &[], &["a1", "a2"]), "s1");
    assert!(
        why.contains("a1 is down") && why.contains("a2 is down"),
        "{why}"
    );
}

#[test]
fn hugepages_and_pinning_count() {
    let d = fleet(
        &[
            ("h1", "{}", "8GiB", ", hugepages: {2MiB: 256}"),
            ("h2", "{}", "16GiB", ""),
        ],
        &[
            (
                "big",
                "hostSelector: {}, memory: {size: 256MiB, hugepages: {pageSize: 2MiB}}",
            ),
            (
                "more",
                "hostSelector: {}, memory: {size: 512MiB, hugepages: {pageSize: 2MiB}}",
            ),
            (
                "pinned",
                "hostSelector: {}, memory: {size: 64MiB}, cpu: {vcpus: 1, dedicated: true, pinning: {vcpus: {0: '7'}}}",
            ),
        ],
    );
    let p = run(&d, &[], &[]);
    assert_eq!(placed(&p, "big"), "h1");
    let why = unplaced(&p, "more");
    assert!(
        why.contains("h1's 2MiB hugepage pool has 128 of 256 pages free, 256 needed"),
        "{why}"
    );
    assert!(why.contains("host h2 keeps no 2MiB hugepage pool"), "{why}");
    assert!(unplaced(&p, "pinned").contains("has no CPU 7"), "{p:?}");
}

#[test]
fn no_matching_host_is_named() {
    let d = fleet(
        &[("a1", "{rack: a}", "4GiB", "")],
        &[("s1", "hostSelector: {rack: z}, memory: {size: 1GiB}")],
    );
    assert_eq!(
        unplaced(&run(&d, &[], &[]), "s1"),
        "no Host matches hostSelector {rack: z}"
    );
}
