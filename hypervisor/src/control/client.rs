//! A small synchronous client for the control socket.
//!
//! ```no_run
//! use berth_hypervisor::control::{Client, Retune};
//! # fn main() -> Result<(), berth_hypervisor::control::ClientError> {
//! let mut vmm = Client::connect("/var/lib/berth/guests/web-1/control.sock")?;
//! let status = vmm.status()?;
//! println!("{} is {:?} with {} vCPUs", status.name, status.state, status.vcpus);
//! vmm.retune(&Retune { vcpus: Some(3), ..Default::default() })?;
//! vmm.shutdown(std::time::Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::protocol::{
    ErrorBody, Op, Request, Response, Retune, ShutdownArgs, Status, StatusArgs, VcpuRegisters,
    PROTOCOL_VERSION,
};
use crate::payload::heartbeat::VerifyReport;

/// Default time to wait for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("Cannot connect to {}: {source}", .path.display())]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Reading or writing failed (the VMM went away, or timed out).
    #[error("Cannot talk to the VMM: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM closed the connection without replying.
    #[error("The VMM closed the connection")]
    Closed,
    /// The reply was not valid.
    #[error("The VMM sent an invalid reply: {0}")]
    BadReply(String),
    /// The VMM refused the request.
    #[error("The VMM refused {op}: {} ({:?})", .error.message, .error.code)]
    Refused {
        /// The op.
        op: &'static str,
        /// Its error.
        error: ErrorBody,
    },
    /// Waiting for the socket or for the VMM to exit took too long.
    #[error("Timed out after {0:?}")]
    Timeout(Duration),
}

/// A reply whose result is read as a `T` (the `v` field is not needed).
#[derive(serde::Deserialize)]
struct TypedResponse<T> {
    id: u64,
    ok: bool,
    #[serde(default = "none")]
    result: Option<T>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

fn none<T>() -> Option<T> {
    None
}

/// The result of the reply `line` to request `id` (op `name`), read as a `T`.
fn parse_reply<T: serde::de::DeserializeOwned>(
    line: &[u8],
    id: u64,
    name: &'static str,
) -> Result<T, ClientError> {
    let response: TypedResponse<T> = serde_json::from_slice(line)
        .map_err(|e| ClientError::BadReply(format!("{e}: {}", String::from_utf8_lossy(line))))?;
    if response.id != id {
        return Err(ClientError::BadReply(format!(
            "reply id {} for request {id}",
            response.id
        )));
    }
    match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (false, _, Some(error)) => Err(ClientError::Refused { op: name, error }),
        _ => Err(ClientError::BadReply("neither result nor error".into())),
    }
}

/// Brief status requests ([`StatusArgs::brief`]) sent to many VMMs at once from one
/// thread, whose replies [`StatusRequests::replies`] collects: each VMM gets one
/// connection, its request and the end of the requests (so that the VMM's thread finds
/// the connection's end at once, without waiting for it). A reply that is there is read
/// at once; the connections whose reply is not there yet wait for it in one `epoll`.
/// The caller may do other work between sending and collecting while the VMMs answer.
///
/// This is what an observe of many guests costs least with: no thread per VMM asked
/// (no spawn, no wake-up per reply) and a handful of system calls per VMM.
pub struct StatusRequests {
    /// Per socket: the connection and the reply so far, while asking; else the result.
    asking: Vec<Asking>,
}

enum Asking {
    Sent(mio::net::UnixStream, Vec<u8>),
    Done(Box<Result<Status, ClientError>>),
}

/// The request id of [`StatusRequests`].
const BATCH_ID: u64 = 1;

