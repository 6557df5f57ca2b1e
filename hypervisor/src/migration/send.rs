//! The source side: the `migrate` control op and the thread that migrates.
//!
//! 1. Connect `connections` TCP streams, each proving the token ([`wire::connect`]).
//! 2. Send `Config` on connection 0; the destination answers `Info` (pre-checks
//!    passed) or `Abort` with every problem. No memory moves before that.
//! 3. Turn on dirty logging; pass 1 sends every non-zero page (the destination's RAM is
//!    fresh zeroes). Each later pass sends the pages dirtied during the previous one
//!    (zeroed ones as `ZeroPages`), spread over the connections by 2 MiB chunk so a page
//!    always takes the same connection. After each pass [`Convergence`] decides.
//! 4. Switchover: stop the throttle, pause, send the last dirty pages and a final
//!    `PassEnd` on every connection, then `State` on connection 0; wait for `Loaded`,
//!    send `Commit`, wait for `Running`, shut this VMM down. See [`super`] for the
//!    rule after `Commit`.

use std::io::Write as _;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_schema::OnTimeout;

use super::control::{MigrateArgs, MigrateResolveArgs, MigrationPhase};
use super::policy::{Convergence, Decision, PassResult, Policy, SAMPLE_PERIOD};
use super::precheck::{SourceConfig, SourceIdentity, CONFIG_VERSION};
use super::ram::{connection_of, GuestRam, Run};
use super::state::{self, MachineState, Persist as _, StateError, Vcpu, XsaveAbi, STATE_VERSION};
use super::throttle::Throttle;
use super::wire::{self, FrameKind, FrameReader, FrameWriter, Token, WireError, PAGE_SIZE};
use super::{KEEPALIVE, LINK_TIMEOUT, MAX_CONNECTIONS};
use crate::arch::x86_64::cpuid;
use crate::control::protocol::GuestRunState;
use crate::vmm::{Payload, Vmm, VmmError};
use crate::vstate::vm::VmError;
use std::cell::RefCell;

/// Pages per `Pages` run at most (256 KiB of data): small enough that the ciphertext
/// sealed out of guest memory and handed to the kernel stays in the core's 2 MiB L2 cache beside
/// the other threads' buffers (source CPU 90-110 ms per migration of 200 MiB against
/// 100-120 ms with 1 MiB runs, BENCHMARKS.md), large enough that per-frame costs stay
/// small.
const BATCH_PAGES: usize = 64;
/// Addresses per `ZeroPages` frame.
const ZERO_BATCH: usize = 32 * 1024;
/// How long the destination gets to load the state and to start the guest.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of connections.
const DEFAULT_CONNECTIONS: u32 = 2;

