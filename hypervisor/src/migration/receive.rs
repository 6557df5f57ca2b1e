//! The destination side of the stream: accept the source's connections (each proving
//! the token), check its `Config`, write pages into the not-yet-running guest, restore
//! the state, answer `Loaded`, and on `Commit` start the vCPUs and answer `Running`.
//!
//! Nothing from the stream is used before its frame's tag checked out: each frame is
//! decrypted in place in its connection's buffer, except page data, which is read and
//! decrypted in place in the guest pages it belongs to, once the run naming them
//! authenticated and was checked against this machine's RAM ([`wire::parse_run`]) and
//! against the connection the sender assigns its 2 MiB chunk to (a bad tag there ends
//! the migration before the guest ever runs on those bytes). Frames are at
//! most [`wire::MAX_PAYLOAD`] bytes, one buffer per connection, at most
//! [`super::MAX_CONNECTIONS`] connections, and the listener closes once they are all
//! in (the token is good for one migration). Any failure before `Commit` returns an
//! error; the caller then discards the machine and exits non-zero. After `Commit`, a
//! durable marker says the guest counts as run here, whatever happens next.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::control::MigrationPhase;
use super::precheck::{self, DestinationFacts, SourceConfig};
use super::ram::{connection_of, GuestRam};
use super::state::{MachineState, Persist as _, StateError, Vcpu, XsaveAbi};
use super::wire::{self, FrameKind, FrameReader, FrameWriter, Token, WireError};
use super::LINK_TIMEOUT;
use crate::payload::heartbeat;
use crate::vmm::{Payload, Vmm, VmmError};

/// Failed handshakes tolerated before the incoming VMM gives up.
pub const MAX_BAD_HANDSHAKES: u32 = 3;

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Accepting a connection failed.
    #[error("Cannot accept a migration connection: {0}")]
    Accept(std::io::Error),
    /// Too many connections failed the handshake.
    #[error("{MAX_BAD_HANDSHAKES} connections failed the handshake; the last: {0}")]
    Handshakes(WireError),
    /// The source broke the protocol.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// A connection failed.
    #[error("Connection {conn} failed: {source}")]
    Connection {
        /// Stream number.
        conn: u32,
        /// The error.
        source: WireError,
    },
    /// The config did not parse.
    #[error("Cannot read the source's config: {0}")]
    Config(serde_json::Error),
    /// Pre-checks failed (also sent to the source).
    #[error("Pre-checks failed: {0}")]
    Precheck(String),
    /// The state could not be decoded or restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// The vCPUs this VMM has beyond the source's could not be prepared.
    #[error("Cannot prepare the vCPUs added by this VMM: {0}")]
    AddVcpus(VmmError),
    /// Starting the vCPUs failed after `Commit`: some may have run, so this counts as
    /// run (the committed marker stays).
    #[error("Cannot start the guest after the commit (it counts as run here): {0}")]
    StartAfterCommit(VmmError),
    /// The committed marker could not be written: the guest is not started.
    #[error("Cannot write the committed marker {path}: {source}")]
    Marker {
        /// The marker's path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The source gave up.
    #[error("The source aborted the migration: {0}")]
    Aborted(String),
    /// Cancelled on request.
    #[error("Cancelled on request")]
    Cancelled,
    /// The source did not connect at all in time.
    #[error("No source connected within {0:?}")]
    NoSource(Duration),
    /// The source did not connect all its streams in time.
    #[error("The source opened {got} of {want} connections within {LINK_TIMEOUT:?}")]
    MissingConnections {
        /// Connections in.
        got: usize,
        /// Announced.
        want: u32,
    },
}

struct Conn {
    stream: u32,
    reader: FrameReader<TcpStream>,
    replies: FrameWriter<TcpStream>,
}

