//! `berth`: GitOps for KVM guests. Parses the command line and runs one subcommand;
//! each subcommand lives in its own module under `commands/`.

use std::process::ExitCode;

mod cli;

/// One module per subcommand. Adding one: a module here, a variant in `cli::Command`,
/// an arm in `cli::run`.
mod commands {
    pub mod apply;
    pub mod certs;
    pub mod fleet;
    pub mod get;
    pub mod import;
    pub mod input;
    pub mod plan;
    pub mod stop;
    pub mod target;
    pub mod validate;
}

fn main() -> ExitCode {
    let args = match cli::parse() {
        Ok(args) => args,
        Err(code) => return code,
    };
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => cli::report(&error),
    }
}