/// Why a migration failed. Every one of these happens before `Commit`: the guest runs
/// here again.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The destination address does not resolve.
    #[error("Cannot resolve the destination {0:?}")]
    Resolve(String),
    /// TCP connect failed.
    #[error("Cannot connect to the destination {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The handshake failed (wrong token, not a berth destination, version).
    #[error("Handshake on connection {stream} failed (a wrong token, or not a berth destination): {source}")]
    Handshake {
        /// Stream number.
        stream: u32,
        /// The wire error.
        source: WireError,
    },
    /// Setting socket options failed.
    #[error("Cannot configure connection {0}: {1}")]
    Socket(u32, std::io::Error),
    /// The destination refused (pre-checks) or gave up.
    #[error("The destination refused the migration: {0}")]
    Refused(String),
    /// A connection failed while sending.
    #[error("Connection {conn} failed: {source}")]
    Connection {
        /// Connection index.
        conn: usize,
        /// The wire error.
        source: WireError,
    },
    /// Reading the destination's replies failed.
    #[error("Cannot read the destination's replies: {0}")]
    Replies(WireError),
    /// The destination sent something out of order.
    #[error("The destination sent {got:?} while {expected} was expected")]
    Unexpected {
        /// What came.
        got: FrameKind,
        /// What was expected.
        expected: &'static str,
    },
    /// The destination did not answer in time.
    #[error("The destination did not send {0} within {ACK_TIMEOUT:?}")]
    Timeout(&'static str),
    /// The CPU model could not be read.
    #[error("Cannot read the guest's CPU model: {0}")]
    Cpuid(String),
    /// Dirty logging failed.
    #[error("Cannot track dirty pages: {0}")]
    DirtyLog(#[from] VmError),
    /// Pausing the guest failed.
    #[error("Cannot pause the guest for the switchover: {0}")]
    Pause(VmmError),
    /// Saving state failed.
    #[error("Cannot save the guest's state: {0}")]
    SaveState(#[from] StateError),
    /// A worker thread could not start.
    #[error("Cannot start a migration thread: {0}")]
    Thread(std::io::Error),
    /// `migrateCancel`.
    #[error("Cancelled on request")]
    Cancelled,
    /// Failed before `Commit`, and putting the guest back as it was failed too.
    #[error("{failure}; then {problems}")]
    NotRestored {
        /// Why the migration failed.
        failure: Box<SendError>,
        /// What could not be undone.
        problems: String,
    },
    /// The completion timeout passed and the policy says abort.
    #[error("Did not converge within {0:?} (dirty rate above what the link moves); aborted as the policy says")]
    NotConverged(Duration),
}

/// Validates `args` and starts the migration thread; replies with the status.
///
/// # Errors
/// [`VmmError::InvalidArgument`] for bad arguments, [`VmmError::Refused`] when a
/// migration runs already or the guest cannot be migrated in its state.
pub fn start(vmm: &Arc<Vmm>, args: MigrateArgs) -> Result<serde_json::Value, VmmError> {
    let token = Token::from_hex(&args.token)
        .ok_or_else(|| VmmError::InvalidArgument("token: expected 64 hex digits".into()))?;
    let addr = args
        .destination
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            VmmError::InvalidArgument(format!(
                "destination {:?} is not a host:port that resolves",
                args.destination
            ))
        })?;
    let connections = args.connections.unwrap_or(DEFAULT_CONNECTIONS);
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(VmmError::InvalidArgument(format!(
            "connections: 1 to {MAX_CONNECTIONS}, not {connections}"
        )));
    }
    match vmm.run_state() {
        (GuestRunState::Crashed | GuestRunState::Halted, reason) => {
            return Err(VmmError::Refused(format!(
                "cannot migrate a guest that has stopped ({})",
                reason.unwrap_or_default()
            )))
        }
        _ if vmm.payload() == Payload::None || vmm.online_vcpus() == 0 => {
            return Err(VmmError::Refused(
                "cannot migrate a guest that has not started (an incoming VMM?)".into(),
            ))
        }
        _ => {}
    }
    let migration = vmm.migration();
    {
        let mut st = migration.status();
        // A guest that arrived here by a completed migration moves on like any other,
        // once it has taken over its directory and cgroup (`relocation` says how that
        // ended; the status is reset below, so the handover must not be under way).
        let incoming =
            st.phase == MigrationPhase::Completed && st.role.as_deref() == Some("incoming");
        if incoming && st.relocation.is_none() {
            return Err(VmmError::Refused(
                "the guest arrived by migration and is still taking over its directory and \
                 cgroup; try again in a moment"
                    .into(),
            ));
        }
        if !incoming
            && !matches!(
                st.phase,
                MigrationPhase::Idle | MigrationPhase::Failed | MigrationPhase::Cancelled
            )
        {
            return Err(VmmError::Refused(format!(
                "a migration is already {:?}",
                st.phase
            )));
        }
        *st = Default::default();
        st.role = Some("outgoing".into());
        st.phase = MigrationPhase::Prechecks;
        st.destination = Some(args.destination.clone());
        st.connections = connections;
        st.guest_bytes = GuestRam::new(vmm.vm()).size();
    }
    migration.reset_cancel();
    let policy = Policy::new(&args.policy, GuestRam::new(vmm.vm()).size());
    let me = Arc::clone(vmm);
    std::thread::Builder::new()
        .name("migrate".into())
        .spawn(move || outgoing(&me, addr, &token, connections, policy))
        .map_err(|e| VmmError::Host(format!("Cannot start the migration thread: {e}")))?;
    Ok(migration.status_json())
}

/// `migrateCancel`: asks a migration to stop before its commit.
///
/// # Errors
/// [`VmmError::Refused`] when none runs or it is past the commit.
pub fn cancel(vmm: &Arc<Vmm>) -> Result<serde_json::Value, VmmError> {
    let migration = vmm.migration();
    let phase = migration.status().phase;
    match phase {
        MigrationPhase::Listening
        | MigrationPhase::Prechecks
        | MigrationPhase::Precopy
        | MigrationPhase::Switchover
        | MigrationPhase::Loaded => {
            migration.request_cancel();
            Ok(migration.status_json())
        }
        other => Err(VmmError::Refused(format!(
            "no migration to cancel (phase {other:?})"
        ))),
    }
}

/// `migrateResolve`: ends `switchoverUnknown`.
///
/// # Errors
/// [`VmmError::Refused`] in any other phase.
pub fn resolve(vmm: &Arc<Vmm>, args: MigrateResolveArgs) -> Result<serde_json::Value, VmmError> {
    let migration = vmm.migration();
    if migration.status().phase != MigrationPhase::SwitchoverUnknown {
        return Err(VmmError::Refused(
            "migrateResolve only answers a switchoverUnknown migration".into(),
        ));
    }
    migration.resolve(args.destination_running);
    Ok(migration.status_json())
}

/// How a migration that got past `Commit` ended.
enum Committed {
    /// `Running` came back.
    Completed,
    /// It did not; why.
    Unknown(String),
}

