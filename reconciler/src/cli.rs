//! The command line: arguments, dispatch to the subcommands, and how errors end the
//! process.
//!
//! Exit codes: 0 success; 1 the input is wrong (invalid manifests); 2 a usage error
//! (from clap); 3 anything else went wrong (an internal or environment error).

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;

/// The input (manifests, arguments) is wrong.
pub const EXIT_INVALID: u8 = 1;
/// Something other than the input went wrong.
pub const EXIT_FAILURE: u8 = 3;

/// GitOps for KVM guests: manifests in git, a reconcile loop that converges the guests
/// that really run.
#[derive(Debug, Parser)]
#[command(name = "berth", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check manifests and print every problem with its file, line and field.
    Validate(commands::validate::Args),
    /// Show what applying the manifests would do, each change classified (live,
    /// migration, restart, blocked), in order. CI mode: --base REV --head REV.
    Plan(commands::plan::Args),
    /// Bring this host's guests and host settings to what the manifests say: plan,
    /// confirm, execute in order, report per action.
    Apply(commands::apply::Args),
    /// List what runs on this machine (`berth get guests`), read from the VMMs.
    Get(commands::get::Args),
    /// Stop guests on this machine (`berth stop NAME...` or `--all`).
    Stop(commands::stop::Args),
    /// Print the JSON Schema of a manifest document, or the manifest reference.
    Schema(SchemaArgs),
    /// Run the host-resident service: follow a git repository and keep this host
    /// converged to it.
    Serve(berth_reconciler::serve::ServeArgs),
    /// Show the status of a running `berth serve`, or of the whole fleet from etcd
    /// (`--fleet --etcd URL`).
    Status(commands::fleet::FleetStatusArgs),
}

/// Arguments of `berth schema`.
#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Print the manifest reference (Markdown) instead of the JSON Schema.
    #[arg(long)]
    pub reference: bool,
}

/// Runs the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate(args) => commands::validate::run(&args),
        Command::Plan(args) => commands::plan::run(&args),
        Command::Apply(args) => commands::apply::run(&args),
        Command::Get(args) => commands::get::run(&args),
        Command::Stop(args) => commands::stop::run(&args),
        Command::Serve(args) => {
            berth_reconciler::serve::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => commands::fleet::status(&args),
        Command::Schema(args) => {
            let text = if args.reference {
                berth_schema::reference::markdown()
            } else {
                berth_schema::json_schema_text()
            };
            write_stdout(&text)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes to stdout; a closed pipe (`berth schema | head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Prints an error and its causes once, and picks the exit code: invalid manifests are
/// the user's to fix, anything else is a failure.
pub fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("caused by: {cause}");
    }
    if error.downcast_ref::<berth_schema::Invalid>().is_some() {
        ExitCode::from(EXIT_INVALID)
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}
