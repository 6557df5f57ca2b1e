//! Following a migration from its source VMM to its end: one state machine for a local
//! live migration (into a new VMM on this host) and a move to another host.
//!
//! The source VMM is asked for its migration status until it says `completed`,
//! `failed` or `cancelled`. Two cases need the destination ([`Destination`]):
//! - `switchoverUnknown`: the source sent `Commit` and no answer came. The destination
//!   is asked whether it runs the guest, and the source is told (`migrateResolve`);
//!   while it cannot tell, it is asked again for [`Follow::resolve_within`].
//! - The source VMM stops answering: it exits right after a completed migration, and
//!   it may also have died. That is a completed migration only when the destination
//!   says it runs the guest; when it says it does not, the migration failed; when it
//!   cannot tell within [`Follow::resolve_within`], the outcome is unknown (never taken
//!   for a failure, since the guest may run there).
//!
//! A follower that is stopping, or past [`Follow::deadline`], cancels the migration
//! once: before the switchover the guest stays on its source; after it, the
//! cancellation does nothing and the migration ends as it would have.

use std::time::{Duration, Instant};

use berth_hypervisor::control::{Client, Op};
use berth_hypervisor::migration::{MigrateResolveArgs, MigrationPhase, MigrationStatus};
use berth_hypervisor::report::one_line;
use tracing::{debug, info, warn};

/// How often the source VMM is asked for its status.
const POLL: Duration = Duration::from_millis(10);

/// Why the destination of a migration cannot tell (yet) whether it runs the guest.
#[derive(Debug, thiserror::Error)]
pub enum CannotTell {
    /// The incoming VMM of a local migration has not ended its migration yet.
    #[error("the incoming VMM of {guest} is at {phase:?}")]
    Incoming {
        /// The guest.
        guest: String,
        /// Its migration phase.
        phase: MigrationPhase,
    },
    /// The incoming VMM of a local migration is there but does not answer.
    #[error("the incoming VMM of {guest} does not answer")]
    IncomingSilent {
        /// The guest.
        guest: String,
    },
    /// The new VMM says it does not run the guest but has not exited: until it has,
    /// it is not taken at its word.
    #[error("the new VMM (pid {pid}) does not run the guest and has not exited yet")]
    NotExited {
        /// Its pid.
        pid: i32,
    },
    /// The destination host's service could not be asked.
    #[error("cannot ask {host}")]
    Unasked {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The destination host's service did not answer in time.
    #[error("{host} ({address}) did not answer within {timeout:?}")]
    Timeout {
        /// The host.
        host: String,
        /// Its service's address.
        address: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// No record says where the guest went, so nobody can be asked (the message says
    /// what the VMM knows; its context says that no record names the destination).
    #[error("its VMM streamed to {destination}; {error}")]
    Unrecorded {
        /// The address its VMM streamed to, as the VMM reports it.
        destination: String,
        /// What the VMM says of the switchover.
        error: String,
    },
}

/// Where a migration goes, as far as following it needs.
pub trait Destination {
    /// Whether the destination runs the guest now; `Err` (why) while it cannot tell.
    fn runs_guest(&self) -> Result<bool, CannotTell>;
    /// How messages name it ("the new VMM", or a host).
    fn name(&self) -> String;
}

/// How a migration is followed.
pub struct Follow<'a> {
    /// The guest.
    pub guest: &'a str,
    /// When the migration is cancelled if it has not ended.
    pub deadline: Duration,
    /// How long a destination that cannot tell is asked again before the outcome
    /// counts as unknown.
    pub resolve_within: Duration,
    /// How often it is asked meanwhile.
    pub ask_every: Duration,
    /// Whether the follower is stopping (the migration is then cancelled, and an
    /// unknown switchover is not waited for).
    pub cancelling: &'a (dyn Fn() -> bool + Sync),
}

/// How a followed migration did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowError {
    /// It ended without moving the guest (failed, cancelled, or the destination said
    /// it does not run it): the guest stays on the source, if it still runs.
    Failed(String),
    /// Nobody can tell yet whether the destination runs the guest: it is neither
    /// resumed on the source nor started anywhere until the destination answers.
    Unknown(String),
}

impl std::fmt::Display for FollowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FollowError::Failed(m) | FollowError::Unknown(m) => f.write_str(m),
        }
    }
}

