//! Live migration between berth-vmm processes.
//!
//! - [`wire`]: the encrypted, authenticated, bounds-checked stream format;
//! - [`fault`]: `BERTH_FAULT`, the test-only fault injection;
//! - [`state`]: vCPU, VM and device state ([`state::Persist`] per component);
//! - [`ram`]: guest RAM as the migration reads and writes it, and the dirty set;
//! - [`policy`]: when to stop copying, throttle, give up or switch over (pure);
//! - [`precheck`]: what the destination checks before any byte of memory moves;
//! - [`throttle`]: auto-converge's vCPU throttle;
//! - [`send`]: the source (the `migrate` control op);
//! - [`receive`]: the destination's stream handling; [`incoming`]: `berth-vmm run
//!   --incoming`, the destination process around it;
//! - [`control`]: the migration's status and control-op arguments.
//!
//! # The switchover rule
//!
//! The source pauses, sends the last dirty pages and the state; the destination
//! restores everything into KVM and answers `Loaded`. Until the source *sends* `Commit`,
//! any failure (connection lost, destination dead, bad token, corrupt frame, `Abort`,
//! cancel, timeout) makes the source resume the guest and the destination discard it
//! and exit non-zero. The destination runs the guest only after reading `Commit`.
//!
//! Once `Commit` is sent, the source never resumes the guest by itself: if `Running`
//! comes back it answers `Done` and shuts down (migration complete); if it does not (connection lost
//! after `Commit`), the source keeps the guest paused and reports the phase
//! `switchoverUnknown`. Only the `migrateResolve` control op ends that state: with
//! `destinationRunning: true` the source shuts down, with `false` it resumes. The caller
//! (the reconciler) answers it from the destination's own status: the destination has
//! run the guest if and only if it read `Commit`, and then its status says so (or it is
//! gone without having run: it exits non-zero before `Commit`). Its durable committed
//! marker, written before any vCPU starts, says so too when the VMM is gone: it stays
//! until the source's `Done` (after `Running`) says nobody will ask, or until the
//! reconciler has resolved the source. So the guest never runs
//! in two places; the price is that a connection lost in that one round trip needs an
//! outside answer before the guest runs again. From sending `Commit` until `Running`
//! or `migrateResolve`, the source also refuses `shutdown`, SIGTERM and `resume` on
//! request (`Migration::holds_the_only_sure_copy`; `shutdown` with `force` overrides):
//! exiting could lose the only copy, resuming could run a second one.
//!
//! # Two VMMs of one guest on one host
//!
//! The incoming VMM lives in `<state>/guests/<name>.incoming/` (its own `vmm.lock`,
//! control socket, console log) and cgroup `berth/<name>.incoming`; guest names are DNS
//! labels, so these never clash with a guest. After `Commit` the guest runs there, and
//! the destination then takes `<state>/guests/<name>/vmm.lock` (waiting until the
//! source, which holds it, has exited; at once on another host), moves its control
//! socket and console log into `<state>/guests/<name>/` (what the guest wrote since the
//! commit is appended to the source's `console.log`, so its history stays), moves
//! itself into cgroup `berth/<name>` (once the source's is gone) and removes the
//! `.incoming` directory (all but a committed marker the source has not answered with
//! `Done`) and cgroup. The one-VMM-per-guest lock
//! thus passes at commit: before it, `guests/<name>/` belongs to the source; after the
//! source exits, to the destination. A reader looking for a guest's VMM checks
//! `guests/<name>/` and then `guests/<name>.incoming/`.

pub mod control;
pub mod fault;
pub mod incoming;
pub mod policy;
pub mod precheck;
pub mod ram;
pub mod receive;
pub mod seal;
pub mod send;
pub mod state;
pub mod throttle;
pub mod wire;

pub use control::{MigrateArgs, MigrateResolveArgs, Migration, MigrationPhase, MigrationStatus};

/// How long a connection may be silent before it is taken as lost. Idle connections
/// carry a keepalive `Info` frame every [`KEEPALIVE`].
pub const LINK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often an idle connection sends a keepalive.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);
/// Most parallel connections one migration may use.
pub const MAX_CONNECTIONS: u32 = 8;