/// The thread body: migrates, then acts on the outcome.
fn outgoing(vmm: &Arc<Vmm>, addr: SocketAddr, token: &Token, connections: u32, policy: Policy) {
    let migration = vmm.migration();
    let was_paused = vmm.run_state().0 == GuestRunState::Paused;
    let outcome = migrate(vmm, addr, token, connections, policy, was_paused);
    let downtime = |st: &mut super::MigrationStatus, since: Instant| {
        st.downtime_ms = Some(since.elapsed().as_secs_f64() * 1000.0);
    };
    match outcome {
        Ok((Committed::Completed, paused_at)) => {
            {
                let mut st = migration.status();
                st.phase = MigrationPhase::Completed;
                downtime(&mut st, paused_at);
            }
            migration.notify_settled();
            eprintln!("berth-vmm: migrated to {addr}; shutting down");
            vmm.request_shutdown(Some(5000), &format!("migrated to {addr}"));
        }
        Ok((Committed::Unknown(why), _)) => {
            {
                let mut st = migration.status();
                st.phase = MigrationPhase::SwitchoverUnknown;
                st.error = Some(why.clone());
            }
            migration.notify_settled();
            eprintln!("berth-vmm: switchover outcome unknown ({why}); guest kept paused until migrateResolve");
            if migration.wait_resolution() {
                migration.status().phase = MigrationPhase::Completed;
                migration.notify_settled();
                vmm.request_shutdown(Some(5000), "the destination runs the guest (resolved)");
            } else {
                // The guest runs here again: dirty logging has no use any more.
                let logging = vmm.vm().set_dirty_logging(false);
                let resumed = if was_paused {
                    Ok(())
                } else if super::fault::on("resume-fails") {
                    Err(VmmError::Host("BERTH_FAULT resume-fails".into()))
                } else {
                    vmm.resume()
                };
                let mut st = migration.status();
                st.phase = MigrationPhase::Failed;
                let mut error = format!("{why}; resolved: the destination did not run the guest");
                if let Err(e) = &logging {
                    error.push_str(&format!("; turning dirty logging off failed: {e}"));
                }
                if let Err(e) = &resumed {
                    error.push_str(&format!(
                        "; resuming the guest here FAILED: {e} (it stays paused; resume it)"
                    ));
                    eprintln!("berth-vmm: resuming the guest after the resolution failed: {e}");
                }
                st.error = Some(error);
                drop(st);
                migration.notify_settled();
            }
        }
        Err(e) => {
            eprintln!("berth-vmm: migration to {addr} failed: {e}");
            let mut st = migration.status();
            let cancelled = |e: &SendError| matches!(e, SendError::Cancelled);
            st.phase = if cancelled(&e)
                || matches!(&e, SendError::NotRestored { failure, .. } if cancelled(failure))
            {
                MigrationPhase::Cancelled
            } else {
                MigrationPhase::Failed
            };
            st.error = Some(e.to_string());
            st.throttle_percent = 0;
            drop(st);
            migration.notify_settled();
        }
    }
}

/// Shared counters of the workers.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    pages: AtomicU64,
    zero: AtomicU64,
}

/// A transfer cap shared by the workers. It holds during pre-copy only: once the guest
/// is paused for the switchover, what is left goes at the link's speed (as QEMU does),
/// since every millisecond then is downtime.
#[derive(Debug)]
struct RateLimiter {
    rate: Option<f64>,
    next: Mutex<Instant>,
    lifted: AtomicBool,
}

impl RateLimiter {
    fn new(rate: Option<u64>) -> Self {
        RateLimiter {
            rate: rate.map(|b| b as f64),
            next: Mutex::new(Instant::now()),
            lifted: AtomicBool::new(false),
        }
    }

    /// Ends the cap for the rest of the migration.
    fn lift(&self) {
        self.lifted.store(true, Ordering::SeqCst);
    }

    fn take(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        if self.lifted.load(Ordering::SeqCst) {
            return;
        }
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / rate);
            start - now
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

enum Job {
    Runs { runs: Vec<Run>, skip_zero: bool },
    PassEnd { pass: u32, last: bool },
    Frame { kind: FrameKind, payload: Vec<u8> },
}

enum Event {
    PassDone,
    FrameSent,
    Failed { conn: usize, error: WireError },
}

enum Reply {
    Frame(FrameKind, Vec<u8>),
    Failed(WireError),
}

/// Everything `migrate` drives, once connected.
struct Session<'a> {
    vmm: &'a Arc<Vmm>,
    ram: &'a GuestRam<'a>,
    jobs: Vec<Sender<Job>>,
    events: Receiver<Event>,
    replies: Receiver<Reply>,
    counters: &'a Counters,
    limiter: &'a RateLimiter,
    started: Instant,
    /// The last pass the destination acknowledged as applied.
    acked: std::cell::Cell<u32>,
}

