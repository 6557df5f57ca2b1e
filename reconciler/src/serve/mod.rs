//! `berth serve`: the host-resident service that follows a git repository and keeps
//! its host converged; and `berth status`, which reads the service's status.
//!
//! The pieces, each usable and tested on its own:
//! - [`source`]: noticing new heads (watch, poll, webhook) and reading each one once
//!   ([`crate::revision`]).
//! - [`controller`]: the reconcile loop (observe, plan, dispatch) with a per-guest work
//!   queue, backoff ([`crate::backoff`]) and suspend; before a start it asks the fleet
//!   coordination ([`crate::fleet::Coordination`]) whether another host may still run
//!   the guest.
//! - [`http`]: `/healthz`, `/status`, `/metrics`, `/hooks/git` and the peer API
//!   ([`crate::fleet::peer`]), over TLS ([`crate::tls`]), with [`crate::auth`] for the
//!   webhook signature (and the fleet secret of `--insecure-plain-http`). Its client is
//!   [`crate::client`] (`berth status`, and the transport of
//!   [`crate::fleet::http::HttpPeers`]).
//! - [`status`]: what `/status` reports (with [`crate::conditions`]); `/metrics` is
//!   [`crate::metrics`].
//! - [`simfleet`]: `--driver sim`, a simulated fleet that survives restarts.
//! - [`locked`]: each action holds the state directory's lock, as `berth apply` and
//!   `berth stop` do, for the action only.
//!
//! With `--driver local`, the driver is the one this host's Host manifest names in
//! the branch head when the service starts: berth-vmm, or libvirt
//! ([`crate::fleet::libvirt`]; restart the service after changing `spec.driver` or
//! `spec.libvirt`). On berth-vmm hosts each new head is also checked against this machine
//! ([`crate::machine`]): a Host manifest naming CPUs, memory or hugepage sizes it lacks
//! makes the revision invalid, so nothing of it is done.
//! Cross-host work (the start guard, live migration to another host and its
//! destination side, unknown switchovers) lives in [`crate::fleet`]; this module wires
//! it up for `--driver local`.
//!
//! Restart safety: the service keeps no state that matters besides what it observes
//! and, for each migration away from this host, where it went (recorded before it
//! starts). It acts only after a full observe, so after a restart (or a SIGKILL) it
//! adopts what runs instead of starting it again; a guest its predecessor left paused
//! in an unknown switchover is resolved by asking the recorded destination. On SIGTERM or SIGINT it stops dispatching,
//! cancels a migration in flight that has not reached its switchover (the guest stays
//! on its source), lets the other actions in flight finish (a driver leaves each guest
//! running exactly once), and exits with the guests running.

pub mod controller;
pub mod http;
pub mod locked;
pub mod simfleet;
pub mod source;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::auth::{Secret, SecretError};
use crate::backoff::BackoffPolicy;
use crate::client;
use crate::driver::local::{locate_vmm, SharedStateLock};
use crate::driver::{Driver, DriverError, DriverKind, LibvirtDriver, LocalDriver};
use crate::fleet::http::HttpPeers;
use crate::fleet::incoming::{IncomingNotes, LocalIncoming};
use crate::fleet::libvirt::{LibvirtIncoming, LibvirtServe};
use crate::fleet::peer::{IncomingMigrations, NoIncoming};
use crate::fleet::placement::Placements;
use crate::fleet::remote::{Enforced, ServeDriver};
use crate::fleet::switchover::{Resolver, Switchovers};
use crate::fleet::Coordination;
use crate::git::{GitError, GitRepo};
use crate::machine::Machine;
use crate::metrics::Metrics;
use controller::{Controller, ControllerConfig};
use locked::Locked;
use simfleet::{SimFleetError, SimulatedFleet};
use source::{Follower, Trigger};
use status::{SourceStatus, Status, StatusStore};

