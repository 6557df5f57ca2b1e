//! Prometheus metrics of the service, served at `/metrics` in the OpenMetrics text
//! format (which Prometheus scrapes natively), or in the text format 0.0.4 when the
//! scraper asks for it ([`exposition`]).

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub mod exposition;

use exposition::{openmetrics_to_text004, Format};

/// Labels of `berth_actions`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActionLabels {
    /// `start`, `stop`, `retune`, `migrate`, `local_migrate`, `cold_migrate`, `restart`,
    /// `configure_host`.
    pub kind: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of `berth_revisions`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RevisionLabels {
    /// `valid`, `invalid` or `unreadable`.
    pub result: String,
}

/// Labels of the migration metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MigrationLabels {
    /// `local` (into a new VMM on this host), `remote` (berth-vmm to another host) or
    /// `libvirt` (libvirtd to another host's).
    pub kind: String,
}

/// Labels of `berth_migration_progress_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProgressLabels {
    /// The guest migrating away.
    pub guest: String,
    /// `processed` (sent so far) or `remaining` (left in this pass).
    pub data: String,
}

/// Labels of `berth_switchover_unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SwitchoverLabels {
    /// The guest held paused here.
    pub guest: String,
    /// The destination host that has not said whether it runs the guest.
    pub peer: String,
}

