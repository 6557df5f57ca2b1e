//! berth-vmm: runs one KVM guest per process.
//!
//! Exit codes, as berth's: 0 the guest was shut down cleanly (or help, version); 1 a
//! usage error, a bad spec, a guest that already runs, or a host failure. Never 2.
//!
//! `berth-vmm run --spec FILE|- --state-dir DIR` takes the state directory
//! `DIR/guests/<name>/`, builds the guest, binds `control.sock` once the guest runs,
//! prints `ready <socket path>` on stdout, and serves the control socket until a
//! `shutdown` request or SIGTERM/SIGINT.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_hypervisor::statedir::{StateDir, StateDirError};
use berth_hypervisor::vmm::{CgroupState, VmmEvent};
use berth_hypervisor::{control, VmConfig, Vmm};

const USAGE: &str = "\
berth-vmm: berth's per-guest KVM process

Usage: berth-vmm run --spec FILE|- --state-dir DIR [--fence-file FILE]
                    [--incoming ADDRESS [--source-timeout-ms N]]

Commands:
  run  Run a guest until it is shut down

Options of run:
  --spec FILE|-         The Guest manifest (YAML or JSON); - reads standard input
  --state-dir DIR       The state root; the guest's files go to DIR/guests/<name>/
  --fence-file FILE     Arm the self-fence from the start: FILE holds the deadline
                        (CLOCK_MONOTONIC milliseconds) that berth serve keeps current
                        while its etcd lease is held. Read when the vCPUs are about to
                        start: a deadline passed (or no file) means no start; then the
                        guest stops at it unless renewed (fenceDeadline). With
                        --incoming, read when the VMM starts listening.
  --incoming ADDRESS    Wait for a live migration of this guest on ADDRESS (host:port;
                        port 0 picks one) instead of booting it; prints
                        `ready <socket> incoming <address> <token>`. Files go to
                        DIR/guests/<name>.incoming/ until the commit.
  --source-timeout-ms N With --incoming: when the source has not connected within N
                        ms (default 60000), remove everything and exit, so that a
                        preparation nobody follows (its service died) does not hold
                        the guest's incoming slot.
  -h, --help            Print this help
  -V, --version         Print the version
";

/// What `berth-vmm run` was asked to do.
#[derive(Debug)]
struct RunArgs {
    spec: String,
    state_dir: PathBuf,
    incoming: Option<String>,
    source_timeout: Duration,
    /// `--fence-file`: where the self-fence's first deadline is read.
    fence_file: Option<PathBuf>,
}

/// How long an incoming VMM waits for the source's first connection by default.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the command line asks for.
#[derive(Debug)]
enum Cli {
    Run(RunArgs),
    Help,
    Version,
}

/// Parses the command line. The VMM is started by berth, not typed by people, and its
/// whole interface is one command with three options, so it uses lexopt rather than a
/// full argument parser: every resident kibibyte counts once per guest.
fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_iter(std::iter::once("berth-vmm".into()).chain(args));
    let mut command = None;
    let (mut spec, mut state_dir, mut incoming) = (None, None, None);
    let mut source_timeout = SOURCE_TIMEOUT;
    let mut fence_file = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(Cli::Help),
            Short('V') | Long("version") => return Ok(Cli::Version),
            Value(v) if command.is_none() => {
                let v = v.string()?;
                if v != "run" {
                    return Err(format!("unknown command {v:?} (expected run)").into());
                }
                command = Some(v);
            }
            Long("spec") if command.is_some() => spec = Some(parser.value()?.string()?),
            Long("state-dir") if command.is_some() => state_dir = Some(parser.value()?.into()),
            Long("incoming") if command.is_some() => {
                incoming = Some(parser.value()?.string()?);
            }
            Long("source-timeout-ms") if command.is_some() => {
                source_timeout = Duration::from_millis(parser.value()?.parse()?);
            }
            Long("fence-file") if command.is_some() => fence_file = Some(parser.value()?.into()),
            _ => return Err(arg.unexpected()),
        }
    }
    if command.is_none() {
        return Err("missing command (expected run)".into());
    }
    Ok(Cli::Run(RunArgs {
        spec: spec.ok_or("run needs --spec FILE|-")?,
        state_dir: state_dir.ok_or("run needs --state-dir DIR")?,
        incoming,
        source_timeout,
        fence_file,
    }))
}

