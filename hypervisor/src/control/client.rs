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
    ErrorBody, Op, Request, Response, Retune, ShutdownArgs, Status, VcpuRegisters, PROTOCOL_VERSION,
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
        let response: TypedResponse<T> =
            serde_json::from_str(&buf).map_err(|e| ClientError::BadReply(format!("{e}: {buf}")))?;
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
        self.typed(Op::Status)
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
