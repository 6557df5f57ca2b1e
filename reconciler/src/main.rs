//! `berth`: GitOps for KVM guests. Parses the command line and runs one subcommand;
//! each subcommand lives in its own module under `commands/`.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// One module per subcommand. Adding one: a module here, a variant in `cli::Command`,
/// an arm in `cli::run`.
mod commands {
    pub mod apply;
    pub mod fleet;
    pub mod get;
    pub mod plan;
    pub mod stop;
    pub mod target;
    pub mod validate;
}

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => cli::report(&error),
    }
}
