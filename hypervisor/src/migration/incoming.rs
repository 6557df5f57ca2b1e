//! `berth-vmm run --spec F --state-dir D --incoming ADDR`: the destination process.
//!
//! It takes `D/guests/<name>.incoming/` and cgroup `berth/<name>.incoming`, builds
//! memory and vCPUs from its own spec (which may differ from the source's in
//! restart-class fields), listens on `ADDR`, generates the one-time token, binds its
//! control socket, and prints
//!
//! ```text
//! ready <control socket> incoming <listen address> <token>
//! ```
//!
//! (`migrateStatus` reports the same). Then it receives; if anything goes wrong before
//! `Commit` it removes everything it made and returns an error (the binary exits
//! non-zero). After `Commit` the guest runs, and the state directory, lock and cgroup
//! pass to `<name>` as [`super`] describes.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::control::MigrationPhase;
use super::receive::{self, Incoming, ReceiveError};
use super::wire::Token;
use crate::config::VmConfig;
use crate::host::cgroup::CgroupError;
use crate::statedir::{StateDir, StateDirError};
use crate::vmm::{CgroupState, Vmm, VmmError, VmmEvent};

/// How long the destination waits, after commit, for the source to release the guest's
/// state directory and cgroup.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the incoming VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The incoming state directory.
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    /// Building the machine.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// Listening.
    #[error("Cannot listen for the migration on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// Faulting RAM in.
    #[error("Cannot fault in the guest's memory: {0}")]
    Populate(std::io::Error),
    /// The token.
    #[error("Cannot generate the migration token: {0}")]
    Token(std::io::Error),
    /// The control thread.
    #[error("Cannot start the control thread: {0}")]
    Control(std::io::Error),
    /// The migration itself.
    #[error("Incoming migration failed: {0}")]
    Receive(#[from] ReceiveError),
    /// Shut down before the guest arrived.
    #[error("Shut down before the migration completed: {0}")]
    Shutdown(String),
    /// The fence deadline (`--fence-file`) cannot be read, or has passed.
    #[error("{0}; not started")]
    Fence(String),
}

/// What the incoming VMM is started with.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// The spec text (written to `spec.yaml`).
    pub spec_text: String,
    /// The validated settings.
    pub config: VmConfig,
    /// The state root (`--state-dir`).
    pub state_root: PathBuf,
    /// Where to listen.
    pub listen: String,
    /// How long to wait for the source's first connection before giving up (and
    /// removing everything): a preparation nobody follows must not hold the slot.
    pub source_timeout: Duration,
    /// Process start.
    pub started: Instant,
    /// `--fence-file`: where an HA guest's fence deadline is read (the VMM is fenced
    /// from its start, as any VMM of an HA guest; see [`crate::fence`]).
    pub fence_file: Option<PathBuf>,
}

