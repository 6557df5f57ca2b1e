//! Following a branch of a git repository: noticing new heads and reading each one as a
//! whole revision, validated.
//!
//! Three things say "the head may have moved": a filesystem watch on the repository's
//! refs ([`watch`], debounced), a periodic poll ([`poll`]), and the webhook
//! (`POST /hooks/git`, in [`super::http`]). They all feed one channel of [`Trigger`]s;
//! [`Follower::run`] coalesces what queued up, resolves the branch, and reads a head
//! only once ([`HeadDedup`]), however many triggers announced it.
//!
//! The repository is a local path. To follow a remote repository, the operator keeps a
//! local clone fetched (a timer running `git fetch`, or a webhook receiver that
//! fetches) and follows a remote-tracking branch such as `origin/main`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::git::{CommitId, GitRepo};
pub use crate::revision::{read_checked_revision, read_revision, MachineCheck, Revision, Trigger};

/// What the follower reports.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A new head.
    Revision(Revision),
    /// The branch or a revision could not be read (git failed); tried again on the
    /// next trigger.
    Unreadable {
        /// The head, when it was resolved.
        commit: Option<CommitId>,
        /// What failed.
        error: String,
    },
}

/// Remembers the last head read, so that a head announced by the watch, the poll and
/// the webhook is read once.
#[derive(Debug, Default)]
pub struct HeadDedup {
    last: Option<CommitId>,
}

impl HeadDedup {
    /// Whether `head` differs from the last head read; if so it becomes the last.
    pub fn is_new(&mut self, head: &CommitId) -> bool {
        if self.last.as_ref() == Some(head) {
            return false;
        }
        self.last = Some(head.clone());
        true
    }

    /// Forgets the last head, so that it is read again (its read failed).
    pub fn forget(&mut self) {
        self.last = None;
    }
}

/// Follows one branch of a repository.
#[derive(Debug)]
pub struct Follower {
    repo: GitRepo,
    branch: String,
    dir: Option<String>,
    debounce: Duration,
    machine_check: Option<MachineCheck>,
}

impl Follower {
    /// Follows `branch` of `repo`, reading the manifests under `dir` (the whole
    /// repository when `None`); filesystem events are debounced by `debounce`.
    pub fn new(repo: GitRepo, branch: String, dir: Option<String>, debounce: Duration) -> Self {
        Follower {
            repo,
            branch,
            dir,
            debounce,
            machine_check: None,
        }
    }

    /// Checks each valid revision's Host manifest against this machine.
    pub fn with_machine_check(mut self, check: MachineCheck) -> Self {
        self.machine_check = Some(check);
        self
    }

