//! A test fleet's network: a hub namespace with a bridge, and one namespace per host,
//! each linked to the bridge by a veth pair, on one /24. The hub holds etcd; the hosts
//! run `berth serve`. Every namespace is deleted on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::run_ok as run;

/// See the module documentation.
pub struct Bridge {
    /// The hub's namespace.
    pub hub: String,
    /// The hub's address on the bridge.
    pub hub_ip: String,
    /// Each host's namespace and address.
    pub hosts: Vec<(String, String)>,
    /// Each host's end of its veth (in the host's namespace).
    devs: Vec<String>,
}

impl Bridge {
    /// A hub and `hosts` host namespaces, named after `tag` (a few letters), this
    /// process and a counter, so that tests and test binaries side by side never meet.
    pub fn new(tag: &str, hosts: usize) -> Bridge {
        static NETS: AtomicU32 = AtomicU32::new(0);
        let k = NETS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let subnet = format!("10.{}.{}", 200 + k, pid % 250);
        let hub = format!("{tag}-{pid}-{k}-hub");
        let hub_ip = format!("{subnet}.1");
        run("ip", &["netns", "add", &hub]);
        let mut net = Bridge {
            hub: hub.clone(),
            hub_ip: hub_ip.clone(),
            hosts: Vec::new(),
            devs: Vec::new(),
        };
        run("ip", &["-n", &hub, "link", "set", "lo", "up"]);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{hub_ip}/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = format!("{tag}-{pid}-{k}-h{i}");
            let ip = format!("{subnet}.{}", 10 + i);
            let (inner, outer) = (format!("eth{i}"), format!("vb{}k{k}x{i}", pid % 100_000));
            run("ip", &["netns", "add", &ns]);
            net.hosts.push((ns.clone(), ip.clone()));
            run(
                "ip",
                &[
                    "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer,
                    "netns", &hub,
                ],
            );
            run("ip", &["-n", &hub, "link", "set", &outer, "master", "br0"]);
            run("ip", &["-n", &hub, "link", "set", &outer, "up"]);
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner],
            );
            run("ip", &["-n", &ns, "link", "set", &inner, "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            net.devs.push(inner);
        }
        net
    }

    /// Cuts host `i`'s link: it reaches neither the hub nor the other hosts.
    pub fn cut(&self, i: usize) {
        run(
            "ip",
            &["-n", &self.hosts[i].0, "link", "set", &self.devs[i], "down"],
        );
    }

    /// Cuts host `i` off from the hub only (etcd): packets to the hub's address are
    /// dropped by a blackhole route; the other hosts stay reachable.
    pub fn partition_from_hub(&self, i: usize) {
        run(
            "ip",
            &[
                "-n",
                &self.hosts[i].0,
                "route",
                "add",
                "blackhole",
                &format!("{}/32", self.hub_ip),
            ],
        );
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for ns in self.hosts.iter().map(|(ns, _)| ns).chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}