impl Session<'_> {
    fn check_cancel(&self) -> Result<(), SendError> {
        if self.vmm.migration().cancel_requested() {
            return Err(SendError::Cancelled);
        }
        // An Abort from the destination ends the migration at once.
        match self.replies.try_recv() {
            Ok(Reply::Frame(FrameKind::Abort, why)) => Err(SendError::Refused(
                String::from_utf8_lossy(&why).into_owned(),
            )),
            Ok(Reply::Frame(FrameKind::Info, payload)) => {
                self.note_info(&payload);
                Ok(())
            }
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Ok(Reply::Frame(got, _)) => Err(SendError::Unexpected {
                got,
                expected: "nothing",
            }),
            Ok(Reply::Failed(e)) => Err(SendError::Replies(e)),
            Err(mpsc::TryRecvError::Disconnected) => Ok(()),
        }
    }

    /// Sends `runs` as pass `pass` and waits until every connection has sent it,
    /// calling `sample` every [`SAMPLE_PERIOD`] meanwhile.
    fn pass(
        &self,
        runs: Vec<Run>,
        pass: u32,
        skip_zero: bool,
        last: bool,
        sample: &mut dyn FnMut() -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        let n = self.jobs.len() as u32;
        let mut split: Vec<Vec<Run>> = vec![Vec::new(); self.jobs.len()];
        for run in runs {
            split[connection_of(run.gpa, n)].push(run);
        }
        for (tx, runs) in self.jobs.iter().zip(split) {
            if !runs.is_empty() {
                let _ = tx.send(Job::Runs { runs, skip_zero });
            }
            let _ = tx.send(Job::PassEnd { pass, last });
        }
        let mut done = 0;
        let mut next_sample = Instant::now() + SAMPLE_PERIOD;
        while done < self.jobs.len() {
            if Instant::now() >= next_sample {
                sample()?;
                next_sample += SAMPLE_PERIOD;
            }
            match self.events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::PassDone) => done += 1,
                Ok(Event::FrameSent) => {}
                Ok(Event::Failed { conn, error }) => {
                    return Err(SendError::Connection {
                        conn,
                        source: error,
                    })
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SendError::Connection {
                        conn: 0,
                        source: WireError::Truncated,
                    })
                }
            }
            if !last {
                self.check_cancel()?;
            }
            self.progress();
        }
        Ok(())
    }

    /// Sends one frame on connection 0 after what it has queued.
    fn frame(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(), SendError> {
        let _ = self.jobs[0].send(Job::Frame { kind, payload });
        loop {
            match self.events.recv_timeout(ACK_TIMEOUT) {
                Ok(Event::FrameSent) => return Ok(()),
                Ok(Event::PassDone) => {}
                Ok(Event::Failed { conn, error }) => {
                    return Err(SendError::Connection {
                        conn,
                        source: error,
                    })
                }
                Err(_) => return Err(SendError::Timeout("a frame send")),
            }
        }
    }

    /// The destination's next reply (a pass acknowledgement is noted before it is
    /// returned), waiting until `deadline`; an Abort, a broken reply stream or the
    /// deadline end the migration, with `what` naming what was awaited.
    fn next_reply(
        &self,
        deadline: Instant,
        what: &'static str,
    ) -> Result<(FrameKind, Vec<u8>), SendError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.replies.recv_timeout(left) {
            Ok(Reply::Frame(FrameKind::Abort, why)) => Err(SendError::Refused(
                String::from_utf8_lossy(&why).into_owned(),
            )),
            Ok(Reply::Frame(kind, payload)) => {
                if kind == FrameKind::Info {
                    self.note_info(&payload);
                }
                Ok((kind, payload))
            }
            Ok(Reply::Failed(e)) => Err(SendError::Replies(e)),
            Err(_) => Err(SendError::Timeout(what)),
        }
    }

    /// Waits for the destination's `expected` reply.
    fn reply(&self, expected: FrameKind, what: &'static str) -> Result<Vec<u8>, SendError> {
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            match self.next_reply(deadline, what)? {
                (kind, payload) if kind == expected => return Ok(payload),
                (FrameKind::Info, _) => {}
                (got, _) => {
                    return Err(SendError::Unexpected {
                        got,
                        expected: what,
                    })
                }
            }
        }
    }

    /// Records a pass acknowledgement (`pass N`).
    fn note_info(&self, payload: &[u8]) {
        let acked = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.strip_prefix("pass "))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(n) = acked {
            self.acked.set(self.acked.get().max(n));
        }
    }

    /// Waits until the destination has applied pass `pass` on every connection.
    fn wait_applied(&self, pass: u32) -> Result<(), SendError> {
        const WHAT: &str = "a pass acknowledgement";
        let deadline = Instant::now() + ACK_TIMEOUT;
        while self.acked.get() < pass {
            match self.next_reply(deadline, WHAT)? {
                (FrameKind::Info, _) => {}
                (got, _) => {
                    return Err(SendError::Unexpected {
                        got,
                        expected: WHAT,
                    })
                }
            }
        }
        Ok(())
    }

    fn progress(&self) {
        let mut st = self.vmm.migration().status();
        st.bytes_sent = self.counters.bytes.load(Ordering::Relaxed);
        st.pages_sent = self.counters.pages.load(Ordering::Relaxed);
        st.zero_pages = self.counters.zero.load(Ordering::Relaxed);
        st.elapsed_ms = self.started.elapsed().as_millis() as u64;
    }
}