impl StatusRequests {
    /// Connects to every socket in `sockets` and sends each a brief status request.
    pub fn send<P: AsRef<Path>>(sockets: &[P]) -> StatusRequests {
        let mut request = serde_json::to_vec(&Request {
            v: PROTOCOL_VERSION,
            id: BATCH_ID,
            op: Op::Status(StatusArgs { brief: true }),
        })
        .expect("a status request serialises");
        request.push(b'\n');
        let asking = sockets
            .iter()
            .map(|path| {
                let path = path.as_ref();
                let sent = mio::net::UnixStream::connect(path)
                    .map_err(|source| ClientError::Connect {
                        path: path.to_owned(),
                        source,
                    })
                    .and_then(|mut stream| {
                        // A new connection's buffer takes the short request whole.
                        if stream.write(&request)? != request.len() {
                            return Err(ClientError::Closed);
                        }
                        stream.shutdown(std::net::Shutdown::Write)?;
                        Ok(stream)
                    });
                match sent {
                    Ok(stream) => Asking::Sent(stream, Vec::new()),
                    Err(e) => Asking::Done(Box::new(Err(e))),
                }
            })
            .collect();
        StatusRequests { asking }
    }

    /// Every VMM's status, in the order of the sockets: a VMM that could not be reached,
    /// or that has not answered within `timeout` from now, gets its error.
    pub fn replies(mut self, timeout: Duration) -> Vec<Result<Status, ClientError>> {
        use mio::{Events, Interest, Poll, Token};
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 16 * 1024];
        // The replies already there; the other connections wait in `poll`.
        let mut poll = Poll::new();
        let mut waiting = 0usize;
        for (i, asking) in self.asking.iter_mut().enumerate() {
            let registered = match (asking.read_from(&mut chunk), &poll) {
                (false, _) => continue,
                (true, Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
                (true, Ok(poll)) => match asking {
                    Asking::Sent(stream, _) => {
                        poll.registry()
                            .register(stream, Token(i), Interest::READABLE)
                    }
                    Asking::Done(_) => continue,
                },
            };
            match registered {
                Ok(()) => waiting += 1,
                Err(e) => *asking = Asking::Done(Box::new(Err(e.into()))),
            }
        }
        let mut events = Events::with_capacity(256);
        while let Some(poll) = poll.as_mut().ok().filter(|_| waiting > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match poll.poll(&mut events, Some(left)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            for event in &events {
                if let Some(asking) = self.asking.get_mut(event.token().0) {
                    if matches!(asking, Asking::Sent(..)) && !asking.read_from(&mut chunk) {
                        waiting -= 1;
                    }
                }
            }
        }
        self.asking
            .into_iter()
            .map(|a| match a {
                Asking::Done(result) => *result,
                Asking::Sent(..) => Err(ClientError::Timeout(timeout)),
            })
            .collect()
    }
}

impl Asking {
    /// Reads what the connection has (through `chunk`) until the reply line is whole,
    /// the connection ends or nothing more is there; true while the reply is still
    /// awaited. A finished connection is dropped, which closes its descriptor (never
    /// duplicated) and so also takes it out of an epoll set.
    fn read_from(&mut self, chunk: &mut [u8]) -> bool {
        use std::io::Read;
        let Asking::Sent(stream, reply) = self else {
            return false;
        };
        let result = loop {
            match stream.read(chunk) {
                Ok(0) => break Err(ClientError::Closed),
                Ok(n) => {
                    reply.extend_from_slice(&chunk[..n]);
                    if let Some(end) = reply.iter().position(|&b| b == b'\n') {
                        break parse_reply(&reply[..end], BATCH_ID, "status");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.into()),
            }
        };
        *self = Asking::Done(Box::new(result));
        false
    }
}

/// A connection to one VMM.
#[derive(Debug)]
pub struct Client {
    /// The connection; requests are written through `get_ref()`.
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connects to the control socket at `path`, with [`DEFAULT_TIMEOUT`] per reply.
    ///
    /// # Errors
    /// [`ClientError::Connect`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// Connects, retrying until the socket accepts or `timeout` passes.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] with the last error in mind.
    pub fn wait_for(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Client::connect(path.as_ref()) {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return Err(ClientError::Timeout(timeout)),
            }
        }
    }

