//! A guest's state directory, `<state>/guests/<name>/`: `vmm.lock` (held with an
//! exclusive flock for the VMM's whole life, so there is never a second VMM for a guest),
//! `pid`, `control.sock`, `console.log`, `spec.yaml`.
//!
//! A VMM that was SIGKILLed leaves its socket and pid file behind; the next VMM holds the
//! lock before it removes them, which proves nobody else owns them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::config::{validate_name, ConfigError};

/// Why the state directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// The name would escape the directory.
    #[error(transparent)]
    Name(#[from] ConfigError),
    /// Creating the directory failed.
    #[error("Cannot create the state directory {}: {source}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another VMM holds the lock.
    #[error("Guest {name:?} already has a running VMM{} (lock {} is held)", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .lock.display())]
    AlreadyRunning {
        /// The guest.
        name: String,
        /// The holder, from the pid file.
        pid: Option<u32>,
        /// The lock file.
        lock: PathBuf,
    },
    /// A file in the directory could not be written or removed.
    #[error("Cannot {action} {}: {source}", .path.display())]
    File {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A guest's state directory, locked by this process.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// The directory of guest `name` under `root`.
    pub fn path_of(root: &Path, name: &str) -> PathBuf {
        root.join("guests").join(name)
    }

    /// Creates and locks the directory of guest `name` under `root`, cleaning up what a
    /// killed VMM left behind, and writes this process's pid.
    ///
    /// # Errors
    /// [`StateDirError::AlreadyRunning`] when another VMM holds it.
    pub fn acquire(root: &Path, name: &str) -> Result<StateDir, StateDirError> {
        validate_name(name)?;
        Self::lock_dir(Self::path_of(root, name), name)
    }

    /// The directory of an incoming migration of guest `name`:
    /// `<root>/guests/<name>.incoming/` (guest names have no dots, so it never names a
    /// guest). See [`crate::migration`] for how it passes to `<name>/` at commit.
    pub fn incoming_path_of(root: &Path, name: &str) -> PathBuf {
        root.join("guests").join(format!("{name}.incoming"))
    }

    /// Creates and locks [`StateDir::incoming_path_of`], as [`StateDir::acquire`] does.
    ///
    /// # Errors
    /// [`StateDirError::AlreadyRunning`] when another incoming VMM holds it.
    pub fn acquire_incoming(root: &Path, name: &str) -> Result<StateDir, StateDirError> {
        validate_name(name)?;
        Self::lock_dir(Self::incoming_path_of(root, name), name)
    }

    fn lock_dir(dir: PathBuf, name: &str) -> Result<StateDir, StateDirError> {
        std::fs::create_dir_all(&dir).map_err(|source| StateDirError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let lock_path = dir.join("vmm.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|source| StateDirError::File {
                action: "open",
                path: lock_path.clone(),
                source,
            })?;
        // SAFETY: flock on an fd we own; no memory is passed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let pid = std::fs::read_to_string(dir.join("pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            return Err(StateDirError::AlreadyRunning {
                name: name.to_owned(),
                pid,
                lock: lock_path,
            });
        }
        let state = StateDir { dir, _lock: lock };
        for stale in [state.socket_path(), state.pid_path()] {
            remove_if_exists(&stale)?;
        }
        let pid_path = state.pid_path();
        std::fs::write(&pid_path, format!("{}\n", std::process::id())).map_err(|source| {
            StateDirError::File {
                action: "write",
                path: pid_path,
                source,
            }
        })?;
        Ok(state)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `control.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// `pid`.
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// `console.log`.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// `spec.yaml`: the spec this VMM runs.
    pub fn spec_path(&self) -> PathBuf {
        self.dir.join("spec.yaml")
    }

    /// Writes `spec.yaml`.
    ///
    /// # Errors
    /// [`StateDirError::File`].
    pub fn write_spec(&self, text: &str) -> Result<(), StateDirError> {
        let path = self.spec_path();
        let mut file =
            File::create(&path).and_then(|mut f| f.write_all(text.as_bytes()).map(|()| f));
        if let Ok(f) = file.as_mut() {
            let _ = f.flush();
        }
        file.map(drop).map_err(|source| StateDirError::File {
            action: "write",
            path,
            source,
        })
    }

    /// Binds `control.sock` with mode 0600: bound under a temporary name, chmod'ed, then
    /// renamed into place, so the socket never exists with looser permissions and never
    /// accepts before the caller is ready.
    ///
    /// # Errors
    /// [`StateDirError::File`].
    pub fn bind_control(&self) -> Result<UnixListener, StateDirError> {
        let tmp = self
            .dir
            .join(format!(".control.sock.{}", std::process::id()));
        remove_if_exists(&tmp)?;
        let err = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StateDirError::File {
                action,
                path,
                source,
            }
        };
        let listener = UnixListener::bind(&tmp).map_err(err("bind", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(err("chmod", &tmp))?;
        std::fs::rename(&tmp, self.socket_path()).map_err(err("rename", &tmp))?;
        Ok(listener)
    }

    /// Removes the socket and pid file (the console log and spec stay for inspection).
    pub fn cleanup(&self) {
        let _ = remove_if_exists(&self.socket_path());
        let _ = remove_if_exists(&self.pid_path());
    }
}

fn remove_if_exists(path: &Path) -> Result<(), StateDirError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StateDirError::File {
            action: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_and_stale_files_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::path_of(root.path(), "g1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("control.sock"), "stale").unwrap();
        let first = StateDir::acquire(root.path(), "g1").unwrap();
        assert!(!first.socket_path().exists());
        let pid = std::fs::read_to_string(first.pid_path()).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock is per open file description: a second open in this process conflicts.
        let msg = StateDir::acquire(root.path(), "g1")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("already has a running VMM"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        let listener = first.bind_control().unwrap();
        let mode = std::fs::metadata(first.socket_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(listener);
        first.cleanup();
        drop(first);
        StateDir::acquire(root.path(), "g1").unwrap();
        assert!(StateDir::acquire(root.path(), "../x").is_err());
    }
}