/// A mistake in what the caller gave, as opposed to a host failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UserError(String);

/// Reads a Guest manifest in JSON or YAML, and returns it with its text as YAML (the
/// VMM's `spec.yaml`). JSON is tried first: YAML reads most JSON too, but not JSON's
/// string keys as the integers of an integer-keyed map (the vCPU pinning), so berth's
/// `start.json` would fail as YAML. A text that is neither names the error of the format
/// it looks like (JSON when it starts with `{`).
fn parse_spec(text: String) -> Result<(berth_schema::Guest, String), String> {
    let json_error = match serde_json::from_str::<berth_schema::Guest>(&text) {
        Ok(guest) => {
            let yaml = serde_yaml::to_string(&guest)
                .map_err(|e| format!("the spec cannot be written as YAML: {e}"))?;
            return Ok((guest, yaml));
        }
        Err(e) => e,
    };
    match serde_yaml::from_str(&text) {
        Ok(guest) => Ok((guest, text)),
        Err(_) if text.trim_start().starts_with('{') => Err(format!(
            "the spec is not a Guest manifest (as JSON): {json_error}"
        )),
        Err(e) => Err(format!("the spec is not a Guest manifest: {e}")),
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Cli::Run(args)) => args,
        Ok(Cli::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Version) => {
            println!("berth-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            berth_hypervisor::report::eprint_chain(
                e.chain().map(|c| c.to_string()),
                "  caused by: ",
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let RunArgs {
        spec,
        state_dir,
        incoming,
        source_timeout,
        fence_file,
    } = args;
    // Before any thread exists, so every thread inherits the mask and SIGTERM/SIGINT are
    // taken only by the signal thread below.
    let signals = block_termination_signals()?;

    let text = if spec == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the spec from standard input")?;
        text
    } else {
        std::fs::read_to_string(&spec).with_context(|| format!("reading the spec {spec}"))?
    };
    let (guest, text) = parse_spec(text).map_err(UserError)?;
    let config = VmConfig::from_guest(&guest).map_err(|e| UserError(e.to_string()))?;
    if let Some(listen) = incoming {
        let place = (state_dir, listen, source_timeout);
        return run_incoming(config, text, place, (started, fence_file), signals);
    }
    let state = StateDir::acquire(&state_dir, &config.name).map_err(|e| match e {
        StateDirError::Name(_) | StateDirError::AlreadyRunning { .. } => {
            anyhow::Error::new(UserError(e.to_string()))
        }
        other => anyhow::Error::new(other),
    })?;
    state.write_spec(&text)?;

    let result = serve(config, &state, (started, fence_file.as_deref()), signals);
    state.cleanup();
    result
}

/// Runs the guest; `fence_file` is `--fence-file`.
fn serve(
    config: VmConfig,
    state: &StateDir,
    (started, fence_file): (Instant, Option<&std::path::Path>),
    signals: libc::sigset_t,
) -> anyhow::Result<ExitCode> {
    // Making the cgroup and writing its limits runs beside the VM's creation; this
    // thread then joins it (see CgroupState::join), before it touches guest memory and
    // starts any other thread. A locked guest touches all of its memory when it is
    // mapped (mlock), so it joins before that.
    let cgroup_config = config.clone();
    let cgroup_setup = std::thread::Builder::new()
        .name("cgroup-setup".into())
        .spawn(move || CgroupState::prepare(&cgroup_config))
        .context("starting the cgroup thread")?;
    let (early_cgroup, cgroup_setup) = if config.memory.locked {
        // A cgroup that fails here fails the start before any memory is locked.
        (Some(join_cgroup(cgroup_setup).and_then(join)?), None)
    } else {
        (None, Some(cgroup_setup))
    };
    let (events, inbox) = std::sync::mpsc::channel();
    let created = Vmm::create(
        config.clone(),
        &state.console_path(),
        events.clone(),
        started,
    );
    let cgroup = match (early_cgroup, cgroup_setup) {
        (Some(cgroup), _) => cgroup,
        (None, Some(handle)) => join_cgroup(handle).and_then(join)?,
        (None, None) => unreachable!("the cgroup thread is joined exactly once"),
    };
    if let Some(reason) = &cgroup.missing {
        eprintln!("berth-vmm: running without a cgroup: {reason}");
    }
    let mut fence_deadline = None;
    let vmm = match created.map_err(user_error).and_then(|vmm| {
        vmm.load_payload().map_err(user_error)?;
        // The guest must not run a moment past its fence: read when the vCPUs are about
        // to start (after the memory, which may take long), a deadline passed means no
        // start at all.
        if let Some(file) = fence_file {
            let left = berth_hypervisor::fence::read_deadline_file(file)
                .map_err(|e| anyhow::Error::new(UserError(format!("{e}; not started"))))?;
            fence_deadline = Some(Instant::now() + left);
        }
        vmm.start()?;
        Ok(vmm)
    }) {
        Ok(vmm) => vmm,
        Err(e) => {
            if let Some(cg) = cgroup.cgroup {
                let _ = cg.remove();
            }
            return Err(e);
        }
    };
    vmm.set_cgroup(cgroup);
    let vmm = Arc::new(vmm);
    if let Some(deadline) = fence_deadline {
        // Armed before anyone can reach the VMM: if berth serve dies before its first
        // renewal, the guest still stops at the deadline. Zero (passed meanwhile) stops
        // it at once.
        let left = deadline.saturating_duration_since(Instant::now());
        vmm.fence().set(
            &vmm,
            berth_hypervisor::fence::FenceArgs {
                in_ms: Some(left.as_millis() as u64),
            },
        );
    }
    let listener = state.bind_control()?;
    control::server::spawn(listener, Arc::clone(&vmm)).context("starting the control thread")?;
    spawn_signal_thread(signals, events.clone())?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready {}", state.socket_path().display());
        let _ = out.flush();
    }

    vmm.run_until_shutdown(&inbox);
    // The socket goes first: a client waiting on it sees the VMM gone as soon as the
    // guest's resources are released.
    std::fs::remove_file(state.socket_path()).ok();
    if let Err(e) = vmm.remove_cgroup() {
        eprintln!("berth-vmm: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `place`: the state root, the listen address and how long to wait for the source.
fn run_incoming(
    config: VmConfig,
    spec_text: String,
    (state_root, listen, source_timeout): (PathBuf, String, Duration),
    (started, fence_file): (Instant, Option<PathBuf>),
    signals: libc::sigset_t,
) -> anyhow::Result<ExitCode> {
    use berth_hypervisor::migration::incoming::{self, IncomingError, IncomingOptions};
    let (events, inbox) = std::sync::mpsc::channel();
    spawn_signal_thread(signals, events.clone())?;
    let opts = IncomingOptions {
        spec_text,
        config,
        state_root,
        listen,
        source_timeout,
        started,
        fence_file,
    };
    incoming::run(opts, events, inbox).map_err(|e| match e {
        IncomingError::StateDir(StateDirError::Name(_) | StateDirError::AlreadyRunning { .. })
        | IncomingError::Fence(_)
        | IncomingError::Vmm(
            berth_hypervisor::vmm::VmmError::InvalidArgument(_)
            | berth_hypervisor::vmm::VmmError::Memory(_)
            | berth_hypervisor::vmm::VmmError::Cpuid(_),
        ) => anyhow::Error::new(UserError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    Ok(ExitCode::SUCCESS)
}

fn join_cgroup(
    handle: std::thread::JoinHandle<Result<CgroupState, berth_hypervisor::vmm::VmmError>>,
) -> anyhow::Result<CgroupState> {
    let state = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the cgroup thread panicked"))??;
    Ok(state)
}

/// Moves this thread into the prepared cgroup (see CgroupState::join).
fn join(mut cgroup: CgroupState) -> anyhow::Result<CgroupState> {
    cgroup.join()?;
    Ok(cgroup)
}

fn user_error(e: berth_hypervisor::vmm::VmmError) -> anyhow::Error {
    use berth_hypervisor::vmm::VmmError as E;
    match e {
        E::InvalidArgument(_) | E::Memory(_) | E::Linux(_) | E::Cpuid(_) => {
            UserError(e.to_string()).into()
        }
        other => other.into(),
    }
}

fn block_termination_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    anyhow::ensure!(rc == 0, "cannot block the termination signals: error {rc}");
    Ok(set)
}

fn spawn_signal_thread(
    set: libc::sigset_t,
    events: std::sync::mpsc::Sender<VmmEvent>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut signal = 0;
            // SAFETY: `set` is an initialized sigset_t blocked in every thread; sigwait
            // writes the signal number into `signal`.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc == 0 {
                let name = match signal {
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGINT => "SIGINT",
                    _ => "SIGHUP",
                };
                let _ = events.send(VmmEvent::Signal(name));
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        parse_args(args.iter().map(Into::into)).map_err(|e| e.to_string())
    }

    #[test]
    fn run_takes_spec_state_dir_and_incoming() {
        let Ok(Cli::Run(a)) = parse(&[
            "run",
            "--spec",
            "-",
            "--state-dir",
            "/s",
            "--incoming=127.0.0.1:0",
        ]) else {
            panic!("run not parsed");
        };
        assert_eq!(a.spec, "-");
        assert_eq!(a.state_dir, PathBuf::from("/s"));
        assert_eq!(a.incoming.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(a.fence_file, None);
        assert!(matches!(parse(&["--help"]), Ok(Cli::Help)));
        assert!(matches!(parse(&["-V"]), Ok(Cli::Version)));
    }

    #[test]
    fn run_takes_a_fence_file_also_with_incoming() {
        let Ok(Cli::Run(a)) = parse(&[
            "run",
            "--spec",
            "-",
            "--state-dir",
            "/s",
            "--fence-file=/s/f",
            "--incoming=127.0.0.1:0",
        ]) else {
            panic!("run not parsed");
        };
        assert_eq!(a.fence_file, Some(PathBuf::from("/s/f")));
        assert_eq!(a.incoming.as_deref(), Some("127.0.0.1:0"));
    }

    const PINNED: &str = "apiVersion: berth.dev/v1\nkind: Guest\n\
        metadata: {name: pinned}\n\
        spec:\n  host: kvm01\n\
        \x20 boot: {kernel: \"builtin:heartbeat\"}\n\
        \x20 cpu: {vcpus: 2, pinning: {vcpus: {0: \"0\", 1: \"1\"}, emulator: \"0-1\"}}\n\
        \x20 memory: {size: 16MiB}\n";

    #[test]
    fn a_spec_with_cpu_pinning_is_read_from_json_and_from_yaml_alike() {
        let (from_yaml, yaml) = parse_spec(PINNED.to_owned()).unwrap();
        assert_eq!(yaml, PINNED, "YAML is kept as written");
        assert_eq!(from_yaml.spec.cpu.pinning.as_ref().unwrap().vcpus.len(), 2);
        let json = serde_json::to_string_pretty(&from_yaml).unwrap();
        assert!(
            json.contains("\"0\": \"0\""),
            "JSON keys are strings: {json}"
        );
        // serde_yaml alone refuses it: the reason for trying JSON first.
        assert!(serde_yaml::from_str::<berth_schema::Guest>(&json).is_err());
        let (from_json, yaml) = parse_spec(json).unwrap();
        assert_eq!(from_json, from_yaml);
        // spec.yaml stays YAML, and reads back as the same guest.
        assert!(!yaml.trim_start().starts_with('{'), "{yaml}");
        assert_eq!(
            serde_yaml::from_str::<berth_schema::Guest>(&yaml).unwrap(),
            from_yaml
        );
    }

    #[test]
    fn a_bad_spec_names_the_error_of_its_format() {
        let e = parse_spec("{\"apiVersion\": \"berth.dev/v1\", \"kind\": 3}".into()).unwrap_err();
        assert!(e.contains("(as JSON)") && e.contains("line 1"), "{e}");
        let e = parse_spec(PINNED.replace("vcpus: 2", "vcpus: two")).unwrap_err();
        assert!(!e.contains("JSON") && e.contains("spec.cpu.vcpus"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse(&[]).unwrap_err().contains("missing command"));
        assert!(parse(&["walk"]).unwrap_err().contains("unknown command"));
        assert!(parse(&["run", "--spec", "x"])
            .unwrap_err()
            .contains("--state-dir"));
        assert!(parse(&["run", "--state-dir", "d"])
            .unwrap_err()
            .contains("--spec"));
        assert!(
            parse(&["run", "--spec", "x", "--state-dir", "d", "--bogus"])
                .unwrap_err()
                .contains("--bogus")
        );
    }
}