/// An incoming migration, listening.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    token: Token,
    /// How long to wait for the source's first connection.
    source_timeout: Duration,
    /// Clones of the accepted sockets, so that a cancel can unblock the readers.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Incoming {
    /// Listens on `listener` for a source proving `token`, connecting within
    /// `source_timeout`.
    ///
    /// # Errors
    /// The listener cannot be made non-blocking.
    pub fn new(
        listener: TcpListener,
        token: Token,
        source_timeout: Duration,
    ) -> std::io::Result<Incoming> {
        listener.set_nonblocking(true)?;
        Ok(Incoming {
            listener,
            token,
            source_timeout,
            sockets: Arc::default(),
        })
    }

    /// A handle that shuts every accepted connection down (to cancel).
    pub fn sockets(&self) -> Arc<Mutex<Vec<TcpStream>>> {
        Arc::clone(&self.sockets)
    }

    fn accept_one(&self, vmm: &Vmm, bad: &mut u32) -> Result<Option<Conn>, ReceiveError> {
        let (mut stream, peer) = match self.listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wakes as soon as a connection comes (a sleep here cost up to its
                // length per connection, inside the migration's time), and at least
                // every 20 ms to check for a cancel and the connection deadline.
                wait_readable(&self.listener, Duration::from_millis(20));
                return Ok(None);
            }
            Err(e) => return Err(ReceiveError::Accept(e)),
        };
        let setup = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(LINK_TIMEOUT))?;
            s.set_write_timeout(Some(LINK_TIMEOUT))
        };
        setup(&stream).map_err(ReceiveError::Accept)?;
        let (key, number) = match wire::accept(&mut stream, &self.token) {
            Ok(k) => k,
            Err(e) => {
                *bad += 1;
                eprintln!("berth-vmm: refused a migration connection from {peer}: {e}");
                vmm.migration().status().error =
                    Some(format!("refused a connection from {peer}: {e}"));
                if *bad >= MAX_BAD_HANDSHAKES {
                    return Err(ReceiveError::Handshakes(e));
                }
                return Ok(None);
            }
        };
        let clone = |s: &TcpStream| s.try_clone().map_err(ReceiveError::Accept);
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(clone(&stream)?);
        Ok(Some(Conn {
            stream: number,
            replies: FrameWriter::new(clone(&stream)?, key.for_replies()),
            reader: FrameReader::new(stream, key),
        }))
    }

    /// Receives the guest into `vmm` (built, not started) and, on `Commit`, writes the
    /// durable marker `committed` (see [`write_committed_marker`]) and starts it.
    /// `state_root` is where this host's guests live (for the name pre-check).
    ///
    /// # Errors
    /// Any failure before `Commit` (the guest never ran here), and
    /// [`ReceiveError::StartAfterCommit`] when the vCPUs could not all start after it
    /// (some may have run: the marker stays).
    pub fn receive(
        self,
        vmm: &Vmm,
        state_root: &Path,
        committed: &Path,
    ) -> Result<(), ReceiveError> {
        let migration = vmm.migration();
        let cancelled = || migration.cancel_requested();
        let mut bad = 0;
        let mut conns: Vec<Conn> = Vec::new();
        // Connection 0 first (the others may come before it and wait).
        let mut config: Option<SourceConfig> = None;
        let mut deadline: Option<Instant> = None;
        let no_source_after = Instant::now() + self.source_timeout;
        loop {
            if cancelled() {
                return Err(ReceiveError::Cancelled);
            }
            if conns.is_empty() && Instant::now() > no_source_after {
                return Err(ReceiveError::NoSource(self.source_timeout));
            }
            if let Some(c) = self.accept_one(vmm, &mut bad)? {
                if conns.iter().any(|o| o.stream == c.stream) || c.stream >= super::MAX_CONNECTIONS
                {
                    return Err(ReceiveError::Protocol(format!(
                        "connection number {} twice or out of range",
                        c.stream
                    )));
                }
                conns.push(c);
            }
            if config.is_none() {
                if let Some(first) = conns.iter_mut().find(|c| c.stream == 0) {
                    migration.status().phase = MigrationPhase::Prechecks;
                    let cfg = read_config(first)?;
                    let facts = DestinationFacts::gather(
                        &vmm.config(),
                        GuestRam::new(vmm.vm()).ranges(),
                        &vmm.vm()
                            .supported_cpuid()
                            .map_err(|e| ReceiveError::Protocol(e.to_string()))?,
                        XsaveAbi::of(vmm.vm().fd()).size(),
                        state_root,
                    );
                    let problems = precheck::check(&cfg, &facts);
                    if !problems.is_empty() {
                        let why = problems.join("; ");
                        let _ = first.replies.send(FrameKind::Abort, &[why.as_bytes()]);
                        return Err(ReceiveError::Precheck(why));
                    }
                    let verdict = serde_json::to_vec(&facts).unwrap_or_default();
                    first
                        .replies
                        .send(FrameKind::Info, &[&verdict])
                        .map_err(|source| ReceiveError::Connection { conn: 0, source })?;
                    deadline = Some(Instant::now() + LINK_TIMEOUT);
                    {
                        let mut st = migration.status();
                        st.connections = cfg.connections;
                        st.phase = MigrationPhase::Precopy;
                    }
                    config = Some(cfg);
                }
            }
            if let Some(cfg) = &config {
                if conns.len() == cfg.connections as usize {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(ReceiveError::MissingConnections {
                        got: conns.len(),
                        want: cfg.connections,
                    });
                }
            }
        }
        // The token is spent: no further connections.
        drop(self.listener);
        let sockets = self.sockets;
        let config = config.expect("the loop ends with a config");
        conns.sort_by_key(|c| c.stream);
        let count = conns.len();
        let mut conns = conns.into_iter();
        let Conn {
            reader: mut first_reader,
            replies,
            ..
        } = conns.next().expect("connection 0");
        let replies = Mutex::new(replies);
        let ram = GuestRam::new(vmm.vm());
        let bounds = ram.bounds();
        let pages = std::sync::atomic::AtomicU64::new(0);
        // Each pass is acknowledged (`Info` "pass N" on connection 0) once every
        // connection has applied it, so the source measures what really arrived and
        // pauses only when nothing of earlier passes is still in flight.
        let passes = Mutex::new((vec![0u32; count], 0u32));
        let pass_applied = |conn: usize, pass: u32| {
            let mut p = passes.lock().unwrap_or_else(|e| e.into_inner());
            p.0[conn] = pass;
            let all = p.0.iter().copied().min().unwrap_or(0);
            if all > p.1 {
                p.1 = all;
                let ack = format!("pass {all}");
                let mut w = replies.lock().unwrap_or_else(|e| e.into_inner());
                let _ = w.send(FrameKind::Info, &[ack.as_bytes()]);
            }
        };
        std::thread::scope(|scope| -> Result<(), ReceiveError> {
            let others: Vec<_> = conns
                .map(|mut c| {
                    let (ram, bounds, pages) = (&ram, &bounds, &pages);
                    let pass_applied = &pass_applied;
                    let sockets = &sockets;
                    scope.spawn(move || -> Result<(), ReceiveError> {
                        let result = (|| loop {
                            let frame =
                                c.reader.recv().map_err(|source| ReceiveError::Connection {
                                    conn: c.stream,
                                    source,
                                })?;
                            let conn = (c.stream, count as u32);
                            match apply(frame.kind, frame.payload, ram, bounds, conn)? {
                                Applied::Run(gpa, n) => {
                                    receive_run(&mut c.reader, ram, (gpa, n), pages, c.stream)?
                                }
                                Applied::LastPass => return Ok(()),
                                Applied::Pass(n) => pass_applied(c.stream as usize, n),
                                Applied::Done => {}
                                Applied::Other(kind) => {
                                    return Err(ReceiveError::Protocol(format!(
                                        "{kind:?} on data connection {}",
                                        c.stream
                                    )))
                                }
                            }
                        })();
                        if result.is_err() {
                            // Unblock connection 0's reader: this error is the one to report.
                            shutdown_all(sockets);
                        }
                        result
                    })
                })
                .collect();
            let mut last_pass_seen = false;
            let state_received_at;
            // A failing data connection shuts every socket down: connection 0's error is
            // then only the echo of it, and the data connection's is reported.
            let first_failed = |e: ReceiveError,
                                others: Vec<
                std::thread::ScopedJoinHandle<'_, Result<(), ReceiveError>>,
            >| {
                others
                    .into_iter()
                    .filter_map(|h| h.join().ok())
                    .find_map(Result::err)
                    .unwrap_or(e)
            };
            let state = loop {
                if cancelled() {
                    return Err(ReceiveError::Cancelled);
                }
                let frame = match first_reader.recv() {
                    Ok(frame) => frame,
                    Err(source) => {
                        return Err(first_failed(
                            ReceiveError::Connection { conn: 0, source },
                            others,
                        ))
                    }
                };
                match apply(frame.kind, frame.payload, &ram, &bounds, (0, count as u32))? {
                    Applied::Run(gpa, n) => {
                        receive_run(&mut first_reader, &ram, (gpa, n), &pages, 0)?;
                    }
                    Applied::Done => {}
                    Applied::Pass(n) => pass_applied(0, n),
                    Applied::LastPass => last_pass_seen = true,
                    Applied::Other(FrameKind::State) if last_pass_seen => {
                        state_received_at = Instant::now();
                        break MachineState::decode(frame.payload)?;
                    }
                    Applied::Other(FrameKind::Abort) => {
                        return Err(ReceiveError::Aborted(
                            String::from_utf8_lossy(frame.payload).into_owned(),
                        ))
                    }
                    Applied::Other(kind) => {
                        return Err(ReceiveError::Protocol(format!(
                            "{kind:?} on connection 0 during pre-copy"
                        )))
                    }
                }
                migration.status().pages_sent = pages.load(std::sync::atomic::Ordering::Relaxed);
            };
            // Every connection's last pages are in before the state is loaded.
            for handle in others {
                handle
                    .join()
                    .map_err(|_| ReceiveError::Protocol("a receiving thread panicked".into()))??;
            }
            migration.status().phase = MigrationPhase::Switchover;
            load(vmm, &config, &state)?;
            if let Some(ms) = super::fault::injected("delay-loaded-ms") {
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(1500)));
            }
            let mut replies = replies.lock().unwrap_or_else(|e| e.into_inner());
            replies
                .send(FrameKind::Loaded, &[])
                .map_err(|source| ReceiveError::Connection { conn: 0, source })?;
            migration.status().phase = MigrationPhase::Loaded;
            // Loaded: only Commit makes this guest run. A keepalive the source sent
            // while this side was loading may come first: it means nothing.
            let frame = loop {
                let frame = first_reader
                    .recv()
                    .map_err(|source| ReceiveError::Connection { conn: 0, source })?;
                if frame.kind != FrameKind::Info {
                    break frame;
                }
            };
            match frame.kind {
                FrameKind::Commit => {}
                FrameKind::Abort => {
                    return Err(ReceiveError::Aborted(
                        String::from_utf8_lossy(frame.payload).into_owned(),
                    ))
                }
                other => {
                    return Err(ReceiveError::Protocol(format!(
                        "{other:?} where Commit was expected"
                    )))
                }
            }
            // The commit point here: durable before any vCPU may run, so that a
            // destination that dies from now on is never taken for one that did not
            // run the guest.
            write_committed_marker(committed).map_err(|source| ReceiveError::Marker {
                path: committed.to_owned(),
                source,
            })?;
            migration.status().committed = true;
            if super::fault::on("exit-after-commit") {
                eprintln!("berth-vmm: BERTH_FAULT exit-after-commit: exiting after the commit");
                std::process::exit(101);
            }
            let started = if super::fault::on("start-fails") {
                Err(VmmError::Host("BERTH_FAULT start-fails".into()))
            } else {
                vmm.start()
            };
            started.map_err(ReceiveError::StartAfterCommit)?;
            let downtime = state_received_at.elapsed();
            // The guest runs here now, whether or not the source hears it.
            let _ = replies.send(FrameKind::Running, &[]);
            drop(replies);
            {
                let mut st = migration.status();
                st.phase = MigrationPhase::Completed;
                st.downtime_ms = Some(downtime.as_secs_f64() * 1000.0);
                st.pages_sent = pages.load(std::sync::atomic::Ordering::Relaxed);
                st.error = None;
            }
            Ok(())
        })?;
        // The marker is the answer "it ran here" for a source that did not hear
        // `Running`: it goes only once the source says it did (`Done`). That is waited
        // for on a thread of its own: the guest runs meanwhile, and the handover or a
        // shutdown need not wait.
        let committed = committed.to_owned();
        let waiter = std::thread::Builder::new()
            .name("mig-done".into())
            .spawn(move || await_done(first_reader, &committed));
        if let Err(e) = waiter {
            eprintln!(
                "berth-vmm: cannot wait for the source's Done ({e}); the committed marker stays"
            );
        }
        Ok(())
    }
}

