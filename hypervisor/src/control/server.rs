//! The VMM side of the control socket: connection threads accept connections
//! themselves and answer their requests through the [`Vmm`].
//!
//! Connection threads are kept: one whose connection ends goes back to `accept`, so a
//! VMM observed every few seconds spawns no thread per request (spawning one, with its
//! stack mapped and unmapped and a fresh malloc arena, cost more than the status it
//! served), and no connection is handed from an accepting thread to a serving one (a
//! wake-up and a context switch per request). A connection never waits behind another:
//! the thread that takes the last waiting thread's place in `accept` starts one more,
//! up to [`MAX_CONNECTIONS`] serving plus one that answers the excess with an error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::protocol::{parse_request, ErrorCode, Op, Request, Response, MAX_LINE};
use crate::vmm::{Vmm, VmmError};

/// Connections served at once; more are answered with an error and closed.
const MAX_CONNECTIONS: usize = 32;

/// Serves `listener` on threads named `control-conn` until the process exits.
///
/// # Errors
/// The first thread cannot be spawned.
pub fn spawn(listener: UnixListener, vmm: Arc<Vmm>) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        listener,
        vmm,
        threads: AtomicUsize::new(1),
        accepting: AtomicUsize::new(1),
        active: AtomicUsize::new(0),
    });
    spawn_thread(shared)
}

/// What the connection threads share.
struct Shared {
    listener: UnixListener,
    vmm: Arc<Vmm>,
    /// Connection threads started.
    threads: AtomicUsize,
    /// Threads in (or on their way back to) `accept`.
    accepting: AtomicUsize,
    /// Connections being served.
    active: AtomicUsize,
}

fn spawn_thread(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("control-conn".into())
        .spawn(move || connection_thread(&shared))?;
    Ok(())
}

/// Accepts and serves connections, one after the other, for the life of the process.
fn connection_thread(shared: &Arc<Shared>) {
    loop {
        let Ok((mut stream, _)) = shared.listener.accept() else {
            continue;
        };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            let reply = Response::error(0, ErrorCode::Host, "too many control connections");
            let _ = write_reply(&mut stream, &reply);
            continue;
        }
        // The last thread in `accept` left it: start another, so that the next
        // connection is taken at once (at most one thread beyond the cap, which answers
        // the excess).
        if shared.accepting.fetch_sub(1, Ordering::SeqCst) == 1
            && shared.threads.load(Ordering::SeqCst) <= MAX_CONNECTIONS
        {
            shared.threads.fetch_add(1, Ordering::SeqCst);
            shared.accepting.fetch_add(1, Ordering::SeqCst);
            if spawn_thread(Arc::clone(shared)).is_err() {
                shared.threads.fetch_sub(1, Ordering::SeqCst);
                shared.accepting.fetch_sub(1, Ordering::SeqCst);
                eprintln!("berth-vmm: cannot start a control connection thread");
            }
        }
        serve(stream, &shared.vmm);
        shared.active.fetch_sub(1, Ordering::SeqCst);
        shared.accepting.fetch_add(1, Ordering::SeqCst);
    }
}

fn write_reply(mut stream: impl Write, reply: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// A successful status reply, serialised straight from the [`Status`] (the same text as
/// [`Response::ok`] with its JSON value, without building the value first).
///
/// [`Status`]: super::protocol::Status
fn write_status(mut stream: impl Write, id: u64, vmm: &Vmm, brief: bool) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(4096);
    write!(
        line,
        "{{\"v\":{},\"id\":{id},\"ok\":true,\"result\":",
        super::protocol::PROTOCOL_VERSION
    )?;
    serde_json::to_writer(&mut line, &vmm.status_of(brief)).map_err(std::io::Error::other)?;
    line.extend_from_slice(b"}\n");
    stream.write_all(&line)
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of stream;
/// `Ok(Some(Err(len)))` for a line that was too long (skipped through its newline).
fn read_line(reader: &mut impl BufRead) -> std::io::Result<Option<Result<Vec<u8>, usize>>> {
    let mut line = Vec::new();
    let mut skipped = 0usize;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(if line.is_empty() && skipped == 0 {
                None
            } else if skipped > 0 {
                Some(Err(skipped))
            } else {
                Some(Ok(line))
            });
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if skipped > 0 || line.len() + chunk.len() > MAX_LINE {
            skipped += line.len() + chunk.len();
            line.clear();
        } else {
            line.extend_from_slice(chunk);
        }
        let consumed = found.unwrap_or(buf.len());
        reader.consume(consumed);
        if found.is_some() {
            return Ok(Some(if skipped > 0 { Err(skipped) } else { Ok(line) }));
        }
    }
}