    /// Sets the time to wait for each reply.
    ///
    /// # Errors
    /// [`ClientError::Io`].
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        Ok(())
    }

    /// Sends `op` and returns the result value.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with the VMM's error, or a transport error.
    pub fn call(&mut self, op: Op) -> Result<serde_json::Value, ClientError> {
        self.typed(op)
    }

    /// Sends `op` and reads the reply's result as a `T`, straight from the reply's text.
    fn typed<T: serde::de::DeserializeOwned>(&mut self, op: Op) -> Result<T, ClientError> {
        let name = op.name();
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Request {
            v: PROTOCOL_VERSION,
            id,
            op,
        })
        .map_err(|e| ClientError::BadReply(e.to_string()))?;
        line.push(b'\n');
        self.reader.get_ref().write_all(&line)?;
        let mut buf = String::new();
        if self.reader.read_line(&mut buf)? == 0 {
            return Err(ClientError::Closed);
        }
        parse_reply(buf.as_bytes(), id, name)
    }

    /// Sends a raw line (tests of the server's error handling) and reads one reply.
    ///
    /// # Errors
    /// Transport errors.
    pub fn raw(&mut self, line: &[u8]) -> Result<Response, ClientError> {
        self.reader.get_ref().write_all(line)?;
        self.read_response()
    }

    fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut buf = String::new();
        if self.reader.read_line(&mut buf)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&buf).map_err(|e| ClientError::BadReply(format!("{e}: {buf}")))
    }

    /// The guest's status.
    ///
    /// # Errors
    /// See [`Client::call`].
    pub fn status(&mut self) -> Result<Status, ClientError> {
        self.typed(Op::Status(StatusArgs::default()))
    }

    /// The guest's status with only what an observe compares ([`StatusArgs::brief`]).
    ///
    /// # Errors
    /// See [`Client::call`].
    pub fn brief_status(&mut self) -> Result<Status, ClientError> {
        self.typed(Op::Status(StatusArgs { brief: true }))
    }

    /// Applies live changes; returns the status after them.
    ///
    /// # Errors
    /// See [`Client::call`]; a vCPU decrease is [`ClientError::Refused`].
    pub fn retune(&mut self, retune: &Retune) -> Result<Status, ClientError> {
        self.typed(Op::Retune(retune.clone()))
    }

    /// Pauses the vCPUs.
    ///
    /// # Errors
    /// See [`Client::call`].
    pub fn pause(&mut self) -> Result<Status, ClientError> {
        self.typed(Op::Pause)
    }

    /// Resumes the vCPUs.
    ///
    /// # Errors
    /// See [`Client::call`].
    pub fn resume(&mut self) -> Result<Status, ClientError> {
        self.typed(Op::Resume)
    }

    /// Checks the heartbeat payload's data pages in guest memory.
    ///
    /// # Errors
    /// See [`Client::call`].
    pub fn verify_memory(&mut self) -> Result<VerifyReport, ClientError> {
        self.typed(Op::VerifyMemory)
    }

    /// The registers of every started vCPU, read while the guest is paused.
    ///
    /// # Errors
    /// See [`Client::call`]; a running guest is [`ClientError::Refused`].
    pub fn vcpu_registers(&mut self) -> Result<Vec<VcpuRegisters>, ClientError> {
        self.typed(Op::VcpuRegisters)
    }

    /// Arms or renews the self-fence: unless called again before, the VMM stops the
    /// guest and exits `within` from now. `None` disarms it.
    ///
    /// # Errors
    /// See [`Client::call`].
    pub fn fence_deadline(
        &mut self,
        within: Option<Duration>,
    ) -> Result<crate::fence::FenceState, ClientError> {
        self.typed(Op::FenceDeadline(crate::fence::FenceArgs {
            in_ms: within.map(|d| d.as_millis() as u64),
        }))
    }

    /// Asks the VMM to shut down and waits until it has closed the connection (it
    /// exits right after), at most `wait` (the VMM's own vCPU timeout is `wait` too).
    ///
    /// # Errors
    /// See [`Client::call`]; [`ClientError::Timeout`] when the VMM is still there.
    pub fn shutdown(self, wait: Duration) -> Result<(), ClientError> {
        self.shutdown_with(wait, false)
    }

    /// [`Client::shutdown`] also while an outgoing migration's switchover is unknown
    /// (`force: true`): the operator's override, for when the destination surely runs
    /// the guest.
    ///
    /// # Errors
    /// As [`Client::shutdown`].
    pub fn shutdown_forced(self, wait: Duration) -> Result<(), ClientError> {
        self.shutdown_with(wait, true)
    }

    fn shutdown_with(mut self, wait: Duration, force: bool) -> Result<(), ClientError> {
        match self.call(Op::Shutdown(ShutdownArgs {
            timeout_ms: Some(wait.as_millis() as u64),
            force,
        })) {
            Ok(_) => {}
            // The VMM took the request and exited before its reply was written.
            Err(ClientError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait + Duration::from_secs(1)))?;
        let mut rest = String::new();
        match self.reader.read_line(&mut rest) {
            Ok(0) => Ok(()),
            Ok(_) => Err(ClientError::BadReply(format!(
                "unexpected after shutdown: {rest}"
            ))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(ClientError::Timeout(wait))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ConsoleStatus, GuestRunState, MemoryStatus};
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    fn status(name: &str) -> Status {
        Status {
            name: name.into(),
            pid: 42,
            state: GuestRunState::Running,
            reason: None,
            boot: "builtin:heartbeat".into(),
            vcpus: 1,
            max_vcpus: 1,
            vcpu: Vec::new(),
            emulator_threads: Vec::new(),
            pinning: berth_schema::Pinning::default(),
            memtune: None,
            io: None,
            memory: MemoryStatus {
                size: 4 << 20,
                backing: "anonymous".into(),
                hugepages: 0,
                rss: 0,
                locked: 0,
                share_pages: false,
                thp: None,
            },
            cgroup: None,
            console: ConsoleStatus {
                path: "console.log".into(),
                lines: 0,
                bytes: 0,
                rotations: 0,
            },
            ignored_accesses: Default::default(),
            uptime_ms: 1,
            migration: None,
            fence_in_ms: None,
        }
    }

    /// A VMM that answers; one whose socket accepts nothing (the connection waits in
    /// its backlog); one that is gone. The results keep the sockets' order, and the one
    /// that answers saw a brief status request and then the end of the requests.
    #[test]
    fn status_requests_answer_in_order_and_name_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (answers, silent) = (dir.path().join("a.sock"), dir.path().join("s.sock"));
        let listener = UnixListener::bind(&answers).unwrap();
        let _silent = UnixListener::bind(&silent).unwrap();
        let vmm = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            // Reads to the end: the client shut its side after the request.
            stream.read_to_end(&mut request).unwrap();
            let reply = serde_json::json!({"v": 1, "id": 1, "ok": true, "result": status("a")});
            stream.write_all(format!("{reply}\n").as_bytes()).unwrap();
            request
        });
        let sockets = [answers, silent, dir.path().join("gone.sock")];
        let asked = StatusRequests::send(&sockets);
        let replies = asked.replies(Duration::from_millis(300));
        let request = vmm.join().unwrap();
        assert_eq!(
            request,
            b"{\"v\":1,\"id\":1,\"op\":\"status\",\"args\":{\"brief\":true}}\n"
        );
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0].as_ref().unwrap(), &status("a"));
        assert!(
            matches!(replies[1], Err(ClientError::Timeout(_))),
            "{:?}",
            replies[1]
        );
        assert!(
            matches!(replies[2], Err(ClientError::Connect { .. })),
            "{:?}",
            replies[2]
        );
    }
}
