//! Reading a revision of a manifest repository straight from git, with the git CLI:
//! `git ls-tree -r -z` lists the files and `git cat-file --batch` reads them in one
//! process. Nothing is checked out; the working tree is not touched.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use berth_schema::load::is_manifest_file;

/// Why a revision could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// `git` could not be run.
    #[error("cannot run git in {repo}: {source}")]
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
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
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
        &git(repo, &["rev-parse", "--verify", "--quiet", &spec]).map_err(|e| match e {
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
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
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
