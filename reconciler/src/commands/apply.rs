//! `berth apply`: validate, observe, plan, show the plan, confirm, execute in order,
//! observe again, and report per action what happened.
//!
//! - Nothing is touched when the manifests are invalid, or when this host's Host
//!   manifest (or a guest placed on it) does not fit this machine (CPUs, memory,
//!   hugepage sizes, /dev/kvm; see `berth_reconciler::machine`).
//! - An exclusive lock on `<state>/apply.lock` keeps two applies (or an apply and
//!   `berth serve`) apart: the second fails at once naming the holder, or waits with
//!   `--wait`.
//! - The local driver acts on this host only: guests placed on other hosts are listed,
//!   not touched (moving guests between hosts is `berth serve`'s).
//! - Before it starts a guest it asks the other hosts whether they may still run it
//!   (the start guard `berth serve` uses, [`berth_reconciler::fleet::Coordination`]):
//!   it refuses, naming the host, when another host runs the guest, or cannot be asked
//!   and is where the guest was last placed (by the manifests applied here or enforced
//!   by `berth serve` here, `<state>/placements.json`).
//! - After a successful apply, `<state>/applied.json` records the revision (the commit
//!   id for `--rev`, else a hash of the documents) and the time.

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context};
use berth_reconciler::apply::{execute, Outcome};
use berth_reconciler::client::Transport;
use berth_reconciler::driver::local::StateLock;
use berth_reconciler::driver::{Driver, DriverKind, LibvirtDriver, Scope, SimDriver};
use berth_reconciler::fleet::http::HttpPeers;
use berth_reconciler::fleet::placement::Placements;
use berth_reconciler::fleet::Coordination;
use berth_reconciler::model::{Desired, Observed, ObservedHost};
use berth_reconciler::output::{self, Output};
use berth_reconciler::plan::{Action, Plan};
use berth_reconciler::render;

use super::plan::Color;
use super::target::{load_source, Applied, LocalArgs};
use crate::cli::write_stdout;

/// Arguments of `berth apply`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A manifest directory (searched recursively for *.yaml, *.yml and *.json) or one file;
    /// `-` reads one manifest file from standard input (then only --yes confirms).
    /// Not with --rev.
    #[arg(conflicts_with = "rev")]
    pub path: Option<PathBuf>,
    /// The fleet's TLS files, to ask the other hosts' `berth serve` (over mutual TLS)
    /// whether they still run a guest before this host starts it. Without --tls-ca
    /// the other hosts are asked over plain HTTP (services started with
    /// --insecure-plain-http).
    #[command(flatten)]
    pub tls: berth_reconciler::tls::TlsArgs,
    /// Apply this git revision (branch, tag or commit) of --repo, read without a
    /// checkout.
    #[arg(long, value_name = "REV")]
    pub rev: Option<String>,
    /// With --rev: the git repository.
    #[arg(long, default_value = ".", value_name = "PATH")]
    pub repo: PathBuf,
    /// With --rev: read the manifests under this directory of the repository only.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<String>,
    /// Apply without asking for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Wait for another apply holding the state directory's lock instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Which guests to act on: berth-vmm processes on this host, or a simulated fleet.
    #[arg(long, value_enum, default_value_t = DriverKind::Local)]
    pub driver: DriverKind,
    /// With --driver sim: the simulated fleet runs these manifests as written.
    #[arg(long, value_name = "PATH")]
    pub sim_from: Option<PathBuf>,
    /// Colour in the plan.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    /// Output format: `text` (the plan, then a line per action as it is done), or one
    /// document at the end as `json` or `yaml`: the plan (as `berth plan -o json`), each
    /// action's outcome, and whether the fleet matches the manifests afterwards. With
    /// `json` or `yaml`, `--yes` is needed when there is anything to do.
    #[arg(short = 'o', long = "output", value_name = "FORMAT",
          value_parser = output::without_markdown(), default_value = "text")]
    pub output: Output,
    /// Local driver options.
    #[command(flatten)]
    pub local: LocalArgs,
}

