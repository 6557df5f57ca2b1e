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
//! - After a successful apply, `<state>/applied.json` records the revision (the commit
//!   id for `--rev`, else a hash of the documents) and the time.

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{bail, Context};
use berth_reconciler::apply::{execute, Outcome};
use berth_reconciler::driver::local::StateLock;
use berth_reconciler::driver::{Driver, LibvirtDriver, SimDriver};
use berth_reconciler::model::{Desired, Observed};
use berth_reconciler::render;

use super::plan::Color;
use super::target::{load_source, Applied, LocalArgs};
use crate::cli::write_stdout;

/// Arguments of `berth apply`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A manifest directory (searched recursively for *.yaml and *.yml) or one file;
    /// `-` reads one manifest file from standard input (then only --yes confirms).
    /// Not with --rev.
    #[arg(conflicts_with = "rev")]
    pub path: Option<PathBuf>,
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
    #[arg(long, value_enum, default_value_t = ApplyDriver::Local)]
    pub driver: ApplyDriver,
    /// With --driver sim: the simulated fleet runs these manifests as written.
    #[arg(long, value_name = "PATH")]
    pub sim_from: Option<PathBuf>,
    /// Colour in the plan.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    /// Local driver options.
    #[command(flatten)]
    pub local: LocalArgs,
}

/// Drivers `berth apply` can act through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApplyDriver {
    /// berth-vmm processes on this host
    Local,
    /// simulated fleet, no real guests
    Sim,
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
    // libvirtd checks its own host; the machine check is berth-vmm's.
    if args.driver == ApplyDriver::Local && libvirt.is_none() {
        super::target::ensure_machine_fits(&source.validated, &host)?;
    }

    let (driver, _lock): (Box<dyn Driver>, Option<StateLock>) = match args.driver {
        ApplyDriver::Local => {
            let lock = StateLock::acquire(&args.local.state_dir, args.wait)?;
            let driver: Box<dyn Driver> = match libvirt {
                Some(spec) => Box::new(LibvirtDriver::new(&host, spec, &source.revision)?),
                None => Box::new(args.local.driver(&host)?),
            };
            (driver, Some(lock))
        }
        ApplyDriver::Sim => (Box::new(simulated(args, &desired)?), None),
    };
    let observed = driver
        .observe()
        .with_context(|| format!("observing through the {} driver", driver.name()))?;
    let scoped = Scoped::new(desired, observed, &host, args.driver == ApplyDriver::Local);
    let plan = berth_reconciler::plan(&scoped.desired, &scoped.observed);
    let colour = super::plan::colour(args.color);

    let mut out = String::new();
    scoped.note(&mut out);
    if !plan.has_changes() {
        out.push_str("No changes. The fleet matches the manifests.\n");
        write_stdout(&out)?;
        record(args, &source, &host)?;
        return Ok(ExitCode::SUCCESS);
    }
    out.push_str(&render::text(&plan, colour));
    write_stdout(&out)?;
    if plan.steps.is_empty() {
        bail!(
            "nothing can be applied: {} blocked (see the reasons above); nothing was changed",
            plan.summary.blocked
        );
    }
    if !confirmed(args, plan.steps.len(), &host)? {
        write_stdout("Apply cancelled; nothing was changed.\n")?;
        return Ok(ExitCode::from(crate::cli::EXIT_ERROR));
    }

    let report = execute(&plan, &scoped.desired, driver.as_ref());
    let mut out = String::from("\nApplying:\n");
    let (mut done, mut failed, mut skipped) = (0, 0, 0);
    for (step, outcome) in &report.steps {
        let what = render::describe_action(&step.action);
        match outcome {
            Outcome::Done => {
                done += 1;
                out.push_str(&format!("  done      {what}\n"));
            }
            Outcome::Failed(reason) => {
                failed += 1;
                out.push_str(&format!("  FAILED    {what}: {reason}\n"));
            }
            Outcome::Skipped => {
                skipped += 1;
                out.push_str(&format!("  not done  {what} (an earlier action failed)\n"));
            }
        }
    }
    out.push_str(&format!(
        "\n{done} done, {failed} failed, {skipped} not done.\n"
    ));

    // What runs now, read back again.
    let after = driver
        .observe()
        .with_context(|| format!("observing again through the {} driver", driver.name()))?;
    let after = Scoped::new(
        scoped.desired.clone(),
        after,
        &host,
        args.driver == ApplyDriver::Local,
    );
    let left = berth_reconciler::plan(&after.desired, &after.observed);
    if left.has_changes() {
        out.push_str(&format!(
            "The fleet does not match the manifests yet: {} action(s) left (berth plan shows them).\n",
            left.steps.len()
        ));
    } else {
        out.push_str("The fleet matches the manifests.\n");
    }
    write_stdout(&out)?;
    if !report.succeeded() {
        bail!("apply failed: {failed} action(s) failed, {skipped} not done (see the report above)");
    }
    record(args, &source, &host)?;
    Ok(ExitCode::SUCCESS)
}

fn record(args: &Args, source: &super::target::Source, host: &str) -> anyhow::Result<()> {
    if args.driver != ApplyDriver::Local {
        return Ok(());
    }
    Applied {
        revision: source.revision.clone(),
        source: source.kind.clone(),
        location: source.location.clone(),
        host: host.to_owned(),
        applied_at: berth_reconciler::serve::status::rfc3339(SystemTime::now()),
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
    /// Narrows to `host` when `local` (the local driver sees this host only); the
    /// simulated fleet sees every host and is left whole.
    pub fn new(mut desired: Desired, mut observed: Observed, host: &str, local: bool) -> Self {
        let mut elsewhere = Vec::new();
        let mut moving_away = BTreeSet::new();
        if local {
            desired.guests.retain(|g| {
                let here = g.spec.host == host;
                if !here {
                    elsewhere.push((g.metadata.name.clone(), g.spec.host.clone()));
                }
                here
            });
            desired.hosts.retain(|h| h.metadata.name == host);
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
