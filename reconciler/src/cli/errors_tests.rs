//! Every error of the reconciler printed as `berth` prints errors ([`super::report`]:
//! `error: <message>`, then `caused by: <cause>` per cause), from the raw chain, without
//! the de-duplication `report` does: no cause may be named twice. A message names its
//! cause or exposes it as `source`, never both.

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use berth_reconciler::auth::{AuthError, SecretError};
use berth_reconciler::client::ClientError;
use berth_reconciler::driver::local::follow::CannotTell;
use berth_reconciler::driver::local::LockError;
use berth_reconciler::driver::{DriverError, DriverKind};
use berth_reconciler::etcd::{EtcdError, Fenced, FencingToken, NoEtcd};
use berth_reconciler::fleet::peer::PeerError;
use berth_reconciler::fleet::switchover::ResolveError;
use berth_reconciler::fleet::{CoordinationError, OwnershipError, StartRefused};
use berth_reconciler::git::GitError;
use berth_reconciler::machine::MachineError;
use berth_reconciler::serve::simfleet::SimFleetError;
use berth_reconciler::serve::{ServeError, StatusError};
use berth_reconciler::tls::TlsError;

/// The messages of `error` and its causes, in order.
fn chain(error: &(dyn Error + 'static)) -> Vec<String> {
    let mut messages = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        messages.push(e.to_string());
        next = e.source();
    }
    messages
}

/// The lines `berth` would print for `error` if it printed every cause.
fn printed(error: &(dyn Error + 'static)) -> Vec<String> {
    chain(error)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let prefix = if i == 0 { "error: " } else { "caused by: " };
            format!("{prefix}{e}")
        })
        .collect()
}

