//! The reference the issue names: a plain copy of the same bytes over loopback TCP, as
//! many connections as berth uses, into a buffer faulted in beforehand. No framing, no
//! crypto, no guest: what the link and the kernel's copies cost on this machine, now.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use berth_hypervisor::host::sysinfo::thread_cpu_time;

/// What one plain copy took.
pub struct Copied {
    /// From the start signal to the last byte in.
    pub elapsed: Duration,
    /// CPU time of the sending and receiving threads (user and system), without the
    /// buffer's setup and check.
    pub cpu: Duration,
    /// The receiving threads' share of `cpu`.
    pub receivers_cpu: Duration,
}

/// Copies `data` over `connections` loopback connections (each its contiguous share)
/// into a pre-faulted buffer of the same size; returns the time from the start signal
/// to the last byte in and the threads' CPU time, after checking every byte arrived.
pub fn copy(data: &[u8], connections: usize) -> anyhow::Result<Copied> {
    let connections = connections.max(1);
    let mut target = vec![0u8; data.len()];
    // Fault every page in for writing (the berth destination does MADV_POPULATE_WRITE).
    for page in target.chunks_mut(4096) {
        page[0] = 1;
    }
    let share = data.len().div_ceil(connections);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::new();
    for _ in 0..connections {
        let out = TcpStream::connect(addr)?;
        let (inc, _) = listener.accept()?;
        out.set_nodelay(true)?;
        pairs.push((out, inc));
    }
    let start = Barrier::new(2 * connections + 1);
    let copied = std::thread::scope(|scope| -> anyhow::Result<Copied> {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for ((mut out, mut inc), (src, dst)) in pairs
            .into_iter()
            .zip(data.chunks(share).zip(target.chunks_mut(share)))
        {
            let start = &start;
            senders.push(scope.spawn(move || -> std::io::Result<Duration> {
                start.wait();
                let cpu = thread_cpu_time();
                for chunk in src.chunks(1 << 20) {
                    out.write_all(chunk)?;
                }
                Ok(thread_cpu_time() - cpu)
            }));
            receivers.push(
                scope.spawn(move || -> std::io::Result<(Instant, Duration)> {
                    start.wait();
                    let cpu = thread_cpu_time();
                    let mut at = 0;
                    while at < dst.len() {
                        let end = (at + (1 << 20)).min(dst.len());
                        match inc.read(&mut dst[at..end])? {
                            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                            n => at += n,
                        }
                    }
                    Ok((Instant::now(), thread_cpu_time() - cpu))
                }),
            );
        }
        start.wait();
        let t = Instant::now();
        let mut last = t;
        let mut cpu = Duration::ZERO;
        for r in receivers {
            let (done, used) = r
                .join()
                .map_err(|_| anyhow::anyhow!("a receiver panicked"))?
                .context("plain copy")?;
            last = last.max(done);
            cpu += used;
        }
        let receivers_cpu = cpu;
        for s in senders {
            cpu += s
                .join()
                .map_err(|_| anyhow::anyhow!("a sender panicked"))?
                .context("plain copy")?;
        }
        Ok(Copied {
            elapsed: last - t,
            cpu,
            receivers_cpu,
        })
    })?;
    anyhow::ensure!(target == data, "the plain copy lost bytes");
    Ok(copied)
}