/// Runs the incoming VMM until the guest is shut down (after a completed migration) or
/// the migration fails. `events`/`inbox` is the VMM's event channel (the caller's
/// signal thread sends shutdowns into it).
///
/// # Errors
/// Any failure before the commit, after everything this function made is removed.
pub fn run(
    opts: IncomingOptions,
    events: Sender<VmmEvent>,
    inbox: Receiver<VmmEvent>,
) -> Result<(), IncomingError> {
    let name = opts.config.name.clone();
    let marker = committed_marker(&opts.state_root, &name);
    let incoming_dir = self::incoming_dir(&opts.state_root, &name);
    // A previous incoming VMM of this guest read Commit and its source never confirmed
    // Running: until that source's switchover is resolved (and the marker removed), the
    // answer "ran" must stay readable. Checked before the directory is taken (a refused
    // VMM leaves nothing beside the marker), and again once it is held.
    let refused = || {
        IncomingError::Receive(ReceiveError::Protocol(format!(
            "{} is there: an earlier migration of {name} committed here and its source \
             never confirmed Running; once that source is resolved (migrateResolve with \
             destinationRunning: true) or gone, remove {}",
            marker.display(),
            incoming_dir.display()
        )))
    };
    if marker.exists() {
        return Err(refused());
    }
    let dir = StateDir::acquire_incoming(&opts.state_root, &name)?;
    if marker.exists() {
        return Err(refused());
    }
    let result = prepare_and_receive(&opts, &dir, &marker, &events, &inbox);
    let vmm = match result {
        Ok(vmm) => vmm,
        Err((e, vmm)) => {
            if let Some(vmm) = vmm {
                let _ = vmm.remove_cgroup();
            }
            dir.cleanup();
            drop(dir);
            if marker.exists() {
                eprintln!(
                    "berth-vmm: the guest counts as run here ({} kept)",
                    marker.display()
                );
            }
            remove_incoming_dir(&incoming_dir);
            return Err(e);
        }
    };
    // The guest runs here. Take over the guest's own directory and cgroup.
    let current: Arc<Mutex<Option<StateDir>>> = Arc::new(Mutex::new(Some(dir)));
    {
        let (vmm, current) = (Arc::clone(&vmm), Arc::clone(&current));
        let opts = opts.clone();
        let spawned = std::thread::Builder::new()
            .name("mig-handover".into())
            .spawn(move || {
                // The guest runs here: it must end up where readers look for it. Until
                // then it stays visible in `<name>.incoming/` (status `committed`,
                // `relocation` saying why), and the handover is tried again.
                let mut wait = Duration::from_secs(1);
                loop {
                    match handover(&vmm, &opts, &current) {
                        Ok(path) => {
                            vmm.migration().status().relocation = Some(path.display().to_string());
                            return;
                        }
                        Err(e) => {
                            eprintln!(
                                "berth-vmm: the guest runs, but the handover failed ({e}); \
                                 trying again in {wait:?}"
                            );
                            vmm.migration().status().relocation =
                                Some(format!("handover failed: {e}"));
                        }
                    }
                    if vmm.shutting_down() {
                        return;
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            });
        if let Err(e) = spawned {
            eprintln!("berth-vmm: cannot start the handover thread: {e}");
        }
    }
    vmm.run_until_shutdown(&inbox);
    let dir = current.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(dir) = &dir {
        std::fs::remove_file(dir.socket_path()).ok();
    }
    if let Err(e) = vmm.remove_cgroup() {
        eprintln!("berth-vmm: {e}");
    }
    if let Some(dir) = dir {
        dir.cleanup();
        if dir.dir() == incoming_dir {
            drop(dir);
            remove_incoming_dir(&incoming_dir);
        }
    }
    Ok(())
}

/// Removes the incoming directory `dir`, except its committed marker: while the marker
/// is there (the source has not confirmed that it heard `Running`), the guest counts as
/// run here, also after this VMM handed it over or exited, and the directory stays with
/// the marker alone. The reconciler removes it once the source is resolved.
fn remove_incoming_dir(dir: &Path) {
    let _held = receive::MARKER_DIR
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let marker = dir.join(COMMITTED);
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name() == COMMITTED {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

type Failure = (IncomingError, Option<Arc<Vmm>>);

fn prepare_and_receive(
    opts: &IncomingOptions,
    dir: &StateDir,
    marker: &Path,
    events: &Sender<VmmEvent>,
    inbox: &Receiver<VmmEvent>,
) -> Result<Arc<Vmm>, Failure> {
    dir.write_spec(&opts.spec_text)
        .map_err(|e| (IncomingError::from(e), None))?;
    let mut cgroup_config = opts.config.clone();
    cgroup_config.name = format!("{}.incoming", opts.config.name);
    let cgroup = CgroupState::create(&cgroup_config).map_err(|e| (e.into(), None))?;
    let vmm = match Vmm::create(
        opts.config.clone(),
        &dir.console_path(),
        events.clone(),
        opts.started,
    ) {
        Ok(vmm) => vmm,
        Err(e) => {
            if let Some(cg) = cgroup.cgroup {
                let _ = cg.remove();
            }
            return Err((e.into(), None));
        }
    };
    vmm.set_cgroup(cgroup);
    let vmm = Arc::new(vmm);
    let fail = |e: IncomingError| (e, Some(Arc::clone(&vmm)));
    // An HA guest's VMM is fenced from its start, this one too: if the service stops
    // renewing the deadline, the migration ends at it (before the commit: the guest stays
    // on its source), or the guest stops here (after it).
    if let Some(file) = &opts.fence_file {
        let left =
            crate::fence::read_deadline_file(file).map_err(|e| fail(IncomingError::Fence(e)))?;
        vmm.fence().set(
            &vmm,
            crate::fence::FenceArgs {
                in_ms: Some(left.as_millis() as u64),
            },
        );
    }
    // RAM is faulted in before the source is told where to connect (see
    // `GuestRam::populate`); it also proves the memory is there.
    super::ram::GuestRam::new(vmm.vm())
        .populate()
        .map_err(|e| fail(IncomingError::Populate(e)))?;
    // The committed marker's content is written and synced now, so that the commit
    // inside the downtime is a rename and one directory sync.
    receive::stage_committed_marker(marker).map_err(|source| {
        fail(IncomingError::Receive(ReceiveError::Marker {
            path: marker.to_owned(),
            source,
        }))
    })?;
    let listener = TcpListener::bind(&opts.listen).map_err(|source| {
        fail(IncomingError::Listen {
            addr: opts.listen.clone(),
            source,
        })
    })?;
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.listen.clone());
    let token = Token::generate().map_err(|e| fail(IncomingError::Token(e)))?;
    {
        let mut st = vmm.migration().status();
        st.role = Some("incoming".into());
        st.phase = MigrationPhase::Listening;
        st.listen = Some(listen.clone());
        st.token = Some(token.to_hex());
        st.guest_bytes = super::ram::GuestRam::new(vmm.vm()).size();
    }
    let control = dir.bind_control().map_err(|e| fail(e.into()))?;
    crate::control::server::spawn(control, Arc::clone(&vmm))
        .map_err(|e| fail(IncomingError::Control(e)))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "ready {} incoming {listen} {}",
            dir.socket_path().display(),
            token.to_hex()
        );
        let _ = out.flush();
    }
    let incoming = Incoming::new(listener, token, opts.source_timeout).map_err(|e| {
        fail(IncomingError::Listen {
            addr: listen.clone(),
            source: e,
        })
    })?;
    let sockets = incoming.sockets();
    let receiver = {
        let vmm = Arc::clone(&vmm);
        let root = opts.state_root.clone();
        let marker = marker.to_owned();
        std::thread::Builder::new()
            .name("mig-receive".into())
            .spawn(move || incoming.receive(&vmm, &root, &marker))
            .map_err(|e| fail(IncomingError::Control(e)))?
    };
    let mut shutdown: Option<String> = None;
    while !receiver.is_finished() {
        match inbox.recv_timeout(Duration::from_millis(20)) {
            Ok(VmmEvent::Shutdown { reason, .. }) => {
                vmm.migration().request_cancel();
                receive::shutdown_all(&sockets);
                shutdown = Some(reason);
            }
            Ok(VmmEvent::Signal(name)) => {
                vmm.migration().request_cancel();
                receive::shutdown_all(&sockets);
                shutdown = Some(format!("{name} received"));
            }
            Ok(VmmEvent::Vcpu(event)) => vmm.on_vcpu_event(&event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let outcome = receiver.join().unwrap_or_else(|_| {
        Err(ReceiveError::Protocol(
            "the receiving thread panicked".into(),
        ))
    });
    match (outcome, shutdown) {
        (Ok(()), None) => Ok(vmm),
        (Ok(()), Some(reason)) if vmm.fence().remaining().is_some_and(|d| d.is_zero()) => {
            // The fence deadline passed: the guest must stop, arrived or not.
            vmm.request_shutdown(None, &reason);
            Ok(vmm)
        }
        (Ok(()), Some(reason)) => {
            // The commit was read first: the guest runs here and nowhere else, and a
            // stop meant for the migration would now stop the guest itself.
            eprintln!(
                "berth-vmm: {reason} while the guest arrived; not applied: the guest runs \
                 here now (ask again to stop it)"
            );
            vmm.withdraw_shutdown();
            Ok(vmm)
        }
        (Err(e), reason) => {
            {
                let mut st = vmm.migration().status();
                st.phase = MigrationPhase::Failed;
                st.error = Some(e.to_string());
            }
            eprintln!("berth-vmm: incoming migration failed: {e}");
            let _ = vmm.stop_vcpus(Duration::from_secs(2));
            Err(fail(match reason {
                Some(r) => IncomingError::Shutdown(r),
                None => e.into(),
            }))
        }
    }
}

/// Moves the running guest's VMM from `<name>.incoming` to `<name>`: lock, spec,
/// console log, control socket, cgroup. Returns the new directory.
fn handover(
    vmm: &Vmm,
    opts: &IncomingOptions,
    current: &Mutex<Option<StateDir>>,
) -> Result<PathBuf, String> {
    let name = &opts.config.name;
    if super::fault::on("handover-fails") {
        return Err("BERTH_FAULT handover-fails".into());
    }
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    let target = loop {
        match StateDir::acquire(&opts.state_root, name) {
            Ok(dir) => break dir,
            Err(StateDirError::AlreadyRunning { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    target
        .write_spec(&opts.spec_text)
        .map_err(|e| e.to_string())?;
    // The cgroup: the source removes berth/<name> as it exits.
    let cgroup = loop {
        match CgroupState::create(&opts.config) {
            Ok(cg) => break cg,
            Err(VmmError::Cgroup(CgroupError::InUse { .. })) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot move into cgroup berth/{name}: {e}")),
        }
    };
    vmm.remove_cgroup().map_err(|e| e.to_string())?;
    vmm.set_cgroup(cgroup);
    // The guest's console history (the source's console.log, for a local migration)
    // stays: what the guest wrote since the commit is appended to it.
    vmm.devices()
        .serial()
        .log_mut()
        .relocate_appending(&target.console_path())
        .map_err(|e| format!("cannot move the console log: {e}"))?;
    let mut slot = current.lock().unwrap_or_else(|e| e.into_inner());
    let socket = slot
        .as_ref()
        .expect("the incoming directory until the handover")
        .socket_path();
    std::fs::rename(socket, target.socket_path())
        .map_err(|e| format!("cannot move the control socket: {e}"))?;
    let incoming = slot.take().expect("checked above");
    let incoming_dir = incoming.dir().to_owned();
    incoming.cleanup();
    drop(incoming);
    // The guest's own VMM answers from now on, and the marker (if the source has not
    // confirmed `Running`) for when it is gone.
    remove_incoming_dir(&incoming_dir);
    let path = target.dir().to_owned();
    *slot = Some(target);
    Ok(path)
}

/// The committed marker's file name in the incoming directory.
const COMMITTED: &str = "committed";

/// The committed marker of an incoming migration of `name` under `root`:
/// `<root>/guests/<name>.incoming/committed`, written (and fsync'd) when the
/// destination reads `Commit`, before any vCPU starts, and removed when the source
/// confirms that it heard `Running` (`Done`). Otherwise it stays, also after the
/// handover and after the VMM exits, until the reconciler has resolved the source. While
/// it exists and no VMM holds the directory, the answer to "did the destination run the
/// guest?" is yes.
pub fn committed_marker(root: &Path, name: &str) -> PathBuf {
    StateDir::incoming_path_of(root, name).join(COMMITTED)
}

/// The path of the incoming VMM's directory for guest `name` under `root`.
pub fn incoming_dir(root: &Path, name: &str) -> PathBuf {
    StateDir::incoming_path_of(root, name)
}
