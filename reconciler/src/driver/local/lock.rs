//! The locks of a state directory: `<state>/apply.lock` ([`StateLock`]), which
//! serialises whatever changes the guests of a state directory (`berth apply`, `berth
//! stop`, and `berth serve` while it acts: [`SharedStateLock`]), and each VMM's
//! `vmm.lock`, which a VMM holds for its whole life (so a held lock means a live VMM,
//! answering or not).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub(super) fn flock(file: &File, operation: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` owns for the whole call; no memory is
        // passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The lock at `path`, taken without waiting; `None` when someone holds it (or it
/// cannot be opened).
pub(super) fn try_lock(path: &Path) -> Option<File> {
    let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB).ok()?;
    Some(file)
}

/// Whether a VMM holds the lock of the guest directory `dir`.
pub(super) fn vmm_lock_held(dir: &Path) -> bool {
    let path = dir.join("vmm.lock");
    path.exists() && try_lock(&path).is_none()
}

/// Why the state directory's apply lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{} holds {}; wait for it to finish, or pass --wait", holder_text(.holder.as_deref(), *.pid), .path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, as it wrote itself into the file.
        pid: Option<u32>,
        /// What the holder is (`berth apply`, `berth stop`, `berth serve`).
        holder: Option<String>,
    },
    /// The lock file could not be opened or locked. The message names the cause, so
    /// it is not also the `source`.
    #[error("cannot lock {}: {error}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

fn holder_text(holder: Option<&str>, pid: Option<u32>) -> String {
    let who = holder.unwrap_or("another berth apply, stop or serve");
    match pid {
        Some(pid) => format!("{who} (pid {pid})"),
        None => who.to_owned(),
    }
}

/// The exclusive lock on `<state>/apply.lock`, held while an apply (or `berth serve`'s
/// reconcile) changes the guests of a state directory; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// The lock file of `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("apply.lock")
    }

    /// Takes the lock: at once or fails naming the holder ([`LockError::Held`]), or
    /// waits for it with `wait`. The holder writes its pid and `holder` (what it is, as
    /// `berth apply`) into the file.
    ///
    /// # Errors
    /// [`LockError`].
    pub fn acquire(state_dir: &Path, wait: bool, holder: &str) -> Result<StateLock, LockError> {
        let path = Self::path(state_dir);
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let operation = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        if let Err(e) = flock(&file, operation) {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let (pid, holder) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
                return Err(LockError::Held {
                    path: path.clone(),
                    pid: pid.parse().ok(),
                    holder: Some(holder.trim().to_owned()).filter(|h| !h.is_empty()),
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        std::io::Write::write_all(
            &mut file,
            format!("{} {holder}\n", std::process::id()).as_bytes(),
        )
        .map_err(io)?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
impl StateLock {
    /// Test support: waits until the state lock of `state_dir` is free. A child that
    /// another test of the same binary forks holds a copy of every descriptor until it
    /// execs, so a lock a test released may stay held for that moment.
    pub(crate) fn wait_free(state_dir: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while StateLock::acquire(state_dir, false, "test").is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the state lock stays held"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Test support: `attempt`, again while it finds the state lock held (its error
    /// names a holder), for at most 5 s. A child that another test of the same binary
    /// forks holds a copy of a released lock until it execs; the service retries "not
    /// now" in the same way.
    pub(crate) fn retry_while_held<T, E: std::error::Error + 'static>(
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match attempt() {
                Err(e)
                    if std::time::Instant::now() < deadline
                        && berth_hypervisor::report::one_line(&e).contains(" holds ") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }
}

/// The state lock as one process that acts on several guests at once holds it
/// (`berth serve`): taken when the first of its actions starts and released when the
/// last one ends, never for the process's whole life. Its own actions run side by
/// side; an `apply` or `stop` run by hand meanwhile waits (`--wait`) or refuses,
/// naming it; and an action of it while one of those runs refuses (and is retried).
#[derive(Debug)]
pub struct SharedStateLock {
    state_dir: PathBuf,
    holder: String,
    /// How many actions hold it, and the lock while any does.
    held: Mutex<(usize, Option<StateLock>)>,
}

/// One action's hold on a [`SharedStateLock`]; released on drop.
#[derive(Debug)]
pub struct SharedStateHold<'a>(&'a SharedStateLock);

impl SharedStateLock {
    /// The lock of `state_dir`, taken in the name of `holder` (as `berth serve`).
    pub fn new(state_dir: &Path, holder: &str) -> Self {
        SharedStateLock {
            state_dir: state_dir.to_owned(),
            holder: holder.to_owned(),
            held: Mutex::new((0, None)),
        }
    }

    /// Holds the lock for one action: takes it without waiting unless another action
    /// of this process holds it already.
    ///
    /// # Errors
    /// When another process holds it ([`LockError::Held`]) or it cannot be taken.
    pub fn hold(&self) -> Result<SharedStateHold<'_>, LockError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.0 == 0 {
            held.1 = Some(StateLock::acquire(&self.state_dir, false, &self.holder)?);
        }
        held.0 += 1;
        Ok(SharedStateHold(self))
    }
}

impl Drop for SharedStateHold<'_> {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        held.0 -= 1;
        if held.0 == 0 {
            held.1 = None;
        }
    }
}