/// Arguments of `berth serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The manifest repository: a local path (a working tree or a bare repository). To
    /// follow a remote, keep a local clone fetched and follow e.g. `origin/main`.
    #[arg(long)]
    pub repo: PathBuf,
    /// The branch followed (any revision expression naming a commit works).
    #[arg(long, default_value = "main")]
    pub branch: String,
    /// Read only the manifests under this directory of the repository (by default,
    /// every `*.yaml`, `*.yml` and `*.json` outside hidden directories).
    #[arg(long)]
    pub path: Option<String>,
    /// This host's name, as its Host manifest names it: only guests placed on it (and
    /// migrations away from it) are acted on.
    #[arg(long)]
    pub host: String,
    /// Address of the API (status, metrics, webhook, peer API), served over TLS.
    #[arg(long, default_value = "127.0.0.1:7410")]
    pub listen: SocketAddr,
    /// The fleet CA, this host's certificate and key: the API is served over TLS and
    /// other hosts are called over mutual TLS (see `berth certs`).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Serve and call the API over plain HTTP, with no TLS at all: for experiments on
    /// loopback only (a non-loopback --listen is refused). Peers then authenticate with
    /// the fleet secret (--fleet-secret-file), which anyone on the path can read.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plain_http: bool,
    /// Where the driver keeps its state (`sim-fleet.json` for the simulated fleet).
    #[arg(long, default_value = "/var/lib/berth")]
    pub state_dir: PathBuf,
    /// What runs guests: `local` (this host's guests: berth-vmm processes, or libvirt
    /// domains when its Host manifest in the branch head says `driver: libvirt`) or
    /// `sim` (a simulated fleet, no real guests).
    #[arg(long, value_enum, default_value_t = DriverKind::Local)]
    pub driver: DriverKind,
    /// The berth-vmm binary (`--driver local`; default: `$BERTH_VMM`, else berth-vmm
    /// next to berth).
    #[arg(long)]
    pub vmm_path: Option<PathBuf>,
    /// How often to look at the branch head even without a filesystem event or webhook.
    #[arg(long, default_value = "30s")]
    pub poll_interval: berth_schema::Duration,
    /// How often to re-observe and correct drift when nothing else happens.
    #[arg(long, default_value = "60s")]
    pub resync_interval: berth_schema::Duration,
    /// Do not watch the repository's refs (on filesystems without inotify, such as
    /// NFS); the poll and the webhook still notice new heads.
    #[arg(long)]
    pub no_watch: bool,
    /// How long to let filesystem events settle before reading the head.
    #[arg(long, default_value = "50ms")]
    pub debounce: berth_schema::Duration,
    /// A file holding the webhook secret (as configured on the git host); whitespace at
    /// its ends (the final newline) is trimmed. Without it, every webhook is refused.
    /// Webhook bodies are read up to 25 MiB (GitHub sends at most 25 MB).
    #[arg(long)]
    pub webhook_secret_file: Option<PathBuf>,
    /// With --insecure-plain-http only: a file holding the fleet's shared secret for
    /// the peer API (without it, every peer request is refused). Under TLS, peers are
    /// authenticated by their certificates instead.
    #[arg(long, requires = "insecure_plain_http")]
    pub fleet_secret_file: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The fleet's etcd (`--etcd URL[,URL...]`, TLS and user): with it, this host
    /// coordinates with the others through etcd (lease, ownership records with
    /// fencing tokens); without it, it runs alone (see the README).
    #[command(flatten)]
    pub etcd: crate::etcd::EtcdArgs,
    /// The host lease's timeouts (with --etcd).
    #[command(flatten)]
    pub lease: crate::etcd::LeaseArgs,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why `berth serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The repository cannot be read.
    #[error("cannot follow the repository {path}")]
    Repo {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: GitError,
    },
    /// A secret file cannot be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The TLS files cannot be used.
    #[error("cannot serve TLS")]
    Tls(#[from] crate::tls::TlsError),
    /// Plain HTTP was asked for on an address other hosts can reach.
    #[error("--insecure-plain-http serves only a loopback address, not {0}: use TLS (--tls-ca, --tls-cert, --tls-key; see `berth certs`)")]
    PlainNotLoopback(SocketAddr),
    /// The state directory cannot be created.
    #[error("cannot create the state directory {path}")]
    StateDir {
        /// The directory.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The berth-vmm binary cannot be found.
    #[error("cannot use the local driver")]
    Vmm(#[source] DriverError),
    /// This machine's facts (CPUs, memory, hugepage sizes) cannot be read.
    #[error(transparent)]
    Machine(crate::machine::MachineError),
    /// The simulated fleet cannot be loaded.
    #[error(transparent)]
    SimFleet(#[from] SimFleetError),
    /// `--driver libvirt` was given (a Host manifest chooses libvirt).
    #[error("--driver {0} is not a command-line choice: this host's Host manifest chooses it (spec.driver)")]
    DriverUnsupported(DriverKind),
    /// This host's libvirtd does not answer.
    #[error("cannot use the libvirt driver of host {host}")]
    Libvirt {
        /// This host.
        host: String,
        /// The error.
        #[source]
        source: DriverError,
    },
    /// The async runtime cannot be built.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The HTTP listener cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The filesystem watch cannot be set up.
    #[error("cannot watch the repository")]
    Watch(#[source] notify::Error),
    /// Signal handlers cannot be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The HTTP server failed.
    #[error("the HTTP server failed")]
    Http(#[source] std::io::Error),
    /// The fleet's etcd cannot be used.
    #[error("cannot join the fleet through etcd")]
    Etcd(#[from] crate::etcd::EtcdError),
}

/// Sets up `tracing` on stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Another subscriber may already be set (tests); keep it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Runs `berth serve` until SIGTERM or SIGINT.
///
/// # Errors
/// When the settings are wrong (repository, secrets, listener) or the service fails.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    init_logging(args.log_format);
    let repo = GitRepo::open(&args.repo).map_err(|source| ServeError::Repo {
        path: args.repo.display().to_string(),
        source,
    })?;
    let webhook_secret = load_secret(args.webhook_secret_file.as_deref(), "webhook")?;
    let security = if args.insecure_plain_http {
        if !args.listen.ip().is_loopback() {
            return Err(ServeError::PlainNotLoopback(args.listen));
        }
        warn!("--insecure-plain-http: the API is served and peers are called without TLS");
        Security::Plain(load_secret(args.fleet_secret_file.as_deref(), "peer API")?)
    } else {
        for key in [&args.tls.tls_key, &args.tls.tls_cert]
            .into_iter()
            .flatten()
        {
            warn_if_readable_by_others(key);
        }
        Security::Tls(crate::tls::FleetTls::load_for_host(&args.tls, &args.host)?)
    };
    std::fs::create_dir_all(&args.state_dir).map_err(|source| ServeError::StateDir {
        path: args.state_dir.display().to_string(),
        source,
    })?;
    let fleet = match args.driver {
        DriverKind::Local => match libvirt_host(&repo, args) {
            Some(spec) => {
                let driver = LibvirtDriver::new(&args.host, spec, "").map_err(|source| {
                    ServeError::Libvirt {
                        host: args.host.clone(),
                        source,
                    }
                })?;
                Fleet::Libvirt(Arc::new(driver))
            }
            None => {
                let vmm = locate_vmm(args.vmm_path.as_deref()).map_err(ServeError::Vmm)?;
                Fleet::Local(Arc::new(LocalDriver::new(
                    args.host.clone(),
                    &args.state_dir,
                    vmm,
                )))
            }
        },
        DriverKind::Sim => Fleet::Sim(Arc::new(SimulatedFleet::open(Some(
            args.state_dir.join("sim-fleet.json"),
        ))?)),
        DriverKind::Libvirt => return Err(ServeError::DriverUnsupported(DriverKind::Libvirt)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-serve")
        .build()
        .map_err(ServeError::Runtime)?;
    // Guests run on this machine only with the local driver: its Host manifest is
    // checked against it (a simulated fleet has no machine to match).
    let machine = match fleet {
        Fleet::Local(_) => Some(Machine::read().map_err(ServeError::Machine)?),
        Fleet::Sim(_) | Fleet::Libvirt(_) => None,
    };
    let result = runtime.block_on(serve(args, repo, webhook_secret, security, fleet, machine));
    // Actions in flight were waited for already; nothing should be left.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn load_secret(
    path: Option<&std::path::Path>,
    what: &str,
) -> Result<Option<Arc<Secret>>, ServeError> {
    match path {
        Some(path) => {
            warn_if_readable_by_others(path);
            Ok(Some(Arc::new(Secret::from_file(path)?)))
        }
        None => {
            warn!("no secret for the {what}: every request to it is refused");
            Ok(None)
        }
    }
}

fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        // Certificates may be world-readable; keys and secrets not.
        let public = path.extension().is_some_and(|e| e == "pem" || e == "crt");
        if !public && meta.permissions().mode() & 0o077 != 0 {
            warn!(path = %path.display(), "the secret file is readable by others than its owner (chmod 600 it)");
        }
    }
}

/// How the API is served and peers are called.
enum Security {
    /// Mutual TLS with the fleet CA.
    Tls(crate::tls::FleetTls),
    /// Plain HTTP on loopback, with the fleet secret, if any.
    Plain(Option<Arc<Secret>>),
}

/// What runs the guests.
enum Fleet {
    Local(Arc<LocalDriver>),
    Sim(Arc<SimulatedFleet>),
    Libvirt(Arc<LibvirtDriver>),
}

/// This host's libvirt connection when its Host manifest in the branch head says
/// `driver: libvirt`; `None` for berth-vmm, and when the head cannot be read or is
/// invalid (then no revision is enforced until a valid one comes, and the local
/// driver's service starts).
fn libvirt_host(repo: &GitRepo, args: &ServeArgs) -> Option<berth_schema::LibvirtSpec> {
    let head = repo.resolve(&args.branch).ok()?;
    let revision =
        source::read_revision(repo, args.path.as_deref(), &head, Trigger::Startup).ok()?;
    let desired = revision.manifests.ok()?;
    desired
        .hosts
        .iter()
        .find(|h| h.metadata.name == args.host)
        .filter(|h| h.spec.driver == berth_schema::HostDriver::Libvirt)
        .map(|h| h.spec.libvirt_or_default())
}

async fn serve(
    args: &ServeArgs,
    repo: GitRepo,
    webhook_secret: Option<Arc<Secret>>,
    security: Security,
    fleet: Fleet,
    machine: Option<Machine>,
) -> Result<(), ServeError> {
    let host_names = crate::tls::HostNames::default();
    let (transport, peer_auth, server_tls) = match security {
        Security::Tls(tls) => (
            client::Transport::Tls(Arc::new(tls.client()?)),
            http::PeerAuth::Certificates(host_names.clone()),
            Some(tls.server_config()?),
        ),
        Security::Plain(secret) => (
            client::Transport::Plain {
                fleet_secret: secret.clone(),
            },
            http::PeerAuth::Secret(secret),
            None,
        ),
    };
    let metrics = Arc::new(Metrics::new());
    let enforced = Arc::new(Enforced::default());
    let notes = Arc::new(IncomingNotes::default());
    let switchovers = Arc::new(Switchovers::default());
    let direct = HttpPeers::new(
        Arc::new(Placements::open(Some(
            args.state_dir.join("placements.json"),
        ))),
        transport.clone(),
    );
    let coordination: Arc<dyn Coordination>;
    let etcd = match args.etcd.config() {
        Ok(config) => {
            let etcd = Arc::new(join_etcd(args, config, direct).await?);
            coordination = etcd.clone();
            Some(etcd)
        }
        Err(crate::etcd::NoEtcd) => {
            coordination = Arc::new(direct);
            None
        }
    };
    // The state lock, held around each action of the service (see `locked`).
    let state_lock = Arc::new(SharedStateLock::new(&args.state_dir, "berth serve"));
    let (driver, incoming, local): (Arc<dyn Driver>, Arc<dyn IncomingMigrations>, _) = match &fleet
    {
        Fleet::Local(local) => {
            let driver = Arc::new(ServeDriver::new(
                Arc::clone(local),
                Arc::clone(&enforced),
                Arc::clone(&coordination),
                Arc::clone(&metrics),
                Arc::clone(&switchovers),
                tokio::runtime::Handle::current(),
            ));
            let incoming = Arc::new(
                LocalIncoming::new(
                    (Arc::clone(local), Arc::clone(&state_lock)),
                    Arc::clone(&enforced),
                    repo.clone(),
                    args.path.clone(),
                    Arc::clone(&notes),
                )
                .with_coordination(Arc::clone(&coordination), tokio::runtime::Handle::current()),
            );
            let locked = Arc::new(Locked::new(Arc::clone(&driver), Arc::clone(&state_lock)));
            (locked, incoming.clone(), Some((driver, incoming)))
        }
        Fleet::Sim(sim) => (sim.clone(), Arc::new(NoIncoming), None),
        Fleet::Libvirt(libvirt) => (
            Arc::new(Locked::new(
                Arc::new(LibvirtServe::new(
                    Arc::clone(libvirt),
                    Arc::clone(&enforced),
                    Arc::clone(&coordination),
                    Arc::clone(&metrics),
                    tokio::runtime::Handle::current(),
                )),
                Arc::clone(&state_lock),
            )),
            Arc::new(LibvirtIncoming::new(Arc::clone(libvirt))),
            None,
        ),
    };
    let status = StatusStore::new(Status {
        host: args.host.clone(),
        driver: driver.name().to_owned(),
        source: SourceStatus {
            repo: args.repo.display().to_string(),
            branch: args.branch.clone(),
            ..SourceStatus::default()
        },
        ..Status::default()
    });
    let status_store = status.clone();
    let (triggers, trigger_rx) = mpsc::channel(16);
    let (events, event_rx) = mpsc::channel(4);
    let (shutdown, shutdown_rx) = watch::channel(false);

    let listener = bind(args.listen).await?;
    let api = http::router(http::ApiState {
        status: status.clone(),
        metrics: Arc::clone(&metrics),
        triggers: triggers.clone(),
        webhook_secret,
        peers: peer_auth,
        incoming,
    });
    let mut http_stop = shutdown_rx.clone();
    let stopped = async move {
        let _ = http_stop.wait_for(|stop| *stop).await;
    };
    let http = match server_tls {
        Some(config) => {
            let listener =
                crate::tls::TlsListener::new(listener, config).map_err(ServeError::Http)?;
            let api = api.into_make_service_with_connect_info::<crate::tls::Connection>();
            tokio::spawn(async move {
                axum::serve(listener, api)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
        None => tokio::spawn(async move {
            axum::serve(listener, api)
                .with_graceful_shutdown(stopped)
                .await
        }),
    };
    info!(listen = %args.listen, host = %args.host, repo = %args.repo.display(), branch = %args.branch, "berth serve started");

    let _watcher = if args.no_watch {
        None
    } else {
        Some(source::watch(&repo, triggers.clone()).map_err(ServeError::Watch)?)
    };
    tokio::spawn(source::poll(args.poll_interval.get(), triggers.clone()));
    let _ = triggers.try_send(Trigger::Startup);
    let mut follower = Follower::new(
        repo,
        args.branch.clone(),
        args.path.clone(),
        args.debounce.get(),
    );
    if let Some(machine) = machine {
        follower = follower.with_machine_check(source::MachineCheck {
            host: args.host.clone(),
            machine,
        });
    }
    tokio::spawn(follower.run(trigger_rx, events.clone()));
    drop(events);

    let sim = match &fleet {
        Fleet::Sim(sim) => Some(Arc::clone(sim)),
        Fleet::Local(_) | Fleet::Libvirt(_) => None,
    };
    let libvirt = match &fleet {
        Fleet::Libvirt(libvirt) => Some(Arc::clone(libvirt)),
        Fleet::Local(_) | Fleet::Sim(_) => None,
    };
    // With etcd: the leader's placements (followed by every host, the leader among
    // them) and the revision the leader schedules.
    let (leader_revision, leader_rx) = watch::channel(None::<Arc<crate::model::Desired>>);
    let controller = Controller::new(
        ControllerConfig {
            host: args.host.clone(),
            resync: args.resync_interval.get(),
            backoff: BackoffPolicy::default(),
        },
        driver,
        status,
        Arc::clone(&metrics),
    );
    let placed_by_leader = Arc::clone(&enforced);
    let mut controller = controller
        .on_revision(Box::new(move |commit, desired| {
            host_names.set(desired.hosts.iter().map(|h| h.metadata.name.clone()));
            enforced.set(commit, desired);
            if let Some(sim) = &sim {
                sim.add_hosts(desired);
            }
            if let Some(libvirt) = &libvirt {
                libvirt.set_desired(commit.as_str(), desired);
            }
            leader_revision.send_replace(Some(Arc::clone(desired)));
        }))
        .with_start_guard(Arc::clone(&coordination));
    if let Some(etcd) = &etcd {
        controller = fleet_scheduling(
            controller,
            etcd.session(),
            &placed_by_leader,
            leader_rx,
            local.as_ref().map(|_| &fleet),
            shutdown_rx.clone(),
        );
    }
    if let (Some((driver, _)), Fleet::Local(local_driver)) = (&local, &fleet) {
        controller = controller
            .with_incoming_notes(notes)
            .with_switchovers(Arc::clone(&switchovers));
        tokio::spawn(
            Arc::clone(driver).follow_destinations(controller.pokes(), shutdown_rx.clone()),
        );
        let resolver = Resolver::new(
            (Arc::clone(local_driver), Arc::clone(&state_lock)),
            Arc::clone(&coordination),
            Arc::clone(&metrics),
            switchovers,
        );
        tokio::spawn(resolver.run(
            args.resync_interval.get(),
            controller.pokes(),
            shutdown_rx.clone(),
        ));
    }
    if let Some(etcd) = &etcd {
        tokio::spawn(Arc::clone(etcd).run(shutdown_rx.clone()));
    }
    tokio::spawn(show_coordination(
        Arc::clone(&coordination),
        status_store,
        controller.retries(),
        shutdown_rx.clone(),
    ));
    let controller = tokio::spawn(controller.run(event_rx, shutdown_rx));

    wait_for_signal().await.map_err(ServeError::Signals)?;
    let _ = shutdown.send(true);
    let migrating = local
        .as_ref()
        .map(|(driver, _)| driver.cancel())
        .unwrap_or_default();
    if migrating.is_empty() {
        info!("stopping: finishing the actions in flight; guests keep running");
    } else {
        info!(guests = %migrating.join(","), "stopping: cancelling the migrations in flight that have not reached their switchover, finishing the other actions; guests keep running");
    }
    if let Err(e) = controller.await {
        error!(error = %e, "the reconcile loop failed");
    }
    let served = match http.await {
        Ok(result) => result.map_err(ServeError::Http),
        Err(e) => {
            error!(error = %e, "the HTTP server failed");
            Ok(())
        }
    };
    // After the server: a migration prepared by a request still in flight at the
    // signal is discarded too.
    if let Some((_, incoming)) = &local {
        let incoming = Arc::clone(incoming);
        let _ = tokio::task::spawn_blocking(move || incoming.abort_pending()).await;
    }
    info!("stopped");
    served
}

/// Connects to the fleet's etcd and opens this host's session: the lease of the
/// previous run (kept in `<state-dir>/etcd-lease`) is resumed while it lives, so a
/// restarted service keeps its guests' ownership records.
async fn join_etcd(
    args: &ServeArgs,
    mut config: crate::etcd::EtcdConfig,
    direct: HttpPeers,
) -> Result<crate::fleet::etcd::EtcdCoordination, ServeError> {
    config.lease = args.lease.timeouts();
    let endpoints = config.endpoints.join(",");
    let store = config.connect().await?;
    let lease_file = args.state_dir.join("etcd-lease");
    let resume = std::fs::read_to_string(&lease_file)
        .ok()
        .and_then(|t| i64::from_str_radix(t.trim(), 16).ok());
    let session = crate::etcd::HostSession::open(&store, &args.host, resume).await?;
    if let Err(e) = std::fs::write(&lease_file, format!("{:x}\n", session.lease())) {
        warn!(path = %lease_file.display(), error = %e, "cannot keep the etcd lease id; a restart will take a new lease");
    }
    info!(etcd = %endpoints, lease = format!("{:x}", session.lease()), "joined the fleet through etcd");
    Ok(crate::fleet::etcd::EtcdCoordination::new(
        Arc::new(session),
        &args.state_dir,
        direct,
        endpoints,
    ))
}

/// Scheduling and HA on etcd: this host follows the placement records (its controller
/// places selector guests from them and runs a pass when they change), campaigns to
/// lead and, while it leads, keeps the placements of the revision it enforces; with the
/// local driver it renews the self-fence deadline of its HA guests' VMMs while its lease
/// is held.
fn fleet_scheduling(
    controller: Controller,
    session: &Arc<crate::etcd::HostSession>,
    enforced: &Enforced,
    revisions: watch::Receiver<Option<Arc<crate::model::Desired>>>,
    local: Option<&Fleet>,
    stop: watch::Receiver<bool>,
) -> Controller {
    let store = session.store().clone();
    let shared = crate::etcd::follow_placements_for(
        store.clone(),
        session.host().to_owned(),
        controller.pokes(),
        stop.clone(),
    );
    let leader = Arc::clone(session);
    let leader_revisions = revisions.clone();
    tokio::spawn(async move {
        crate::etcd::lead_on(
            &leader,
            leader_revisions,
            crate::etcd::LeaderSettings::default(),
            |leadership, round| {
                for (guest, from, to) in &round.moved {
                    info!(
                        leader = leadership.host(),
                        guest,
                        from = from.as_deref().unwrap_or("-"),
                        to,
                        "placed by selector"
                    );
                }
            },
        )
        .await;
    });
    if let Some(Fleet::Local(driver)) = local {
        let driver = Arc::clone(driver);
        let every = store.lease_timeouts().renew_every;
        // HA guests' VMMs arm their fence from this file at their start; written afresh
        // now, before the first guest can be started.
        let deadline_file = driver.state_dir().join("fence-deadline");
        crate::etcd::begin_deadline_file(session, &deadline_file);
        driver.fence_ha_guests(deadline_file.clone());
        // Every guest running here may carry a deadline from an earlier service: the
        // first round takes it away from those that are not HA.
        let mut renewed: std::collections::BTreeSet<String> = driver
            .guest_dir_names()
            .unwrap_or_default()
            .into_iter()
            .collect();
        tokio::spawn(crate::etcd::keep_fences(
            Arc::clone(session),
            move || {
                let Some(desired) = revisions.borrow().clone() else {
                    return crate::etcd::FenceTargets::default();
                };
                let ha: std::collections::BTreeSet<String> = desired
                    .guests
                    .iter()
                    .filter(|g| g.spec.restarts_on_host_failure())
                    .map(|g| g.metadata.name.clone())
                    .collect();
                // Where the guests run, not where they are placed: one moving away
                // keeps its fence until its migration ends.
                let here = match driver.guest_dir_names() {
                    Ok(here) => here,
                    Err(e) => {
                        warn!(error = %e, "cannot list the guests here; fences renewed as before");
                        renewed.iter().cloned().collect()
                    }
                };
                let (renew, disarm) = crate::etcd::fence_round(&here, &ha, &renewed);
                let sockets = |names: &std::collections::BTreeSet<String>| {
                    names
                        .iter()
                        .map(|n| driver.control_socket(n))
                        .collect::<Vec<_>>()
                };
                // Incoming VMMs of HA guests too (armed at their start): the guest may
                // run there after the commit, before the handover.
                let mut renew_sockets = sockets(&renew);
                renew_sockets.extend(
                    ha.iter()
                        .filter(|g| driver.incoming_under_way(g))
                        .map(|g| driver.incoming_socket(g)),
                );
                let targets = crate::etcd::FenceTargets {
                    renew: renew_sockets,
                    disarm: sockets(&disarm),
                };
                renewed = renew;
                targets
            },
            every,
            Some(deadline_file),
            stop,
        ));
    }
    // A move of a selector-placed guest needs its destination observed too.
    enforced.place_with(Arc::clone(&shared) as Arc<dyn crate::scheduler::Placer>);
    controller.with_placer(shared)
}

/// Shows in `/status` whether this host can coordinate with its fleet, until `stop`;
/// when it can again, `retry` makes the loop try what it held back at once.
async fn show_coordination(
    coordination: Arc<dyn Coordination>,
    status: StatusStore,
    retry: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut shown = None;
    loop {
        let now = coordination.health();
        if now != shown {
            match &now {
                Some(lost) => warn!(reason = lost.reason, "{}", lost.message),
                None if shown.is_some() => {
                    info!("fleet coordination is back: retrying what was held back");
                    retry.notify_one();
                }
                None => {}
            }
            status.update(|s| {
                s.coordination_lost = now.as_ref().map(|l| status::CoordinationLost {
                    reason: l.reason.to_owned(),
                    message: l.message.clone(),
                })
            });
            shown = now;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Binds the API's listener. After a SIGKILL the address can stay taken for a moment
/// (a VMM being started then holds the inherited socket until its exec), so a taken
/// address is tried again for a few seconds.
async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => return Err(ServeError::Listen { addr, source }),
        }
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}

/// Arguments of `berth status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The `berth serve` to ask: `https://HOST:PORT` (TLS, checked against the fleet CA
    /// of --tls-ca), or `http://HOST:PORT` for a service started with
    /// --insecure-plain-http.
    #[arg(long, default_value = "https://127.0.0.1:7410")]
    pub server: String,
    /// The name the server's certificate must carry (default: the host part of
    /// --server; a Host name such as `kvm01` works when --server is an address the
    /// certificate does not name).
    #[arg(long)]
    pub server_name: Option<String>,
    /// The fleet CA (required for https); a client certificate is optional (`/status`
    /// needs none).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Output format: `text` (a header and a table of guests with their conditions),
    /// or the whole `/status` document as `json` or `yaml`.
    #[arg(short = 'o', long, value_name = "FORMAT",
          value_parser = crate::output::without_markdown(), default_value = "text")]
    pub output: crate::output::Output,
    /// The same as `-o json` (the flag before `-o` existed).
    #[arg(long, hide = true, conflicts_with = "output")]
    pub json: bool,
}

