//! `berth stop NAME... | --all`: shuts guests on this machine down through the local
//! driver, under the apply lock. A guest whose manifest still says `running` is started
//! again by the next apply; set `state: stopped` in the manifest to keep it down.

use std::process::ExitCode;

use anyhow::bail;
use berth_reconciler::driver::local::StateLock;
use berth_reconciler::driver::Driver;

use super::target::LocalArgs;
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
    /// Local driver options.
    #[command(flatten)]
    pub local: LocalArgs,
}

/// Runs `berth stop`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let _lock = StateLock::acquire(&args.local.state_dir, args.wait)?;
    let driver = args.local.observer(&args.local.recorded_host());
    let running: Vec<String> = driver
        .guests()?
        .into_iter()
        .map(|g| g.observed.name)
        .collect();
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
    if names.is_empty() {
        write_stdout("No guests run on this machine.\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut failures = 0;
    for name in &names {
        let stopped = if args.force_unknown_switchover {
            driver.stop_forced(name)
        } else {
            driver.stop(name, driver.host())
        };
        match stopped {
            Ok(()) => write_stdout(&format!("stopped {name}\n"))?,
            Err(e) => {
                failures += 1;
                eprintln!("error: stopping {name}: {e}");
            }
        }
    }
    if failures > 0 {
        bail!(
            "{failures} of {} guest(s) could not be stopped",
            names.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
