//! berth's one door to git, through the git CLI.
//!
//! - [`read_revision`]: a revision's manifest files, straight from the object store:
//!   `git ls-tree -r -z` lists the files and `git cat-file --batch` reads them in one
//!   process. Nothing is checked out; the working tree is not touched.
//! - [`GitRepo`]: what following a branch needs besides (`berth serve`): the commit a
//!   branch points at now, cheaply and often, and the directory whose refs to watch.
//!
//! Every git process is started by [`command`]: stdin closed and no prompt of any kind
//! (terminal, askpass, credential helper UI, ssh password), since berth has no terminal
//! to answer it; a revision that comes from input is passed after `--end-of-options`,
//! so that it is never taken for an option.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use berth_schema::load::is_manifest_file;

/// Why a revision could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// `git` could not be run.
    #[error("cannot run git in {repo}")]
    Spawn {
        /// The repository.
        repo: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `git` failed.
    #[error("git {args} failed in {repo}: {stderr}")]
    Failed {
        /// The repository.
        repo: PathBuf,
        /// The git arguments.
        args: String,
        /// What git said.
        stderr: String,
    },
    /// `git cat-file --batch` answered something unexpected.
    #[error("unexpected output from git cat-file in {repo}: {detail}")]
    Protocol {
        /// The repository.
        repo: PathBuf,
        /// What was wrong.
        detail: String,
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

/// A `git -C repo` command that never prompts: stdin closed, no terminal prompt, no
/// askpass program, no credential manager dialog, ssh in batch mode.
pub fn command(repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GCM_INTERACTIVE", "never")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .stdin(Stdio::null());
    cmd
}

/// One revision's manifest files: the commit id and `(path, contents)` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// The full commit id the revision resolved to.
    pub commit: String,
    /// Manifest files (`*.yaml`, `*.yml`, `*.json`, outside hidden directories), by path.
    pub files: Vec<(String, Vec<u8>)>,
}

fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, GitError> {
    let out = command(repo)
        .args(args)
        .output()
        .map_err(|source| GitError::Spawn {
            repo: repo.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(GitError::Failed {
            repo: repo.to_owned(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// Reads the manifest files of `rev` in the repository at `repo`, limited to the
/// directory `dir` of the repository when given.
///
/// # Errors
/// When git cannot be run, the revision does not exist, or git answers unexpectedly.
pub fn read_revision(repo: &Path, rev: &str, dir: Option<&str>) -> Result<Revision, GitError> {
    let spec = format!("{rev}^{{commit}}");
    let commit = String::from_utf8_lossy(
        &git(
            repo,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                &spec,
            ],
        )
        .map_err(|e| match e {
            GitError::Failed { repo, args, .. } => GitError::Failed {
                repo,
                args,
                stderr: format!("no commit {rev:?}"),
            },
            other => other,
        })?,
    )
    .trim()
    .to_owned();

    let mut ls_args = vec!["ls-tree", "-r", "-z", "--full-tree", commit.as_str()];
    if let Some(dir) = dir {
        ls_args.extend(["--", dir]);
    }
    let listing = git(repo, &ls_args)?;
    let mut blobs: Vec<(String, String)> = Vec::new();
    for entry in listing.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let mut meta = meta.split(' ');
        let (_mode, kind, oid) = (meta.next(), meta.next(), meta.next());
        let hidden = path.split('/').any(|c| c.starts_with('.'));
        if kind == Some("blob") && !hidden && is_manifest_file(Path::new(path)) {
            if let Some(oid) = oid {
                blobs.push((path.to_owned(), oid.to_owned()));
            }
        }
    }
    let files = cat_blobs(repo, &blobs)?;
    Ok(Revision { commit, files })
}

/// Reads blobs with one `git cat-file --batch`.
fn cat_blobs(repo: &Path, blobs: &[(String, String)]) -> Result<Vec<(String, Vec<u8>)>, GitError> {
    if blobs.is_empty() {
        return Ok(Vec::new());
    }
    let spawn_err = |source| GitError::Spawn {
        repo: repo.to_owned(),
        source,
    };
    let protocol = |detail: String| GitError::Protocol {
        repo: repo.to_owned(),
        detail,
    };
    let mut child = command(repo)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut stdin = child.stdin.take().expect("piped");
    let request: String = blobs.iter().map(|(_, oid)| format!("{oid}\n")).collect();
    // Write from another thread: git answers while it reads, and both pipes are bounded.
    let writer = std::thread::spawn(move || stdin.write_all(request.as_bytes()));
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut files = Vec::with_capacity(blobs.len());
    let mut header = String::new();
    for (path, oid) in blobs {
        header.clear();
        out.read_line(&mut header).map_err(spawn_err)?;
        let mut parts = header.trim_end().split(' ');
        let (got, kind, size) = (parts.next(), parts.next(), parts.next());
        if got != Some(oid.as_str()) || kind != Some("blob") {
            return Err(protocol(format!(
                "asked for blob {oid} ({path}), got {header:?}"
            )));
        }
        let size: usize = size
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol(format!("no size in {header:?}")))?;
        let mut content = vec![0; size + 1];
        out.read_exact(&mut content).map_err(spawn_err)?;
        content.pop();
        files.push((path.clone(), content));
    }
    let _ = writer.join();
    let output = child.wait_with_output().map_err(spawn_err)?;
    if !output.status.success() {
        return Err(GitError::Failed {
            repo: repo.to_owned(),
            args: "cat-file --batch".into(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(files)
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
    git(dir, args).map(|out| String::from_utf8_lossy(&out).into_owned())
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
        let read = read_revision(dir, "main", None).expect("read");
        assert_eq!(read.commit, second.as_str());
        assert_eq!(read.files, vec![("a.yaml".to_owned(), b"two\n".to_vec())]);
        let out = dir.join("out");
        let option = format!("--output={}", out.display());
        assert!(read_revision(dir, &option, None).is_err());
        assert!(!out.exists(), "a revision is never an option");
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