/// Panics when a cause of `error` is named by a message before it.
fn names_each_cause_once(error: &(dyn Error + 'static)) {
    let chain = chain(error);
    for (i, cause) in chain.iter().enumerate() {
        assert!(!cause.trim().is_empty(), "an empty message in {chain:?}");
        if let Some(earlier) = chain[..i].iter().find(|m| m.contains(cause.as_str())) {
            panic!(
                "{cause:?} is printed twice (also in {earlier:?}):\n{}",
                printed(error).join("\n")
            );
        }
    }
    // What `berth` prints is then the whole chain: its de-duplication drops nothing.
    let kept = berth_hypervisor::report::causes_once(chain.iter().cloned());
    assert_eq!(kept, chain);
}

fn io(kind: std::io::ErrorKind) -> std::io::Error {
    std::io::Error::from(kind)
}

fn json_error() -> serde_json::Error {
    serde_json::from_str::<u32>("x").unwrap_err()
}

/// A real failure with a cause of its own: connecting to a VMM socket that is not there.
fn vmm_refused() -> berth_hypervisor::control::ClientError {
    match berth_hypervisor::control::Client::connect("/nonexistent/berth-test/control.sock") {
        Err(e) => e,
        Ok(_) => panic!("a socket at /nonexistent"),
    }
}

fn coordination_error() -> CoordinationError {
    CoordinationError {
        host: "kvm02".into(),
        source: Box::new(ClientError::Connect {
            server: "https://10.0.0.2:7410".into(),
            source: io(std::io::ErrorKind::ConnectionRefused),
        }),
    }
}

fn driver_errors() -> Vec<DriverError> {
    vec![
        DriverError::Capacity {
            host: "kvm01".into(),
            detail: "64 MiB free, 128 MiB asked".into(),
        },
        DriverError::NotFound("guest web-1 does not run on kvm01".into()),
        DriverError::Refused("spec.memory.size cannot change live".into()),
        DriverError::Simulated("start web-1".into()),
        DriverError::failed("starting web-1", io(std::io::ErrorKind::NotFound)),
        DriverError::failed("asking the VMM of web-1", vmm_refused()),
        DriverError::failed("migrating web-1 to kvm02", coordination_error()),
        DriverError::failed("reading /proc/cpuinfo", "a plain reason"),
    ]
}

fn cannot_tell() -> Vec<CannotTell> {
    vec![
        CannotTell::Incoming {
            guest: "web-1".into(),
            phase: berth_hypervisor::migration::MigrationPhase::Loaded,
        },
        CannotTell::IncomingSilent {
            guest: "web-1".into(),
        },
        CannotTell::NotExited { pid: 42 },
        CannotTell::Unasked {
            host: "kvm02".into(),
            source: coordination_error().source,
        },
        CannotTell::Timeout {
            host: "kvm02".into(),
            address: "https://10.0.0.2:7410".into(),
            timeout: Duration::from_secs(5),
        },
        CannotTell::Unrecorded {
            destination: "10.0.0.2:40123".into(),
            error: "no Running after Commit".into(),
        },
    ]
}

fn etcd_request() -> EtcdError {
    EtcdError::Request {
        what: "reading the ownership record of web-1".into(),
        source: etcd_client::Error::InvalidArgs("deadline exceeded".into()).into(),
    }
}

fn etcd_errors() -> Vec<EtcdError> {
    vec![
        EtcdError::Connect {
            endpoints: "http://127.0.0.1:1".into(),
            source: etcd_client::Error::InvalidArgs("connection refused".into()).into(),
        },
        etcd_request(),
        EtcdError::Timeout {
            what: "granting a lease".into(),
            timeout: Duration::from_secs(2),
        },
        EtcdError::Decode {
            key: "/berth/owners/web-1".into(),
            source: json_error(),
        },
        EtcdError::TlsFile {
            path: "/etc/berth/etcd-ca.pem".into(),
            source: io(std::io::ErrorKind::NotFound),
        },
        EtcdError::Timeouts("the self-fence comes after the lease expires"),
    ]
}

fn refused() -> StartRefused {
    StartRefused::CannotAsk {
        guest: "web-1".into(),
        host: "kvm01".into(),
        reason: "cannot reach https://10.0.0.1:7410".into(),
    }
}

fn git_spawn() -> GitError {
    GitError::Spawn {
        repo: "/srv/manifests".into(),
        source: io(std::io::ErrorKind::NotFound),
    }
}

fn tls_errors() -> Vec<TlsError> {
    vec![
        TlsError::File {
            what: "a certificate",
            path: "/etc/berth/tls.pem".into(),
            detail: "no PEM item".into(),
        },
        TlsError::Missing("--tls-key is needed with --tls-cert".into()),
        TlsError::WrongName {
            path: "/etc/berth/tls.pem".into(),
            host: "kvm01".into(),
        },
        TlsError::Rustls(Box::new(rustls::Error::General("key mismatch".into()))),
    ]
}

fn every_error() -> Vec<Box<dyn Error + Send + Sync>> {
    let mut all: Vec<Box<dyn Error + Send + Sync>> = Vec::new();
    all.extend(driver_errors().into_iter().map(|e| Box::new(e) as _));
    all.extend(cannot_tell().into_iter().map(|e| Box::new(e) as _));
    all.extend(etcd_errors().into_iter().map(|e| Box::new(e) as _));
    all.extend(tls_errors().into_iter().map(|e| Box::new(e) as _));
    let addr: SocketAddr = "0.0.0.0:7410".parse().unwrap();
    let others: Vec<Box<dyn Error + Send + Sync>> = vec![
        Box::new(LockError::Held {
            path: "/var/lib/berth/apply.lock".into(),
            pid: Some(7),
            holder: Some("berth serve".into()),
        }),
        Box::new(LockError::Io {
            path: "/var/lib/berth/apply.lock".into(),
            error: io(std::io::ErrorKind::PermissionDenied),
        }),
        Box::new(git_spawn()),
        Box::new(GitError::Failed {
            repo: "/srv/manifests".into(),
            args: "rev-parse main".into(),
            stderr: "fatal: bad revision".into(),
        }),
        Box::new(NoEtcd),
        Box::new(Fenced {
            guest: "web-1".into(),
            stale: FencingToken(3),
            current: None,
        }),
        Box::new(OwnershipError::Etcd(etcd_request())),
        Box::new(OwnershipError::Elsewhere {
            guest: "web-1".into(),
            host: "kvm03".into(),
            moving_to: Some("kvm04".into()),
            expected: "kvm01 moving to kvm02".into(),
        }),
        Box::new(OwnershipError::Missing {
            guest: "web-1".into(),
        }),
        Box::new(OwnershipError::Refused(refused())),
        Box::new(CoordinationError {
            host: "kvm02".into(),
            source: Box::new(OwnershipError::Missing {
                guest: "web-1".into(),
            }),
        }),
        Box::new(coordination_error()),
        Box::new(refused()),
        Box::new(ResolveError::CannotTell(cannot_tell().remove(3))),
        Box::new(ResolveError::Driver(DriverError::failed(
            "resolving the switchover of web-1",
            vmm_refused(),
        ))),
        Box::new(PeerError::Refused("web-1 already runs here".into())),
        Box::new(PeerError::Failed("the incoming VMM did not start".into())),
        Box::new(PeerError::CannotTell(cannot_tell().remove(0))),
        Box::new(PeerError::Busy(LockError::Held {
            path: "/var/lib/berth/apply.lock".into(),
            pid: Some(7),
            holder: Some("berth apply".into()),
        })),
        Box::new(ResolveError::Busy {
            guest: "web-1".into(),
            error: LockError::Io {
                path: "/var/lib/berth/apply.lock".into(),
                error: io(std::io::ErrorKind::PermissionDenied),
            },
        }),
        Box::new(SecretError::Read {
            path: "/etc/berth/secret".into(),
            source: io(std::io::ErrorKind::NotFound),
        }),
        Box::new(SecretError::Empty("/etc/berth/secret".into())),
        Box::new(AuthError::Mismatch),
        Box::new(ClientError::Http {
            server: "https://10.0.0.2:7410".into(),
            source: Box::new(io(std::io::ErrorKind::ConnectionReset)),
        }),
        Box::new(ClientError::Decode {
            server: "https://10.0.0.2:7410".into(),
            source: json_error(),
        }),
        Box::new(SimFleetError::Parse {
            path: "/tmp/fleet.json".into(),
            source: json_error(),
        }),
        Box::new(ServeError::Repo {
            path: "/srv/manifests".into(),
            source: git_spawn(),
        }),
        Box::new(ServeError::Tls(tls_errors().remove(3))),
        Box::new(ServeError::PlainNotLoopback(addr)),
        Box::new(ServeError::Vmm(DriverError::NotFound(
            "berth-vmm not found at /usr/libexec/berth-vmm".into(),
        ))),
        Box::new(ServeError::Libvirt {
            host: "kvm01".into(),
            source: DriverError::failed("connecting to qemu:///system", vmm_refused()),
        }),
        Box::new(ServeError::Listen {
            addr,
            source: io(std::io::ErrorKind::AddrInUse),
        }),
        Box::new(ServeError::Etcd(etcd_errors().remove(0))),
        Box::new(ServeError::DriverUnsupported(DriverKind::Libvirt)),
        Box::new(StatusError::Client(ClientError::Timeout(
            "https://10.0.0.2:7410".into(),
        ))),
        Box::new(MachineError::PageSizes(
            berth_hypervisor::host::hugepages::HugePageError::Unsupported {
                page_size: berth_schema::PageSize::Huge1G,
                path: PathBuf::from("/sys/kernel/mm/hugepages/hugepages-1048576kB"),
            },
        )),
    ];
    all.extend(others);
    all
}

#[test]
fn every_reconciler_error_names_each_cause_once_as_berth_prints_it() {
    let all = every_error();
    for error in &all {
        names_each_cause_once(&**error);
    }
    // The causes are all there, on one line or as sources.
    let text: Vec<String> = all.iter().map(|e| printed(&**e).join("\n")).collect();
    let driver = text.iter().find(|t| t.contains("asking the VMM")).unwrap();
    assert!(
        driver.contains("asking the VMM of web-1: Cannot connect to /nonexistent"),
        "{driver}"
    );
    let resolve = text
        .iter()
        .find(|t| t.contains("cannot ask kvm02"))
        .unwrap();
    assert!(
        resolve.contains("caused by: cannot reach https://10.0.0.2:7410"),
        "{resolve}"
    );
}

/// The check finds a message that names its cause and also exposes it.
#[test]
#[should_panic(expected = "is printed twice")]
fn a_cause_both_named_and_exposed_is_found() {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot lock /x: {source}")]
    struct Both {
        source: std::io::Error,
    }
    names_each_cause_once(&Both {
        source: io(std::io::ErrorKind::PermissionDenied),
    });
}