/// Runs `berth apply`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let source = load_source(
        args.path.as_deref(),
        args.rev.as_deref(),
        &args.repo,
        args.dir.as_deref(),
    )?;
    for w in &source.validated.warnings {
        eprintln!("{w}");
    }
    let desired = Desired::from_manifests(&source.validated.manifests);
    let host = args.local.this_host(&desired)?;
    let libvirt = super::target::libvirt_host(&desired, &host);
    let recorded_libvirt = libvirt.clone();
    // libvirtd checks its own host; the machine check is berth-vmm's.
    if args.driver == DriverKind::Local && libvirt.is_none() {
        super::target::ensure_machine_fits(&source.validated, &host)?;
    }

    let (driver, _lock): (Box<dyn Driver>, Option<StateLock>) = match args.driver {
        DriverKind::Local => {
            let lock = StateLock::acquire(&args.local.state_dir, args.wait, "berth apply")?;
            let driver: Box<dyn Driver> = match libvirt {
                Some(spec) => {
                    let driver = LibvirtDriver::new(&host, spec, &source.revision)?;
                    driver.set_desired(&source.revision, &desired);
                    Box::new(driver)
                }
                None => Box::new(args.local.driver(&host)?),
            };
            (driver, Some(lock))
        }
        DriverKind::Sim => (Box::new(simulated(args, &desired)?), None),
        DriverKind::Libvirt => anyhow::bail!("--driver libvirt is not a command-line choice"),
    };
    let observed = driver
        .observe()
        .with_context(|| format!("observing through the {} driver", driver.name()))?;
    let capabilities = driver.plan_capabilities(&desired);
    let scope = driver.scope();
    let fleet = desired.clone();
    let destinations = reachable_destinations(driver.as_ref(), &host, &desired, &observed);
    let guard = start_guard(&args.local.state_dir, &args.tls)?;
    if let Some(me) = scope.host() {
        guard.record_placements(me, &fleet);
    }
    let scoped = Scoped::new(desired, observed, &scope, destinations.clone());
    let plan = berth_reconciler::plan(&scoped.desired, &scoped.observed, &capabilities);
    let colour = super::plan::colour(args.color);

    let text = args.output == Output::Text;
    let mut out = String::new();
    scoped.note(&mut out);
    if !plan.has_changes() {
        out.push_str("No changes. The fleet matches the manifests.\n");
        emit(
            args.output,
            &out,
            &Report::of(&plan, Vec::new(), true, true),
        )?;
        record(args, &source, &host, recorded_libvirt.clone())?;
        return Ok(ExitCode::SUCCESS);
    }
    out.push_str(&render::text(&plan, colour));
    if text {
        write_stdout(&out)?;
    }
    if plan.steps.is_empty() {
        if !text {
            emit(
                args.output,
                "",
                &Report::of(&plan, Vec::new(), false, false),
            )?;
        }
        bail!(
            "nothing can be applied: {} blocked (see the reasons above); nothing was changed",
            plan.summary.blocked
        );
    }
    if let Some(me) = scope.host() {
        check_starts(&guard, me, &fleet, &plan)?;
        check_moves(me, &plan)?;
    }
    if !text && !args.yes {
        bail!(
            "-o json and -o yaml need --yes (the confirmation prompt is text); nothing was changed"
        );
    }
    if !confirmed(args, plan.steps.len(), &host)? {
        write_stdout("Apply cancelled; nothing was changed.\n")?;
        return Ok(ExitCode::from(crate::cli::EXIT_ERROR));
    }

    let report = execute(&plan, &scoped.desired, driver.as_ref());
    let mut out = String::from("\nApplying:\n");
    let (mut done, mut failed, mut skipped) = (0, 0, 0);
    let mut results = Vec::new();
    for (step, outcome) in &report.steps {
        let what = render::describe_action(&step.action);
        let (kind, reason) = match outcome {
            Outcome::Done => {
                done += 1;
                out.push_str(&format!("  done      {what}\n"));
                (ActionOutcome::Done, None)
            }
            Outcome::Failed(reason) => {
                failed += 1;
                out.push_str(&format!("  FAILED    {what}: {reason}\n"));
                (ActionOutcome::Failed, Some(reason.to_string()))
            }
            Outcome::Skipped => {
                skipped += 1;
                out.push_str(&format!("  not done  {what} (an earlier action failed)\n"));
                (ActionOutcome::NotDone, None)
            }
        };
        results.push(ActionResult {
            action: what,
            outcome: kind,
            reason,
        });
    }
    out.push_str(&format!(
        "\n{done} done, {failed} failed, {skipped} not done.\n"
    ));

    // What runs now, read back again.
    let after = driver
        .observe()
        .with_context(|| format!("observing again through the {} driver", driver.name()))?;
    let after = Scoped::new(scoped.desired.clone(), after, &scope, destinations);
    let left = berth_reconciler::plan(&after.desired, &after.observed, &capabilities);
    if left.has_changes() {
        out.push_str(&format!(
            "The fleet does not match the manifests yet: {} action(s) left (berth plan shows them).\n",
            left.steps.len()
        ));
    } else {
        out.push_str("The fleet matches the manifests.\n");
    }
    emit(
        args.output,
        &out,
        &Report::of(&plan, results, report.succeeded(), !left.has_changes()),
    )?;
    if !report.succeeded() {
        bail!("apply failed: {failed} action(s) failed, {skipped} not done (see the report above)");
    }
    record(args, &source, &host, recorded_libvirt)?;
    Ok(ExitCode::SUCCESS)
}

