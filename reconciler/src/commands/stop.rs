//! `berth stop NAME... | --all`: shuts guests on this machine down through the local
//! driver, under the apply lock. A guest whose manifest still says `running` is started
//! again by the next apply; set `state: stopped` in the manifest to keep it down.

use std::process::ExitCode;

use anyhow::bail;
use berth_reconciler::driver::local::StateLock;
use berth_reconciler::driver::{Driver, LibvirtDriver};
use berth_reconciler::output::{self, Output};

use super::target::{LibvirtArgs, LocalArgs};
use crate::cli::write_stdout;

/// Arguments of `berth stop`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The guests to stop.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub names: Vec<String>,
    /// Stop every guest that runs on this machine.
    #[arg(long)]
    pub all: bool,
    /// Also stop a guest whose VMM is in an unknown migration switchover (it sent
    /// `Commit` and never heard back). Refused without this flag, since that VMM may
    /// hold the only copy of the guest: use it only when the destination surely runs
    /// the guest.
    #[arg(long)]
    pub force_unknown_switchover: bool,
    /// Wait for an apply holding the state directory's lock instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Output format: `text` (a line per guest stopped), or one document at the end as
    /// `json` or `yaml`: `{stopped: [NAME...], failed: [{name, error}...]}`.
    #[arg(short = 'o', long = "output", value_name = "FORMAT",
          value_parser = output::without_markdown(), default_value = "text")]
    pub output: Output,
    /// Local driver options.
    #[command(flatten)]
    pub local: LocalArgs,
    /// On a libvirt host.
    #[command(flatten)]
    pub libvirt: LibvirtArgs,
}

/// What `berth stop -o json|yaml` prints.
#[derive(Debug, Default, serde::Serialize)]
struct Stopped {
    stopped: Vec<String>,
    failed: Vec<StopFailure>,
}

/// A guest that could not be stopped, and why.
#[derive(Debug, serde::Serialize)]
struct StopFailure {
    name: String,
    error: String,
}

/// Prints `text` in the text format, else `doc` as one JSON or YAML document.
fn emit(format: Output, text: &str, doc: &Stopped) -> anyhow::Result<()> {
    match format {
        Output::Text | Output::Markdown => write_stdout(text)?,
        Output::Json => write_stdout(&output::json(doc)?)?,
        Output::Yaml => write_stdout(&output::yaml(doc)?)?,
    }
    Ok(())
}

/// Runs `berth stop`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let _lock = StateLock::acquire(&args.local.state_dir, args.wait, "berth stop")?;
    let host = args.local.recorded_host();
    let local = args.local.observer(&host);
    let libvirt = match args.libvirt.spec(&args.local) {
        Some(spec) => {
            if args.force_unknown_switchover {
                bail!("--force-unknown-switchover is for berth-vmm guests; libvirt resolves its own migrations");
            }
            Some(LibvirtDriver::new(&host, spec, "")?)
        }
        None => None,
    };
    let running: Vec<String> = match &libvirt {
        Some(libvirt) => libvirt
            .observe()?
            .guests
            .into_iter()
            .filter(|g| g.state != berth_schema::GuestState::Stopped)
            .map(|g| g.name)
            .collect(),
        None => local
            .guests()?
            .into_iter()
            .map(|g| g.observed.name)
            .collect(),
    };
    let names = if args.all {
        running
    } else {
        for name in &args.names {
            if !running.contains(name) {
                bail!(
                    "guest {name} does not run on this machine (state directory {})",
                    args.local.state_dir.display()
                );
            }
        }
        args.names.clone()
    };
    let mut doc = Stopped::default();
    if names.is_empty() {
        emit(args.output, "No guests run on this machine.\n", &doc)?;
        return Ok(ExitCode::SUCCESS);
    }
    let text = args.output == Output::Text;
    for name in &names {
        let stopped = match &libvirt {
            Some(libvirt) => libvirt.stop(name, &host),
            None if args.force_unknown_switchover => local.stop_forced(name),
            None => local.stop(name, local.host()),
        };
        match stopped {
            Ok(()) => {
                if text {
                    write_stdout(&format!("stopped {name}\n"))?;
                }
                doc.stopped.push(name.clone());
            }
            Err(e) => {
                eprintln!("error: stopping {name}: {e}");
                doc.failed.push(StopFailure {
                    name: name.clone(),
                    error: e.to_string(),
                });
            }
        }
    }
    if !text {
        emit(args.output, "", &doc)?;
    }
    let failures = doc.failed.len();
    if failures > 0 {
        bail!(
            "{failures} of {} guest(s) could not be stopped",
            names.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
