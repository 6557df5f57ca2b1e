//! One revision of the manifest repository, read with git ([`crate::git`]) and
//! validated as a whole; optionally checked against this machine ([`MachineCheck`]).
//! The source follower of `berth serve` reads each new head this way, and a
//! destination reads the revision an incoming migration names.

use std::sync::Arc;

use berth_schema::{Diagnostic, Invalid};

use crate::git::{CommitId, GitRepo};
use crate::machine::Machine;
use crate::model::Desired;

/// Something that says the branch head may have moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The service started.
    Startup,
    /// The filesystem watch saw a ref change.
    Watch,
    /// The poll interval passed.
    Poll,
    /// A signed webhook arrived.
    Webhook,
}

/// One head of the branch, read and validated as a whole.
#[derive(Debug, Clone)]
pub struct Revision {
    /// The commit.
    pub commit: CommitId,
    /// What triggered reading it.
    pub trigger: Trigger,
    /// The manifests, or every problem that keeps the revision from being applied.
    pub manifests: Result<Arc<Desired>, Invalid>,
    /// Problems that do not block the revision.
    pub warnings: Vec<Diagnostic>,
}

/// Reads and validates the manifests of `commit` (with [`crate::git::read_revision`]),
/// only those under `dir` of the repository when given.
///
/// # Errors
/// When git fails; an invalid revision is not an error here but a [`Revision`] whose
/// `manifests` is `Err`.
pub fn read_revision(
    repo: &GitRepo,
    dir: Option<&str>,
    commit: &CommitId,
    trigger: Trigger,
) -> Result<Revision, crate::git::GitError> {
    read_checked_revision(repo, dir, commit, trigger, None)
}

/// This host's Host manifest checked against this machine: a revision whose Host (or
/// a guest placed on it) does not fit is treated as invalid, so nothing of it is done.
#[derive(Debug, Clone)]
pub struct MachineCheck {
    /// This host's name.
    pub host: String,
    /// This machine's facts, read when the service started.
    pub machine: Machine,
}

/// [`read_revision`], and when `check` is given, the machine check on a valid revision.
///
/// # Errors
/// When git fails.
pub fn read_checked_revision(
    repo: &GitRepo,
    dir: Option<&str>,
    commit: &CommitId,
    trigger: Trigger,
    check: Option<&MachineCheck>,
) -> Result<Revision, crate::git::GitError> {
    let files = crate::git::read_revision(repo.dir(), commit.as_str(), dir)?.files;
    let checked = berth_schema::load_files(files).and_then(|v| match check {
        Some(c) => c.machine.ensure_fits(&v.manifests, &c.host).map(|()| v),
        None => Ok(v),
    });
    let (manifests, warnings) = match checked {
        Ok(v) => (
            Ok(Arc::new(Desired::from_manifests(&v.manifests))),
            v.warnings,
        ),
        Err(invalid) => (Err(invalid), Vec::new()),
    };
    Ok(Revision {
        commit: commit.clone(),
        trigger,
        manifests,
        warnings,
    })
}