    /// Reads triggers until the channel closes; sends each new head to `events`.
    pub async fn run(
        self,
        mut triggers: mpsc::Receiver<Trigger>,
        events: mpsc::Sender<SourceEvent>,
    ) {
        let follower = Arc::new(self);
        let mut dedup = HeadDedup::default();
        while let Some(mut trigger) = triggers.recv().await {
            if trigger == Trigger::Watch {
                // A commit touches several files in a few milliseconds; look once.
                tokio::time::sleep(follower.debounce).await;
            }
            // Whatever queued up meanwhile is answered by this one look; a webhook
            // among them names the look, for the logs.
            while let Ok(next) = triggers.try_recv() {
                if next == Trigger::Webhook {
                    trigger = next;
                }
            }
            let f = Arc::clone(&follower);
            let head = tokio::task::spawn_blocking(move || f.repo.resolve(&f.branch))
                .await
                .expect("resolving the head does not panic");
            let head = match head {
                Ok(head) => head,
                Err(e) => {
                    let error = berth_hypervisor::report::one_line(&e);
                    warn!(%error, branch = %follower.branch, "cannot resolve the branch");
                    let event = SourceEvent::Unreadable {
                        commit: None,
                        error,
                    };
                    if events.send(event).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            if !dedup.is_new(&head) {
                debug!(?trigger, head = %head.short(), "head unchanged");
                continue;
            }
            info!(?trigger, head = %head, "new head");
            let f = Arc::clone(&follower);
            let commit = head.clone();
            let read = tokio::task::spawn_blocking(move || {
                read_checked_revision(
                    &f.repo,
                    f.dir.as_deref(),
                    &commit,
                    trigger,
                    f.machine_check.as_ref(),
                )
            })
            .await
            .expect("reading a revision does not panic");
            let event = match read {
                Ok(revision) => SourceEvent::Revision(revision),
                Err(e) => {
                    dedup.forget();
                    let error = berth_hypervisor::report::one_line(&e);
                    warn!(%error, head = %head, "cannot read the revision");
                    SourceEvent::Unreadable {
                        commit: Some(head),
                        error,
                    }
                }
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Watches the refs of `repo` (`HEAD`, `packed-refs`, `refs/`, `reftable/`) and sends
/// [`Trigger::Watch`] when one changes. The watch lasts as long as the returned watcher.
///
/// # Errors
/// When the watch cannot be set up.
pub fn watch(
    repo: &GitRepo,
    triggers: mpsc::Sender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    let common = repo.common_dir().to_path_buf();
    let handler_common = common.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| is_ref_path(&handler_common, p));
        if relevant {
            // A full channel already holds a trigger that will look at the head.
            let _ = triggers.try_send(Trigger::Watch);
        }
    })?;
    watcher.watch(&common, RecursiveMode::NonRecursive)?;
    for sub in ["refs", "reftable"] {
        let dir = common.join(sub);
        if dir.is_dir() {
            watcher.watch(&dir, RecursiveMode::Recursive)?;
        }
    }
    Ok(watcher)
}

/// Whether a changed path under the git directory can move a branch head. Lock files
/// are written before the rename that publishes a ref; the rename is what counts.
fn is_ref_path(common: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(common) else {
        return false;
    };
    if rel.extension().is_some_and(|e| e == "lock") {
        return false;
    }
    let first = rel.components().next().and_then(|c| c.as_os_str().to_str());
    matches!(first, Some("HEAD" | "packed-refs" | "refs" | "reftable"))
}

/// Sends [`Trigger::Poll`] every `interval`, until the channel closes.
pub async fn poll(interval: Duration, triggers: mpsc::Sender<Trigger>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; startup already looked
    loop {
        tick.tick().await;
        if triggers.send(Trigger::Poll).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::tests::{commit_file, init_repo};
    use crate::machine::Machine;

    const HOST: &str = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
                        spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 16GiB}\n";

    #[test]
    fn dedups_heads() {
        let a = CommitId::parse(&"a".repeat(40)).expect("id");
        let b = CommitId::parse(&"b".repeat(40)).expect("id");
        let mut dedup = HeadDedup::default();
        assert!(dedup.is_new(&a));
        assert!(!dedup.is_new(&a));
        assert!(dedup.is_new(&b));
        assert!(
            dedup.is_new(&a),
            "going back to an earlier head is a new head"
        );
        dedup.forget();
        assert!(dedup.is_new(&a));
    }

    #[test]
    fn ref_paths() {
        let common = Path::new("/r/.git");
        assert!(is_ref_path(common, Path::new("/r/.git/refs/heads/main")));
        assert!(is_ref_path(common, Path::new("/r/.git/packed-refs")));
        assert!(is_ref_path(common, Path::new("/r/.git/HEAD")));
        assert!(!is_ref_path(
            common,
            Path::new("/r/.git/refs/heads/main.lock")
        ));
        assert!(!is_ref_path(common, Path::new("/r/.git/index")));
        assert!(!is_ref_path(common, Path::new("/r/.git/objects/ab/cdef")));
        assert!(!is_ref_path(common, Path::new("/elsewhere/HEAD")));
    }

    #[test]
    fn reads_valid_and_invalid_revisions_with_file_and_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init_repo(dir);
        commit_file(dir, "README.md", "not a manifest: {{{\n");
        let good = commit_file(dir, "hosts.yaml", HOST);
        let bad = commit_file(
            dir,
            "hosts.yaml",
            &HOST.replace("cpus: 0-1", "cpus: 0-1, cpuz: 2"),
        );
        let repo = GitRepo::open(dir).expect("open");

        let rev = read_revision(&repo, None, &good, Trigger::Startup).expect("read");
        let desired = rev.manifests.expect("valid");
        assert_eq!(desired.hosts.len(), 1);
        assert_eq!(desired.hosts[0].metadata.name, "kvm01");

        let rev = read_revision(&repo, None, &bad, Trigger::Poll).expect("read");
        let invalid = rev.manifests.expect_err("invalid");
        let first = &invalid.diagnostics[0];
        assert_eq!((first.file.as_str(), first.line), ("hosts.yaml", Some(4)));
        assert!(first.message.contains("cpuz"), "{first}");
    }

    #[test]
    fn a_host_this_machine_does_not_match_makes_the_revision_invalid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init_repo(dir);
        let fits = commit_file(dir, "hosts.yaml", HOST);
        let cpu64 = commit_file(
            dir,
            "hosts.yaml",
            &HOST.replace("cpus: 0-1", "cpus: \"0-1,64\""),
        );
        let repo = GitRepo::open(dir).expect("open");
        let check = MachineCheck {
            host: "kvm01".into(),
            machine: Machine {
                online_cpus: "0-1".parse().expect("cpuset"),
                memory: berth_schema::Bytes::gib(64),
                page_sizes: vec![berth_schema::PageSize::Huge2M],
                kvm: true,
            },
        };
        let read = |commit| {
            read_checked_revision(&repo, None, commit, Trigger::Poll, Some(&check)).expect("read")
        };
        read(&fits).manifests.expect("the Host fits");
        let invalid = read(&cpu64).manifests.expect_err("CPU 64 is not online");
        let texts: Vec<String> = invalid
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            texts,
            ["hosts.yaml:4:39: error: spec.cpus: CPU 64 is not online on this machine (online: 0-1)"]
        );
    }

    #[tokio::test]
    async fn follower_reads_each_head_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        init_repo(dir);
        let first = commit_file(dir, "hosts.yaml", HOST);
        let repo = GitRepo::open(dir).expect("open");
        let (trigger_tx, trigger_rx) = mpsc::channel(8);
        let (event_tx, mut event_rx) = mpsc::channel(8);
        let follower = Follower::new(repo, "main".into(), None, Duration::from_millis(1));
        let task = tokio::spawn(follower.run(trigger_rx, event_tx));

        trigger_tx.send(Trigger::Startup).await.expect("send");
        let Some(SourceEvent::Revision(rev)) = event_rx.recv().await else {
            panic!("expected a revision");
        };
        assert_eq!(rev.commit, first);
        // The same head announced again is not read again.
        trigger_tx.send(Trigger::Poll).await.expect("send");
        trigger_tx.send(Trigger::Webhook).await.expect("send");
        let second = commit_file(dir, "more.yaml", "");
        trigger_tx.send(Trigger::Watch).await.expect("send");
        let Some(SourceEvent::Revision(rev)) = event_rx.recv().await else {
            panic!("expected a revision");
        };
        assert_eq!(rev.commit, second);
        drop(trigger_tx);
        task.await.expect("follower ends when the triggers end");
        assert!(
            event_rx.try_recv().is_err(),
            "no duplicate revision was sent"
        );
    }
}