/// Reads connection 0 after `Running`: on `Done` the committed marker goes; anything
/// else (silence for [`LINK_TIMEOUT`], a closed link, another frame) keeps it.
fn await_done(mut reader: FrameReader<TcpStream>, committed: &Path) {
    let done = loop {
        match reader.recv() {
            Ok(frame) if frame.kind == FrameKind::Info => {}
            Ok(frame) => break frame.kind == FrameKind::Done,
            Err(_) => break false,
        }
    };
    if done {
        clear_committed_marker(committed);
    } else {
        eprintln!(
            "berth-vmm: the source did not confirm Running; {} stays until its switchover \
             is resolved",
            committed.display()
        );
    }
}

fn read_config(c: &mut Conn) -> Result<SourceConfig, ReceiveError> {
    let frame = c
        .reader
        .recv()
        .map_err(|source| ReceiveError::Connection { conn: 0, source })?;
    if frame.kind != FrameKind::Config {
        return Err(ReceiveError::Protocol(format!(
            "{:?} before the config",
            frame.kind
        )));
    }
    serde_json::from_slice(frame.payload).map_err(ReceiveError::Config)
}

enum Applied {
    Done,
    /// A `Pages` frame named this run (checked): its `PageData` comes next.
    Run(u64, u32),
    Pass(u32),
    LastPass,
    Other(FrameKind),
}

