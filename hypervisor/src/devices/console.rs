//! The console log: what the guest writes to its serial port, in `console.log`, bounded
//! in size. When the file would pass the limit at a line end it is renamed to
//! `console.log.1` (replacing the older one) and a new file begins.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Default size limit of `console.log`.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;

/// Counters the status reads without locking the serial port.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    /// Newlines written since the VMM started.
    pub lines: AtomicU64,
    /// Bytes written since the VMM started.
    pub bytes: AtomicU64,
    /// Rotations done.
    pub rotations: AtomicU64,
}

/// A size-bounded, rotating log file.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    pending: Vec<u8>,
    stats: Arc<ConsoleStats>,
}

impl ConsoleLog {
    /// Opens (truncating) `path`; rotates at `max` bytes.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(path: &Path, max: u64) -> io::Result<ConsoleLog> {
        let file = File::create(path)?;
        Ok(ConsoleLog {
            path: path.to_owned(),
            file,
            size: 0,
            max,
            pending: Vec::new(),
            stats: Arc::new(ConsoleStats::default()),
        })
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<ConsoleStats> {
        Arc::clone(&self.stats)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the log file to `path` (a rename: both in one filesystem) and rotates there
    /// from now on.
    ///
    /// # Errors
    /// The rename fails; the log stays where it was.
    pub fn relocate(&mut self, path: &Path) -> io::Result<()> {
        let _ = self.flush_pending();
        std::fs::rename(&self.path, path)?;
        self.path = path.to_owned();
        Ok(())
    }

    /// Moves the log to `path` and keeps what `path` already holds: this log's lines
    /// are appended to it, and it is written (and rotated) there from now on. A local
    /// migration hands the guest's `console.log` over this way, so the guest's history
    /// stays in one file instead of being rotated out by the move. When `path` does not
    /// exist this is [`ConsoleLog::relocate`].
    ///
    /// # Errors
    /// `path` cannot be opened or written, or this log cannot be read; the log stays
    /// where it was.
    pub fn relocate_appending(&mut self, path: &Path) -> io::Result<()> {
        let _ = self.flush_pending();
        let mut target = match OpenOptions::new().append(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.relocate(path),
            Err(e) => return Err(e),
        };
        let mut own = File::open(&self.path)?;
        io::copy(&mut own, &mut target)?;
        let size = target.metadata()?.len();
        std::fs::remove_file(&self.path)?;
        self.file = target;
        self.size = size;
        self.path = path.to_owned();
        Ok(())
    }

    /// Writes out what one guest exit produced; lines are never split across files.
    pub fn end_of_exit(&mut self) {
        let _ = self.flush_pending();
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.pending);
        if self.size > 0 && self.size + bytes.len() as u64 > self.max {
            // Rotate at the last line end in the file so far; a partial line stays here.
            self.rotate()?;
        }
        self.file.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let old = self.path.with_extension("log.1");
        std::fs::rename(&self.path, old)?;
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.size = 0;
        self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        let newlines = buf.iter().filter(|&&b| b == b'\n').count() as u64;
        self.stats.lines.fetch_add(newlines, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if self.pending.len() >= 4096 {
            self.flush_pending()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relocating_onto_an_older_log_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("console.log");
        std::fs::write(&old, "before 1\nbefore 2\n").unwrap();
        std::fs::write(dir.path().join("console.log.1"), "older\n").unwrap();
        let incoming = dir.path().join("incoming.log");
        let mut log = ConsoleLog::create(&incoming, 1 << 20).unwrap();
        log.write_all(b"after 1\n").unwrap();
        log.end_of_exit();
        log.relocate_appending(&old).unwrap();
        log.write_all(b"after 2\n").unwrap();
        log.end_of_exit();
        assert_eq!(
            std::fs::read_to_string(&old).unwrap(),
            "before 1\nbefore 2\nafter 1\nafter 2\n"
        );
        assert!(!incoming.exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("console.log.1")).unwrap(),
            "older\n",
            "nothing was rotated by the move"
        );
        // Onto no file, it is a rename.
        let elsewhere = dir.path().join("elsewhere.log");
        log.relocate_appending(&elsewhere).unwrap();
        assert!(!old.exists());
        assert!(std::fs::read_to_string(&elsewhere)
            .unwrap()
            .ends_with("after 2\n"));
    }

    #[test]
    fn rotates_at_the_limit_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::create(&path, 100).unwrap();
        for i in 0..30 {
            log.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
            log.end_of_exit();
        }
        let cur = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("console.log.1")).unwrap();
        assert!(cur.len() <= 100 && old.len() <= 100, "{cur:?} {old:?}");
        assert!(cur.ends_with("line 0029\n"));
        assert!(old.starts_with("line ") && old.ends_with('\n'));
        let stats = log.stats();
        assert_eq!(stats.lines.load(Ordering::Relaxed), 30);
        assert!(stats.rotations.load(Ordering::Relaxed) >= 2);
    }
}
