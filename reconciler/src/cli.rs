//! The command line: arguments, dispatch to the subcommands, and how errors end the
//! process.
//!
//! Exit codes, the same for every command: 0 success; 1 an error, invalid input
//! (manifests, a Host this machine does not match) or a usage error; 2 only from
//! `berth plan --detailed-exitcode`, when the plan has changes. A usage error is never
//! 2, so that a typo in a CI job never reads as "changes present".

use std::io::Write;
use std::process::ExitCode;

use berth_reconciler::output::{self, Output};
use clap::{CommandFactory, Parser, Subcommand};

use crate::commands;

/// The input (manifests, arguments) is wrong.
pub const EXIT_INVALID: u8 = 1;
/// Something other than the input went wrong.
pub const EXIT_ERROR: u8 = 1;

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
    /// Write Guest and Host manifests for the domains of a libvirt connection and
    /// mark the domains as berth's (adopt existing guests).
    Import(commands::import::Args),
    /// Print the JSON Schema of a manifest document, or the manifest reference.
    Schema(SchemaArgs),
    /// Run the host-resident service: follow a git repository and keep this host
    /// converged to it.
    Serve(Box<berth_reconciler::serve::ServeArgs>),
    /// Show the status of a running `berth serve`, or of the whole fleet from etcd
    /// (`--fleet --etcd URL`).
    Status(commands::fleet::FleetStatusArgs),
    /// Print a shell completion script: `berth completion bash > /etc/bash_completion.d/berth`.
    Completion(CompletionArgs),
    /// Make a fleet CA and host certificates for the hosts' mutual TLS.
    Certs(commands::certs::Args),
}

/// Arguments of `berth schema`.
#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// `json` (the JSON Schema of a manifest document, the default; `text` is the
    /// same), `yaml` (the same schema as YAML), or `markdown` (the manifest reference).
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT", default_value_t = Output::Text)]
    pub output: Output,
    /// The same as `-o markdown`.
    #[arg(long, conflicts_with = "output")]
    pub reference: bool,
}

/// Arguments of `berth completion`.
#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Parses the command line. Help and version go to stdout with exit 0; a usage error
/// goes to stderr with exit 1 (clap's own code, 2, is `--detailed-exitcode`'s
/// "changes").
pub fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|error| {
        let _ = error.print();
        if error.use_stderr() {
            ExitCode::from(EXIT_INVALID)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Runs the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate(args) => commands::validate::run(&args),
        Command::Plan(args) => commands::plan::run(&args),
        Command::Apply(args) => commands::apply::run(&args),
        Command::Get(args) => commands::get::run(&args),
        Command::Stop(args) => commands::stop::run(&args),
        Command::Certs(args) => commands::certs::run(&args),
        Command::Import(args) => commands::import::run(&args),
        Command::Serve(args) => {
            berth_reconciler::serve::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => commands::fleet::status(&args),
        Command::Schema(args) => {
            let format = if args.reference {
                Output::Markdown
            } else {
                args.output
            };
            let text = match format {
                Output::Markdown => berth_schema::reference::markdown(),
                Output::Yaml => output::yaml(&berth_schema::json_schema())?,
                Output::Text | Output::Json => berth_schema::json_schema_text(),
            };
            write_stdout(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion(args) => {
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "berth", &mut script);
            write_stdout(&String::from_utf8(script)?)?;
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

/// Prints an error and each of its causes once (a cause its message already names is
/// not printed again); every error exits 1.
pub fn report(error: &anyhow::Error) -> ExitCode {
    berth_hypervisor::report::eprint_chain(error.chain().map(|c| c.to_string()), "caused by: ");
    ExitCode::from(EXIT_ERROR)
}

#[cfg(test)]
mod errors_tests;