/// Connects, copies, switches over. `Ok` once `Commit` was sent (with the moment the
/// guest was paused); `Err` before, with the guest running here again.
fn migrate(
    vmm: &Arc<Vmm>,
    addr: SocketAddr,
    token: &Token,
    connections: u32,
    policy: Policy,
    was_paused: bool,
) -> Result<(Committed, Instant), SendError> {
    let started = Instant::now();
    let ram = GuestRam::new(vmm.vm());
    trace(started, "connecting");
    let mut sockets: Vec<TcpStream> = Vec::new();
    // KVM write-protects every page when dirty logging starts (milliseconds for a
    // large guest): done while the connections are set up and the destination runs
    // its pre-checks, not after. It must be on before pass 1 reads any page.
    let (connected, logging) = std::thread::scope(|scope| {
        let logging = std::thread::Builder::new()
            .name("mig-dirtylog".into())
            .spawn_scoped(scope, || -> Result<(), SendError> {
                ram.reset_vmm_dirty();
                vmm.vm().set_dirty_logging(true)?;
                trace(started, "dirty logging on");
                Ok(())
            });
        let connected = connect_all(vmm, &ram, addr, token, connections, &mut sockets, started);
        let logging = match logging {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                Err(SendError::Thread(std::io::Error::other(
                    "the dirty-logging thread panicked",
                )))
            }),
            Err(e) => Err(SendError::Thread(e)),
        };
        (connected, logging)
    });
    trace(started, "connected, dirty logging on");
    let connected = connected.and_then(|c| logging.map(|()| c));
    let (writers, reader) = match connected {
        Ok(c) => c,
        Err(e) => {
            for s in &sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
            let _ = vmm.vm().set_dirty_logging(false);
            return Err(e);
        }
    };
    let shared = Shared {
        counters: Counters::default(),
        limiter: RateLimiter::new(policy.bandwidth),
    };
    let result = std::thread::scope(|scope| {
        let result = run_session(
            scope, vmm, &ram, &shared, writers, reader, policy, was_paused, started,
        );
        // The destination sees the stream end; the reply reader and workers stop.
        for s in &sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        result
    });
    match result {
        Err(failure) => {
            // Before Commit: the guest runs here again, untouched.
            let mut problems = Vec::new();
            if let Err(e) = vmm.vm().set_dirty_logging(false) {
                problems.push(format!("turning dirty logging off failed: {e}"));
            }
            if !was_paused && vmm.run_state().0 == GuestRunState::Paused {
                let resumed = if super::fault::on("resume-fails") {
                    Err(VmmError::Host("BERTH_FAULT resume-fails".into()))
                } else {
                    vmm.resume()
                };
                if let Err(e) = resumed {
                    problems.push(format!(
                        "resuming the guest here FAILED: {e} (it stays paused; resume it)"
                    ));
                }
            }
            if problems.is_empty() {
                return Err(failure);
            }
            let problems = problems.join("; ");
            eprintln!("berth-vmm: after the failed migration: {problems}");
            Err(SendError::NotRestored {
                failure: Box::new(failure),
                problems,
            })
        }
        ok => ok,
    }
}

/// Opens connection 0, sends `Config` and reads the destination's verdict; then opens
/// the others. Every socket opened goes into `sockets` (to shut down at the end).
fn connect_all(
    vmm: &Vmm,
    ram: &GuestRam<'_>,
    addr: SocketAddr,
    token: &Token,
    connections: u32,
    sockets: &mut Vec<TcpStream>,
    started: Instant,
) -> Result<(Vec<FrameWriter<TcpStream>>, FrameReader<TcpStream>), SendError> {
    let config = source_config(vmm, ram, connections)?;
    trace(started, "config made");
    vmm.migration().status().xsave_bytes = Some(config.xsave_size);
    let mut writers = Vec::with_capacity(connections as usize);
    let mut reader = None;
    for stream in 0..connections {
        let mut conn = TcpStream::connect_timeout(&addr, LINK_TIMEOUT)
            .map_err(|source| SendError::Connect { addr, source })?;
        let opts = |c: &TcpStream| -> std::io::Result<TcpStream> {
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(LINK_TIMEOUT))?;
            c.set_write_timeout(Some(LINK_TIMEOUT))?;
            c.try_clone()
        };
        sockets.push(opts(&conn).map_err(|e| SendError::Socket(stream, e))?);
        let key = wire::connect(&mut conn, token, stream)
            .map_err(|source| SendError::Handshake { stream, source })?;
        trace(started, &format!("connection {stream}: handshake done"));
        let mut writer = FrameWriter::new(
            conn.try_clone().map_err(|e| SendError::Socket(stream, e))?,
            key.clone(),
        );
        if stream == 0 {
            // Pre-checks: Config, then the destination's verdict, before anything else.
            let json = serde_json::to_vec(&config).expect("the config serializes");
            writer
                .send(FrameKind::Config, &[&json])
                .map_err(|source| SendError::Connection { conn: 0, source })?;
            let mut r = FrameReader::new(conn, key.for_replies());
            let verdict = r.recv().map_err(SendError::Replies)?;
            trace(started, "verdict read");
            match verdict.kind {
                FrameKind::Info => {}
                FrameKind::Abort => {
                    return Err(SendError::Refused(
                        String::from_utf8_lossy(verdict.payload).into_owned(),
                    ))
                }
                got => {
                    return Err(SendError::Unexpected {
                        got,
                        expected: "the pre-check verdict",
                    })
                }
            }
            // From here replies may take as long as the migration.
            r.get_mut()
                .set_read_timeout(None)
                .map_err(|e| SendError::Socket(0, e))?;
            reader = Some(r);
        }
        writers.push(writer);
    }
    Ok((writers, reader.expect("connection 0 was opened")))
}