/// Follows the migration of `source` to `to` to its end; the last status the source
/// gave on success (its phase set to completed when the destination confirmed).
///
/// # Errors
/// See [`FollowError`].
pub fn follow(
    source: &mut Client,
    to: &dyn Destination,
    how: &Follow<'_>,
) -> Result<MigrationStatus, FollowError> {
    let name = how.guest;
    let deadline = Instant::now() + how.deadline;
    let mut cancelled: Option<&str> = None;
    let mut last: Option<MigrationStatus> = None;
    let mut unknown_since: Option<Instant> = None;
    loop {
        match source
            .call(Op::MigrateStatus)
            .map(serde_json::from_value::<MigrationStatus>)
        {
            Ok(Ok(status)) => match status.phase {
                MigrationPhase::Completed => return Ok(status),
                MigrationPhase::Failed | MigrationPhase::Cancelled => {
                    return Err(FollowError::Failed(status.error.unwrap_or_else(
                        || match cancelled {
                            Some(why) => format!("cancelled: {why}"),
                            None => format!("{:?}", status.phase),
                        },
                    )))
                }
                MigrationPhase::SwitchoverUnknown => {
                    let since = *unknown_since.get_or_insert_with(|| {
                        warn!(guest = %name, to = %to.name(), error = ?status.error,
                            "switchover unknown; asking the destination whether it runs the guest");
                        Instant::now()
                    });
                    match to.runs_guest() {
                        Ok(running) => {
                            let _ = source.call(Op::MigrateResolve(MigrateResolveArgs {
                                destination_running: running,
                            }));
                            if !running {
                                return Err(FollowError::Failed(format!(
                                    "the switchover was not confirmed: {} does not run the guest, so it stays on its source",
                                    to.name()
                                )));
                            }
                        }
                        Err(e) if since.elapsed() > how.resolve_within || (how.cancelling)() => {
                            return Err(FollowError::Unknown(format!(
                                "{} could not tell within {:?} whether it runs the guest ({})",
                                to.name(),
                                how.resolve_within,
                                one_line(&e)
                            )));
                        }
                        Err(e) => {
                            debug!(guest = %name, error = %one_line(&e), "the destination cannot tell yet");
                            std::thread::sleep(how.ask_every);
                        }
                    }
                }
                _ => last = Some(status),
            },
            Ok(Err(e)) => {
                return Err(FollowError::Failed(format!(
                    "unreadable migration status: {e}"
                )))
            }
            // The source VMM exits right after a completed migration, and it may also
            // have died: only the destination can tell which.
            Err(e) => return source_gone(to, how, last, &e.to_string()),
        }
        if cancelled.is_none() {
            let why = if (how.cancelling)() {
                Some("the service is stopping")
            } else if Instant::now() > deadline {
                Some("the migration did not end in time")
            } else {
                None
            };
            if let Some(why) = why {
                info!(guest = %name, reason = why, "cancelling the migration");
                let _ = source.call(Op::MigrateCancel);
                cancelled = Some(why);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// The source VMM stopped answering: the migration completed only if the destination
/// runs the guest now.
fn source_gone(
    to: &dyn Destination,
    how: &Follow<'_>,
    last: Option<MigrationStatus>,
    error: &str,
) -> Result<MigrationStatus, FollowError> {
    let since = Instant::now();
    loop {
        match to.runs_guest() {
            Ok(true) => {
                let mut status = last.unwrap_or_default();
                status.phase = MigrationPhase::Completed;
                return Ok(status);
            }
            Ok(false) => {
                return Err(FollowError::Failed(format!(
                    "the source VMM stopped answering ({error}) and {} does not run the guest",
                    to.name()
                )))
            }
            Err(e) if since.elapsed() > how.resolve_within => {
                return Err(FollowError::Unknown(format!(
                    "the source VMM stopped answering ({error}) and {} could not tell within {:?} whether it runs the guest ({})",
                    to.name(),
                    how.resolve_within,
                    one_line(&e)
                )))
            }
            Err(e) => {
                debug!(guest = %how.guest, error = %one_line(&e), "the destination cannot tell yet");
                std::thread::sleep(how.ask_every);
            }
        }
    }
}