/// Labels of `berth_switchover_resolutions`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResolutionLabels {
    /// Where the guest runs after the resolution: `destination` or `source`.
    pub outcome: String,
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Time of one reconcile pass: observe, plan, dispatch.
    pub reconcile_duration: Histogram,
    /// Actions that corrected drift (a change made outside berth) on a revision the
    /// host had already converged to.
    pub drift_corrections: Counter,
    /// Actions run, by kind and result.
    pub actions: Family<ActionLabels, Counter>,
    /// New heads read, by validation result.
    pub revisions: Family<RevisionLabels, Counter>,
    /// 1 once the first full observe succeeded.
    pub ready: Gauge,
    /// Wall time of migrations away from this host (and local ones), start to switchover.
    pub migration_duration: Family<MigrationLabels, Histogram>,
    /// Time the guest was paused at switchover, as the migration engine reports it.
    pub migration_downtime: Family<MigrationLabels, Histogram>,
    /// Bytes sent by migrations, as the migration engine reports them.
    pub migration_bytes: Family<MigrationLabels, Counter>,
    /// 1 per guest held paused here because its switchover is unknown and the
    /// destination has not said yet whether it runs the guest.
    pub switchover_unknown: Family<SwitchoverLabels, Gauge>,
    /// A migration in flight from this host, from the hypervisor's job statistics.
    pub migration_progress: Family<ProgressLabels, Gauge>,
    /// Unknown switchovers resolved, by where the guest runs afterwards.
    pub switchover_resolutions: Family<ResolutionLabels, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let reconcile_duration = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass (observe, plan, dispatch)",
            reconcile_duration.clone(),
        );
        let drift_corrections = Counter::default();
        registry.register(
            "drift_corrections",
            "Actions that corrected drift on a revision already converged to",
            drift_corrections.clone(),
        );
        let actions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "actions",
            "Actions run, by kind and result",
            actions.clone(),
        );
        let revisions = Family::<RevisionLabels, Counter>::default();
        registry.register(
            "revisions",
            "New heads of the followed branch, by validation result",
            revisions.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 once the first full observe succeeded",
            ready.clone(),
        );
        let migration_duration = Family::<MigrationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        });
        registry.register(
            "migration_duration_seconds",
            "Wall time of migrations run from this host",
            migration_duration.clone(),
        );
        let migration_downtime = Family::<MigrationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 14))
        });
        registry.register(
            "migration_downtime_seconds",
            "Time guests were paused at migration switchover",
            migration_downtime.clone(),
        );
        let migration_bytes = Family::<MigrationLabels, Counter>::default();
        registry.register(
            "migration_bytes",
            "Bytes sent by migrations from this host",
            migration_bytes.clone(),
        );
        let switchover_unknown = Family::<SwitchoverLabels, Gauge>::default();
        registry.register(
            "switchover_unknown",
            "Guests held paused here: their switchover is unknown and the destination has not said whether it runs them",
            switchover_unknown.clone(),
        );
        let migration_progress = Family::<ProgressLabels, Gauge>::default();
        registry.register(
            "migration_progress_bytes",
            "Migrations in flight from this host: bytes sent so far and left in this pass",
            migration_progress.clone(),
        );
        let switchover_resolutions = Family::<ResolutionLabels, Counter>::default();
        registry.register(
            "switchover_resolutions",
            "Unknown switchovers resolved, by where the guest runs afterwards",
            switchover_resolutions.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            reconcile_duration,
            drift_corrections,
            actions,
            revisions,
            ready,
            migration_duration,
            migration_downtime,
            migration_bytes,
            switchover_unknown,
            migration_progress,
            switchover_resolutions,
        }
    }

    /// Counts one action.
    pub fn action(&self, kind: &str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.actions
            .get_or_create(&ActionLabels {
                kind: kind.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        // A migration to another host is recorded from what its VMM reports
        // ([`Metrics::migration`]); a local one by its wall time.
        if kind == "local_migrate" && ok {
            self.migration_duration
                .get_or_create(&MigrationLabels {
                    kind: "local".to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Records one completed migration as its source VMM reported it: its duration,
    /// the guest's pause at switchover (when reported) and the bytes sent.
    pub fn migration(&self, kind: &str, took: Duration, downtime_secs: Option<f64>, bytes: u64) {
        let labels = MigrationLabels {
            kind: kind.to_owned(),
        };
        self.migration_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(downtime) = downtime_secs {
            self.migration_downtime
                .get_or_create(&labels)
                .observe(downtime);
        }
        self.migration_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Shows the progress of `guest`'s migration in flight.
    pub fn migration_progress(&self, guest: &str, processed: u64, remaining: u64) {
        for (data, bytes) in [("processed", processed), ("remaining", remaining)] {
            self.migration_progress
                .get_or_create(&ProgressLabels {
                    guest: guest.to_owned(),
                    data: data.to_owned(),
                })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// `guest`'s migration is no longer in flight.
    pub fn migration_progress_done(&self, guest: &str) {
        for data in ["processed", "remaining"] {
            self.migration_progress.remove(&ProgressLabels {
                guest: guest.to_owned(),
                data: data.to_owned(),
            });
        }
    }

    /// Shows `guest` held paused for an answer from `peer` (`stuck`), or no more.
    pub fn switchover_unknown(&self, guest: &str, peer: &str, stuck: bool) {
        let labels = SwitchoverLabels {
            guest: guest.to_owned(),
            peer: peer.to_owned(),
        };
        if stuck {
            self.switchover_unknown.get_or_create(&labels).set(1);
        } else {
            self.switchover_unknown.remove(&labels);
        }
    }

    /// Counts one resolved switchover: the guest runs on the `destination` or the
    /// `source`.
    pub fn switchover_resolved(&self, outcome: &str) {
        self.switchover_resolutions
            .get_or_create(&ResolutionLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one new head.
    pub fn revision(&self, result: &str) {
        self.revisions
            .get_or_create(&RevisionLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The metrics in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Text004 => openmetrics_to_text004(&self.encode()),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_families() {
        let m = Metrics::new();
        m.action("retune", true, Duration::from_millis(3));
        m.action("migrate", true, Duration::from_millis(300));
        m.migration("remote", Duration::from_millis(250), Some(0.002), 4096);
        m.action("start", false, Duration::from_millis(1));
        m.drift_corrections.inc();
        m.reconcile_duration.observe(0.002);
        m.switchover_unknown("web-1", "kvm02", true);
        m.switchover_unknown("web-2", "kvm02", true);
        m.switchover_unknown("web-2", "kvm02", false);
        m.switchover_resolved("source");
        let text = m.encode();
        for line in [
            "berth_actions_total{kind=\"retune\",result=\"ok\"} 1",
            "berth_actions_total{kind=\"start\",result=\"error\"} 1",
            "berth_drift_corrections_total 1",
            "berth_reconcile_duration_seconds_count 1",
            "berth_migration_duration_seconds_count{kind=\"remote\"} 1",
            "berth_migration_downtime_seconds_count{kind=\"remote\"} 1",
            "berth_migration_bytes_total{kind=\"remote\"} 4096",
            "berth_switchover_unknown{guest=\"web-1\",peer=\"kvm02\"} 1",
            "berth_switchover_resolutions_total{outcome=\"source\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(!text.contains("guest=\"web-2\""), "{text}");
    }
}
