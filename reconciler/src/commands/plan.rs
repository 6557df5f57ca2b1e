//! `berth plan`: what applying the manifests would do, field by field, each change
//! classified (live, migration, restart, blocked), in the order it would be done.
//!
//! Two ways to get the observed side:
//! - CI mode, `--base REV --head REV [--repo PATH]`: both revisions are read from git
//!   (no checkout), the head is validated, and the base is taken as running exactly as
//!   written. No host is touched.
//! - `PATH` (`--driver local`, the default, as for `berth apply`): the berth-vmm
//!   processes of this host under the same state directory `apply` uses, read back from
//!   them, so that changes made by hand show up as drift. Guests placed on other hosts
//!   are listed, not planned. Right after an apply, this plan is empty.
//! - `PATH --driver sim`: a simulated fleet, no real guests; it runs the manifests of
//!   `--sim-from PATH` as written, or nothing.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use berth_reconciler::driver::{Driver, DriverKind, FleetCapabilities, LibvirtDriver, SimDriver};
use berth_reconciler::model::{Desired, Observed};
use berth_reconciler::output::{self, Output};
use berth_reconciler::{git, plan, render, scheduler};
use berth_schema::Validated;

use crate::cli::write_stdout;

/// Arguments of `berth plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A manifest directory (searched recursively for *.yaml, *.yml and *.json) or one file;
    /// `-` reads one manifest file from standard input. Not with --base/--head.
    #[arg(conflicts_with_all = ["base", "head"])]
    pub path: Option<PathBuf>,
    /// CI mode: the revision taken as running exactly as written (for example the
    /// pull request's base branch).
    #[arg(long, requires = "head", value_name = "REV")]
    pub base: Option<String>,
    /// CI mode: the revision to plan (for example the pull request's head).
    #[arg(long, requires = "base", value_name = "REV")]
    pub head: Option<String>,
    /// CI mode: the git repository holding both revisions.
    #[arg(long, default_value = ".", value_name = "PATH")]
    pub repo: PathBuf,
    /// CI mode: read the manifests under this directory of the repository only.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<String>,
    /// Where observed state comes from, outside CI mode: this host's guests, as
    /// `berth apply` sees them, or a simulated fleet.
    #[arg(long, value_enum, default_value_t = DriverKind::Local)]
    pub driver: DriverKind,
    /// With --driver sim: the simulated fleet runs these manifests as written.
    #[arg(long, value_name = "PATH")]
    pub sim_from: Option<PathBuf>,
    /// With --driver local: the local driver's options.
    #[command(flatten)]
    pub local: super::target::LocalArgs,
    /// Output format: `text` (like `terraform plan`: symbols, field changes, YAML
    /// diffs, the order, a summary), `json` (`formatVersion` 1; schema:
    /// `berth plan --json-schema`), `yaml` (the same data), or `markdown` (for a
    /// pull-request comment). `--format` is an alias.
    #[arg(short = 'o', long = "output", alias = "format", value_enum,
          value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
    /// Colour in the text format.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    /// Exit 0 when nothing would change, 2 when something would (or is blocked),
    /// 1 on error (terraform's convention).
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Print the JSON Schema of `-o json` and exit.
    #[arg(long)]
    pub json_schema: bool,
}

/// When to colour the text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    /// On a terminal, unless NO_COLOR is set.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Exit code of `--detailed-exitcode` when something would change.
const EXIT_CHANGES: u8 = 2;
/// Exit code of `--detailed-exitcode` on any error.
const EXIT_ERROR: u8 = 1;

/// Plans and prints.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match plan_and_print(args) {
        Ok(changes) if args.detailed_exitcode && changes => Ok(ExitCode::from(EXIT_CHANGES)),
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(error) if args.detailed_exitcode => {
            crate::cli::report(&error);
            Ok(ExitCode::from(EXIT_ERROR))
        }
        Err(error) => Err(error),
    }
}

/// Returns whether the plan changes anything.
fn plan_and_print(args: &Args) -> anyhow::Result<bool> {
    if args.json_schema {
        write_stdout(&render::json_schema())?;
        return Ok(false);
    }
    let (desired, observed, capabilities) = match (&args.base, &args.head) {
        (Some(base), Some(head)) => ci_inputs(args, base, head)?,
        _ => driver_inputs(args)?,
    };
    let plan = plan(&desired, &observed, &capabilities);
    let out = match args.output {
        Output::Text => render::text(&plan, colour(args.color)),
        Output::Json => render::json(&plan),
        Output::Yaml => output::json_text_to_yaml(&render::json(&plan))?,
        Output::Markdown => render::markdown(&plan),
    };
    write_stdout(&out)?;
    Ok(plan.has_changes())
}

/// Whether to colour text output.
pub fn colour(choice: Color) -> bool {
    match choice {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stdout().is_terminal()
        }
    }
}

