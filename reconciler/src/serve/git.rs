//! Following a branch needs two things from git besides reading a revision (which
//! [`crate::git::read_revision`] does): the commit a branch points at now, cheaply and
//! often, and the directory whose refs to watch.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why git could not answer.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be run at all.
    #[error("cannot run git: {0}")]
    Spawn(#[source] std::io::Error),
    /// git ran and failed.
    #[error("git {args} failed in {repo}: {stderr}")]
    Command {
        /// The repository.
        repo: String,
        /// The arguments, for the message.
        args: String,
        /// What git said.
        stderr: String,
    },
    /// git printed something that is not an object id.
    #[error("git rev-parse {spec} printed {output:?}, not a commit id")]
    Output {
        /// What was resolved.
        spec: String,
        /// What git printed.
        output: String,
    },
}

/// A commit id as git prints it (40 hex digits, or 64 in a SHA-256 repository).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitId(String);

impl CommitId {
    /// Parses a full lowercase hexadecimal object id.
    pub fn parse(text: &str) -> Option<Self> {
        let ok = matches!(text.len(), 40 | 64)
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| CommitId(text.to_owned()))
    }

    /// The full id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, for messages.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A local git repository, asked through the git CLI.
#[derive(Debug, Clone)]
pub struct GitRepo {
    dir: PathBuf,
    common_dir: PathBuf,
}

impl GitRepo {
    /// Opens the repository at `dir` (a working tree or a bare repository).
    ///
    /// # Errors
    /// When `dir` is not a git repository or git cannot be run.
    pub fn open(dir: &Path) -> Result<Self, GitError> {
        let common = run(
            dir,
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        )?;
        Ok(GitRepo {
            dir: dir.to_path_buf(),
            common_dir: PathBuf::from(common.trim_end()),
        })
    }

    /// The repository directory as given.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding refs, `HEAD` and `packed-refs` (`.git` of a working tree).
    pub fn common_dir(&self) -> &Path {
        &self.common_dir
    }

    /// The commit `rev` names now: a branch (`main`), a remote-tracking branch
    /// (`origin/main`), a tag or a commit id.
    ///
    /// # Errors
    /// When `rev` names no commit.
    pub fn resolve(&self, rev: &str) -> Result<CommitId, GitError> {
        let spec = format!("{rev}^{{commit}}");
        let out = run(
            &self.dir,
            &["rev-parse", "--verify", "--end-of-options", &spec],
        )?;
        CommitId::parse(out.trim_end()).ok_or(GitError::Output { spec, output: out })
    }
}

fn run(dir: &Path, args: &[&str]) -> Result<String, GitError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        // Never wait for credentials or an editor: the service has no terminal.
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(GitError::Spawn)?;
    if !out.status.success() {
        return Err(GitError::Command {
            repo: dir.display().to_string(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A throwaway repository with a local identity, for tests.
    pub(crate) fn init_repo(dir: &Path) {
        for args in [
            &["init", "--quiet", "--initial-branch=main"][..],
            &["config", "user.name", "berth tests"],
            &["config", "user.email", "tests@berth.invalid"],
            &["config", "commit.gpgsign", "false"],
        ] {
            git(dir, args);
        }
    }

    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub(crate) fn commit_file(dir: &Path, path: &str, text: &str) -> CommitId {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(file, text).expect("write");
        git(dir, &["add", "--all"]);
        git(dir, &["commit", "--quiet", "--allow-empty", "-m", path]);
        CommitId::parse(git(dir, &["rev-parse", "HEAD"]).trim()).expect("commit id")
    }

    #[test]
    fn resolves_branches_and_finds_the_git_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init_repo(dir);
        let first = commit_file(dir, "a.yaml", "one\n");
        let second = commit_file(dir, "a.yaml", "two\n");
        let repo = GitRepo::open(dir).expect("open");
        assert_eq!(repo.resolve("main").expect("resolve"), second);
        assert_eq!(repo.resolve("main~1").expect("resolve"), first);
        assert!(repo.resolve("no-such-branch").is_err());
        assert!(
            repo.resolve("--help").is_err(),
            "a revision is never an option"
        );
        assert_eq!(
            repo.common_dir().canonicalize().expect("canonical"),
            dir.join(".git").canonicalize().expect("canonical")
        );
        assert!(
            GitRepo::open(&dir.join(".git/refs")).is_ok(),
            "inside .git still opens"
        );
        let elsewhere = tempfile::tempdir().expect("tempdir");
        assert!(GitRepo::open(elsewhere.path()).is_err());
    }

    #[test]
    fn commit_ids_are_full_lowercase_hex() {
        assert!(CommitId::parse(&"a".repeat(40)).is_some());
        assert!(CommitId::parse(&"0".repeat(64)).is_some());
        assert!(CommitId::parse(&"A".repeat(40)).is_none());
        assert!(CommitId::parse("abc123").is_none());
        let id = CommitId::parse("0123456789abcdef0123456789abcdef01234567").expect("id");
        assert_eq!(id.short(), "0123456789ab");
    }
}