/// Where a receiver writes pages: guest RAM, or a test's stand-in that checks every
/// write.
pub(crate) trait PageSink: Sync {
    /// Lends the `pages` pages from `gpa` (checked against the bounds and the
    /// connection) to `write`, to be written in place.
    fn with_run(
        &self,
        gpa: u64,
        pages: u32,
        write: &mut dyn FnMut(&mut [u8]) -> wire::Result<()>,
    ) -> wire::Result<()>;
    /// Zeroes the pages at `gpas` (checked against the bounds).
    fn zero_pages(&self, gpas: &[u64]);
}

impl PageSink for GuestRam<'_> {
    fn with_run(
        &self,
        gpa: u64,
        pages: u32,
        write: &mut dyn FnMut(&mut [u8]) -> wire::Result<()>,
    ) -> wire::Result<()> {
        GuestRam::with_run(self, gpa, pages, write)
    }

    fn zero_pages(&self, gpas: &[u64]) {
        GuestRam::zero_pages(self, gpas);
    }
}

/// Reads the `PageData` of the run `(gpa, pages)` (checked by [`apply`]) of connection
/// `conn` straight into guest memory, where it is decrypted.
fn receive_run<R: std::io::Read>(
    reader: &mut FrameReader<R>,
    ram: &impl PageSink,
    (gpa, n): (u64, u32),
    pages: &std::sync::atomic::AtomicU64,
    conn: u32,
) -> Result<(), ReceiveError> {
    ram.with_run(gpa, n, &mut |run| reader.recv_pages_into(run))
        .map_err(|source| ReceiveError::Connection { conn, source })?;
    pages.fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Applies one frame of connection `conn.0` of `conn.1`. Pages are written only
/// after every address of the frame was checked: inside guest memory, and carried by
/// the connection the sender assigns its 2 MiB chunk to ([`connection_of`]), so two
/// receiving threads never write the same page. A run of pages is only checked here:
/// the caller reads its data into place ([`receive_run`]).
fn apply(
    kind: FrameKind,
    payload: &[u8],
    ram: &impl PageSink,
    bounds: &wire::MemoryBounds,
    conn: (u32, u32),
) -> Result<Applied, ReceiveError> {
    let wire_err = |source| ReceiveError::Connection {
        conn: conn.0,
        source,
    };
    let check_owner = |gpas: &[u64]| -> Result<(), ReceiveError> {
        match gpas
            .iter()
            .find(|&&gpa| connection_of(gpa, conn.1) != conn.0 as usize)
        {
            Some(gpa) => Err(ReceiveError::Protocol(format!(
                "page {gpa:#x} arrived on connection {} but belongs to connection {}",
                conn.0,
                connection_of(*gpa, conn.1)
            ))),
            None => Ok(()),
        }
    };
    match kind {
        FrameKind::Pages => {
            // The run lies in one 2 MiB chunk: its first page names the connection.
            let (gpa, n) = wire::parse_run(payload, bounds).map_err(wire_err)?;
            check_owner(&[gpa])?;
            Ok(Applied::Run(gpa, n))
        }
        FrameKind::ZeroPages => {
            let gpas = wire::parse_zero_pages(payload, bounds).map_err(wire_err)?;
            check_owner(&gpas)?;
            ram.zero_pages(&gpas);
            Ok(Applied::Done)
        }
        FrameKind::PassEnd => {
            if payload.len() != 16 {
                return Err(ReceiveError::Protocol(format!(
                    "PassEnd of {} bytes",
                    payload.len()
                )));
            }
            let pass = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
            Ok(if flags & 1 != 0 {
                Applied::LastPass
            } else {
                Applied::Pass(pass)
            })
        }
        FrameKind::Info => Ok(Applied::Done),
        other => Ok(Applied::Other(other)),
    }
}

/// Restores the state into the built machine (VM first, then vCPUs, then devices).
///
/// This VMM may have more vCPUs than the source (a larger maxVcpus). A heartbeat
/// guest's payload is extended to them ([`heartbeat::add_vcpus`]) and each starts at
/// the payload's entry, as at a fresh start; the guest then runs as many vCPUs as the
/// source ran or this VMM's spec asks for, whichever is more (a decrease would need a
/// hot-remove), and the rest are hot-added later like on any guest. A Linux guest
/// brings CPUs up itself from its MP table, which lists only the source's: its extra
/// vCPUs wait for a startup IPI (in reserve) and it runs what the source ran.
fn load(vmm: &Vmm, config: &SourceConfig, state: &MachineState) -> Result<(), ReceiveError> {
    let vcpus = vmm.vcpus();
    if state.vcpus.len() > vcpus.len() {
        return Err(StateError::TooManyVcpus {
            source_vcpus: state.vcpus.len(),
            here: vcpus.len(),
        }
        .into());
    }
    let xsave = XsaveAbi::of(vmm.vm().fd());
    state.check_xsave(xsave)?;
    vmm.vm().restore(&state.vm).map_err(StateError::Vm)?;
    for s in &state.vcpus {
        let handle = vcpus
            .get(s.index as usize)
            .ok_or_else(|| ReceiveError::Protocol(format!("state for vCPU {}", s.index)))?;
        let fd = handle.fd();
        Vcpu {
            index: s.index,
            fd: &fd,
            msrs: &[],
            xsave,
        }
        .restore(s)?;
    }
    vmm.migration().status().xsave_bytes = Some(state.xsave_size);
    match vmm.devices().restore(&state.devices) {
        Ok(()) => {}
        Err(never) => match never {},
    }
    let online = match config.heartbeat {
        Some(layout) => {
            let added = &vcpus[state.vcpus.len()..];
            let layout = heartbeat::add_vcpus(vmm.vm().memory(), &layout, vcpus.len() as u32)
                .map_err(|e| ReceiveError::AddVcpus(e.into()))?;
            for v in added {
                heartbeat::boot_vcpu(&v.fd(), &layout, v.index())
                    .map_err(|e| ReceiveError::AddVcpus(e.into()))?;
            }
            vmm.set_payload(Payload::Heartbeat(layout));
            state.online.max(vmm.config().vcpus)
        }
        None => {
            // Not started by the MP table the kernel read: they wait for an INIT/SIPI
            // that never comes, also if one is hot-added later.
            for v in &vcpus[state.vcpus.len()..] {
                v.wait_for_startup_ipi()
                    .map_err(|e| ReceiveError::AddVcpus(e.into()))?;
            }
            vmm.set_payload(Payload::Linux);
            state.online
        }
    };
    vmm.set_start(online, state.paused);
    Ok(())
}

/// Writes the destination's committed marker at `path` (contents: this process's pid)
/// and makes it durable (the file and its directory fsync'd) before returning. It says
/// "this destination read `Commit`": from then on the guest counts as run here, even if
/// this process dies or its vCPUs fail to start, so that the source is never told to
/// resume a copy that may have run. It goes with the `.incoming` directory when the
/// handover succeeds; a later incoming VMM of the guest refuses to start while it is
/// there (see [`super::incoming`]).
///
/// When [`stage_committed_marker`] prepared it, this only renames the staged file into
/// place and syncs the directory: one disk flush inside the guest's downtime instead of
/// two (the file's was done before the migration started).
///
/// # Errors
/// The file cannot be written or synced. When the rename went through but the
/// directory sync failed, the marker is renamed back (staged), so that a marker that
/// may not be durable never answers "ran" for a guest whose vCPUs never started.
pub fn write_committed_marker(path: &Path) -> std::io::Result<()> {
    commit_marker_with(path, sync_parent)
}

fn commit_marker_with(
    path: &Path,
    sync: impl Fn(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let staged = staged_marker(path);
    if std::fs::rename(&staged, path).is_err() {
        stage_committed_marker(path)?;
        std::fs::rename(&staged, path)?;
    }
    sync(path).inspect_err(|_| {
        // If even this fails the marker stays: the guest then counts as run here.
        let _ = std::fs::rename(path, &staged);
    })
}

/// The pid of the incoming VMM that wrote the committed marker at `path`; `None` when
/// there is no marker or it says no pid.
pub fn committed_marker_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().strip_prefix("committed pid ")?.parse().ok()
}

/// Held while this process removes a committed marker or the files of the incoming
/// directory beside it, so that the two never interleave (the `Done` of the source may
/// arrive while the VMM hands its directory over).
pub(crate) static MARKER_DIR: Mutex<()> = Mutex::new(());

/// Removes the committed marker at `path` once its migration's source heard `Running`:
/// nobody will ask any more. Only a marker this process wrote: a late `Done` must not
/// take the answer of a later migration of the guest. Its directory goes too if nothing
/// else is left in it (the VMM handed it over already). Not synced: a marker that comes
/// back after a crash only keeps answering "ran", which stays true.
pub fn clear_committed_marker(path: &Path) {
    let _held = MARKER_DIR.lock().unwrap_or_else(|e| e.into_inner());
    if committed_marker_pid(path) != Some(std::process::id() as i32) {
        return;
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("berth-vmm: cannot remove {}: {e}", path.display());
        }
    }
    if let Some(dir) = path.parent() {
        // Fails, as it should, while the directory holds anything else.
        let _ = std::fs::remove_dir(dir);
    }
}