fn print_warnings(validated: &Validated) {
    for w in &validated.warnings {
        eprintln!("{w}");
    }
}

/// The planner's inputs.
type Inputs = (Desired, Observed, FleetCapabilities);

/// CI mode: head validated, base as observed, each host's capabilities from its Host
/// manifest's driver. The two revisions are read and validated on two threads.
fn ci_inputs(args: &Args, base: &str, head: &str) -> anyhow::Result<Inputs> {
    let (head_set, base_set) = std::thread::scope(|s| {
        let base = s.spawn(|| load_revision(args, base));
        let head = load_revision(args, head);
        (
            head,
            base.join().expect("the base revision loader panicked"),
        )
    });
    let (head_rev, head_set) = head_set?;
    let head_set = head_set.with_context(|| {
        format!(
            "the head revision {head} ({}) is not valid",
            short(&head_rev)
        )
    })?;
    print_warnings(&head_set);
    let (base_rev, base_set) = base_set?;
    let base_set = base_set.with_context(|| {
        format!(
            "the base revision {base} ({}) is not valid, so it cannot stand for what runs",
            short(&base_rev)
        )
    })?;
    let mut head = Desired::from_manifests(&head_set.manifests);
    let mut base = Desired::from_manifests(&base_set.manifests);
    // Selector-placed guests: the base as the scheduler places it, the head keeping
    // the base's placements where they still fit.
    scheduler::place(&mut base, &Observed::default());
    let observed = Observed::baseline(&base, &head);
    scheduler::place(&mut head, &observed);
    let capabilities = FleetCapabilities::from_manifests(&head);
    Ok((head, observed, capabilities))
}

/// A revision's commit id and its validated manifests.
fn load_revision(
    args: &Args,
    rev: &str,
) -> anyhow::Result<(String, Result<Validated, berth_schema::Invalid>)> {
    let revision = git::read_revision(&args.repo, rev, args.dir.as_deref())
        .with_context(|| format!("reading revision {rev}"))?;
    Ok((revision.commit, berth_schema::load_files(revision.files)))
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// `PATH --driver ...`: the manifests on disk against what the driver observes.
fn driver_inputs(args: &Args) -> anyhow::Result<Inputs> {
    let path = args.path.clone().unwrap_or_else(|| PathBuf::from("."));
    if super::input::is_stdin(&path) && args.sim_from.as_deref().is_some_and(super::input::is_stdin)
    {
        bail!("standard input is read once: PATH and --sim-from cannot both be -");
    }
    let validated = super::input::load(&path)
        .with_context(|| format!("the manifests in {} are not valid", path.display()))?;
    print_warnings(&validated);
    let desired = Desired::from_manifests(&validated.manifests);
    let host = match args.driver {
        DriverKind::Local => args.local.this_host(&desired)?,
        DriverKind::Sim => String::new(),
        DriverKind::Libvirt => bail!("--driver libvirt is not a command-line choice"),
    };
    let driver: Box<dyn Driver> = match args.driver {
        DriverKind::Sim => Box::new(simulated_fleet(args, &desired)?),
        // This host's Host manifest chooses between berth-vmm and libvirt.
        DriverKind::Local => match super::target::libvirt_host(&desired, &host) {
            Some(spec) => Box::new(LibvirtDriver::new(&host, spec, "")?),
            None => Box::new(args.local.observer(&host)),
        },
        DriverKind::Libvirt => bail!("--driver libvirt is not a command-line choice"),
    };
    let observed = driver
        .observe()
        .with_context(|| format!("observing through the {} driver", driver.name()))?;
    let capabilities = driver.plan_capabilities(&desired);
    let destinations =
        super::apply::reachable_destinations(driver.as_ref(), &host, &desired, &observed);
    let scoped = super::apply::Scoped::new(desired, observed, &driver.scope(), destinations);
    let mut note = String::new();
    scoped.note(&mut note);
    if !note.is_empty() {
        eprint!("{note}");
    }
    Ok((scoped.desired, scoped.observed, capabilities))
}

fn simulated_fleet(args: &Args, desired: &Desired) -> anyhow::Result<SimDriver> {
    match &args.sim_from {
        Some(from) => {
            let running = super::input::load(from).with_context(|| {
                format!(
                    "the manifests in {} (--sim-from) are not valid",
                    from.display()
                )
            })?;
            let running = Desired::from_manifests(&running.manifests);
            Ok(SimDriver::from_observed(Observed::baseline(
                &running, desired,
            )))
        }
        None => {
            if desired.hosts.is_empty() {
                bail!("the simulated fleet needs Host manifests to place guests on");
            }
            let empty = Desired::default();
            Ok(SimDriver::from_observed(Observed::baseline(
                &empty, desired,
            )))
        }
    }
}
