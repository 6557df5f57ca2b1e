//! The locks of a state directory: `<state>/apply.lock` ([`StateLock`]), which
//! serialises whatever changes the guests of a state directory (`berth apply`, `berth
//! stop`), and each VMM's `vmm.lock`, which a VMM holds for its whole life (so a held
//! lock means a live VMM, answering or not).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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
    #[error("another berth apply or serve{} holds {}; wait for it to finish, or pass --wait", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder, as it wrote itself into the file.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
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

    /// Takes the lock: at once or fails with the holder's pid ([`LockError::Held`]), or
    /// waits for it with `wait`. The holder writes its pid into the file.
    ///
    /// # Errors
    /// [`LockError`].
    pub fn acquire(state_dir: &Path, wait: bool) -> Result<StateLock, LockError> {
        let path = Self::path(state_dir);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
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
                return Err(LockError::Held {
                    path: path.clone(),
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes())
            .map_err(io)?;
        Ok(StateLock { _file: file })
    }
}