/// Writes the committed marker's content beside `path`, under a name no reader looks
/// at (`<path>.staged`), and makes it durable, so that [`write_committed_marker`] only
/// has to rename it. Done before the source connects; a staged file means nothing, and
/// it goes with the `.incoming` directory.
///
/// # Errors
/// The file cannot be written or synced.
pub fn stage_committed_marker(path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(staged_marker(path))?;
    writeln!(f, "committed pid {}", std::process::id())?;
    f.sync_all()?;
    sync_parent(path)
}

fn staged_marker(path: &Path) -> std::path::PathBuf {
    let mut staged = path.as_os_str().to_owned();
    staged.push(".staged");
    staged.into()
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Waits until `listener` has a connection to accept, or `timeout` passes.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd as _;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is one valid pollfd for the listener's open descriptor, which
    // outlives the call; poll only writes its `revents`.
    let _ = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// Shuts every socket in `sockets` down (unblocks the readers of a cancelled receive).
pub fn shutdown_all(sockets: &Mutex<Vec<TcpStream>>) {
    for s in sockets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = s.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    //! The receiver meets hostile bytes: arbitrary streams, streams sealed by a peer
    //! that holds the keys but sends nonsense, and good streams mutated on the way. No
    //! panic, no page written outside guest memory, every bad frame a clear error.

    use super::*;
    use crate::migration::seal::SharedBytes;
    use crate::migration::wire::{MemoryBounds, PAGE_SIZE};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn the_committed_marker_is_staged_then_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("committed");
        stage_committed_marker(&marker).unwrap();
        assert!(!marker.exists(), "a staged marker is not a marker");
        write_committed_marker(&marker).unwrap();
        let text = std::fs::read_to_string(&marker).unwrap();
        assert_eq!(text, format!("committed pid {}\n", std::process::id()));
        assert_eq!(
            committed_marker_pid(&marker),
            Some(std::process::id() as i32)
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Without a staged file it is written whole.
        let other = dir.path().join("other");
        write_committed_marker(&other).unwrap();
        assert_eq!(std::fs::read_to_string(&other).unwrap(), text);
        // A directory that is gone is an error, not a marker.
        let gone = dir.path().join("gone").join("committed");
        assert!(write_committed_marker(&gone).is_err());
        // A directory sync that fails leaves no marker (it may not be durable): the
        // vCPUs do not start, and the guest does not count as run here.
        let unsynced = dir.path().join("unsynced");
        stage_committed_marker(&unsynced).unwrap();
        let failed = commit_marker_with(&unsynced, |_| Err(std::io::Error::other("EIO")));
        assert!(failed.is_err());
        assert!(!unsynced.exists(), "a marker stayed after its sync failed");
        assert!(staged_marker(&unsynced).exists());
        // Cleared once the source confirmed Running; clearing it again is no error.
        clear_committed_marker(&marker);
        assert!(!marker.exists());
        assert_eq!(committed_marker_pid(&marker), None);
        clear_committed_marker(&marker);
        // A marker another VMM wrote (a later migration of the guest) stays.
        std::fs::write(&marker, "committed pid 1\n").unwrap();
        clear_committed_marker(&marker);
        assert_eq!(committed_marker_pid(&marker), Some(1));
    }

    const PAGE: u64 = PAGE_SIZE as u64;

    /// Guest memory as two ranges (64 pages at 0, 16 pages at 4 GiB), in a buffer;
    /// every write is checked to fall inside them.
    struct Recorder {
        bounds: MemoryBounds,
        mem: Mutex<Vec<u8>>,
        written: AtomicU64,
    }

    impl Recorder {
        fn new() -> Recorder {
            Recorder {
                bounds: MemoryBounds::new([(0, 64 * PAGE), (1 << 32, 16 * PAGE)]),
                mem: Mutex::new(vec![0u8; 80 * PAGE_SIZE]),
                written: AtomicU64::new(0),
            }
        }

        fn offset(&self, gpa: u64) -> usize {
            assert!(
                self.bounds.contains_page(gpa),
                "a write outside guest memory: {gpa:#x}"
            );
            if gpa >= 1 << 32 {
                (64 * PAGE + (gpa - (1 << 32))) as usize
            } else {
                gpa as usize
            }
        }
    }

    impl PageSink for Recorder {
        fn with_run(
            &self,
            gpa: u64,
            pages: u32,
            write: &mut dyn FnMut(&mut [u8]) -> wire::Result<()>,
        ) -> wire::Result<()> {
            assert!(pages > 0, "an empty run");
            let at = self.offset(gpa);
            let last = self.offset(gpa + u64::from(pages - 1) * PAGE);
            assert_eq!(
                last,
                at + (pages as usize - 1) * PAGE_SIZE,
                "a run across ranges"
            );
            let mut mem = self.mem.lock().unwrap();
            self.written.fetch_add(u64::from(pages), Ordering::Relaxed);
            write(&mut mem[at..at + pages as usize * PAGE_SIZE])
        }

        fn zero_pages(&self, gpas: &[u64]) {
            let mut mem = self.mem.lock().unwrap();
            for gpa in gpas {
                let at = self.offset(*gpa);
                mem[at..at + PAGE_SIZE].fill(0);
                self.written.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Decodes `stream` as the receiver does (frames, then pages and state) until the
    /// first error; returns the payloads of the frames that authenticated, and the
    /// error. Panics (fails the property) on a write outside memory.
    fn decode(
        stream: &[u8],
        key: &wire::SessionKey,
        conn: (u32, u32),
        sink: &Recorder,
    ) -> (Vec<(FrameKind, Vec<u8>)>, Option<String>) {
        let mut reader = FrameReader::new(stream, key.clone());
        let pages = AtomicU64::new(0);
        let mut good = Vec::new();
        loop {
            if reader.get_mut().is_empty() && reader.read_ahead().is_empty() {
                // The end, at a frame boundary.
                return (good, None);
            }
            let frame = match reader.recv() {
                Ok(frame) => frame,
                Err(e) => return (good, Some(e.to_string())),
            };
            good.push((frame.kind, frame.payload.to_vec()));
            let applied = apply(frame.kind, frame.payload, sink, &sink.bounds, conn);
            match applied {
                Err(e) => return (good, Some(e.to_string())),
                Ok(Applied::Run(gpa, n)) => {
                    if let Err(e) = receive_run(&mut reader, sink, (gpa, n), &pages, conn.0) {
                        return (good, Some(e.to_string()));
                    }
                    let at = sink.offset(gpa);
                    let data = sink.mem.lock().unwrap()[at..at + n as usize * PAGE_SIZE].to_vec();
                    good.push((FrameKind::PageData, data));
                }
                Ok(Applied::Other(FrameKind::State)) => {
                    if let Err(e) = MachineState::decode(frame.payload) {
                        return (good, Some(e.to_string()));
                    }
                }
                Ok(_) => {}
            }
        }
    }

    fn page_addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            (0u64..64).prop_map(|p| p * PAGE),
            (0u64..16).prop_map(|p| (1 << 32) + p * PAGE),
            any::<u64>(),
            (0u64..64 * PAGE),
            Just(64 * PAGE),
            Just(!0xfffu64),
        ]
    }

    /// A payload a hostile source might seal: runs with any addresses and counts,
    /// zero-page lists, page data of a few pages (or a byte off), or any bytes.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (
                page_addr(),
                prop_oneof![0u32..4, Just(512), Just(513), any::<u32>()]
            )
                .prop_map(|(gpa, pages)| wire::run_payload(gpa, pages).to_vec()),
            proptest::collection::vec(page_addr(), 0..8)
                .prop_map(|gpas| wire::zero_pages_payload(&gpas)),
            (1usize..3, any::<u8>(), 0usize..3).prop_map(|(pages, fill, off)| {
                vec![fill; (pages * PAGE_SIZE + off).saturating_sub(1)]
            }),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    fn seal(frames: &[(u8, Vec<u8>)], key: &wire::SessionKey) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), key.clone());
        for (kind, payload) in frames {
            w.send_raw_kind(*kind, payload).unwrap();
        }
        std::mem::take(w.get_mut())
    }

    fn connection() -> impl Strategy<Value = (u32, u32)> {
        prop_oneof![Just((0, 1)), Just((0, 2)), Just((1, 2)), Just((2, 3))]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_are_refused_cleanly(
            stream in proptest::collection::vec(any::<u8>(), 0..2048),
            conn in connection(),
        ) {
            let sink = Recorder::new();
            let (good, error) = decode(&stream, &wire::SessionKey::for_tests(3), conn, &sink);
            // Without the key nothing authenticates (2^-128 per frame).
            prop_assert!(good.is_empty());
            prop_assert_eq!(sink.written.load(Ordering::Relaxed), 0);
            if !stream.is_empty() {
                prop_assert!(error.is_some_and(|e| !e.is_empty()));
            }
        }

        #[test]
        fn sealed_nonsense_never_writes_outside_memory(
            frames in proptest::collection::vec((0u8..13, payload()), 1..6),
            conn in connection(),
        ) {
            let key = wire::SessionKey::for_tests(5);
            let stream = seal(&frames, &key);
            let sink = Recorder::new();
            let (good, error) = decode(&stream, &key, conn, &sink);
            // What authenticated is exactly what was sealed, in order.
            for (i, (kind, payload)) in good.iter().enumerate() {
                prop_assert_eq!(*kind as u8, frames[i].0);
                prop_assert_eq!(payload, &frames[i].1);
            }
            if let Some(e) = error {
                prop_assert!(!e.is_empty());
            }
        }

        #[test]
        fn mutated_streams_fail_at_the_mutation(
            frames in proptest::collection::vec(
                (0u64..60, 1u64..4, any::<u8>())
                    .prop_map(|(first, n, fill)| ((first..first + n).collect::<Vec<u64>>(), fill)),
                1..5,
            ),
            mutation in 0usize..4,
            at in any::<prop::sample::Index>(),
            len in 1usize..64,
            bit in 0u8..8,
        ) {
            // A good stream: runs on connection 0 of 1, in bounds, each a `Pages`
            // frame and its `PageData`.
            let key = wire::SessionKey::for_tests(7);
            let mut w = FrameWriter::new(Vec::new(), key.clone());
            let mut sealed: Vec<(u8, Vec<u8>)> = Vec::new();
            for (run, fill) in &frames {
                let first = run[0];
                let pages = run.len() as u32;
                let bytes = vec![*fill; pages as usize * PAGE_SIZE];
                w.send_pages(first * PAGE, SharedBytes::from_slice(&bytes)).unwrap();
                sealed.push((FrameKind::Pages as u8, wire::run_payload(first * PAGE, pages).to_vec()));
                sealed.push((FrameKind::PageData as u8, vec![*fill; pages as usize * PAGE_SIZE]));
            }
            let stream = std::mem::take(w.get_mut());
            let i = at.index(stream.len());
            let mut bad = stream.clone();
            match mutation {
                0 => bad[i] ^= 1 << bit,
                1 => bad.truncate(i),
                2 => {
                    let end = (i + len).min(bad.len());
                    bad.drain(i..end);
                }
                _ => {
                    let end = (i + len).min(bad.len());
                    let copy = bad[i..end].to_vec();
                    bad.splice(i..i, copy);
                }
            }
            let sink = Recorder::new();
            let (good, error) = decode(&bad, &key, (0, 1), &sink);
            // Every frame that got through is one that was sent, in its place.
            for (n, (kind, payload)) in good.iter().enumerate() {
                prop_assert_eq!(*kind as u8, sealed[n].0);
                prop_assert_eq!(payload, &sealed[n].1);
            }
            // The mutation was noticed: an error, or (a truncation at a frame edge) a
            // stream that simply holds fewer frames.
            match error {
                Some(e) => prop_assert!(!e.is_empty()),
                None => prop_assert!(mutation == 1 && good.len() < sealed.len()),
            }
        }
    }
}