/// What `berth apply -o json|yaml` prints, once, at the end.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    /// The plan, as `berth plan -o json` prints it.
    plan: serde_json::Value,
    /// Each action run, in order.
    results: Vec<ActionResult>,
    /// Whether every action was done.
    succeeded: bool,
    /// Whether the fleet, observed again afterwards, matches the manifests.
    matches_manifests: bool,
}

impl Report {
    fn of(plan: &Plan, results: Vec<ActionResult>, succeeded: bool, matches: bool) -> Report {
        Report {
            plan: serde_json::from_str(&render::json(plan)).expect("the plan's JSON parses"),
            results,
            succeeded,
            matches_manifests: matches,
        }
    }
}

/// One action of [`Report`].
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ActionResult {
    action: String,
    outcome: ActionOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// How an action ended.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
enum ActionOutcome {
    Done,
    Failed,
    /// Not run because an earlier action failed.
    NotDone,
}

/// Prints `text` in the text format, else `report` as one JSON or YAML document.
fn emit(format: Output, text: &str, report: &Report) -> anyhow::Result<()> {
    match format {
        Output::Text | Output::Markdown => write_stdout(text)?,
        Output::Json => write_stdout(&output::json(report)?)?,
        Output::Yaml => write_stdout(&output::yaml(report)?)?,
    }
    Ok(())
}

/// The start guard `berth serve` uses, with this host's record of where guests were
/// last placed (`<state>/placements.json`, shared with `berth serve`), asking over
/// mutual TLS when the fleet's files are given.
fn start_guard(
    state_dir: &std::path::Path,
    tls: &berth_reconciler::tls::TlsArgs,
) -> anyhow::Result<HttpPeers> {
    let transport = match tls.tls_ca {
        Some(_) => Transport::Tls(Arc::new(
            berth_reconciler::tls::FleetTls::load(tls)?.client()?,
        )),
        None => Transport::plain(),
    };
    Ok(HttpPeers::new(
        Arc::new(Placements::open(Some(state_dir.join("placements.json")))),
        transport,
    ))
}

/// Before this host (`me`) starts a guest, asks the other hosts of `fleet` whether they
/// may still run it.
///
/// # Errors
/// Naming the host, when one runs a guest to be started here, or cannot be asked and
/// is where the guest was last placed.
fn check_starts(
    guard: &HttpPeers,
    me: &str,
    fleet: &Desired,
    plan: &berth_reconciler::Plan,
) -> anyhow::Result<()> {
    let starts: Vec<&str> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Start { guest, host } if host == me => Some(guest.as_str()),
            _ => None,
        })
        .collect();
    if starts.is_empty() || fleet.hosts.iter().all(|h| h.metadata.name == me) {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let refused: Vec<String> = runtime.block_on(async {
        let mut refused = Vec::new();
        for guest in starts {
            if let Err(why) = guard.may_start(me, guest, fleet).await {
                refused.push(why.to_string());
            }
        }
        refused
    });
    if !refused.is_empty() {
        bail!("{}; nothing was changed", refused.join("; "));
    }
    Ok(())
}

/// The other libvirt hosts this libvirt host moves its guests to live (see
/// [`berth_reconciler::driver::libvirt::destinations`]); none for other drivers. A
/// destination that does not answer is said on standard error.
pub fn reachable_destinations(
    driver: &dyn Driver,
    host: &str,
    desired: &Desired,
    observed: &Observed,
) -> Vec<ObservedHost> {
    if driver.kind() != DriverKind::Libvirt {
        return Vec::new();
    }
    let (hosts, unreachable) =
        berth_reconciler::driver::libvirt::destinations(host, desired, observed);
    for why in unreachable {
        eprintln!("cannot plan a move there: {why}");
    }
    hosts
}

/// A guest moves to another host only live: this host cannot start it there, so a
/// cold move (stop here, start there) is refused before anything changes.
///
/// # Errors
/// Naming the guests, when the plan moves one cold from `me` to another host.
fn check_moves(me: &str, plan: &berth_reconciler::Plan) -> anyhow::Result<()> {
    let cold: Vec<String> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::ColdMigrate { guest, from, to } if from == me && to != me => {
                Some(format!("{guest} ({from} -> {to})"))
            }
            _ => None,
        })
        .collect();
    if !cold.is_empty() {
        bail!(
            "berth apply moves a guest to another host only live, and these moves need a \
             restart (cold): {}; split the change (first the restart-class change, then the \
             placement) or let berth serve on both hosts do it; nothing was changed",
            cold.join(", ")
        );
    }
    Ok(())
}