/// What the sending threads share.
struct Shared {
    counters: Counters,
    limiter: RateLimiter,
}

#[allow(clippy::too_many_arguments)]
fn run_session<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    vmm: &'env Arc<Vmm>,
    ram: &'env GuestRam<'env>,
    shared: &'env Shared,
    writers: Vec<FrameWriter<TcpStream>>,
    mut reader: FrameReader<TcpStream>,
    policy: Policy,
    was_paused: bool,
    started: Instant,
) -> Result<(Committed, Instant), SendError> {
    let (reply_tx, replies) = mpsc::channel();
    std::thread::Builder::new()
        .name("mig-replies".into())
        .spawn_scoped(scope, move || loop {
            match reader.recv() {
                Ok(f) => {
                    if reply_tx
                        .send(Reply::Frame(f.kind, f.payload.to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = reply_tx.send(Reply::Failed(e));
                    return;
                }
            }
        })
        .map_err(SendError::Thread)?;
    let batch = match policy.bandwidth {
        // Frames of at most ~20 ms of the cap, so the cap holds smoothly.
        Some(cap) => ((cap / 50) as usize / PAGE_SIZE).clamp(1, BATCH_PAGES),
        None => BATCH_PAGES,
    };
    let (event_tx, events) = mpsc::channel();
    let mut jobs = Vec::new();
    for (conn, writer) in writers.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        jobs.push(tx);
        let events = event_tx.clone();
        let (counters, limiter) = (&shared.counters, &shared.limiter);
        std::thread::Builder::new()
            .name(format!("mig-send{conn}"))
            .spawn_scoped(scope, move || {
                if let Err(error) = worker(writer, ram, &rx, &events, counters, limiter, batch) {
                    let _ = events.send(Event::Failed { conn, error });
                }
            })
            .map_err(SendError::Thread)?;
    }
    drop(event_tx);
    let session = Session {
        vmm,
        ram,
        jobs,
        events,
        replies,
        counters: &shared.counters,
        limiter: &shared.limiter,
        started,
        acked: std::cell::Cell::new(0),
    };
    let result = precopy_and_switch(&session, policy, was_paused);
    // Workers end when their job channels close.
    drop(session);
    result
}

fn source_config(
    vmm: &Vmm,
    ram: &GuestRam<'_>,
    connections: u32,
) -> Result<SourceConfig, SendError> {
    let config = vmm.config();
    let supported = vmm
        .vm()
        .supported_cpuid()
        .map_err(|e| SendError::Cpuid(e.to_string()))?;
    // The CPUID every vCPU was given (vCPU 0's; the others differ only in APIC IDs).
    let guest = cpuid::for_vcpu(
        &supported,
        config.cpu_mode,
        config.cpu_model.as_deref(),
        0,
        config.max_vcpus,
    )
    .map_err(|e| SendError::Cpuid(e.to_string()))?;
    Ok(SourceConfig {
        version: CONFIG_VERSION,
        name: config.name.clone(),
        ranges: ram.ranges(),
        max_vcpus: config.max_vcpus,
        online_vcpus: vmm.online_vcpus(),
        cpu_mode: config.cpu_mode,
        cpu_vendor: cpuid::vendor(&guest),
        cpu_flags: cpuid::feature_flags(&guest)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        // Every berth payload runs in 64-bit mode from its first instruction.
        long_mode: true,
        heartbeat: match vmm.payload() {
            Payload::Heartbeat(layout) => Some(layout),
            _ => None,
        },
        connections,
        source: SourceIdentity::here(),
        xsave_size: XsaveAbi::of(vmm.vm().fd()).size() as u32,
    })
}

fn precopy_and_switch(
    s: &Session<'_>,
    policy: Policy,
    was_paused: bool,
) -> Result<(Committed, Instant), SendError> {
    let vmm = s.vmm;
    let migration = vmm.migration();
    migration.status().phase = MigrationPhase::Precopy;
    trace(s.started, "verdict");

    let throttle = if policy.auto_converge {
        Some(Throttle::start(Arc::clone(vmm)).map_err(SendError::Thread)?)
    } else {
        None
    };
    let convergence = RefCell::new(Convergence::new(policy));
    let dirty = RefCell::new(s.ram.dirty_set());
    // Auto-converge looks at the dirty rate while a pass runs, not only after it.
    let mut last_sample = Instant::now();
    let mut sample = || -> Result<(), SendError> {
        let found = s.ram.collect_dirty(&mut dirty.borrow_mut())?;
        let rate = found as f64 * PAGE_SIZE as f64 / last_sample.elapsed().as_secs_f64();
        last_sample = Instant::now();
        if s.started.elapsed() >= policy.timeout && policy.on_timeout == OnTimeout::Abort {
            return Err(SendError::NotConverged(policy.timeout));
        }
        if let Some(pct) = convergence.borrow_mut().sample(rate) {
            if let Some(t) = &throttle {
                t.set(pct);
            }
            migration.status().throttle_percent = pct;
        }
        s.check_cancel()
    };
    let mut pass = 1;
    let mut runs = s.ram.all_runs();
    let mut skip_zero = true;
    let paused_at = loop {
        let before = s.counters.bytes.load(Ordering::Relaxed);
        let t = Instant::now();
        s.pass(runs, pass, skip_zero, false, &mut sample)?;
        s.wait_applied(pass)?;
        let duration = t.elapsed();
        trace(s.started, &format!("pass {pass} sent in {duration:?}"));
        s.ram.collect_dirty(&mut dirty.borrow_mut())?;
        let dirty_pages = dirty.borrow().count();
        let result = PassResult {
            bytes_sent: s.counters.bytes.load(Ordering::Relaxed) - before,
            duration,
            dirty_pages,
            elapsed: s.started.elapsed(),
        };
        let decision = convergence.borrow_mut().decide(&result);
        {
            let c = convergence.borrow();
            let mut st = migration.status();
            st.pass = pass;
            st.dirty_pages = dirty_pages;
            st.dirty_rate =
                (dirty_pages as f64 * PAGE_SIZE as f64 / duration.as_secs_f64().max(1e-6)) as u64;
            st.bandwidth = c.bandwidth() as u64;
            st.estimated_downtime_ms = c.estimated_downtime().as_secs_f64() * 1000.0;
        }
        s.progress();
        s.check_cancel()?;
        match decision {
            Decision::Switchover | Decision::ForcedSwitchover => {
                if let Some(t) = throttle {
                    t.stop();
                }
                migration.status().throttle_percent = 0;
                let paused_at = Instant::now();
                if !was_paused {
                    vmm.pause().map_err(SendError::Pause)?;
                }
                s.limiter.lift();
                migration.status().phase = MigrationPhase::Switchover;
                s.ram.collect_dirty(&mut dirty.borrow_mut())?;
                break paused_at;
            }
            Decision::Abort => return Err(SendError::NotConverged(policy.timeout)),
            Decision::Continue { throttle: pct } => {
                if let Some(t) = &throttle {
                    t.set(pct);
                }
                migration.status().throttle_percent = pct;
                // Very short passes would only spin on the dirty log.
                if duration < Duration::from_millis(1) {
                    std::thread::sleep(Duration::from_millis(1) - duration);
                }
                runs = dirty.borrow_mut().take_runs();
                skip_zero = false;
                pass += 1;
            }
        }
    };
    let final_runs = dirty.borrow_mut().take_runs();
    // The guest is paused: the rest, then the state.
    trace(s.started, "paused");
    s.pass(final_runs, pass + 1, false, true, &mut || Ok(()))?;
    trace(s.started, "last pass sent");
    let state = save_state(vmm, was_paused)?;
    trace(s.started, "state saved");
    s.frame(FrameKind::State, state.encode()?)?;
    trace(s.started, "state sent");
    s.reply(FrameKind::Loaded, "Loaded")?;
    trace(s.started, "loaded");
    if migration.cancel_requested() {
        return Err(SendError::Cancelled);
    }
    // The commit point: from here on this VMM never resumes the guest by itself, nor on
    // request (`Migration::holds_the_only_sure_copy`).
    migration.status().commit_sent = true;
    if let Err(e) = s.frame(FrameKind::Commit, Vec::new()) {
        return Ok((
            Committed::Unknown(format!("sending Commit failed: {e}")),
            paused_at,
        ));
    }
    Ok(match s.reply(FrameKind::Running, "Running") {
        Ok(_) => {
            trace(s.started, "running");
            // The destination keeps its committed marker (the answer "it ran here")
            // until it hears this; if it does not, the marker stays, which is safe.
            if !super::fault::on("skip-done") {
                let _ = s.frame(FrameKind::Done, Vec::new());
            }
            (Committed::Completed, paused_at)
        }
        Err(e) => (
            Committed::Unknown(format!("no Running after Commit: {e}")),
            paused_at,
        ),
    })
}

/// With `BERTH_MIGRATION_TRACE` set, prints the time of each migration step to stderr.
fn trace(since: Instant, what: &str) {
    if std::env::var_os("BERTH_MIGRATION_TRACE").is_some() {
        eprintln!(
            "berth-vmm: migration +{:.3} ms: {what}",
            since.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// Reads every vCPU (started or held for hot-add), the VM and the devices. The vCPUs
/// are paused.
fn save_state(vmm: &Vmm, paused: bool) -> Result<MachineState, SendError> {
    let vcpus = vmm.vcpus();
    let first = vcpus[0].fd();
    let msrs = state::saveable_msrs(vmm.vm().kvm(), &first)?;
    drop(first);
    let xsave = XsaveAbi::of(vmm.vm().fd());
    let mut saved = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let fd = v.fd();
        saved.push(
            Vcpu {
                index: v.index(),
                fd: &fd,
                msrs: &msrs,
                xsave,
            }
            .save()?,
        );
    }
    Ok(MachineState {
        version: STATE_VERSION,
        xsave_size: xsave.size() as u32,
        vcpus: saved,
        online: vmm.online_vcpus(),
        paused,
        vm: vmm.vm().save().map_err(StateError::Vm)?,
        devices: match vmm.devices().save() {
            Ok(d) => d,
            Err(never) => match never {},
        },
    })
}

/// One connection's sender: turns jobs into frames.
fn worker(
    mut w: FrameWriter<TcpStream>,
    ram: &GuestRam<'_>,
    jobs: &Receiver<Job>,
    events: &Sender<Event>,
    counters: &Counters,
    limiter: &RateLimiter,
    batch: usize,
) -> Result<(), WireError> {
    let mut pages = wire::PageBatch::new(batch);
    let pagemap = ram.pagemap();
    let mut zeros: Vec<u64> = Vec::new();
    let account = |wire_bytes: usize| {
        counters
            .bytes
            .fetch_add(wire_bytes as u64, Ordering::Relaxed);
    };
    let send = |w: &mut FrameWriter<TcpStream>, kind, parts: &[&[u8]]| -> Result<(), WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        limiter.take(len);
        w.send(kind, parts)?;
        account(len + wire::HEADER_LEN + wire::TAG_LEN);
        Ok(())
    };
    let send_pages =
        |w: &mut FrameWriter<TcpStream>, pages: &mut wire::PageBatch| -> Result<(), WireError> {
            let Some((gpa, n)) = pages.take() else {
                return Ok(());
            };
            limiter.take(n * PAGE_SIZE + wire::RUN_LEN);
            account(w.send_pages(gpa, ram.pages(gpa, n))?);
            counters.pages.fetch_add(n as u64, Ordering::Relaxed);
            Ok(())
        };
    loop {
        let job = match jobs.recv_timeout(KEEPALIVE) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                send(&mut w, FrameKind::Info, &[b"keepalive"])?;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        match job {
            Job::Runs { runs, skip_zero } => {
                for run in runs {
                    let untouched = pagemap
                        .as_ref()
                        .and_then(|pm| ram.untouched(pm, run))
                        .unwrap_or_default();
                    let nonzero = ram.nonzero_heads(run, &untouched);
                    for i in 0..u64::from(run.pages) {
                        let gpa = run.gpa + i * PAGE_SIZE as u64;
                        let (word, bit) = ((i / 64) as usize, 1 << (i % 64));
                        let never_faulted = untouched[word] & bit != 0;
                        if never_faulted || (nonzero[word] & bit == 0 && ram.is_zero(gpa)) {
                            counters.zero.fetch_add(1, Ordering::Relaxed);
                            if !skip_zero {
                                zeros.push(gpa);
                                if zeros.len() == ZERO_BATCH {
                                    send(
                                        &mut w,
                                        FrameKind::ZeroPages,
                                        &[&wire::zero_pages_payload(&zeros)],
                                    )?;
                                    zeros.clear();
                                }
                            }
                            continue;
                        }
                        if !pages.takes(gpa) {
                            send_pages(&mut w, &mut pages)?;
                        }
                        pages.push(gpa);
                        if pages.is_full() {
                            send_pages(&mut w, &mut pages)?;
                        }
                    }
                    // A run lies in one range of RAM, so its pages are contiguous in
                    // this process too; the next run may lie in another range.
                    send_pages(&mut w, &mut pages)?;
                }
                if !zeros.is_empty() {
                    send(
                        &mut w,
                        FrameKind::ZeroPages,
                        &[&wire::zero_pages_payload(&zeros)],
                    )?;
                    zeros.clear();
                }
            }
            Job::PassEnd { pass, last } => {
                let mut p = [0u8; 16];
                p[..4].copy_from_slice(&pass.to_le_bytes());
                p[4..8].copy_from_slice(&u32::from(last).to_le_bytes());
                send(&mut w, FrameKind::PassEnd, &[&p])?;
                w.get_mut().flush()?;
                let _ = events.send(Event::PassDone);
            }
            Job::Frame { kind, payload } => {
                send(&mut w, kind, &[&payload])?;
                w.get_mut().flush()?;
                let _ = events.send(Event::FrameSent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_until_lifted() {
        // 64 KiB/s: each 16 KiB take waits 250 ms once the first one is spent.
        let limiter = RateLimiter::new(Some(64 << 10));
        let t = Instant::now();
        limiter.take(16 << 10);
        limiter.take(16 << 10);
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        limiter.lift();
        let t = Instant::now();
        for _ in 0..100 {
            limiter.take(16 << 10);
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
}