fn serve(stream: UnixStream, vmm: &Arc<Vmm>) {
    let mut reader = BufReader::new(&stream);
    loop {
        let line = read_line(&mut reader);
        // From here until the reply is written, the VMM does not exit.
        let _answering = vmm.answering();
        let reply = match line {
            Ok(None) | Err(_) => return,
            Ok(Some(Err(len))) => Response::error(
                0,
                ErrorCode::TooLarge,
                format!("request of {len} bytes is over the {MAX_LINE}-byte limit"),
            ),
            Ok(Some(Ok(line))) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(Ok(line))) => match parse_request(&line) {
                Ok(Request {
                    id,
                    op: Op::Status(args),
                    ..
                }) => {
                    if write_status(&stream, id, vmm, args.brief).is_err() {
                        return;
                    }
                    continue;
                }
                Ok(request) => handle(vmm, request),
                Err(reply) => reply,
            },
        };
        if let Some(delay) = injected_reply_delay() {
            std::thread::sleep(delay);
        }
        if write_reply(&stream, &reply).is_err() {
            return;
        }
    }
}

/// The test-only fault `delay-reply-ms` ([`crate::migration::fault`]), read once: the
/// environment is not searched again for every reply.
fn injected_reply_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        crate::migration::fault::injected("delay-reply-ms")
            .map(|ms| std::time::Duration::from_millis(ms.parse().unwrap_or(0)))
    })
}

fn handle(vmm: &Arc<Vmm>, request: Request) -> Response {
    let id = request.id;
    let result = match request.op {
        Op::Status(args) => Ok(serde_json::to_value(vmm.status_of(args.brief)).unwrap_or_default()),
        Op::Retune(retune) => vmm.retune(&retune).map(|()| vmm.status_json()),
        Op::Pause => vmm.pause().map(|()| vmm.status_json()),
        Op::Resume => match vmm.migration().holds_the_only_sure_copy() {
            // The guest may run on the destination: resuming it here could run it twice.
            Some(why) => Err(VmmError::Refused(format!("resume refused: {why}"))),
            None => vmm.resume().map(|()| vmm.status_json()),
        },
        Op::VerifyMemory => vmm
            .verify_memory()
            .map(|report| serde_json::to_value(report).unwrap_or_default()),
        Op::Migrate(args) => crate::migration::send::start(vmm, args),
        Op::MigrateStatus => {
            vmm.migration().status().dirty_logging = vmm.vm().dirty_logging();
            Ok(vmm.migration().status_json())
        }
        Op::MigrateCancel => crate::migration::send::cancel(vmm),
        Op::MigrateResolve(args) => crate::migration::send::resolve(vmm, args),
        Op::VcpuRegisters => vmm
            .vcpu_registers()
            .map(|regs| serde_json::to_value(regs).unwrap_or_default()),
        Op::FenceDeadline(args) => {
            Ok(serde_json::to_value(vmm.fence().set(vmm, args)).unwrap_or_default())
        }
        Op::Shutdown(args) => match vmm.migration().holds_the_only_sure_copy() {
            Some(why) if !args.force => Err(VmmError::Refused(format!(
                "{why}; or shut down with force: true (berth stop --force-unknown-switchover) \
                 if the destination surely runs it"
            ))),
            _ => {
                let reason = if args.force {
                    "forced shutdown requested on the control socket"
                } else {
                    "shutdown requested on the control socket"
                };
                vmm.request_shutdown(args.timeout_ms, reason);
                Ok(serde_json::json!({"state": "stopping"}))
            }
        },
    };
    match result {
        Ok(value) => Response::ok(id, value),
        Err(e) => Response::error(id, e.code(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_capped_and_skipped() {
        let mut input = Vec::new();
        input.extend_from_slice(b"first\n");
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\nsecond\ntail");
        let mut r = BufReader::with_capacity(1000, &input[..]);
        assert_eq!(read_line(&mut r).unwrap(), Some(Ok(b"first".to_vec())));
        assert_eq!(read_line(&mut r).unwrap(), Some(Err(MAX_LINE + 10)));
        assert_eq!(read_line(&mut r).unwrap(), Some(Ok(b"second".to_vec())));
        assert_eq!(read_line(&mut r).unwrap(), Some(Ok(b"tail".to_vec())));
        assert_eq!(read_line(&mut r).unwrap(), None);
    }
}