fn record(
    args: &Args,
    source: &super::target::Source,
    host: &str,
    libvirt: Option<berth_schema::LibvirtSpec>,
) -> anyhow::Result<()> {
    if args.driver != DriverKind::Local {
        return Ok(());
    }
    Applied {
        revision: source.revision.clone(),
        source: source.kind.clone(),
        location: source.location.clone(),
        host: host.to_owned(),
        applied_at: berth_reconciler::conditions::rfc3339(SystemTime::now()),
        libvirt,
    }
    .write(&args.local.state_dir)
}

/// Asks on the terminal; without one, only `--yes` confirms.
fn confirmed(args: &Args, actions: usize, host: &str) -> anyhow::Result<bool> {
    if args.yes {
        return Ok(true);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("not applying without confirmation: standard input is not a terminal; pass --yes to apply");
    }
    print!("\nApply these {actions} action(s) on host {host}? Only 'yes' applies: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

fn simulated(args: &Args, desired: &Desired) -> anyhow::Result<SimDriver> {
    let running = match &args.sim_from {
        Some(from) => {
            let set = super::input::load(from).with_context(|| {
                format!(
                    "the manifests in {} (--sim-from) are not valid",
                    from.display()
                )
            })?;
            Desired::from_manifests(&set.manifests)
        }
        None => Desired::default(),
    };
    Ok(SimDriver::from_observed(Observed::baseline(
        &running, desired,
    )))
}

/// The desired and observed sides narrowed to one host, and what was left out.
pub struct Scoped {
    /// Guests and the Host manifest of this host.
    pub desired: Desired,
    /// What runs here, less guests whose manifest places them elsewhere.
    pub observed: Observed,
    /// Guests whose manifests place them on other hosts: (name, host).
    pub elsewhere: Vec<(String, String)>,
    /// Of those, the ones that run here.
    pub moving_away: BTreeSet<String>,
}

impl Scoped {
    /// Narrows to the driver's host when its `scope` is one host (the local driver sees
    /// this host only); a driver that sees the fleet gets it whole. `destinations` are
    /// other hosts this host moves guests to itself (libvirt hosts it reaches,
    /// [`berth_reconciler::driver::libvirt::destinations`]), as observed: a guest that
    /// runs here and is placed on one of them stays in the plan, as a move.
    pub fn new(
        mut desired: Desired,
        mut observed: Observed,
        scope: &Scope,
        destinations: Vec<ObservedHost>,
    ) -> Self {
        berth_reconciler::scheduler::place(&mut desired, &observed);
        let mut elsewhere = Vec::new();
        let mut moving_away = BTreeSet::new();
        if let Some(host) = scope.host() {
            let reachable = |to: &str| destinations.iter().any(|d| d.name == to);
            let runs_here = |name: &str| {
                observed
                    .guests
                    .iter()
                    .any(|o| o.name == name && o.host == host)
            };
            desired.guests.retain(|g| {
                // A guest the scheduler could place nowhere is planned (blocked, with
                // the reason) on every host.
                let here = g.spec.host == host
                    || g.spec.host.is_empty()
                    || (reachable(&g.spec.host) && runs_here(&g.metadata.name));
                if !here {
                    elsewhere.push((g.metadata.name.clone(), g.spec.host.clone()));
                }
                here
            });
            desired
                .hosts
                .retain(|h| h.metadata.name == host || reachable(&h.metadata.name));
            observed.hosts.extend(destinations);
            let away: BTreeSet<&str> = elsewhere.iter().map(|(n, _)| n.as_str()).collect();
            observed.guests.retain(|g| {
                let keep = !away.contains(g.name.as_str());
                if !keep {
                    moving_away.insert(g.name.clone());
                }
                keep
            });
        }
        Scoped {
            desired,
            observed,
            elsewhere,
            moving_away,
        }
    }

    /// A note on the guests left out, if any.
    pub fn note(&self, out: &mut String) {
        if self.elsewhere.is_empty() {
            return;
        }
        let list: Vec<String> = self
            .elsewhere
            .iter()
            .map(|(name, host)| {
                if self.moving_away.contains(name) {
                    format!("{name} (runs here, placed on {host}: moving it is berth serve's)")
                } else {
                    format!("{name} ({host})")
                }
            })
            .collect();
        out.push_str(&format!(
            "Not acted on, placed on other hosts: {}\n\n",
            list.join(", ")
        ));
    }
}