/// Why `berth status` failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// `berth serve` cannot run this driver's hosts yet.
    #[error("berth serve does not run {0} hosts yet")]
    DriverUnsupported(DriverKind),
    /// The async runtime cannot be built.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The service could not be asked.
    #[error(transparent)]
    Client(#[from] client::ClientError),
    /// The status cannot be written as YAML.
    #[error("cannot write the status as YAML")]
    Yaml(#[source] serde_yaml::Error),
    /// The TLS files cannot be used.
    #[error("cannot speak TLS")]
    Tls(#[from] crate::tls::TlsError),
}

/// Reads the status of a `berth serve` and renders it (a table, JSON or YAML).
///
/// # Errors
/// When the service cannot be reached or answers with an error.
pub fn status_text(args: &StatusArgs) -> Result<String, StatusError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatusError::Runtime)?;
    let transport = if args.server.starts_with("http://") {
        client::Transport::plain()
    } else {
        client::Transport::Tls(Arc::new(crate::tls::FleetTls::load(&args.tls)?.client()?))
    };
    let name = match &args.server_name {
        Some(name) => name.clone(),
        None => client::host_of(&args.server)?,
    };
    let status: Status = runtime.block_on(client::status(&transport, &args.server, &name))?;
    use crate::output::{self, Output};
    let format = if args.json { Output::Json } else { args.output };
    Ok(match format {
        Output::Json => output::json(&status).expect("the status serializes"),
        Output::Yaml => output::yaml(&status).map_err(StatusError::Yaml)?,
        Output::Text | Output::Markdown => status::render_table(&status),
    })
}
